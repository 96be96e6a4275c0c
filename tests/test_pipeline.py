"""--pipeline: the K modules trained as P stages, one per process (gloo on the CPU), must end with
exactly the parameters, buffers, momentum, metrics and checkpoint of the same run in one process;
--pipeline P under N processes (P stages x N/P replicas), exactly those of N/P data-parallel ones."""
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

import common
from conftest import QUICK, ROOT, metrics_but_time, read_json, read_jsonl, run_script

SMALL = ["--subset", "128", "--batch-size", "32"]  # 4 steps per epoch


def torchrun(script, out, procs, *args, layout=("--pipeline",)):
    """`procs` processes of one thread each: pipeline stages, or as `layout` says (() data parallel)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           f"{script}.py", *QUICK, *SMALL, "--out", str(out), *map(str, layout), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the sequential run below uses one thread too
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def sequential(script, out, *args):
    """The same run in this process, with one thread like each pipeline process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_script(script, out, *SMALL, *args)
    finally:
        torch.set_num_threads(threads)


def assert_same_run(a, b):
    ca, cb = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False) for d in (a, b))
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for key in sa:
        assert torch.equal(sa[key]["momentum_buffer"], sb[key]["momentum_buffer"]), key
    assert metrics_but_time(a) == metrics_but_time(b)


CASES = [("dgl", ["--k", 4]), ("infopro", ["--k", 4]), ("auglocal", ["--k", 8]),
         ("contsup", ["--k", 4, "--context", "R2"])]


@pytest.mark.parametrize("script,args", CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow
def test_pipeline_equals_sequential_training(tmp_path, script, args):
    args = [*args, "--epochs", 2, "--steps", 6]  # an epoch and a half: checkpoints, metrics, --steps
    sequential(script, tmp_path / "seq", *args)
    seq = read_json(tmp_path / "seq" / "summary.json")
    for procs in (2, 3):
        proc = torchrun(script, tmp_path / f"p{procs}", procs, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_run(tmp_path / "seq", tmp_path / f"p{procs}")
        summary = read_json(tmp_path / f"p{procs}" / "summary.json")
        stages = summary["stages"]
        assert len(stages) == procs and sum((s["modules"] for s in stages), []) == list(range(len(seq["modules"])))
        assert abs(sum(s["flops_share"] for s in stages) - 1) < 1e-3
        assert abs(summary["predicted_speedup"] - 1 / max(s["time_share"] for s in stages)) < 1e-2
        assert summary["rank_max_abs_diff"] == 0.0  # every process holds the whole trained model
        assert summary["final_test_acc"] == seq["final_test_acc"] and summary["steps"] == 6
        # Each stage saves only its own modules' activations; the local backwards free them module by
        # module, so the largest stage peak is the sequential peak.
        assert max(s["act_mem_bytes"] for s in stages) == seq["act_mem_bytes"]
        assert min(s["act_mem_bytes"] for s in stages) < seq["act_mem_bytes"]


@pytest.mark.slow
def test_pipelined_run_resumes_exactly_and_either_mode_resumes_the_other(tmp_path):
    args = ["--k", 4, "--epochs", 2]
    sequential("dgl", tmp_path / "straight", *args)
    proc = torchrun("dgl", tmp_path / "run", 2, *args, "--steps", 4)  # stops after epoch 1, checkpointed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [l["epoch"] for l in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]
    proc = torchrun("dgl", tmp_path / "run", 2, *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "run")
    # A pipelined checkpoint continues in one process, and a sequential one under --pipeline.
    run_script("dgl", tmp_path / "half", *SMALL, *args, "--steps", 4)
    proc = torchrun("dgl", tmp_path / "half", 2, *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(tmp_path / "half" / "summary.json")["steps"] == 8


@pytest.mark.slow
def test_pipeline_stage_cuts_by_hand_and_bad_cuts(tmp_path):
    proc = torchrun("dgl", tmp_path / "a", 2, "--k", 4, "--steps", 1, "--pipeline-cuts", 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s["modules"] for s in read_json(tmp_path / "a" / "summary.json")["stages"]] == [[0, 1, 2], [3]]
    proc = torchrun("dgl", tmp_path / "b", 2, "--k", 4, "--steps", 1, "--pipeline-cuts", 4)
    assert proc.returncode != 0 and "--pipeline-cuts needs 1 increasing module indices from 1 to 3" in proc.stderr
    proc = torchrun("dgl", tmp_path / "c", 3, "--k", 2, "--steps", 1)
    assert proc.returncode != 0 and "--pipeline over 3 stages needs at least 3 modules" in proc.stderr


@pytest.mark.slow
def test_pipeline_refusals_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="bp.py cannot pipeline its modules: end-to-end training is one module"):
        run_script("bp", tmp_path / "a", "--pipeline")
    with pytest.raises(SystemExit, match="mlaan.py cannot pipeline its modules: its windows span several modules"):
        run_script("mlaan", tmp_path / "b", "--pipeline")
    with pytest.raises(SystemExit, match="--pipeline trains one stage per process: launch the script with torchrun"):
        run_script("dgl", tmp_path / "c", "--k", 4, "--pipeline")
    with pytest.raises(SystemExit, match="--pipeline-cuts sets the stages of --pipeline"):
        run_script("dgl", tmp_path / "d", "--k", 4, "--pipeline-cuts", 2)


def test_balanced_cuts_minimise_the_slowest_stage():
    assert common.balanced_cuts([1, 1, 1, 1], 2) == [2]
    assert common.balanced_cuts([5, 1, 1, 1, 1, 1], 2) == [1]
    assert common.balanced_cuts([1, 2, 3], 3) == [1, 2]
    rng = random.Random(0)
    for _ in range(50):  # against every way to cut
        costs = [rng.randint(1, 9) for _ in range(rng.randint(2, 7))]
        parts = rng.randint(1, len(costs))
        cuts = common.balanced_cuts(costs, parts)
        worst = lambda c: max(sum(costs[a:b]) for a, b in zip([0, *c], [*c, len(costs)]))
        best = min(worst(list(c)) for c in itertools.combinations(range(1, len(costs)), parts - 1))
        assert len(cuts) == parts - 1 and worst(cuts) == best


@pytest.mark.slow
def test_bench_compares_one_process_with_pipelined_stages():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench
    rows = bench.main(["--cases", "dgl:resnet32:4:cifar10:16", "--pipeline", "2", "--steps", "3", "--device", "cpu"])
    (row,) = rows
    assert "error" not in row and row["sequential"] > 0 and row["pipelined"] > 0 and 1 <= row["predicted"] <= 2
    assert sum((s["modules"] for s in row["stages"]), []) == [0, 1, 2, 3]  # cut by measured time
    assert "| dgl | resnet32 | 4 | cifar10 | 16 |" in bench.pipeline_table(rows, 2)


@pytest.mark.slow
def test_predict_pipeline_cuts_measured_module_times():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import predict_pipeline
    assert predict_pipeline.speedup([1, 1, 1, 1], 2) == 2 and predict_pipeline.speedup([3, 1, 1, 1], 2) == 2
    assert predict_pipeline.speedup([3, 1, 1, 1], 4) == 2 and predict_pipeline.speedup([1, 1], 4) is None
    ((case, seconds),) = predict_pipeline.main(["--cases", "dgl:resnet32:4:cifar10:8", "--stages", "2", "4"])
    assert case["k"] == 4 and len(seconds) == 4 and min(seconds) > 0
    table = predict_pipeline.table([(case, [1, 1, 1, 1])], [2, 4], 8)
    assert "| 2 stages | 4 stages | 8 GPUs: 2 x 4 | 8 GPUs: 4 x 2 |" in table
    assert "| 2.00x | 4.00x | 8.00x | 8.00x |" in table
    with pytest.raises(SystemExit, match="mlaan.py cannot pipeline its modules"):
        predict_pipeline.main(["--cases", "mlaan:resnet32:4:cifar10:8"])


@pytest.mark.slow
def test_mid_epoch_checkpoint_resumes_exactly_in_another_stage_layout(tmp_path):
    """The partial statistics of a mid-epoch checkpoint go on with the module that owns them, so
    the resumed epoch's train_loss and module_loss are the uninterrupted run's to the last bit."""
    args = ["--k", 4, "--epochs", 2, "--save-every", 1]
    sequential("dgl", tmp_path / "straight", *args)
    proc = torchrun("dgl", tmp_path / "two", 2, *args, "--steps", 6)  # stops at epoch 2, batch 2
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["partial"]["batch"] == 2
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    proc = torchrun("dgl", tmp_path / "two", 3, *args, "--resume")  # 2 stages -> 3
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "two")
    sequential("dgl", tmp_path / "one", *args, "--resume")  # 2 stages -> one process
    assert_same_run(tmp_path / "straight", tmp_path / "one")


PXR_CASES = [("dgl", ["--k", 4]), ("contsup", ["--k", 4, "--context", "R2"])]  # ContSup's context crosses stages


@pytest.mark.parametrize("script,args", PXR_CASES, ids=[c[0] for c in PXR_CASES])
@pytest.mark.slow
def test_stages_times_replicas_equal_data_parallel_training(tmp_path, script, args):
    """2 stages x 2 replicas end where 2 data-parallel processes end, bit for bit: each stage's
    gradients are the same sum of two shards' (commutative), its BatchNorm the same average."""
    args = [*args, "--epochs", 2]
    proc = torchrun(script, tmp_path / "dp", 2, *args, layout=())
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(script, tmp_path / "pxr", 4, *args, layout=("--pipeline", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each on 2 data-parallel replicas" in proc.stdout
    assert_same_run(tmp_path / "dp", tmp_path / "pxr")
    dp, pxr = read_json(tmp_path / "dp" / "summary.json"), read_json(tmp_path / "pxr" / "summary.json")
    assert pxr["rank_max_abs_diff"] == 0.0 and pxr["world_size"] == 4 and pxr["steps"] == 8
    assert sum((s["modules"] for s in pxr["stages"]), []) == [0, 1, 2, 3] and len(pxr["stages"]) == 2
    assert pxr["train_flops_per_image"] == dp["train_flops_per_image"]  # every stage counted once, not per replica
    assert max(s["act_mem_bytes"] for s in pxr["stages"]) == dp["act_mem_bytes"]


@pytest.mark.slow
def test_stages_times_replicas_resume_in_one_process_and_back(tmp_path):
    args = ["--k", 4, "--epochs", 2]
    proc = torchrun("dgl", tmp_path / "pxr", 4, *args, "--steps", 4, layout=("--pipeline", 2))  # epoch 1
    assert proc.returncode == 0, proc.stderr[-3000:]
    epoch1 = read_jsonl(tmp_path / "pxr" / "metrics.jsonl")
    sequential("dgl", tmp_path / "pxr", *args, "--resume")
    assert read_jsonl(tmp_path / "pxr" / "metrics.jsonl")[:1] == epoch1
    assert read_json(tmp_path / "pxr" / "summary.json")["steps"] == 8
    # A one-process checkpoint goes on as 2 x 2 exactly as under 2 data-parallel processes.
    sequential("dgl", tmp_path / "pxr1", *args, "--steps", 4)
    shutil.copytree(tmp_path / "pxr1", tmp_path / "dp1")
    proc = torchrun("dgl", tmp_path / "pxr1", 4, *args, "--resume", layout=("--pipeline", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun("dgl", tmp_path / "dp1", 2, *args, "--resume", layout=())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "dp1", tmp_path / "pxr1")


LAYOUT_ERRORS = [  # (processes, arguments, error): refused before any process group exists
    (1, ["--pipeline", 2], "--pipeline 2 needs a multiple of 2 processes (P stages times R replicas), and this run "
     "has 1"),
    (4, ["--pipeline", 3], "--pipeline 3 needs a multiple of 3 processes (P stages times R replicas), and this run "
     "has 4; launch torchrun --nproc_per_node with a multiple of 3"),
    (4, ["--pipeline", 8], "--pipeline 8 needs a multiple of 8 processes"),
    (4, ["--pipeline", 2, "--batch-size", 33], "--batch-size 33 does not split over 2 data-parallel replicas"),
    (4, ["--pipeline", 2, "--batch-size", 2], "--batch-size 2 leaves fewer than 2 images per replica"),
    (4, ["--pipeline", 1], "--pipeline 1: a pipeline has at least 2 stages"),
    (4, ["--pipeline", 0], "--pipeline 0: a pipeline has at least 2 stages"),
]


@pytest.mark.parametrize("world,args,error", LAYOUT_ERRORS)
def test_pipeline_layout_errors_are_one_line(tmp_path, monkeypatch, world, args, error):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit, match=f"^error: {re.escape(error)}"):
        run_script("dgl", tmp_path / "a", "--k", 4, *args)


def test_more_stages_than_modules_is_one_line():
    procs = types.SimpleNamespace(stage_count=3)
    with pytest.raises(SystemExit, match="--pipeline over 3 stages needs at least 3 modules, and this run has 2"):
        common.Pipeline(procs, None, None, None, [[0], [1]], None)
