"""Predicted speed-up of module-parallel training (`--pipeline`) for layouts this machine cannot run.

Every module's training step is timed here the way a pipelined run's own probe times it
(common.probe_modules: random images of the dataset's shape, the least of its timed passes after
a warm-up), the modules are cut into P stages as `--pipeline` cuts them (common.balanced_cuts),
and the speed-up over one process is predicted as the step time over the slowest stage's time.
On N devices laid out as P stages x R data-parallel replicas (R = N / P) the prediction is R x
the P-stage speed-up. Assumed: communication costs nothing (the activations between stages, the
gradient all-reduce between replicas) and data parallelism scales linearly, so every prediction
is an upper bound, and plain data parallelism (1 x N) would be N x. The module times are this
machine's: a GPU's differ (its early high-resolution layers with few channels run nearer its
peak), so the table says how evenly the modules can be cut on this device, not what a GPU reaches.

    python benchmarks/predict_pipeline.py        # the README table: ResNet-110, K=16 and 55, 4 and 8 stages, 8 GPUs
    python benchmarks/predict_pipeline.py --cases contsup:resnet32:8:cifar10:256:--context=R1E --stages 2 3 --gpus 4

A case is METHOD:ARCH:K:DATASET:BATCH[:OPTIONS] as in bench.py; BATCH is the batch the modules
are timed on (a CPU takes seconds per ResNet-110 step at the paper's 1024).
"""
import argparse
import contextlib
import datetime
import functools
import importlib
import io
import os
import platform
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import common  # noqa: E402
from bench import parse_case  # noqa: E402

CASES = [f"{m}:resnet110:{k}:cifar10:128" for m in ("dgl", "infopro") for k in (16, 55)]


def module_seconds(case, device):
    """Each module's training-step seconds, the model built by the method script's own functions
    (the lines of its main() before training) and timed by the pipeline's probe."""
    script = importlib.import_module(case["method"])
    argv = ["--dataset", case["dataset"], "--fake-data", "--arch", case["arch"], "--k", str(case["k"]),
            "--batch-size", str(case["batch"]), "--device", device, "--pipeline", *case["options"]]
    with contextlib.redirect_stdout(io.StringIO()):  # the methods' notes on their resolved settings
        args = common.parse_args(argv, "", case["method"], case["k"], 1, script.method_args,
                                 no_pipeline=getattr(script, "NO_PIPELINE", None))
        dev = torch.device(device)
        data = common.load_data(args, dev)
        net = common.build_backbone(args, data, dev)
        modules = common.make_modules(args, net, data)
        aux = script.build_aux(args, net, modules, data).to(dev)
        step = functools.partial(script.local_step, net, modules, aux, args)
        _, seconds, *_ = common.probe_modules(nn.ModuleDict({"net": net, "aux": aux}), data, step, len(modules),
                                              args, dev, args.batch_size)
    return seconds


def speedup(seconds, stages):
    """The step time over the slowest stage's, cut as --pipeline cuts (None: fewer modules than stages)."""
    if stages > len(seconds):
        return None
    bounds = [0, *common.balanced_cuts(seconds, stages), len(seconds)]
    return sum(seconds) / max(sum(seconds[a:b]) for a, b in zip(bounds, bounds[1:]))


def table(rows, stages, gpus):
    layouts = [(p, gpus // p) for p in stages if gpus % p == 0 and p > 1]
    head = ["method", "arch", "K", "data", "batch timed", "step s", *(f"{p} stages" for p in stages),
            *(f"{gpus} GPUs: {p} x {r}" for p, r in layouts)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"
    for case, seconds in rows:
        pipelined = {p: speedup(seconds, p) for p in stages}
        cells = [case["method"], case["arch"], case["k"], case["dataset"], case["batch"], f"{sum(seconds):.2f}",
                 *(fmt(pipelined[p]) for p in stages),
                 *(fmt(pipelined[p] and r * pipelined[p]) for p, r in layouts)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def cpu_name():
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=CASES, help="METHOD:ARCH:K:DATASET:BATCH[:OPTIONS] ...")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8], help="pipeline stages P to predict")
    p.add_argument("--gpus", type=int, default=8, help="devices N for the P x R layouts (R = N / P replicas)")
    p.add_argument("--device", default="cpu", help="where the modules are timed")
    p.add_argument("--threads", type=int, default=1, help="CPU threads while timing: one, as every process of a "
                   "pipelined run under torchrun (two made this 2-core machine's module times vary by half)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for case in map(parse_case, args.cases):
        print("timing the modules of {method}:{arch}:{k}:{dataset}:{batch}".format(**case), file=sys.stderr, flush=True)
        rows.append((case, module_seconds(case, args.device)))
    machine = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
               else f"{cpu_name()}, {torch.get_num_threads()} torch thread(s)")
    text = (table(rows, args.stages, args.gpus) + f"\npredicted from module times measured on {machine}, torch "
            f"{torch.__version__}, {datetime.date.today()}; step s: one training step of all modules\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
