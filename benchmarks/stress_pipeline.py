"""Stress check for pipelined runs that end badly: many tiny `torchrun ... --pipeline` runs, a few
side by side as on a loaded machine, and every one that exits non-zero is reported (torchrun's
exit code, whether the run had already written summary.json, and the tail of its output, e.g. a
rank killed by "Signal 6 (SIGABRT)" / "terminate called without an active exception" at exit).

    python benchmarks/stress_pipeline.py                          # 120 runs, 3 side by side
    python benchmarks/stress_pipeline.py --runs 30 --parallel 2   # a quicker look
    python benchmarks/stress_pipeline.py --scripts dgl --stages 3 --runs 60 --keep /tmp/stress

Each run is METHOD (cycling over --scripts: dgl, contsup, infopro) x P stages (cycling over
--stages: 2 and 3) of ResNet-32 in K=4 modules on 128 synthetic images, batch 16 (8 steps per
epoch), 2 epochs, one thread per process (OMP_NUM_THREADS=1); every third run stops early with
--steps 13. The shape matters: the ranks' stop vote (an asynchronous all-reduce every
STOP_CHECK_STEPS=10 steps) is started in the last epoch and is still outstanding when the run
finishes, and --steps ends a run in the middle of an epoch with stage-to-stage sends in flight.
Every torchrun uses --standalone (its own free port), so parallel runs never collide. A run gets
--timeout seconds (then it is killed and counted as a failure).

The abort itself is rare (about 1 in 20-30 loaded runs, fewer on an idle machine), so every run
also checks its cause: a sitecustomize.py put on the ranks' PYTHONPATH reports, at interpreter
exit, a rank whose gloo threads (pt_gloo_runloop: the process group's workers; gloo_tcp_loop: its
transport) are still alive although the run destroyed its process group. Such a run counts as a
failure too ("gloo threads alive at exit"); --no-thread-check counts exit codes only. The script
prints a line per failure, then a summary (runs, failures, wall time) and exits 1 if any run
failed, else 0.

Time: a run takes 10-30 s of wall time on this project's 2-core machine, depending on what else runs;
120 runs, 3 side by side, took 18.8 minutes here (2026-12-04, torch 2.14.1; about 35 with other work
on the machine); the script prints its own duration.
"""
import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

MARK = "stress_pipeline: gloo threads alive at exit:"
SITECUSTOMIZE = f'''import atexit, glob, os, sys
def _gloo_threads_at_exit():
    names = [open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm")]
    alive = sorted(n for n in names if "gloo" in n)
    if alive and "RANK" in os.environ:
        print(f"{MARK} rank {{os.environ['RANK']}}: {{alive}}", file=sys.stderr, flush=True)
atexit.register(_gloo_threads_at_exit)
'''

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_ARGS = {"dgl": [], "infopro": [], "contsup": ["--context", "R2"]}
COMMON = ["--dataset", "synthetic", "--arch", "resnet32", "--k", "4", "--subset", "128", "--batch-size", "16",
          "--epochs", "2", "--device", "cpu", "--quiet"]


def one_run(i, script, stages, steps, base, timeout, hook):
    out = os.path.join(base, f"run{i:04d}-{script}-p{stages}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stages}",
           f"{script}.py", *COMMON, *SCRIPT_ARGS[script], "--seed", str(i), "--out", out, "--pipeline"]
    if steps:
        cmd += ["--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if hook:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [hook, env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                              start_new_session=True)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    wrote = os.path.exists(os.path.join(out, "summary.json"))
    if rc == 0 and MARK in text:
        rc = "gloo threads alive at exit"
    return {"i": i, "script": script, "stages": stages, "steps": steps, "rc": rc, "wrote_summary": wrote,
            "seconds": time.perf_counter() - t0, "out": out, "cmd": cmd, "text": text}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=120)
    p.add_argument("--parallel", type=int, default=3, help="runs side by side (each P processes, 1 thread)")
    p.add_argument("--scripts", default="dgl,contsup,infopro")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run before it is killed")
    p.add_argument("--no-thread-check", action="store_true", help="count non-zero exits only")
    p.add_argument("--keep", default=None, help="keep the runs' folders here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    scripts, stages = args.scripts.split(","), [int(s) for s in args.stages.split(",")]
    base = args.keep or tempfile.mkdtemp(prefix="stress_pipeline_")
    os.makedirs(base, exist_ok=True)
    hook = None
    if not args.no_thread_check:
        hook = os.path.join(base, "hook")
        os.makedirs(hook, exist_ok=True)
        with open(os.path.join(hook, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
    # every combination of script and stage count, with and without --steps, comes up in turn
    combos = itertools.cycle(itertools.product(scripts, stages, (None, None, 13)))
    jobs = [(i, *next(combos)) for i in range(args.runs)]
    t0 = time.perf_counter()
    failures, done = [], 0
    print(f"{args.runs} runs ({', '.join(scripts)}; {', '.join(map(str, stages))} stages), {args.parallel} side by "
          f"side, in {base}", flush=True)
    try:
        with ThreadPoolExecutor(args.parallel) as pool:
            for r in pool.map(lambda job: one_run(*job, base, args.timeout, hook), jobs):
                done += 1
                if r["rc"] != 0:
                    failures.append(r)
                    lines = [l for l in r["text"].splitlines() if l.strip()]
                    tail = [l for l in lines if MARK in l] or lines[-12:]
                    print(f"FAIL run {r['i']} {r['script']} P={r['stages']} steps={r['steps']}: exit {r['rc']}, "
                          f"summary.json {'written' if r['wrote_summary'] else 'missing'}, {r['seconds']:.0f} s\n  "
                          + "\n  ".join(tail), flush=True)
                elif done % 10 == 0:
                    print(f"{done}/{args.runs} runs, {len(failures)} failed, {time.perf_counter() - t0:.0f} s",
                          flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    threads = sum(f["rc"] == "gloo threads alive at exit" for f in failures)
    print(f"{done} runs, {len(failures)} failed ({len(failures) - threads} non-zero exits, "
          f"{sum(f['wrote_summary'] for f in failures)} failures after writing summary.json; {threads} exited 0 with gloo "
          f"threads alive at exit), {elapsed:.0f} s ({elapsed / 60:.1f} min)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
