"""--bf16, --channels-last, --compile, --no-augment, --fake-data, the benchmark script and figures.py."""
import functools
import os
import sys

import pytest
import torch

import common
import dgl
from conftest import QUICK, ROOT, run_script, train_step

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench  # noqa: E402
import figures  # noqa: E402
import gpu  # noqa: E402


def setup(*flags, k=4):
    args = common.parse_args([*QUICK, "--k", str(k), *flags, "--out", "unused"], "", "dgl", 16, 160)
    data = common.load_data(args, torch.device("cpu"))
    net = common.build_backbone(args, data, torch.device("cpu"))
    modules = common.make_modules(args, net, data)
    aux = dgl.build_aux(args, net, modules, data)
    return args, data, net, modules, aux


@pytest.mark.slow
def test_bf16_channels_last_step_matches_fp32():
    losses = {}
    for flags in ((), ("--bf16", "--channels-last")):
        args, data, net, modules, aux = setup(*flags)
        if args.channels_last:
            net.to(memory_format=torch.channels_last)
            aux.to(memory_format=torch.channels_last)
        x, y = next(data.train_batches(1, 32, 0))
        assert x.is_contiguous(memory_format=torch.channels_last) == args.channels_last
        with common.autocast(args, torch.device("cpu")):
            loss, logits = train_step(dgl, net, modules, aux, args, x, y)
        losses[flags] = loss.float().item()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    fp32, fast = losses.values()
    assert abs(fast - fp32) < 0.05 * fp32


@pytest.mark.slow
def test_bf16_channels_last_run(tmp_path):
    summary = run_script("dgl", tmp_path / "run", "--k", "4", "--bf16", "--channels-last", "--steps", "2",
                         "--subset", "128")
    assert summary["steps"] == 2 and summary["act_mem_bytes"] > 0


@pytest.mark.slow
def test_channels_last_holds_the_same_activation_bytes(tmp_path):
    """The meter leaves out the parameters as they train: --channels-last converts them (new storages)
    before the meter records them; recorded before, stale addresses hid activations reusing them."""
    plain, nhwc = (run_script("dgl", tmp_path / name, "--k", "4", "--steps", "1", "--subset", "64", *extra)
                   for name, extra in (("plain", []), ("nhwc", ["--channels-last"])))
    assert nhwc["act_mem_bytes"] == plain["act_mem_bytes"] > 0


@pytest.mark.slow
def test_compile_wraps_every_piece_without_changing_state_keys(tmp_path):
    args, data, net, modules, aux = setup("--compile")
    args.out = str(tmp_path / "run")
    run = common.Run(args)
    model = torch.nn.ModuleDict({"net": net, "aux": aux})
    keys = set(model.state_dict())
    step = functools.partial(dgl.local_step, net, modules, aux, args)
    run.start(model, common.make_optimizer(args, model), data, modules, step)
    common.release_run()  # the run is not trained: its lock and signal handlers go back now
    pieces = [*net.layers, net.head, *aux.children()]
    assert all(p._compiled_call_impl is not None for p in pieces)
    assert set(model.state_dict()) == keys  # checkpoints stay loadable without --compile


def test_no_augment_and_fake_data():
    args, data, *_ = setup("--no-augment")
    x, y = next(data.train_batches(1, 256, 0))
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0 * 100003 + 1))
    torch.testing.assert_close(x, data.normalize(data.train_x[order]))
    args = common.parse_args(["--dataset", "stl10", "--fake-data", "--batch-size", "4", "--out", "x"], "", "dgl", 16, 160)
    fake = common.load_data(args, torch.device("cpu"))
    assert fake.train_x.shape == (32, 3, 96, 96) and fake.num_classes == 10 and fake.train_y.max() < 10


@pytest.mark.slow
def test_benchmark_table_on_cpu(tmp_path):
    rows = bench.main(["--cases", "dgl:resnet32:4:cifar10:16", "contsup:resnet32:4:cifar10:16:--context=R0",
                       "contsup:resnet32:4:cifar10:16:--context=R1,--loss=ce", "--steps", "3", "--device", "cpu",
                       "--out", str(tmp_path / "table.md")])
    assert [r["method"] for r in rows] == ["bp", "dgl", "contsup", "contsup"]  # the bp baseline is added
    assert all("error" not in r for r in rows)
    assert rows[1]["memory"] < 0.6 * rows[0]["memory"]
    text = (tmp_path / "table.md").read_text()
    assert "| dgl | - | resnet32 | 4 | cifar10 | 16 | fp32 |" in text and "activation MiB (CPU)" in text
    assert rows[1]["flops"] < rows[2]["flops"] and "| compute / bp |" in text  # 1c2f heads cost more than mlp-sr
    assert "| contsup | --context=R1 --loss=ce | resnet32 | 4 |" in text
    assert rows[2]["memory"] != rows[3]["memory"]  # the options reached the script (R1 keeps more)


@pytest.mark.slow
def test_benchmark_reports_a_failed_case_and_goes_on(tmp_path):
    rows = bench.main(["--cases", "mlaan:resnet32:2:cifar10:8", "dgl:resnet32:2:cifar10:8", "--steps", "1",
                       "--device", "cpu", "--out", str(tmp_path / "table.md")])
    assert [(r["method"], "error" in r) for r in rows] == [("bp", False), ("mlaan", True), ("dgl", False)]
    assert ("| mlaan | - | resnet32 | 2 | cifar10 | 8 | fp32 | failed: error: --base plain cascades 2 modules per "
            "window, so --k must be at least 3") in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_a_failed_case_in_process_leaves_the_process_as_it_was(monkeypatch):
    """The GPU kit and figures.py run their cases in one process: a case the script refuses or one that
    runs out of memory is a row that says why, and leaves no lock and no signal handler behind (the
    autouse fixture no_run_left_behind checks those after every test)."""
    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(dgl, "local_step", out_of_memory)
    case = dict(arch="resnet32", k=2, dataset="cifar10", batch=8, options=[])
    rows = [bench.run_in_process({**case, "method": method}, 1, "cpu", "") for method in ("mlaan", "predsim", "dgl")]
    assert rows[0]["error"].startswith("error: --base plain cascades 2 modules per window")
    assert rows[1]["memory"] > 0 and rows[2]["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"


def test_benchmark_bad_case():
    with pytest.raises(SystemExit, match=r"write METHOD:ARCH:K:DATASET:BATCH\[:OPTIONS\]"):
        bench.main(["--cases", "dgl:resnet32"])


def test_gpu_kit_dry_run(tmp_path, monkeypatch):
    """The GPU kit's cases on the CPU (one per table here: the full dry run takes minutes)."""
    text = gpu.main(["--dry-run", "--only", "dgl:resnet32:16", "--budget-s", "0", "--out", str(tmp_path)])
    assert (tmp_path / "gpu.md").read_text() == text and "not GPU figures" in text and ": 4 cases in" in text
    assert "### fp32" in text and "### bf16, channels last" in text and "InfoPro*" not in text
    assert "| dgl | - | resnet32 | 16 | cifar10 | 4 | fp32 | 1 | 0.14 | 0.36 | 0.87 | - | - | - |" in text
    assert "| bp | - | resnet32 | 1 | cifar10 | 4 | --bf16 --channels-last |" in text
    with pytest.raises(SystemExit, match=r"^error: the dry run failed for 3 cases: bp:resnet110:1:cifar10:4 "
                       r"\(InfoPro\* Table 3 \(fp32\): boom\); infopro:resnet110:3:cifar10:4"):
        monkeypatch.setattr(gpu, "run_in_process", lambda case, *_: {**case, "error": "boom"})
        gpu.main(["--dry-run", "--only", "infopro:resnet110:3", "infopro:resnet110:4", "--out", str(tmp_path)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # on a GPU the budget counts
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "GPU")
    text = gpu.main(["--only", "infopro:resnet110:3", "--budget-s", "0", "--out", str(tmp_path)])
    assert ": 0 cases in" in text and "Not run (over --budget-s 0): bp:resnet110:1:cifar10:1024 (InfoPro* " in text
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="no CUDA device is visible"):
        gpu.main(["--out", str(tmp_path)])


def test_benchmark_docstring_commands_are_whole_lines():
    # a backslash continuation inside the docstring joins the lines with a run of spaces in --help
    commands = [line.split("#")[0].strip() for line in bench.__doc__.splitlines() if line.strip().startswith("python")]
    assert len(commands) == 8 and not any("  " in c or "\\" in c for c in commands), commands
    cases = [c.split("--cases ")[1].split(" --")[0].split() for c in commands if "--cases" in c]
    assert cases and all(bench.parse_case(case) for case in cases[0])


@pytest.mark.slow
def test_figures_table_and_plot(tmp_path):
    """benchmarks/figures.py on a subset: the ratios to bp.py in figures.md and the plot in figures.png."""
    results, _ = figures.main(["--out", str(tmp_path), "--archs", "resnet32", "--ks", "2", "4",
                               "--methods", "bp", "dgl", "--no-table3"])
    cell = results["resnet32", "cifar10"]
    memory = [figures.ratios(cell["dgl", k], cell["bp"])[0] for k in (2, 4)]
    assert 1 > memory[0] > memory[1]  # the saving local learning exists for, larger with more modules
    table = (tmp_path / "figures.md").read_text()
    assert "| dgl | {:.2f} / ".format(memory[0]) in table and (tmp_path / "figures.png").stat().st_size > 10_000
