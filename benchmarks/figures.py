"""Activation memory and training compute of every method relative to bp.py against K: exact on any
device, so the CPU measures them (no wall times here; those need a GPU, see gpu.sh).

Each case is one training step of a method script (`--fake-data --steps 1`), run in this process;
`act_mem_bytes` (the bytes autograd holds for backward) and `train_flops_per_image` (forward and
every backward, aux nets and context encoders included) come from its summary.json. Writes a
markdown table of ratios to bp.py (figures.md) and a PNG figure (figures.png), plus the InfoPro*
Table 3 rows beside the paper's ratios.

    python benchmarks/figures.py                      # about a minute on 2 idle CPU cores (20 when they are busy)
    python benchmarks/figures.py --out /tmp/fig --archs resnet32 --ks 2 4 --methods bp dgl   # a subset

Batches are small (ResNet-32: 8, ResNet-110: 4 CIFAR-sized or 2 STL-10-sized images), to keep the
run short on a shared CPU: FLOPs per image do not depend on the batch and activation bytes grow in
proportion to it, so the ratios are those of the papers' batches (InfoPro ResNet-110 K=16 at batch
4 and 32: 0.1309 and 0.1311 of bp.py).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import METHODS, ROOT, run_in_process  # noqa: E402

# (title, arch, dataset shape, batch, the K of the x axis)
SETTINGS = [("ResNet-32, CIFAR (32 px)", "resnet32", "cifar10", 8, (2, 4, 8, 16)),
            ("ResNet-110, CIFAR (32 px)", "resnet110", "cifar10", 4, (2, 16, 55)),
            ("ResNet-110, STL-10 (96 px)", "resnet110", "stl10", 2, (2, 16))]
# InfoPro Table 3 (ResNet-110, CIFAR-10, batch 1024, GPU memory in GB): E2E and InfoPro* K=2, 3, 4.
PAPER_E2E_GB, PAPER_INFOPRO_STAR_GB = 9.40, {2: 5.38, 3: 4.22, 4: 3.52}


def measure(method, arch, dataset, batch, k, options=()):
    """One training step of `method`.py on the CPU, in this process (bench.row: memory, flops)."""
    case = dict(method=method, arch=arch, k=k, dataset=dataset, batch=batch, options=list(options))
    return run_in_process(case, 1, "cpu", "")


def grid(settings, methods):
    """{(arch, dataset): {"bp": row, (method, k): row}} over the settings, where the method allows K
    (MLAAN's windows of 2 modules need K >= 3)."""
    results = {}
    for title, arch, dataset, batch, ks in settings:
        cell = results[arch, dataset] = {"bp": measure("bp", arch, dataset, batch, 1)}
        for method in methods:
            for k in ks:
                if method != "bp":
                    result = measure(method, arch, dataset, batch, k)
                    print(f"{title} {method} K={k}: {result.get('error', 'measured')}", flush=True)
                    if "error" not in result:
                        cell[method, k] = result
    return results


def ratios(result, bp):
    return result["memory"] / bp["memory"], result["flops"] / bp["flops"]


def markdown(settings, methods, results, star):
    lines = []
    for title, arch, dataset, batch, ks in settings:
        cell = results[arch, dataset]
        bp = cell["bp"]
        lines += [f"**{title}**, batch {batch}: bp.py holds {bp['memory'] / batch / 2**20:.2f} MiB of "
                  f"activations per image and trains at {bp['flops'] / 1e9:.2f} GFLOP per image. "
                  f"Each cell: activation memory / training compute, relative to bp.py.", "",
                  "| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for method in methods:
            if method == "bp":
                continue
            cells = ["{:.2f} / {:.2f}".format(*ratios(cell[method, k], bp)) if (method, k) in cell else "-"
                     for k in ks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if star:
        bp, batch = star["bp"], star["batch"]
        lines += [f"**InfoPro\\* (Table 3)**: ResNet-110, CIFAR-10, balanced split, batch {batch} here (the paper: "
                  "1024; activation bytes grow in proportion to the batch). The paper's ratio is of whole GPU "
                  "memory (weights, optimizer state and workspace included), ours of activations alone.", "",
                  "| K | activation memory / bp.py | paper: GPU memory / E2E | training compute / bp.py |",
                  "|---|---|---|---|"]
        for k, gb in PAPER_INFOPRO_STAR_GB.items():
            mem, flops = ratios(star[k], bp)
            lines.append(f"| {k} | {mem:.2f} | {gb / PAPER_E2E_GB:.2f} ({gb} / {PAPER_E2E_GB} GB) | {flops:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(settings, methods, results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(settings), figsize=(4.2 * len(settings), 7), squeeze=False)
    for col, (title, arch, dataset, batch, ks) in enumerate(settings):
        cell = results[arch, dataset]
        for row, label in enumerate(("activation memory / bp.py", "training compute / bp.py")):
            ax = axes[row][col]
            ax.axhline(1.0, color="black", lw=1, label="bp.py")
            for method in methods:
                points = [(k, ratios(cell[method, k], cell["bp"])[row]) for k in ks if (method, k) in cell]
                if points:
                    ax.plot(*zip(*points), marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xlabel("K (modules)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(title)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Relative to bp.py: activations held for backward, training FLOPs per image (exact)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks"), help="folder for figures.md and figures.png")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--archs", nargs="+", default=None, help="only these settings' archs (default: all)")
    p.add_argument("--ks", nargs="+", type=int, default=None, help="only these K (default: each setting's)")
    p.add_argument("--no-table3", action="store_true", help="skip the InfoPro* Table 3 rows")
    args = p.parse_args(argv)
    settings = [(t, a, d, b, tuple(k for k in ks if args.ks is None or k in args.ks))
                for t, a, d, b, ks in SETTINGS if args.archs is None or a in args.archs]
    results = grid(settings, args.methods)
    star = None
    if not args.no_table3:
        batch = 4
        star = {"batch": batch, "bp": results.get(("resnet110", "cifar10"), {}).get("bp")
                or measure("bp", "resnet110", "cifar10", batch, 1)}
        for k in PAPER_INFOPRO_STAR_GB:
            star[k] = measure("infopro", "resnet110", "cifar10", batch, k, ["--split", "balanced"])
    os.makedirs(args.out, exist_ok=True)
    text = markdown(settings, args.methods, results, star)
    with open(os.path.join(args.out, "figures.md"), "w") as f:
        f.write(text)
    plot(settings, args.methods, results, os.path.join(args.out, "figures.png"))
    print(text)
    return results, star


if __name__ == "__main__":
    main()
