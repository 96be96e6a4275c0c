"""compare.py: one markdown table, and optionally one figure, from the folders of training runs.

    python tools/compare.py runs/*
    python tools/compare.py runs/bp-* runs/dgl-* --plot compare.png

Each argument is a run folder (what a script writes to --out: args.json, metrics.jsonl and, once
the run has finished, summary.json), a folder of run folders (one level: runs/readme) or a glob of
them. Runs still going (no summary.json yet) and
runs from older versions (fewer fields) are shown with what they have; a missing value is "-",
and a wall time taken from the files' times (runs from before `elapsed_s`) is marked "~".

Columns: the run's folder, method, dataset, arch, K, batch, epochs done / planned, final and best
test accuracy, the activation memory of one step (`act_mem_bytes`) and the peak CUDA memory
(`peak_mem_bytes`, only when some run has it), each with its ratio to a bp.py run of the same
arch, dataset and batch among the given runs, images/s and wall time. `--plot FILE.png` draws
the test accuracy per epoch of every run and, from each run's last epoch, the accuracy of every
module (its auxiliary classifier's; the last module's is the network's head): on the test set
where the run measured it (`module_test_acc`), else on the training batches (`module_acc`).
"""
import argparse
import glob
import json
import math
import os
import sys


def die(message):
    raise SystemExit(f"error: {message}")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # missing, or being rewritten right now


def read_metrics(path):
    """The epoch lines; a line cut short (a run writing it now) is left out."""
    lines = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return lines


def is_run(folder):
    """A folder a script wrote: its arguments, an epoch or a summary. A start that failed before its
    first step (missing data, a bad argument) leaves only an empty metrics.jsonl: not a run."""
    path = lambda name: os.path.join(folder, name)
    metrics = path("metrics.jsonl")
    return (os.path.exists(path("args.json")) or os.path.exists(path("summary.json"))
            or os.path.exists(metrics) and os.path.getsize(metrics) > 0)


def runs_in(folder):
    """The folder if it is a run, else the runs directly inside it (a folder of runs: runs/readme/)."""
    if is_run(folder):
        return [folder]
    inside = sorted(glob.glob(os.path.join(glob.escape(folder), "*")))
    return [f for f in inside if os.path.isdir(f) and is_run(f)]


def find_runs(patterns):
    """Run folders in the order given (a glob's matches sorted); a folder named outright must be a run
    or hold runs."""
    folders = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not glob.has_magic(pattern) and not (os.path.isdir(pattern) and runs_in(pattern)):
            die(f"{pattern} is not a run folder (no args.json, epoch in metrics.jsonl or summary.json) nor a folder "
                f"of runs: pass folders that a script wrote with --out, e.g. runs/*")
        folders += [run for m in matches if os.path.isdir(m) for run in runs_in(m) if run not in folders]
    if not folders:
        die(f"no run folders in {' '.join(patterns)}: pass folders that a script wrote with --out, e.g. runs/*")
    return folders


def file_times_elapsed(folder):
    """Wall time of a run from before `elapsed_s`: args.json is written when the run starts (or is
    resumed), summary.json or metrics.jsonl last when it ends (or at its last epoch)."""
    paths = {name: os.path.join(folder, name) for name in ("args.json", "metrics.jsonl", "summary.json")}
    stamps = {name: os.path.getmtime(path) for name, path in paths.items() if os.path.exists(path)}
    if "args.json" not in stamps or len(stamps) < 2:
        return None
    return max(stamps.values()) - stamps["args.json"]


def k_trained(k, summary):
    """K as asked, and the modules trained where they differ (AugLocal's K-d merge: '16 (14)')."""
    modules = summary.get("modules")
    return f"{k} ({len(modules)})" if modules and k is not None and len(modules) != k else k


def load_run(folder):
    """One run as a flat dict; the summary wins over args.json, the last epoch line fills in."""
    args = read_json(os.path.join(folder, "args.json"))
    summary = read_json(os.path.join(folder, "summary.json"))
    epochs = read_metrics(os.path.join(folder, "metrics.jsonl"))
    last = epochs[-1] if epochs else {}
    elapsed, estimated = summary.get("elapsed_s", last.get("elapsed_s")), False
    if elapsed is None:
        elapsed, estimated = file_times_elapsed(folder), True

    def get(key):
        return summary[key] if summary.get(key) is not None else args.get(key)

    return {
        "run": os.path.basename(os.path.normpath(folder)), "finished": bool(summary), "epoch_lines": epochs,
        "method": get("method"), "dataset": get("dataset"), "arch": get("arch"), "k": k_trained(get("k"), summary),
        "batch": get("batch_size"), "epochs": args.get("epochs", summary.get("epochs")), "done": last.get("epoch"),
        "final": summary.get("final_test_acc", last.get("test_acc")),
        "best": summary.get("best_test_acc", last.get("best_test_acc")),
        "act_mem": summary.get("act_mem_bytes"), "peak_mem": summary.get("peak_mem_bytes"),
        "images_per_s": summary.get("images_per_s"), "elapsed_s": elapsed,
        "elapsed_estimated": estimated and elapsed is not None,
    }


def with_bp_ratios(runs):
    """Memory relative to the first bp.py run with the same arch, dataset and batch."""
    bps = {}
    for r in runs:
        if r["method"] == "bp":
            bps.setdefault((r["arch"], r["dataset"], r["batch"]), r)
    for r in runs:
        bp = bps.get((r["arch"], r["dataset"], r["batch"]), {})
        for key in ("act_mem", "peak_mem"):
            r[key + "_ratio"] = r[key] / bp[key] if r[key] is not None and bp.get(key) else None
    return runs


def fmt(value, spec="", scale=1, unit=""):
    if value is None:
        return "-"
    return f"{value * scale:{spec}}{unit}" if isinstance(value, (int, float)) else str(value)


def duration(seconds):
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def table(runs):
    peak = any(r["peak_mem"] is not None for r in runs)  # CUDA runs only
    head = ["run", "method", "dataset", "arch", "K", "batch", "epochs", "final acc", "best acc",
            "act. MB", "act / bp", *(["peak MB", "peak / bp"] if peak else []), "images/s", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        epochs = f"{fmt(r['done'])}/{fmt(r['epochs'])}" + ("" if r["finished"] else " †")
        memory = [fmt(r["act_mem"], ".1f", 1e-6), fmt(r["act_mem_ratio"], ".2f")]
        if peak:
            memory += [fmt(r["peak_mem"], ".1f", 1e-6), fmt(r["peak_mem_ratio"], ".2f")]
        cells = [r["run"], *(fmt(r[key]) for key in ("method", "dataset", "arch", "k", "batch")), epochs,
                 fmt(r["final"], ".1f", 100, "%"), fmt(r["best"], ".1f", 100, "%"), *memory,
                 fmt(r["images_per_s"], ".0f"), ("~" if r["elapsed_estimated"] else "") + duration(r["elapsed_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    if not all(r["finished"] for r in runs):
        lines.append("\n† no summary.json yet: the run is still going (or was stopped); its last epoch is shown.")
    if any(r["elapsed_estimated"] for r in runs):
        lines.append("\n~ from the files' times (the run has no elapsed_s): since its start or its last --resume.")
    return "\n".join(lines) + "\n"


def module_accuracies(run):
    """(label, per-module accuracies with None as NaN) of the run's last epoch, or None."""
    last = run["epoch_lines"][-1] if run["epoch_lines"] else {}
    for key, label in (("module_test_acc", "test"), ("module_acc", "train")):
        if last.get(key):
            return label, [math.nan if a is None else 100 * a for a in last[key]]
    return None


def plot(runs, path):
    try:
        import matplotlib
    except ImportError:
        die("--plot needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (curves, modules) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for i, r in enumerate(runs):
        style = dict(color=f"C{i % 10}", marker="o", markersize=3)  # one colour per run in both panels
        points = [(line["epoch"], 100 * line["test_acc"]) for line in r["epoch_lines"] if "test_acc" in line]
        if points:
            curves.plot(*zip(*points), label=r["run"], **style)
        per_module = module_accuracies(r)
        if per_module:
            label, accs = per_module
            modules.plot(range(1, len(accs) + 1), accs, label=f"{r['run']} ({label})", **style)
    curves.set(title="test accuracy per epoch", xlabel="epoch", ylabel="test accuracy (%)")
    modules.set(title="per-module accuracy, last epoch", xlabel="module (the last: the network's head)",
                ylabel="accuracy (%)")
    for ax in (curves, modules):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not modules.lines:
        modules.text(0.5, 0.5, "no per-module accuracies in these runs", ha="center", va="center",
                     transform=modules.transAxes)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders or globs, e.g. runs/*")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the figure into this file")
    args = p.parse_args(argv)
    runs = with_bp_ratios([load_run(folder) for folder in find_runs(args.runs)])
    text = table(runs)
    sys.stdout.write(text)
    if args.plot:
        plot(runs, args.plot)
    return text


if __name__ == "__main__":
    main()
