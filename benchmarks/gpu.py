"""The one-shot GPU kit: every CUDA table the README needs, in one command, on one H100/H200.

    python benchmarks/gpu.py --out benchmarks/gpu          # on the GPU: about 4.5 minutes, at most 8
    python benchmarks/gpu.py --dry-run --out /tmp/gpu-dry   # the same cases on the CPU, 1 step, batch 2-4

Tables (markdown, in OUT/gpu.md, ready for the README's Speed section), each with peak CUDA memory,
images/s, training FLOPs and the fraction of the GPU's peak FLOP/s reached, relative to bp.py:
1. InfoPro* Table 3 (ResNet-110, balanced K=2/3/4, batch 1024, fp32) beside the paper's GB;
2. all six methods at ResNet-32 K=16, ResNet-110 K=16 and K=55 (batch 1024, CIFAR shapes) and
   ResNet-110 K=16 on STL-10 shapes (batch 128), in fp32;
3. the same with --bf16 --channels-last.

Every case runs in this process (no start-up per case) for STEPS optimizer steps, the first
WARMUP_STEPS (2) untimed: step 1 also counts the FLOPs. The fraction of peak is training FLOPs per
image (forward and every backward, counted exactly) x images/s / the peak assumed: dense tensor-core
TFLOP/s of an H100 SXM, which the H200 shares: TF32 494.7 for fp32 runs (PyTorch's cuDNN convolutions
use TF32 by default, `torch.backends.cudnn.allow_tf32`), BF16 989.4 (NVIDIA H100 datasheet; sparsity
excluded). Override with --peak-fp32 / --peak-bf16 on other GPUs.

Sizing (no GPU was lent to time it): 52 cases (4 + 24 + 24, bp.py baselines included). Each case
costs set-up (data, model, cuDNN autotuning in the warm-up, the FLOP-counted first step, one
evaluation batch; about 3 s assumed) plus 8 steps. From the exact FLOP counts (the largest case,
MLAAN ResNet-110 K=55, 9.5 GFLOP per image, 9.8 TFLOP per step) at 3% of peak (what small-channel
CIFAR ResNets reach; at least 0.3 s per step for launch-bound K=55) that is about 4.5 minutes; the
dry run prints this estimate for the cases it runs. On the GPU the kit starts no case after
--budget-s (default 450 s), so it ends within 8 minutes, and lists any case it skipped. The dry run
has no budget: it tries every case, and exits 1 naming the cases that failed.
"""
import argparse
import datetime
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import PRESETS, parse_case, run_in_process, table, with_bp_baselines  # noqa: E402
from figures import PAPER_E2E_GB, PAPER_INFOPRO_STAR_GB  # noqa: E402

STEPS = 8                                    # 2 warm-up + 6 timed
PEAK_TFLOPS = {"fp32": 494.7, "bf16": 989.4}  # H100 SXM / H200 dense: TF32 (fp32 convs), BF16
# For the time estimate only: set-up per case, the fraction of peak reached, and a floor per step for
# the launch-bound cases (K=55: thousands of small kernels per step).
SETUP_S, ASSUMED_FRACTION, STEP_FLOOR_S = 3.0, 0.03, 0.3
FAST = "--bf16 --channels-last"
# (title, cases, extra flags, precision), the paper's headline first in case the budget runs out
TABLES = [("InfoPro* Table 3 (fp32)", PRESETS["infopro-star"], "", "fp32"),
          ("fp32", PRESETS["gpu"], "", "fp32"),
          ("bf16, channels last", PRESETS["gpu"], FAST, "bf16")]
DRY_BATCH = {"cifar10": 4, "stl10": 2}


def estimate_s(flops, batch, steps, precision):
    """Estimated GPU seconds of a case from its exact training FLOPs per image: set-up, then the
    steps at the assumed fraction of the peak, none faster than the floor."""
    return SETUP_S + steps * max(STEP_FLOOR_S, batch * flops / (ASSUMED_FRACTION * PEAK_TFLOPS[precision] * 1e12))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("benchmarks", "gpu"), help="folder for gpu.md")
    p.add_argument("--dry-run", action="store_true", help="the same cases on the CPU: 1 step, batch 4 (STL-10: 2)")
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="only the cases whose METHOD:ARCH:K:DATASET contains one of these (a bp.py baseline is kept)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"steps per case (default {STEPS}, 2 are warm-up)")
    p.add_argument("--budget-s", type=float, default=450, help="on the GPU, start no case after this many seconds")
    p.add_argument("--peak-fp32", type=float, default=PEAK_TFLOPS["fp32"], help="peak TFLOP/s of fp32 runs")
    p.add_argument("--peak-bf16", type=float, default=PEAK_TFLOPS["bf16"], help="peak TFLOP/s of bf16 runs")
    args = p.parse_args(argv)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device is visible; run on the GPU, or pass --dry-run to try the cases on CPU")
    device, steps = ("cpu", 1) if args.dry_run else ("cuda", args.steps)
    peaks = {"fp32": args.peak_fp32, "bf16": args.peak_bf16}
    budget_s = math.inf if args.dry_run else args.budget_s  # a dry run tries every case
    start, sections, estimate, skipped, failed, count = time.perf_counter(), [], 0.0, [], [], 0
    for title, texts, extra, precision in TABLES:
        cases = [parse_case(t) for t in texts]
        cases = [c for c in cases if args.only is None or any(
            o in "{method}:{arch}:{k}:{dataset}".format(**c) for o in args.only)]
        if not cases:
            continue
        rows = []
        for case in with_bp_baselines(cases):
            run = {**case, "batch": DRY_BATCH[case["dataset"]]} if args.dry_run else case
            label = ":".join(str(run[key]) for key in ("method", "arch", "k", "dataset", "batch")) + " ".join(
                ["", *case["options"]])
            if time.perf_counter() - start > budget_s:
                skipped.append(f"{label} ({title})")
                continue
            t, count = time.perf_counter(), count + 1
            result = run_in_process(run, steps, device, extra)
            rows.append(result)
            line = f"{title}: {label}: {time.perf_counter() - t:.1f} s"
            if "error" in result:
                failed.append(f"{label} ({title}: {result['error']})")
            else:
                estimate += estimate_s(result["flops"], case["batch"], args.steps, precision)
                line += f", {result['flops'] / 1e9:.2f} GFLOP/image"
            print(line, flush=True)
        text = table(rows, extra, peaks[precision])
        if title.startswith("InfoPro*"):
            text += "\nPaper (InfoPro Table 3, batch 1024): E2E {} GB; ".format(PAPER_E2E_GB) + ", ".join(
                f"K={k} {gb} GB ({gb / PAPER_E2E_GB:.2f})" for k, gb in PAPER_INFOPRO_STAR_GB.items()) + "\n"
        sections.append(f"### {title}\n\n{text}")
    elapsed = time.perf_counter() - start
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    kind = "dry run on the CPU, 1 step per case, tiny batches: not GPU figures" if args.dry_run else (
        f"{torch.cuda.get_device_name()}, {steps} steps per case, 2 of them warm-up")
    head = (f"GPU kit ({kind}), torch {torch.__version__}, {when}: {count} cases in {elapsed:.0f} s. Fraction "
            f"of peak against {peaks['fp32']:g} (fp32: TF32) / {peaks['bf16']:g} (bf16) TFLOP/s. Estimated GPU "
            f"time of these cases ({args.steps} steps each): {estimate:.0f} s.")
    if skipped:
        head += f"\n\nNot run (over --budget-s {args.budget_s:g}): " + "; ".join(skipped)
    text = head + "\n\n" + "\n".join(sections)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(text)
    print(text)
    if args.dry_run and failed:
        raise SystemExit(f"error: the dry run failed for {len(failed)} cases: " + "; ".join(failed))
    return text


if __name__ == "__main__":
    main()
