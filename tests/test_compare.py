"""tools/compare.py: the table and the figure from run folders, finished, running and older ones."""
import json
import math
import os
import sys

import pytest

from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, args, epochs, summary=None):
    """A run folder as the scripts write it (summary None: the run is still going)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump({"dataset": "synthetic", "arch": "resnet32", "batch_size": 64, "epochs": 3, **args}, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"epoch": e, **line}) + "\n" for e, line in enumerate(epochs, 1))
    if summary is not None:
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump({"method": args["method"], "k": args["k"], **summary}, f)


def epoch(acc, best, **extra):
    return {"test_acc": acc, "best_test_acc": best, "train_loss": 1.0, "train_acc": 0.5, **extra}


@pytest.fixture
def runs(tmp_path):
    """bp and dgl finished with every field (CUDA memory too), infopro still running with per-module
    fields (SupCon heads: no accuracy), an older contsup run without them and at another batch."""
    write_run(tmp_path / "bp", {"method": "bp", "k": 1},
              [epoch(0.5, 0.5, elapsed_s=10.0, module_loss=[1.2], module_acc=[0.6]),
               epoch(0.9, 0.9, elapsed_s=20.0, module_loss=[0.4], module_acc=[0.8])],
              dict(final_test_acc=0.9, best_test_acc=0.9, act_mem_bytes=200e6, peak_mem_bytes=400e6,
                   images_per_s=300.0, elapsed_s=21.0))
    write_run(tmp_path / "dgl", {"method": "dgl", "k": 3},
              [epoch(0.7, 0.7, elapsed_s=12.0, module_loss=[2.0, 1.5, 1.0], module_acc=[0.3, 0.5, 0.6],
                     module_test_acc=[0.25, 0.45, 0.7]),
               epoch(0.6, 0.7, elapsed_s=24.0, module_loss=[1.8, 1.2, 0.9], module_acc=[0.4, 0.6, 0.7],
                     module_test_acc=[0.35, 0.55, 0.6])],
              dict(final_test_acc=0.6, best_test_acc=0.7, act_mem_bytes=50e6, peak_mem_bytes=100e6,
                   images_per_s=250.0, elapsed_s=150.0))
    write_run(tmp_path / "infopro", {"method": "infopro", "k": 3},
              [epoch(0.4, 0.4, elapsed_s=30.0, module_loss=[5.0, 4.0, 1.5], module_acc=[None, None, 0.45])])
    write_run(tmp_path / "contsup-old", {"method": "contsup", "k": 4, "batch_size": 32},
              [epoch(0.3, 0.3), epoch(0.8, 0.8)],
              dict(final_test_acc=0.8, best_test_acc=0.8, act_mem_bytes=70e6, peak_mem_bytes=None,
                   images_per_s=None, epochs=3))
    for name, stamp in (("args.json", 1000), ("metrics.jsonl", 1080), ("summary.json", 1090)):
        os.utime(tmp_path / "contsup-old" / name, (stamp, stamp))
    return tmp_path


def rows(text):
    """The table as {run: {column: cell}}."""
    lines = [l for l in text.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(head, cells)) for cells in
            ([c.strip() for c in l.strip("|").split("|")] for l in lines[2:])}


def test_table_from_finished_running_and_older_runs(runs, capsys):
    text = compare.main([str(runs / "*")])
    assert capsys.readouterr().out == text
    table = rows(text)
    assert list(table) == ["bp", "contsup-old", "dgl", "infopro"]  # a glob's matches, sorted
    bp, dgl, info, old = table["bp"], table["dgl"], table["infopro"], table["contsup-old"]
    assert (dgl["method"], dgl["dataset"], dgl["arch"], dgl["K"], dgl["batch"]) == ("dgl", "synthetic", "resnet32",
                                                                                       "3", "64")
    assert (dgl["final acc"], dgl["best acc"], dgl["epochs"], dgl["wall time"]) == ("60.0%", "70.0%", "2/3",
                                                                                     "2.5 min")
    assert (dgl["act. MB"], dgl["act / bp"], dgl["peak MB"], dgl["peak / bp"]) == ("50.0", "0.25", "100.0", "0.25")
    assert (bp["act / bp"], bp["images/s"], bp["wall time"]) == ("1.00", "300", "21 s")
    # still running: no summary, so the last epoch line gives what it can
    assert (info["epochs"], info["final acc"], info["best acc"], info["wall time"]) == ("1/3 †", "40.0%", "40.0%",
                                                                                        "30 s")
    assert info["act. MB"] == info["act / bp"] == info["images/s"] == "-"
    assert "† no summary.json yet" in text
    # an older run: no CUDA peak, no bp.py run at its batch, and the wall time from its files' times
    assert (old["epochs"], old["act. MB"], old["act / bp"], old["peak MB"], old["wall time"]) == ("2/3", "70.0", "-",
                                                                                                   "-", "~90 s")
    assert "~ from the files' times" in text


def test_runs_named_outright_keep_their_order_and_cpu_tables_have_no_peak_column(runs):
    os.remove(runs / "dgl" / "summary.json")
    table = rows(compare.main([str(runs / "infopro"), str(runs / "dgl"), str(runs / "contsup-old")]))
    assert list(table) == ["infopro", "dgl", "contsup-old"]
    assert "peak MB" not in table["dgl"] and table["dgl"]["act / bp"] == "-"  # no bp.py run given
    assert table["dgl"]["final acc"] == "60.0%" and table["dgl"]["wall time"] == "24 s"


def test_a_folder_of_runs_is_read_one_level_down(runs, tmp_path):
    nested = tmp_path / "all"
    os.makedirs(nested)
    os.rename(runs / "dgl", nested / "dgl")  # runs/*: bp, contsup-old, infopro and the folder all/
    assert list(rows(compare.main([str(runs / "*")]))) == ["dgl", "bp", "contsup-old", "infopro"]  # all/ first
    assert list(rows(compare.main([str(nested)]))) == ["dgl"]  # named outright


def test_a_cut_short_last_line_is_skipped(runs):
    with open(runs / "infopro" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "test_ac')
    assert rows(compare.main([str(runs / "infopro")]))["infopro"]["epochs"] == "1/3 †"


def test_not_a_run_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*is not a run folder.*e\.g\. runs/\*$"):
        compare.main([str(tmp_path)])
    os.makedirs(tmp_path / "failed")  # a start that failed before its first step: not a run
    (tmp_path / "failed" / "metrics.jsonl").write_text("")
    (tmp_path / "failed" / ".lock").write_text("process 1 on here\n")
    with pytest.raises(SystemExit, match=r"^error: no run folders in .*"):
        compare.main([str(tmp_path / "*")])
    with pytest.raises(SystemExit, match=r"^error: no run folders in .*nothing\*"):
        compare.main([str(tmp_path / "nothing*")])


def test_module_accuracies_prefer_test_and_keep_missing_heads_as_gaps(runs):
    load = {name: compare.load_run(str(runs / name)) for name in ("dgl", "infopro", "contsup-old")}
    assert compare.module_accuracies(load["dgl"]) == ("test", pytest.approx([35.0, 55.0, 60.0]))
    label, accs = compare.module_accuracies(load["infopro"])
    assert label == "train" and math.isnan(accs[0]) and math.isnan(accs[1]) and accs[2] == pytest.approx(45.0)
    assert compare.module_accuracies(load["contsup-old"]) is None


def test_plot_writes_a_png(runs, tmp_path):
    import matplotlib.image as image  # in requirements.txt: CI tests the figure
    out = tmp_path / "compare.png"
    compare.main([str(runs / "*"), "--plot", str(out)])
    assert out.read_bytes()[:8] == PNG
    pixels = image.imread(out)
    assert pixels.shape[:2] == (400, 1100) and pixels.std() > 0.05  # drawn, not blank


def test_plot_without_matplotlib_says_how_to_install_it(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(SystemExit, match=r"^error: --plot needs matplotlib: pip install matplotlib$"):
        compare.main([str(runs / "bp"), "--plot", str(tmp_path / "x.png")])


@pytest.mark.slow
def test_a_real_run(runs, tmp_path):
    """A run the scripts write today (whatever per-module fields it has), against the bp.py run above."""
    summary = run_script("dgl", tmp_path / "dgl-real", "--k", "4", "--epochs", "1", "--steps", "1", "--subset", "64")
    out = tmp_path / "real.png"
    table = rows(compare.main([str(tmp_path / "dgl-real"), str(runs / "bp"), "--plot", str(out)]))
    real = table["dgl-real"]
    assert (real["method"], real["K"], real["batch"], real["epochs"]) == ("dgl", "4", "64", "1/1")
    assert real["final acc"] == f"{100 * summary['final_test_acc']:.1f}%"
    assert real["act / bp"] == f"{summary['act_mem_bytes'] / 200e6:.2f}"
    assert out.read_bytes()[:8] == PNG


@pytest.mark.slow
def test_k_beside_the_modules_trained_where_the_method_merges(tmp_path, capsys):
    """auglocal.py at K=16 on ResNet-32 trains 14 modules (the K-d merge): the start line and the table say so."""
    summary = run_script("auglocal", tmp_path / "run", "--steps", "1", "--epochs", "1")
    assert summary["k"] == 16 and len(summary["modules"]) == 14
    assert "in K=16 modules (14 trained: merged as the method does)" in capsys.readouterr().out
    assert compare.load_run(str(tmp_path / "run"))["k"] == "16 (14)"
    assert compare.k_trained(4, {"modules": [[0], [1], [2], [3]]}) == 4
