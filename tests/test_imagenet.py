"""ImageNet: torchvision backbones as layer lists, the papers' splits, the ImageFolder pipeline,
and every method script running a few steps (and under torchrun) on a tiny folder of JPEGs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, read_json, read_jsonl, run_script

METHODS = ["bp", "dgl", "infopro", "auglocal", "contsup", "mlaan"]


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    """3 classes, 6 training and 2 validation JPEGs each, of various sizes."""
    from PIL import Image
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in range(3):
            folder = root / split / f"n0000{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 72, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a learnable colour cue is enough here
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG")
    return root


def imagenet_args(root, *extra):
    return ["--dataset", "imagenet", "--data-dir", str(root), "--image-size", "32", "--batch-size", "6",
            "--workers", "0", "--device", "cpu", *extra]


@pytest.mark.slow
def test_backbones_are_torchvision_models_relisted():
    import torchvision
    for arch, n_layers in (("resnet18", 9), ("resnet50", 17)):
        net = common.imagenet_backbone(arch, 10)
        reference = getattr(torchvision.models, arch)(num_classes=10)
        assert len(net.layers) == n_layers
        net.eval(), reference.eval()
        reference.load_state_dict(dict(zip(reference.state_dict(), net.state_dict().values())))
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(net(x), reference(x))  # the same network, layer for layer
    # torchvision's published parameter counts (1000 classes)
    for arch, n_layers, params in (("resnet34", 17, 21_797_672), ("resnet101", 34, 44_549_160),
                                   ("vgg13_bn", 10, 133_053_736)):
        net = common.imagenet_backbone(arch, 1000)
        assert len(net.layers) == n_layers and common.count_params(net) == params


def test_imagenet_splits():
    cases = {  # (arch, K): layers per module (stem counted as a layer)
        ("resnet101", 2): [5, 29], ("resnet152", 2): [10, 41], ("resnext101_32x8d", 2): [7, 27],
        ("vgg13_bn", 4): [3, 3, 3, 1], ("vgg13_bn", 10): [1] * 10, ("resnet34", 17): [1] * 17,
        ("resnet101", 34): [1] * 34, ("resnet50", 4): [5, 4, 4, 4],
    }
    n_layers = {"resnet101": 34, "resnet152": 51, "resnext101_32x8d": 34, "vgg13_bn": 10, "resnet34": 17,
                "resnet50": 17}
    for (arch, k), expected in cases.items():
        assert [len(m) for m in common.split_modules(arch, n_layers[arch], k)] == expected, (arch, k)
    assert [len(m) for m in common.split_modules("resnet101", 34, 2, "balanced", 224)] == [5, 29]


def test_imagenet_schedule_has_no_warmup():
    args = common.parse_args(["--dataset", "imagenet", "--arch", "resnet101", "--out", "x"], "", "infopro", 2, 160)
    assert (args.batch_size, args.lr, args.epochs, args.warmup_epochs) == (1024, 0.4, 90, 0)
    assert common.lr_at(1, args) == pytest.approx(0.4) and common.lr_at(46, args) == pytest.approx(0.2)


def test_imagenet_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="is a CIFAR network; for imagenet choose one of"):
        common.parse_args(["--dataset", "imagenet", "--arch", "resnet32"], "", "dgl", 16, 160)
    args = common.parse_args(imagenet_args(tmp_path, "--arch", "resnet18", "--out", "x"), "", "dgl", 16, 160)
    with pytest.raises(SystemExit, match=r"imagenet needs .*train in ImageFolder layout"):
        common.load_data(args, torch.device("cpu"))


def test_imagefolder_pipeline(tiny_imagenet):
    args = common.parse_args(imagenet_args(tiny_imagenet, "--arch", "resnet18", "--out", "x"), "", "dgl", 16, 160)
    data = common.load_data(args, torch.device("cpu"))
    assert data.num_classes == 3 and data.image_size == 32
    batches = list(data.train_batches(1, 6, seed=0))
    assert len(batches) == 3 and batches[0][0].shape == (6, 3, 32, 32)
    again = list(data.train_batches(1, 6, seed=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # deterministic per (seed, epoch)
    assert [len(y) for _, y in data.train_batches(0, 17, seed=0)] == [17]  # no last batch of 1 (BatchNorm)
    shards = [list(data.test_batches(6, rank, 2)) for rank in (0, 1)]
    assert sum(len(y) for shard in shards for _, y in shard) == 6  # each image once over the ranks


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_script_runs_on_imagenet(tmp_path, tiny_imagenet, method):
    k = {"bp": "1", "mlaan": "4"}.get(method, "3")  # MLAAN's ImageNet windows hold 3 modules
    summary = run_script(method, tmp_path / method, *imagenet_args(tiny_imagenet, "--arch", "resnet18", "--k", k,
                                                                   "--steps", "2"), quick=False)
    assert summary["steps"] == 2 and summary["dataset"] == "imagenet" and len(summary["modules"]) >= 1
    line = read_jsonl(tmp_path / method / "metrics.jsonl")[-1]
    assert 0 <= line["test_acc"] <= line["test_top5"] == 1.0  # top-5 of 3 classes


@pytest.mark.slow
@pytest.mark.parametrize("method,k", [("dgl", 3), ("contsup", 3), ("mlaan", 4)])
def test_torchrun_on_imagenet(tmp_path, tiny_imagenet, method, k):
    """Two gloo ranks end with identical parameters: backbone, aux nets, ContSup's context encoders,
    MLAAN's freshly drawn leap copies and their EMA copies."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"{method}.py",
           *imagenet_args(tiny_imagenet, "--arch", "resnet18", "--k", str(k), "--epochs", "1"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["rank_max_abs_diff"] == 0.0
