"""Per-module metrics in metrics.jsonl: each module's local loss and auxiliary-classifier accuracy
during training, its test accuracy with --module-acc, and the wall time."""
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import dgl
from conftest import build_method, read_json, read_jsonl, run_script


@pytest.mark.slow
def test_dgl_logs_every_modules_loss_and_accuracy(tmp_path):
    run_script("dgl", tmp_path / "run", "--k", 4, "--epochs", 2, "--module-acc")
    lines, summary = read_jsonl(tmp_path / "run" / "metrics.jsonl"), read_json(tmp_path / "run" / "summary.json")
    for line in lines:
        assert len(line["module_loss"]) == len(line["module_acc"]) == len(line["module_test_acc"]) == 4
        assert all(l > 0 for l in line["module_loss"]) and all(0 <= a <= 1 for a in line["module_acc"])
        # The last module is the network: its loss and accuracy are the run's.
        assert line["module_loss"][-1] == line["train_loss"] and line["module_acc"][-1] == line["train_acc"]
        assert line["module_test_acc"][-1] == line["test_acc"]
    assert 0 < lines[0]["elapsed_s"] < lines[1]["elapsed_s"] <= summary["elapsed_s"]

    # The logged test accuracy of module 1's head is that head's accuracy on the test split.
    args, data, net, modules, aux = build_method("dgl", "--dataset", "synthetic", "--arch", "resnet32", "--subset",
                                                 256, "--k", 4)
    model = nn.ModuleDict({"net": net, "aux": aux})
    model.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"])
    model.eval()
    with torch.no_grad():
        x, y = data.normalize(data.test_x), data.test_y
        h = net.run(modules[1], net.run(modules[0], x))
        right = (aux[1](h).argmax(1) == y).float().mean().item()
    assert abs(lines[-1]["module_test_acc"][1] - right) < 1e-6


@pytest.mark.slow
def test_modules_without_a_classifier_log_no_accuracy(tmp_path):
    run_script("infopro", tmp_path / "run", "--k", 4, "--steps", 2, "--module-acc")  # SupCon heads
    line = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert line["module_acc"][:3] == [None] * 3 and line["module_test_acc"][:3] == [None] * 3
    assert all(l is not None for l in line["module_loss"])
    run_script("mlaan", tmp_path / "mlaan", "--k", 4, "--steps", 2)  # windows of 2 end at modules 1 and 2
    line = read_jsonl(tmp_path / "mlaan" / "metrics.jsonl")[-1]
    assert line["module_loss"][0] is None and all(l is not None for l in line["module_loss"][1:])
    assert line["module_acc"][0] is None and all(0 <= a <= 1 for a in line["module_acc"][1:])  # cascaded heads
    assert "module_test_acc" not in line


def test_run_modules_backpropagates_each_loss_at_once_and_detaches():
    """The driver of every method: per module, the loss's backward before the next module runs."""
    args, data, net, modules, aux = build_method("dgl", "--dataset", "synthetic", "--arch", "resnet32", "--subset",
                                                 64, "--k", 3)
    x, y = data.normalize(data.train_x[:16]), data.train_y[:16]
    seen = []

    def step(i, h, x, y):
        seen.append((i, [p.grad is None for p in net.layers[modules[0][0]].parameters()]))
        return dgl.local_step(net, modules, aux, args, i, h, x, y)

    h, losses, logits = common.run_modules(step, range(3), x, x, y)
    assert [i for i, _ in seen] == [0, 1, 2]
    assert all(seen[0][1]) and not any(seen[1][1])  # module 0 had its gradient before module 1 ran
    assert not h.requires_grad and all(not l.requires_grad for l in losses)
    expected = F.cross_entropy(logits[-1], y)
    torch.testing.assert_close(losses[-1], expected)
    assert common.train_step(functools.partial(dgl.local_step, net, modules, aux, args), 3, x, y)[1].shape == (16, 10)
