"""Speed and memory of the method scripts side by side.

Each case runs one script for a fixed number of optimizer steps on random data of the real
dataset's shape (`--fake-data`), then one table is written: peak CUDA memory (or, on CPU, the
activation memory held for backward), memory relative to bp.py, images/s and time per batch
relative to bp.py, training FLOPs per image (forward and every backward, counted exactly) and
compute relative to bp.py, for the same arch, dataset shape, batch and precision.

    python benchmarks/bench.py --preset gpu --out benchmarks/fp32.md          # the README table
    python benchmarks/bench.py --preset gpu --extra "--bf16 --channels-last" --out benchmarks/bf16.md
    python benchmarks/bench.py --cases dgl:resnet32:4:cifar10:32 --steps 4 --device cpu   # a CPU smoke run

    python benchmarks/bench.py --preset infopro-star   # InfoPro* Table 3 (ResNet-110, balanced K=2,3,4)
    python benchmarks/bench.py --preset contsup        # ContSup R0/E/R1/R1E, ResNet-32 K=8/16
    python benchmarks/bench.py --preset imagenet       # ResNet-101 K=2 InfoPro*, ResNet-34 AugLocal, 128/GPU
    python benchmarks/bench.py --preset pipeline --pipeline 2 --steps 24 --device cpu  # pipelined: measured, predicted
    python benchmarks/bench.py --preset predsim        # PredSim / MAN / HPFF at their published K (also: man, hpff)

A case is METHOD:ARCH:K:DATASET:BATCH[:OPTIONS], OPTIONS being the script's own flags joined by
commas, e.g. infopro:resnet110:2:cifar10:1024:--split=balanced. A bp.py case is added for every
(arch, dataset, batch) that lacks one (so the smoke run above also runs bp:resnet32:1:cifar10:64).
Measurement: common.Run (peak after 2 warm-up steps, evaluation excluded).
"""
import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run_in_process imports the method scripts
METHODS = ("bp", "dgl", "infopro", "auglocal", "contsup", "mlaan", "predsim", "man", "hpff")
LOCAL = METHODS[1:6]  # the GPU kit's methods (the six of the seed papers); predsim, man and hpff have presets
PRESETS = {  # the README's GPU table (issue: speed and memory side by side)
    "gpu": [f"{m}:resnet32:16:cifar10:1024" for m in LOCAL]
           + [f"{m}:resnet110:{k}:cifar10:1024" for k in (16, 55) for m in LOCAL]
           + [f"{m}:resnet110:16:stl10:128" for m in LOCAL],
    "infopro-star": [f"infopro:resnet110:{k}:cifar10:1024:--split=balanced" for k in (2, 3, 4)],
    "contsup": [f"contsup:resnet32:{k}:cifar10:1024:--context={c}" for k in (8, 16) for c in ("R0", "E", "R1", "R1E")],
    "imagenet": ["infopro:resnet101:2:imagenet:128:--split=balanced", "auglocal:resnet34:17:imagenet:128"],
    # The published configurations of the three methods MLAAN and AugLocal's tables compare with.
    "predsim": ["predsim:resnet32:16:cifar10:1024", "predsim:resnet110:55:cifar10:1024", "predsim:resnet110:16:stl10:128"],
    "man": ["man:resnet32:15:cifar10:1024", "man:resnet110:54:cifar10:1024", "infopro:resnet32:16:cifar10:1024"],
    "hpff": ["hpff:resnet32:15:cifar10:1024", "hpff:resnet110:54:cifar10:1024", "hpff:resnet110:16:stl10:128"],
    "ci": ["bp:resnet32:1:cifar10:32", "dgl:resnet32:4:cifar10:32"],
    # Module-parallel training, with --pipeline P: one process against P pipelined stages, a thread each.
    "pipeline": [f"{m}:resnet32:{k}:cifar10:256" for m, k in (("dgl", 2), ("dgl", 4), ("infopro", 4), ("auglocal", 4),
                                                                ("predsim", 4), ("dgl", 16), ("infopro", 16))],
}


def parse_case(text):
    try:
        method, arch, k, dataset, batch, *options = text.split(":", 5)
        case = dict(method=method, arch=arch, k=int(k), dataset=dataset, batch=int(batch),
                    options=options[0].split(",") if options and options[0] else [])
    except ValueError:
        raise SystemExit(f"error: bad case {text!r}: write METHOD:ARCH:K:DATASET:BATCH[:OPTIONS], e.g. "
                         f"dgl:resnet32:16:cifar10:1024 or contsup:resnet32:8:cifar10:1024:--context=R1E")
    if method not in METHODS:
        raise SystemExit(f"error: unknown method {method!r} in {text!r}: choose one of {', '.join(METHODS)}")
    return case


def with_bp_baselines(cases):
    groups = {(c["arch"], c["dataset"], c["batch"]) for c in cases}
    have = {(c["arch"], c["dataset"], c["batch"]) for c in cases if c["method"] == "bp"}
    extra = [dict(method="bp", arch=a, k=1, dataset=d, batch=b, options=[]) for a, d, b in sorted(groups - have)]
    return extra + cases


def script_args(case, steps, device, extra, out):
    """The command-line arguments of a case's script."""
    argv = ["--dataset", case["dataset"], "--fake-data", "--arch", case["arch"], "--k", str(case["k"]),
            "--batch-size", str(case["batch"]), "--steps", str(steps), "--out", out, *case["options"],
            *shlex.split(extra)]
    return argv + (["--device", device] if device else [])


def row(case, summary):
    memory = summary["peak_mem_bytes"] if summary["peak_mem_bytes"] is not None else summary["act_mem_bytes"]
    return {**case, "memory": memory, "cuda": summary["peak_mem_bytes"] is not None,
            "images_per_s": summary["images_per_s"], "flops": summary["train_flops_per_image"],
            "device": summary["device"], "torch": summary["torch"]}


def run_case(case, steps, device, extra, workdir):
    """One case in its own process (nothing left over from other cases in the CUDA allocator)."""
    out = tempfile.mkdtemp(prefix="{method}-{arch}-k{k}-{dataset}-b{batch}-".format(**case), dir=workdir)
    cmd = [sys.executable, os.path.join(ROOT, f"{case['method']}.py"), *script_args(case, steps, device, extra, out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {**case, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    with open(os.path.join(out, "summary.json")) as f:
        return row(case, json.load(f))


def run_pipeline_case(case, procs, steps, device, extra, workdir):
    """Images/s of a case in one process and as `procs` pipelined stages under torchrun (--pipeline),
    one thread per process, and each stage's share of the FLOPs and activation memory."""
    result = {**case}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    for mode, launch, flags in (("sequential", [sys.executable], []), ("pipelined", torchrun, ["--pipeline"])):
        out = tempfile.mkdtemp(prefix="{method}-k{k}-".format(**case) + mode, dir=workdir)
        script = os.path.join(ROOT, f"{case['method']}.py")
        cmd = [*launch, script, *script_args(case, steps, device, extra, out), *flags]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            return {**case, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        result.update({mode: summary["images_per_s"], "device": summary["device"], "torch": summary["torch"],
                       "stages": summary.get("stages", result.get("stages")),
                       "predicted": summary.get("predicted_speedup", result.get("predicted"))})
    return result


def pipeline_table(rows, procs):
    """Measured speed-up beside the predicted one: the probe's step time over its slowest stage's."""
    lines = [f"| method | arch | K | data | batch | images/s, 1 process | images/s, {procs} stages | speed-up, "
             "predicted | speed-up, measured | stages: modules (share of step time / of FLOPs, activation MiB) |",
             "|---" * 10 + "|"]
    for r in rows:
        head = f"| {r['method']} | {r['arch']} | {r['k']} | {r['dataset']} | {r['batch']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | |")
            continue
        stages = "; ".join(f"{s['modules'][0]}-{s['modules'][-1]} ({s['time_share']:.0%} / {s['flops_share']:.0%}, "
                           f"{s['act_mem_bytes'] / 2**20:.0f})" for s in r["stages"])
        lines.append(f"{head} {r['sequential']:.1f} | {r['pipelined']:.1f} | {r['predicted']:.2f}x | "
                     f"{r['pipelined'] / r['sequential']:.2f}x | {stages} |")
    ok = [r for r in rows if "error" not in r]
    if ok:
        lines.append(f"\n{ok[0]['device']}, torch {ok[0]['torch']}, one thread per process")
    return "\n".join(lines) + "\n"


def run_in_process(case, steps, device, extra):
    """One case in this process: no interpreter, import and CUDA start-up per case (the GPU kit and
    the CPU figures run many short cases). Freed memory goes back to the CUDA allocator first."""
    import torch
    script = importlib.import_module(case["method"])
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        try:
            summary = script.main(script_args(case, steps, device, extra, os.path.join(out, "run")))
        except (SystemExit, RuntimeError) as e:  # a refused option, CUDA out of memory: report, go on
            return {**case, "error": str(e).splitlines()[0]}
        finally:
            importlib.import_module("common").release_run()  # after an error: the lock and signal handlers
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return row(case, summary)


def table(rows, extra, peak_tflops=None):
    """The markdown table; with `peak_tflops` (the device's peak TFLOP/s at this precision) also the
    fraction of it that each case reaches: training FLOPs per image x images/s / peak."""
    base = {(r["arch"], r["dataset"], r["batch"]): r for r in rows if r["method"] == "bp" and "error" not in r}
    kind = "peak CUDA MiB" if any(r.get("cuda") for r in rows) else "activation MiB (CPU)"
    precision = extra or "fp32"
    peak = f" % of {peak_tflops:g} TFLOP/s |" if peak_tflops else ""
    lines = [f"| method | options | arch | K | data | batch | precision | {kind} | memory / bp | GFLOP/image "
             f"| compute / bp | images/s | time / bp |{peak}", "|---" * (13 + bool(peak)) + "|"]
    for r in rows:
        options = " ".join(r["options"]) or "-"
        head = f"| {r['method']} | {options} | {r['arch']} | {r['k']} | {r['dataset']} | {r['batch']} | {precision} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} |" + " |" * (5 + bool(peak)))
            continue
        bp = base.get((r["arch"], r["dataset"], r["batch"]))
        mem_ratio = f"{r['memory'] / bp['memory']:.2f}" if bp else "-"
        flop_ratio = f"{r['flops'] / bp['flops']:.2f}" if bp else "-"
        time_ratio = f"{bp['images_per_s'] / r['images_per_s']:.2f}" if bp and r["images_per_s"] else "-"
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        line = (f"{head} {r['memory'] / 2**20:.0f} | {mem_ratio} | {r['flops'] / 1e9:.2f} | {flop_ratio} | {ips} "
                f"| {time_ratio} |")
        if peak:
            reached = r["flops"] * r["images_per_s"] / (peak_tflops * 1e12) if r["images_per_s"] else None
            line += f" {100 * reached:.1f} |" if reached else " - |"
        lines.append(line)
    ok = [r for r in rows if "error" not in r]
    if ok:
        lines.append(f"\n{ok[0]['device']}, torch {ok[0]['torch']}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=[], help="METHOD:ARCH:K:DATASET:BATCH[:OPTIONS] ...")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named list of cases")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per case (2 are warm-up)")
    p.add_argument("--device", default=None)
    p.add_argument("--extra", default="", help="flags passed to every script, e.g. '--bf16 --channels-last'")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s at this precision: adds the fraction of it each case reaches")
    p.add_argument("--pipeline", type=int, default=None, metavar="P",
                   help="compare each case in one process with P pipelined stages under torchrun (--pipeline)")
    p.add_argument("--out", default=None, help="write the table to this file too")
    args = p.parse_args(argv)
    cases = [parse_case(c) for c in (PRESETS[args.preset] if args.preset else []) + args.cases]
    if not cases:
        raise SystemExit("error: no cases: pass --preset or --cases")
    with tempfile.TemporaryDirectory() as workdir:
        if args.pipeline:
            rows = [run_pipeline_case(c, args.pipeline, args.steps, args.device, args.extra, workdir) for c in cases]
        else:
            rows = [run_case(c, args.steps, args.device, args.extra, workdir) for c in with_bp_baselines(cases)]
    text = pipeline_table(rows, args.pipeline) if args.pipeline else table(rows, args.extra, args.peak_tflops)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
