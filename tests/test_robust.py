"""Long runs: one run per folder, no folder locked by a failed start, orphaned ranks that stop,
validated arguments, one-line errors for damaged or unwritable files, no non-finite checkpoint,
SIGTERM / --save-every checkpoints that resume exactly, measurements kept across resume, start and
progress lines."""
import errno
import glob
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, build_method, checkpoint_state, metrics_but_time, read_json, read_jsonl, run_script
from test_common import write_cifar

# 64 images in batches of 32: 2 steps per epoch.
TINY = ["--dataset", "synthetic", "--arch", "resnet32", "--subset", "64", "--batch-size", "32", "--device", "cpu"]
# The run that interrupted and resumed runs must reproduce bit for bit: 4 steps per epoch, 2 epochs.
EXACT = ["--dataset", "synthetic", "--arch", "resnet32", "--subset", "128", "--batch-size", "32", "--device", "cpu",
         "--k", "2", "--epochs", "2"]
# A dgl run with 3 steps per epoch (the third is the first one timed, after 2 warm-up steps).
AFTER_EPOCH_1 = ["--k", "2", "--epochs", "2", "--subset", "96"]


def tiny(name, out, *args):
    return run_script(name, out, *TINY, *args, quick=False)


def one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, message
    return message


def same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def one_thread():
    """Results depend on the thread count: the in-process runs here use 1 thread, as the subprocesses do."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run_script("dgl", out, *EXACT, quick=False)
    torch.set_num_threads(n)
    return out


@pytest.fixture(scope="module")
def after_epoch_1(tmp_path_factory):
    """A dgl run of 2 epochs of 3 steps stopped by --steps after epoch 1 (its checkpoint); its
    third step is the first one timed for images_per_s (after 2 warm-up steps)."""
    out = tmp_path_factory.mktemp("epoch1") / "run"
    tiny("dgl", out, *AFTER_EPOCH_1, "--steps", "3")
    return out


def copy_run(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# ---- 1. a run that fails before its first checkpoint leaves its folder free ----------------------

@pytest.mark.slow
def test_failed_starts_do_not_lock_the_folder(tmp_path, monkeypatch):
    import torchvision
    data, out = tmp_path / "data", tmp_path / "run"
    cifar = ["--dataset", "cifar10", "--data-dir", data, "--subset", "64", "--batch-size", "32", "--device", "cpu",
             "--epochs", "1"]

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit, match="is not in"):  # no data yet
        run_script("dgl", out, *cifar, "--k", "2", quick=False)
    write_cifar(data, 13, 10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                "labels")
    with pytest.raises(SystemExit, match="--k 17 is not valid"):  # the data is there, the argument is wrong
        run_script("dgl", out, *cifar, "--k", "17", quick=False)
    summary = run_script("dgl", out, *cifar, "--k", "2", quick=False)  # the fixed command runs
    assert summary["steps"] == 2 and read_json(out / "args.json")["k"] == 2
    assert [l["epoch"] for l in read_jsonl(out / "metrics.jsonl")] == [1]


@pytest.mark.slow
def test_a_folder_in_use_is_refused_and_freed_when_its_run_ends(tmp_path):
    import fcntl
    out = tmp_path / "run"

    def held_by_another_run():
        held = open(out / ".lock", "w")
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("process 4242 on node7\n")
        held.flush()
        return held
    os.makedirs(out)
    with held_by_another_run():
        with pytest.raises(SystemExit) as e:
            tiny("dgl", out, "--k", "2", "--epochs", "2", "--steps", "2")
        one_line_error(e, out, "is in use by process 4242 on node7", "--out")
    assert os.listdir(out) == [".lock"]  # the refused start touched nothing
    tiny("dgl", out, "--k", "2", "--epochs", "2", "--steps", "2")  # free again: epoch 1, checkpointed
    with held_by_another_run():
        with pytest.raises(SystemExit, match="is in use by process 4242"):  # also for --resume
            tiny("dgl", out, "--k", "2", "--epochs", "2", "--resume")
    with pytest.raises(SystemExit, match="has --k 2, not 3"):  # a refused resume leaves the folder free
        tiny("dgl", out, "--k", "3", "--epochs", "2", "--resume")
    assert tiny("dgl", out, "--k", "2", "--epochs", "2", "--resume")["steps"] == 4


@pytest.mark.slow
def test_ranks_whose_torchrun_was_killed_checkpoint_and_stop(tmp_path):
    """torchrun starts its ranks in their own session, so killing its process group leaves them
    running: they notice that their launcher is gone and stop as on SIGTERM."""
    out, log = tmp_path / "run", open(tmp_path / "log", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dgl.py", *TINY,
           "--subset", "256", "--batch-size", "16", "--k", "2", "--epochs", "50", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + 300
    while not os.path.exists(out / "checkpoint.pt") and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    ranks = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    while any(os.path.exists(f"/proc/{r}") for r in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{r}") for r in ranks), "orphaned ranks still running"
    text = open(tmp_path / "log").read()
    assert "stopped by SIGTERM" in text and "Traceback" not in text, text
    partial = torch.load(out / "checkpoint.pt", weights_only=False)["partial"]
    assert partial is not None and partial["replicas"] == 2  # a checkpoint where they stopped


@pytest.mark.slow
def test_args_json_holds_the_values_used_and_resume_compares_them(tmp_path):
    out = tmp_path / "run"
    tiny("auglocal", out, "--k", "4", "--epochs", "1")
    saved = read_json(out / "args.json")
    assert (saved["aux_depth"], saved["pyramid_coeff"], saved["device"]) == (2, 0.5, "cpu")
    with pytest.raises(SystemExit) as e:  # the default, explicit: accepted (and the complete run left as it is)
        tiny("auglocal", out, "--k", "4", "--epochs", "1", "--aux-depth", "2", "--resume")
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        tiny("auglocal", out, "--k", "4", "--epochs", "1", "--aux-depth", "1", "--resume")
    one_line_error(e, "has --aux-depth 2, not 1")
    infopro_args = build_method("infopro", *TINY, "--k", "2", "--out", tmp_path / "i")[0]
    contsup_args = build_method("contsup", *TINY, "--k", "2", "--out", tmp_path / "c")[0]
    assert infopro_args.loss == contsup_args.loss == "contrast" and len(infopro_args.lambdas) == 4  # the defaults


# ---- 2. arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "--batch-size must be at least 2"),
    (["--batch-size", "1"], "--batch-size must be at least 2 (BatchNorm"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--weight-decay", "-1"], "--weight-decay must be at least 0"),
    (["--save-every", "-1"], "--save-every must be at least 0"),
    (["--weight-decay", "1e9"], "--weight-decay must be below 1"),
    (["--momentum", "1"], "--momentum must be below 1"),
])
def test_bad_numbers_are_refused(args, needle):
    with pytest.raises(SystemExit) as e:
        common.parse_args([*TINY, *args], "", "dgl", 16, 160)
    one_line_error(e, needle)


@pytest.mark.parametrize("device", ["tpu", "cpu:5", "cuda:x"])
def test_unknown_devices_are_refused(tmp_path, device):
    with pytest.raises(SystemExit) as e:
        tiny("dgl", tmp_path / "run", "--device", device)
    one_line_error(e, f"--device {device}", "use cpu, cuda or cuda:N")


@pytest.mark.parametrize("method,args,needle", [
    ("bp", ["--k", "2"], "bp.py trains end to end, so --k must be 1 (got 2); local methods take --k"),
    ("bp", ["--k", "1", "--grad-checkpoint", "17"], "--grad-checkpoint must be from 0 to 16 (the number of layers)"),
    ("mlaan", ["--arch", "resnet18", "--k", "4", "--base", "infopro"], "--base infopro is for the CIFAR ResNets"),
])
def test_a_method_refuses_what_it_cannot_build(tmp_path, method, args, needle):
    with pytest.raises(SystemExit) as e:
        tiny(method, tmp_path / "run", *args)
    one_line_error(e, needle)
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.slow
def test_a_subset_without_a_full_step_is_refused(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_script("dgl", tmp_path / "run", *TINY, "--subset", "1", quick=False)
    one_line_error(e, "--batch-size 32 leaves no training step on 1 training images", "--subset")


@pytest.mark.slow
def test_bad_input_exits_1_with_one_line(tmp_path):
    cmd = [sys.executable, "dgl.py", *TINY, "--lr", "-0.1", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: --lr must be a positive number, got -0.1"]


@pytest.mark.slow
def test_under_torchrun_an_error_is_printed_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dgl.py", *TINY,
           "--k", "99", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1  # torchrun's: its own ChildFailedError report follows the line
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --k 99 is not valid for resnet32: choose K from 1 to 16 (the number of layers)"]


STOPS_AT_ITS_FIRST_SAVE = """import os, sys
sys.path.insert(0, {root!r})
import common, dgl
def save(folder, ckpt):  # the main process stops as on {how}
    {stop}
common.RunFolder.save = save
dgl.main(sys.argv[1:])
"""


@pytest.mark.parametrize("how,layout", [("an error", []), ("a crash", ["--pipeline"])])
@pytest.mark.slow
def test_under_torchrun_the_others_lose_contact_in_one_line(tmp_path, how, layout):
    """When one process stops, the collectives of the others fail: no traceback from inside
    torch.distributed, only a line, and only where no process of the machine printed its error."""
    stop = ('common.die("cannot write it; free disk space")' if how == "an error" else "os._exit(3)")
    script = tmp_path / "stops.py"
    script.write_text(STOPS_AT_ITS_FIRST_SAVE.format(root=str(ROOT), how=how, stop=f"if folder.main: {stop}"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *TINY,
           "--k", "4", "--epochs", "2", *layout, "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    assert "[rank1]" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr[-3000:]  # gloo's traceback
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    if how == "an error":
        assert errors == ["error: cannot write it; free disk space"]
    else:  # nothing printed by the process that crashed: the one that lost it says so
        assert len(errors) == 1 and errors[0].startswith("error: lost contact with another process of the run (")
        assert errors[0].endswith("that one stopped first, and its own output says why")


# ---- 3. damaged and unwritable files ---------------------------------------------------------------

@pytest.mark.slow
def test_truncated_checkpoint(after_epoch_1, tmp_path):
    out = copy_run(after_epoch_1, tmp_path)
    path = out / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        tiny("dgl", out, *AFTER_EPOCH_1, "--resume")
    one_line_error(e, f"cannot read {path}", "delete it")


@pytest.mark.slow
def test_another_runs_checkpoint(after_epoch_1, tmp_path):
    out = copy_run(after_epoch_1, tmp_path)
    tiny("bp", tmp_path / "bp", "--epochs", "2", "--steps", "2")
    shutil.copy(tmp_path / "bp" / "checkpoint.pt", out / "checkpoint.pt")
    with pytest.raises(SystemExit) as e:
        tiny("dgl", out, *AFTER_EPOCH_1, "--resume")
    one_line_error(e, "is a bp.py run, not dgl.py")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    del ckpt["args"]  # as written before checkpoints named their run: args.json says dgl, the weights are bp's
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(SystemExit) as e:
        tiny("dgl", out, *AFTER_EPOCH_1, "--resume")
    one_line_error(e, "does not fit this model")


@pytest.mark.slow
def test_half_written_metrics_line_and_temporary_files_are_dropped(after_epoch_1, tmp_path):
    out = copy_run(after_epoch_1, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.0, "train_lo')  # killed while appending
    (out / "checkpoint.pt.tmp12345").write_bytes(b"\0" * 1000)  # killed while saving
    summary = tiny("dgl", out, *AFTER_EPOCH_1, "--resume")
    assert [l["epoch"] for l in read_jsonl(out / "metrics.jsonl")] == [1, 2] and summary["steps"] == 6
    assert not glob.glob(str(out / "*.tmp*"))


@pytest.mark.slow
@pytest.mark.parametrize("lines,needle", [(["[1, 2, 3]"], "is not an epoch's entry"),
                                          (['{"lr": 1}'], "is not an epoch's entry"),
                                          (["{not json", '{"epoch": 1}'], "is not JSON")])  # and not the last line
def test_a_metrics_line_that_is_not_an_epoch_is_one_line(after_epoch_1, tmp_path, lines, needle):
    run = copy_run(after_epoch_1, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("".join(line + "\n" for line in lines))
    with pytest.raises(SystemExit) as e:
        tiny("dgl", run, *AFTER_EPOCH_1, "--resume")
    one_line_error(e, f"metrics.jsonl line 2 {needle}; repair or delete that line")


@pytest.mark.slow
def test_resuming_a_complete_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    tiny("dgl", out, "--k", "2", "--epochs", "1")
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if name != ".lock"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tiny("dgl", out, "--k", "2", "--epochs", "1", "--resume")
    assert e.value.code in (0, None)
    assert capsys.readouterr().out.strip().endswith("the run is complete (1 epochs, 2 steps); nothing to resume")
    assert {name: (out / name).read_bytes() for name in os.listdir(out) if name != ".lock"} == before


@pytest.mark.slow
def test_quiet_prints_only_the_json_lines_and_short_schedules_are_noted(tmp_path, capsys):
    run_script("infopro", tmp_path / "quiet", "--k", "2", "--epochs", "1", "--subset", "64", "--quiet")
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith("{") for line in out), out  # no lambda line, no start line
    run_script("dgl", tmp_path / "short", "--k", "2", "--epochs", "2", "--subset", "64")
    assert "note: 2 of the 2 epochs train at lr 0.01 (the warm-up's start) or 0" in capsys.readouterr().out
    run_script("dgl", tmp_path / "long", "--k", "2", "--epochs", "4", "--subset", "64", "--steps", "1")
    assert "note:" not in capsys.readouterr().out


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        tiny("dgl", tmp_path / "file")
    one_line_error(e, f"--out {tmp_path / 'file'} is a file")


@pytest.mark.slow
def test_read_only_out(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(SystemExit) as e:
        tiny("dgl", tmp_path / "run")
    message = one_line_error(e, f"cannot write {tmp_path / 'run'} (Read-only file system)", "--out")
    assert "disk space" not in message  # not the cause here


@pytest.mark.slow
def test_full_disk_while_saving(tmp_path, monkeypatch):
    out, save = tmp_path / "run", torch.save

    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch's words
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        tiny("bp", out, "--epochs", "1")
    one_line_error(e, f"cannot write {out / 'checkpoint.pt'}", "free disk space")
    assert sorted(os.listdir(out)) == [".lock", "args.json", "metrics.jsonl"]  # no temporary file keeps the disk full
    monkeypatch.setattr(torch, "save", save)
    assert tiny("bp", out, "--epochs", "1")["steps"] == 2  # and nothing blocks the next run


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        common.read_raw_dataset("cifar10", str(tmp_path / "data"))
    one_line_error(e, f"--data-dir {tmp_path / 'data'} is a file, not a folder")


@pytest.mark.parametrize("damage", ["truncated", "a label short"])
def test_damaged_cifar_batch(tmp_path, damage):
    write_cifar(tmp_path, 4, 10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                "labels")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    else:
        with open(path, "rb") as f:
            batch = pickle.load(f)
        with open(path, "wb") as f:
            pickle.dump({**batch, "labels": batch["labels"][:-1]}, f)
    with pytest.raises(SystemExit) as e:
        common.read_raw_dataset("cifar10", str(tmp_path))
    one_line_error(e, f"{path} is damaged (" + ("UnpicklingError" if damage == "truncated" else "ValueError"))


def test_garbage_stl10_file(tmp_path):
    os.makedirs(tmp_path / "stl10_binary")
    for split in ("train", "test"):
        (tmp_path / "stl10_binary" / f"{split}_X.bin").write_bytes(np.random.default_rng(0).bytes(1000))
        (tmp_path / "stl10_binary" / f"{split}_y.bin").write_bytes(b"\1")
    with pytest.raises(SystemExit) as e:
        common.read_raw_dataset("stl10", str(tmp_path))
    one_line_error(e, f"{tmp_path / 'stl10_binary' / 'train_X.bin'} is damaged")


def image_folder(root, classes):
    """ImageFolder splits `train` and `val` with a class folder per {name: number of JPEGs}."""
    from PIL import Image
    for split in ("train", "val"):
        for name, n in classes.items():
            os.makedirs(root / split / name)
            for i in range(n):
                Image.fromarray(np.full((40, 40, 3), 50 * i, dtype=np.uint8)).save(root / split / name / f"{i}.JPEG")


def corrupt_jpeg_folder(root):
    """An ImageFolder of 3 + 3 JPEGs, one of which is not an image; returns its path."""
    image_folder(root, {"n01": 3, "n02": 3})
    bad = root / "train" / "n02" / "1.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    return bad


def imagenet(root, *extra):
    args = ["--dataset", "imagenet", "--data-dir", str(root), "--arch", "resnet18", "--image-size", "32",
            "--batch-size", "4", "--device", "cpu", "--out", str(root / "out"), *extra]
    return common.parse_args(args, "", "dgl", 16, 160)


@pytest.mark.slow
def test_imagenet_class_folder_without_images(tmp_path):
    image_folder(tmp_path, {"n01": 2, "n02": 0})
    with pytest.raises(SystemExit) as e:
        common.load_data(imagenet(tmp_path), torch.device("cpu"))
    one_line_error(e, tmp_path / "train", "n02", "remove the empty class folders")


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_jpeg_stops_with_its_path(tmp_path, workers):
    bad = corrupt_jpeg_folder(tmp_path)
    data = common.load_data(imagenet(tmp_path, "--workers", workers), torch.device("cpu"))
    with pytest.raises(SystemExit) as e:
        list(data.train_batches(1, 4, seed=0))
    one_line_error(e, f"cannot read the image {bad}", "replace or delete the file")


@pytest.mark.slow
def test_script_with_loader_workers_exits_after_an_error(tmp_path):
    """DataLoader workers ignore SIGTERM (a scheduler's is for the main process); the loader an error
    leaves behind must not keep the script from exiting (multiprocessing ends workers with SIGTERM)."""
    bad = corrupt_jpeg_folder(tmp_path)
    cmd = [sys.executable, "dgl.py", "--dataset", "imagenet", "--data-dir", str(tmp_path), "--arch", "resnet18",
           "--image-size", "32", "--batch-size", "4", "--k", "2", "--epochs", "1", "--workers", "2",
           "--device", "cpu", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)  # hung forever before
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot read the image {bad}"), proc.stderr


# ---- 4. a non-finite model is never checkpointed ---------------------------------------------------

@pytest.mark.slow
def test_nonfinite_state_stops_before_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # the loss stays finite for an epoch while BatchNorm statistics overflow
        tiny("dgl", out, "--k", "4", "--epochs", "3", "--lr", "1e4", "--warmup-epochs", "0")
    message = one_line_error(e, "; lower --lr (it was ")
    epoch = int(message.split(" in epoch ")[1].split()[0].rstrip(";"))
    args = common.parse_args([*TINY, "--epochs", "3", "--lr", "1e4", "--warmup-epochs", "0"], "", "dgl", 16, 160)
    assert f"it was {common.lr_at(epoch, args):.4g} in epoch {epoch})" in message  # the lr of the bad epoch
    if os.path.exists(out / "checkpoint.pt"):
        assert f"last good checkpoint is {out / 'checkpoint.pt'} (epoch {epoch - 1})" in message
        for key, t in checkpoint_state(out).items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), key


@pytest.mark.slow
def test_nonfinite_state_is_not_checkpointed_mid_epoch(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # a checkpoint after every step: the state overflows within epoch 1
        tiny("dgl", out, "--k", "4", "--subset", "256", "--epochs", "3", "--lr", "1e4", "--warmup-epochs", "0",
             "--save-every", "1")
    one_line_error(e, "the model state became non-finite in epoch 1",
                   f"the last good checkpoint is {out / 'checkpoint.pt'} (epoch 1, batch ")
    for key, t in checkpoint_state(out).items():
        assert not t.is_floating_point() or torch.isfinite(t).all(), key


# ---- 5. SIGTERM / Ctrl-C and --save-every ----------------------------------------------------------

@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(straight, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "dgl.py", *EXACT, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.exists(out / "checkpoint.pt") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # epoch 2 is under way (4 steps)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stderr and "--resume" in stderr.splitlines()[-1]
    partial = torch.load(out / "checkpoint.pt", weights_only=False)["partial"]
    assert partial["epoch"] == 2 and 1 <= partial["batch"] <= 4  # a checkpoint inside epoch 2
    assert not glob.glob(str(out / "*.tmp*"))
    proc = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    same_state(checkpoint_state(straight), checkpoint_state(out))
    assert metrics_but_time(straight) == metrics_but_time(out)  # train loss too


@pytest.mark.slow
def test_save_every_resumes_exactly(straight, tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    run_script("dgl", out, *EXACT, "--save-every", "5", "--steps", "7", "--quiet", quick=False)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["partial"]["batch"] == 1  # step 5: epoch 2, batch 1
    run_script("dgl", out, *EXACT, "--resume", "--quiet", quick=False)  # steps 6-8
    same_state(checkpoint_state(straight), checkpoint_state(out))
    assert metrics_but_time(straight) == metrics_but_time(out)
    for line in capsys.readouterr().out.splitlines():  # --quiet: JSON lines only
        json.loads(line)


@pytest.mark.slow
def test_sigint_in_process_stops_after_the_step(tmp_path, monkeypatch):
    import dgl
    step, calls = dgl.local_step, []

    def interrupted_step(net, modules, aux, args, i, *rest):  # the signal arrives in step 3's first module
        calls.append(i)
        if calls.count(0) == 3 and i == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return step(net, modules, aux, args, i, *rest)
    monkeypatch.setattr(dgl, "local_step", interrupted_step)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        tiny("dgl", tmp_path / "run", "--k", "2", "--subset", "128", "--epochs", "1")
    assert e.value.code == 128 + signal.SIGINT and calls.count(0) == 3 and calls[-1] == 1  # step 3 finished
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["steps"] == 3 and ckpt["partial"]["batch"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # the run's handler is gone again


@pytest.mark.slow
def test_a_second_sigint_stops_at_once(tmp_path, monkeypatch):
    import dgl
    step, calls = dgl.local_step, []

    def twice_interrupted_step(net, modules, aux, args, i, *rest):  # Ctrl-C twice in step 3's first module
        calls.append(i)
        if calls.count(0) == 3 and i == 0:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return step(net, modules, aux, args, i, *rest)
    monkeypatch.setattr(dgl, "local_step", twice_interrupted_step)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):  # the second signal goes to that handler, as without the run's
            tiny("dgl", tmp_path / "run", "--k", "2", "--subset", "128", "--epochs", "1")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, handler)
    assert calls[-1] == 0 and calls.count(0) == 3  # step 3 did not go on
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    monkeypatch.setattr(dgl, "local_step", step)  # the same folder is free again (a notebook's next run)
    assert tiny("dgl", tmp_path / "run", "--k", "2", "--epochs", "1")["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [2, 1])
def test_a_signal_during_evaluation_stops_after_the_epochs_checkpoint(tmp_path, monkeypatch, epochs):
    evaluate, out = common.evaluate, tmp_path / "run"

    def interrupted_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(common, "evaluate", interrupted_evaluation)
    if epochs == 1:  # the run is complete anyway: it ends as usual
        assert tiny("dgl", out, "--k", "2", "--epochs", "1")["steps"] == 2
        return
    with pytest.raises(SystemExit) as e:
        tiny("dgl", out, "--k", "2", "--epochs", "2")
    assert e.value.code == 128 + signal.SIGTERM
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["steps"], ckpt["partial"]) == (1, 2, None)
    assert [line["epoch"] for line in read_jsonl(out / "metrics.jsonl")] == [1]


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_resumes_with_as_many_replicas(tmp_path):
    out = tmp_path / "run"
    tiny("dgl", out, *AFTER_EPOCH_1, "--steps", "1", "--save-every", "1")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    partial = ckpt["partial"]
    assert (partial["epoch"], partial["batch"], partial["replicas"]) == (1, 1, 1)
    ckpt["partial"] = {**partial, "replicas": 2, "stats": partial["stats"] * 2, "aug": partial["aug"] * 2}
    torch.save(ckpt, out / "checkpoint.pt")  # as two data-parallel processes write it
    with pytest.raises(SystemExit) as e:
        tiny("dgl", out, *AFTER_EPOCH_1, "--resume")
    one_line_error(e, "was written mid-epoch by 2 data-parallel replicas; resume it with as many")


# ---- 6. what was measured survives a resume ------------------------------------------------------

@pytest.mark.slow
def test_resume_keeps_the_measurements(after_epoch_1, tmp_path):
    out = copy_run(after_epoch_1, tmp_path)
    resumed = tiny("dgl", out, *AFTER_EPOCH_1, "--resume")
    assert resumed["act_mem_bytes"] > 0 and resumed["images_per_s"] > 0
    with pytest.raises(SystemExit) as e:  # a finished run: nothing to train, nothing rewritten
        tiny("dgl", out, *AFTER_EPOCH_1, "--resume")
    assert e.value.code == 0
    again = read_json(out / "summary.json")
    keys = ("act_mem_bytes", "images_per_s", "steps")
    assert {k: again[k] for k in keys} == {k: resumed[k] for k in keys}


# ---- 8. start and progress lines -------------------------------------------------------------------

@pytest.mark.slow
def test_start_and_progress_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "PROGRESS_STEPS", 1)
    out = tmp_path / "run"
    tiny("bp", out, "--epochs", "2")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"bp: synthetic (64 training images, 2 steps per epoch), resnet32 in K=1 modules, 466,906 "
                        f"parameters, epochs 1-2 on 1 x cpu, output in {out}")
    progress = [l for l in lines if l.startswith("epoch ")]
    assert [l.split(" train_loss")[0] for l in progress] == [f"epoch {(s + 1) // 2}/2 step {s}/4" for s in (1, 2, 3, 4)]
    assert all(" images/s elapsed " in l and " eta " in l for l in progress)


@pytest.mark.slow
def test_the_first_progress_line_comes_after_a_few_timed_steps(tmp_path, capsys):
    tiny("dgl", tmp_path / "run", "--k", "2", "--subset", "256", "--epochs", "1")  # 8 steps
    lines = capsys.readouterr().out.splitlines()
    progress = [i for i, l in enumerate(lines) if l.startswith("epoch ")]
    assert len(progress) == 1 and lines[progress[0]].startswith("epoch 1/1 step 5/8 train_loss ")
    assert lines[progress[0] + 1].startswith('{"epoch": 1,')  # before the epoch's JSON line
