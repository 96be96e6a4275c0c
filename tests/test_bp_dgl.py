"""bp.py and dgl.py: the local step, isolation, memory, outputs, resume, torchrun, learning."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bp
import common
import dgl
from conftest import (QUICK, ROOT, assert_greedy_gradients, build_method, checkpoint_state, metrics_but_time,
                      module_params, read_json, read_jsonl, run_script, saved_tensor_peak, train_step)


def build(k, arch="resnet32", seed=0):
    return build_method("dgl", *QUICK, "--arch", arch, "--k", k, "--seed", seed)


def batch(data, n=32):
    return data.normalize(data.train_x[:n]), data.train_y[:n]


def test_mlp_sr_head_parameter_counts():
    # The official counts (the official DGL code's mlp-sr head) minus the unused BatchNorm2d(C) (2C parameters).
    for channels, size, official in ((16, 32, 14_410), (32, 16, 54_922), (64, 8, 214_282)):
        head = dgl.MlpSrHead(channels, size, 10)
        assert common.count_params(head) == official - 2 * channels
        assert head(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_dgl_heads_sit_on_module_outputs():
    args, data, net, modules, aux = build(16)
    assert len(aux) == 15
    assert aux[0].pool_size == 8 and aux[6].pool_size == 4 and aux[14].pool_size == 2  # ceil(S/4)
    assert [h.mlp[-1].in_features for h in (aux[0], aux[6], aux[14])] == [64, 128, 256]


def test_each_module_gets_exactly_the_gradient_of_its_own_local_loss():
    args, data, net, modules, aux = build(4)
    assert_greedy_gradients("dgl", args, net, modules, aux, *batch(data))


def test_no_gradient_crosses_a_module_boundary():
    """Changing what later modules compute leaves the gradients of earlier modules untouched."""
    args, data, net, modules, aux = build(4)
    x, y = batch(data)
    def grads():
        for p in [*net.parameters(), *aux.parameters()]:
            p.grad = None
        train_step(dgl, net, modules, aux, args, x, y)
        return [[p.grad.clone() for p in module_params(net, m)] for m in modules]
    before = grads()
    with torch.no_grad():  # perturb the heads of modules 2 and 3 (the final one included)
        for p in [*aux[2].parameters(), *net.head.parameters()]:
            p.mul_(1.5)
    after = grads()
    for k in (0, 1):
        for a, b in zip(before[k], after[k]):
            assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(before[3], after[3]))  # the check can fail


@pytest.mark.slow
def test_per_module_backward_is_what_saves_memory():
    """The act_mem meter tells a per-module backward from one backward on the summed losses."""
    args, data, net, modules, aux = build(4)
    x, y = batch(data, 64)

    def summed(x, y):
        losses, h = [], x
        for layers, head in zip(modules[:-1], aux):
            h = net.run(layers, h)
            losses.append(F.cross_entropy(head(h), y))
            h = h.detach()
        losses.append(F.cross_entropy(net.head(net.run(modules[-1], h)), y))
        sum(losses).backward()

    local = saved_tensor_peak([net, aux], lambda: train_step(dgl, net, modules, aux, args, x, y))
    assert local < 0.6 * saved_tensor_peak([net, aux], lambda: summed(x, y))


@pytest.mark.slow
def test_dgl_activation_memory_well_below_bp(tmp_path):
    bp_summary = run_script("bp", tmp_path / "bp", "--steps", "1")
    dgl_summary = run_script("dgl", tmp_path / "dgl", "--k", "4", "--steps", "1")
    assert dgl_summary["act_mem_bytes"] < 0.5 * bp_summary["act_mem_bytes"]
    k16 = run_script("dgl", tmp_path / "dgl16", "--k", "16", "--steps", "1")
    assert k16["act_mem_bytes"] < dgl_summary["act_mem_bytes"]


@pytest.mark.slow
def test_grad_checkpoint_gives_the_same_gradients_and_batchnorm_statistics():
    """The forward recomputed in backward must not update BatchNorm's running statistics again."""
    args, data, net, modules, _ = build(1)
    x, y = batch(data)
    results = []
    for n in (0, 3):
        args.grad_checkpoint = n
        model = copy.deepcopy(net)
        train_step(bp, model, [list(range(16))], None, args, x, y)
        results.append(([p.grad for p in model.parameters()], list(model.buffers())))
    (grads, buffers), (ckpt_grads, ckpt_buffers) = results
    for a, b in zip(grads + buffers, ckpt_grads + ckpt_buffers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(buffers[-1]) == 1  # num_batches_tracked
    assert bp.checkpoint_segments(tuple(range(16)), 3) == [list(range(0, 6)), list(range(6, 11)), list(range(11, 16))]


@pytest.mark.slow
def test_k1_local_training_equals_bp(tmp_path):
    run_script("bp", tmp_path / "bp", "--epochs", "1")
    run_script("dgl", tmp_path / "dgl", "--k", "1", "--epochs", "1")
    a, b = checkpoint_state(tmp_path / "bp"), checkpoint_state(tmp_path / "dgl")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_outputs(tmp_path):
    out = tmp_path / "run"
    summary = run_script("dgl", out, "--k", "4", "--epochs", "2")
    assert sorted(os.listdir(out)) == [".lock", "args.json", "checkpoint.pt", "metrics.jsonl", "summary.json"]
    assert read_json(out / "summary.json") == summary
    assert summary["modules"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert summary["params"] == {"backbone": 466_906, "aux": 14_378 + 54_858 + 214_154}
    for key in ("method", "dataset", "arch", "k", "epochs", "steps", "best_test_acc", "final_test_acc",
                "peak_mem_bytes", "act_mem_bytes", "images_per_s", "device", "torch"):
        assert key in summary
    assert summary["steps"] == 8 and summary["device"] == "cpu" and summary["act_mem_bytes"] > 0
    lines = read_jsonl(out / "metrics.jsonl")
    assert [l["epoch"] for l in lines] == [1, 2] and lines[-1]["test_acc"] == summary["final_test_acc"]
    assert read_json(out / "args.json")["k"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("arch,k,blocks", [("resnet32", 8, [2] * 8), ("resnet110", 4, [13, 14, 14, 14])])
def test_summary_reports_official_split_and_params(tmp_path, arch, k, blocks):
    summary = run_script("dgl", tmp_path / "run", "--arch", arch, "--k", k, "--steps", "1", "--subset", "64")
    assert [len(m) for m in summary["modules"]] == blocks
    assert summary["params"]["backbone"] == {"resnet32": 466_906, "resnet110": 1_730_714}[arch]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    run_script("dgl", tmp_path / "straight", "--k", "2", "--epochs", "2")
    run_script("dgl", tmp_path / "split", "--k", "2", "--epochs", "2", "--steps", "4")  # stops after epoch 1
    assert [l["epoch"] for l in read_jsonl(tmp_path / "split" / "metrics.jsonl")] == [1]
    run_script("dgl", tmp_path / "split", "--k", "2", "--epochs", "2", "--resume")
    a, b = checkpoint_state(tmp_path / "straight"), checkpoint_state(tmp_path / "split")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_jsonl(tmp_path / "straight" / "metrics.jsonl") [-1]["test_acc"] == \
        read_jsonl(tmp_path / "split" / "metrics.jsonl")[-1]["test_acc"]


@pytest.mark.slow
def test_resume_mid_epoch_drops_the_unfinished_epoch(tmp_path):
    run_script("dgl", tmp_path / "run", "--k", "2", "--epochs", "2", "--steps", "6")  # 1.5 epochs
    assert [l["epoch"] for l in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    summary = run_script("dgl", tmp_path / "run", "--k", "2", "--epochs", "2", "--resume")
    assert summary["steps"] == 8
    assert [l["epoch"] for l in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_resume_errors(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        run_script("dgl", tmp_path / "none", "--resume")
    run_script("dgl", tmp_path / "run", "--k", "2", "--epochs", "1")
    with pytest.raises(SystemExit, match=r"has --k 2, not 4; resume with the same arguments"):
        run_script("dgl", tmp_path / "run", "--k", "4", "--epochs", "1", "--resume")
    with pytest.raises(SystemExit, match="already holds a run; pass --resume"):
        run_script("dgl", tmp_path / "run", "--k", "2", "--epochs", "1")


@pytest.mark.slow
def test_nan_loss_stops_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="training loss became nan in epoch 1; lower --lr"):
        run_script("bp", tmp_path / "run", "--lr", "1e30", "--warmup-epochs", "0", "--epochs", "4")
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_models_and_resume_mid_epoch_exactly(tmp_path):
    def torchrun(out, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dgl.py",
               *QUICK, "--k", "4", "--epochs", "2", "--out", str(out), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    torchrun(tmp_path / "ddp")
    summary = read_json(tmp_path / "ddp" / "summary.json")
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["rank_max_abs_diff"] == 0.0
    assert summary["final_test_acc"] > 0  # evaluated over both ranks' shards
    torchrun(tmp_path / "split", "--steps", "6", "--save-every", "1")  # stops at epoch 2, batch 2
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["partial"]["batch"] == 2
    torchrun(tmp_path / "split", "--resume")  # each replica goes on with its own shard's statistics
    assert metrics_but_time(tmp_path / "ddp") == metrics_but_time(tmp_path / "split")


@pytest.mark.slow
def test_bp_learns_on_synthetic(tmp_path):
    summary = run_script("bp", tmp_path / "run", "--subset", "1024", "--epochs", "4", "--lr", "0.1")
    assert summary["final_test_acc"] > 0.7  # chance is 0.1; measured 0.90


@pytest.mark.slow
def test_dgl_learns_on_synthetic(tmp_path):
    summary = run_script("dgl", tmp_path / "run", "--k", "4", "--subset", "1024", "--epochs", "4", "--lr", "0.1")
    assert summary["final_test_acc"] > 0.7  # chance is 0.1; measured 1.0


def test_imagenet_vgg_follows_the_official_dgl_vgg_model():
    """No Dropout in the network's head; every Linear layer (head and aux heads) N(0, 0.01), bias 0."""
    args, data, net, modules, aux = build_method("dgl", "--dataset", "imagenet", "--fake-data", "--image-size", "32",
                                                 "--arch", "vgg13_bn", "--k", "4", "--batch-size", "4", "--device",
                                                 "cpu", "--out", "unused")
    assert not any(isinstance(m, torch.nn.Dropout) for m in net.modules())
    linears = [m for m in [*net.head.modules(), *aux.modules()] if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 + 4 * len(aux) == 15
    for m in linears:
        assert abs(m.weight.std().item() - 0.01) < 0.002 and not m.bias.any()
    net.train()
    h = torch.randn(2, 512, 2, 2)
    torch.testing.assert_close(net.head(h), net.head(h), rtol=0, atol=0)  # deterministic in training
