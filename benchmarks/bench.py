"""Speed and memory of the method scripts side by side.

Each case runs one script for a fixed number of optimizer steps on random data of the real
dataset's shape (`--fake-data`), then one table is written: peak CUDA memory (or, on CPU, the
activation memory held for backward), memory relative to bp.py, images/s and time per batch
relative to bp.py, for the same arch, dataset shape, batch and precision.

    python benchmarks/bench.py --preset gpu --out benchmarks/results.md        # the README table
    python benchmarks/bench.py --cases dgl:resnet32:4:cifar10:64 --steps 4 --device cpu   # a CPU smoke run
    python benchmarks/bench.py --preset gpu --extra "--bf16 --channels-last"

    python benchmarks/bench.py --preset infopro-star   # InfoPro* Table 3 (ResNet-110, balanced K=2,3,4)
    python benchmarks/bench.py --preset contsup        # ContSup R0/E/R1/R1E, ResNet-32 K=8/16
    python benchmarks/bench.py --preset imagenet       # ResNet-101 K=2 InfoPro*, ResNet-34 AugLocal, 128/GPU

A case is METHOD:ARCH:K:DATASET:BATCH[:OPTIONS], OPTIONS being the script's own flags joined by
commas, e.g. infopro:resnet110:2:cifar10:1024:--split=balanced. A bp.py case is added for every
(arch, dataset, batch) that lacks one (so the smoke run above also runs bp:resnet32:1:cifar10:64).
Measurement: common.Run (peak after 2 warm-up steps, evaluation excluded).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("bp", "dgl", "infopro", "auglocal", "contsup", "mlaan")
LOCAL = METHODS[1:]
PRESETS = {  # the README's GPU table (issue: speed and memory side by side)
    "gpu": [f"{m}:resnet32:16:cifar10:1024" for m in LOCAL]
           + [f"{m}:resnet110:{k}:cifar10:1024" for k in (16, 55) for m in LOCAL]
           + [f"{m}:resnet110:16:stl10:128" for m in LOCAL],
    "infopro-star": [f"infopro:resnet110:{k}:cifar10:1024:--split=balanced" for k in (2, 3, 4)],
    "contsup": [f"contsup:resnet32:{k}:cifar10:1024:--context={c}" for k in (8, 16) for c in ("R0", "E", "R1", "R1E")],
    "imagenet": ["infopro:resnet101:2:imagenet:128:--split=balanced", "auglocal:resnet34:17:imagenet:128"],
    "ci": ["bp:resnet32:1:cifar10:32", "dgl:resnet32:4:cifar10:32"],
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


def run_case(case, steps, device, extra, workdir):
    out = tempfile.mkdtemp(prefix="{method}-{arch}-k{k}-{dataset}-b{batch}-".format(**case), dir=workdir)
    cmd = [sys.executable, os.path.join(ROOT, f"{case['method']}.py"), "--dataset", case["dataset"], "--fake-data",
           "--arch", case["arch"], "--k", str(case["k"]), "--batch-size", str(case["batch"]),
           "--steps", str(steps), "--out", out, *case["options"], *shlex.split(extra)]
    if device:
        cmd += ["--device", device]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {**case, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    memory = summary["peak_mem_bytes"] if summary["peak_mem_bytes"] is not None else summary["act_mem_bytes"]
    return {**case, "memory": memory, "cuda": summary["peak_mem_bytes"] is not None,
            "images_per_s": summary["images_per_s"], "device": summary["device"], "torch": summary["torch"]}


def table(rows, extra):
    base = {(r["arch"], r["dataset"], r["batch"]): r for r in rows if r["method"] == "bp" and "error" not in r}
    kind = "peak CUDA MiB" if any(r.get("cuda") for r in rows) else "activation MiB (CPU)"
    precision = extra or "fp32"
    lines = [f"| method | options | arch | K | data | batch | precision | {kind} | memory / bp | images/s | time / bp |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        options = " ".join(r["options"]) or "-"
        head = f"| {r['method']} | {options} | {r['arch']} | {r['k']} | {r['dataset']} | {r['batch']} | {precision} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | |")
            continue
        bp = base.get((r["arch"], r["dataset"], r["batch"]))
        mem_ratio = f"{r['memory'] / bp['memory']:.2f}" if bp else "-"
        time_ratio = f"{bp['images_per_s'] / r['images_per_s']:.2f}" if bp and r["images_per_s"] else "-"
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        lines.append(f"{head} {r['memory'] / 2**20:.0f} | {mem_ratio} | {ips} | {time_ratio} |")
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
    p.add_argument("--out", default=None, help="write the table to this file too")
    args = p.parse_args(argv)
    cases = [parse_case(c) for c in (PRESETS[args.preset] if args.preset else []) + args.cases]
    if not cases:
        raise SystemExit("error: no cases: pass --preset or --cases")
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run_case(c, args.steps, args.device, args.extra, workdir) for c in with_bp_baselines(cases)]
    text = table(rows, args.extra)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
