"""common.py: backbones, splits, schedule, data loaders, memory meter, bad input."""
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

# Blocks per module in the official InfoPro tables (networks/configs.py, stem in module 1).
OFFICIAL_BLOCKS = {
    ("resnet32", 2): [7, 8], ("resnet32", 3): [5, 5, 5], ("resnet32", 4): [3, 4, 4, 4],
    ("resnet32", 8): [1, 2, 2, 2, 2, 2, 2, 2], ("resnet32", 16): [0] + [1] * 15,
    ("resnet110", 2): [27, 27], ("resnet110", 3): [18, 18, 18], ("resnet110", 4): [12, 14, 14, 14],
    ("resnet110", 8): [5, 7, 7, 7, 7, 7, 7, 7], ("resnet110", 16): [2] + [3] * 8 + [4] * 7,
}
BALANCED_BLOCKS = {  # InfoPro*, ResNet-110 (dataset, K)
    ("cifar10", 2): [15, 39], ("cifar10", 3): [10, 11, 33], ("cifar10", 4): [7, 8, 12, 27],
    ("stl10", 2): [15, 39], ("stl10", 3): [9, 11, 34], ("stl10", 4): [7, 8, 12, 27],
}


def sizes(modules):
    return [len(m) for m in modules]


def check_contiguous(modules, n):
    assert [i for m in modules for i in m] == list(range(n))


@pytest.mark.parametrize("arch,k", OFFICIAL_BLOCKS)
def test_official_splits(common, arch, k):
    n = {"resnet32": 16, "resnet110": 55}[arch]
    modules = common.split_modules(arch, n, k)
    check_contiguous(modules, n)
    expected = OFFICIAL_BLOCKS[arch, k]
    assert sizes(modules) == [expected[0] + 1] + expected[1:]  # + the stem


@pytest.mark.parametrize("dataset,k", BALANCED_BLOCKS)
def test_balanced_splits(common, dataset, k):
    size = common.DATASETS[dataset].image_size
    modules = common.split_modules("resnet110", 55, k, "balanced", size)
    expected = BALANCED_BLOCKS[dataset, k]
    assert sizes(modules) == [expected[0] + 1] + expected[1:]


def test_one_layer_per_module_and_even_splits(common):
    assert common.split_modules("resnet110", 55, 55) == [[i] for i in range(55)]
    assert common.split_modules("resnet32", 16, 16) == [[i] for i in range(16)]
    for k in (5, 7, 13):
        modules = common.split_modules("resnet110", 55, k)
        check_contiguous(modules, 55)
        assert len(modules) == k and max(sizes(modules)) - min(sizes(modules)) <= 1
    assert sizes(common.split_modules("resnet32", 16, 8, "even")) == [2] * 8


def test_balanced_fallback_balances_activation_size(common):
    net = common.cifar_resnet("resnet32", 10)
    acts = [c * h * w for c, h, w in common.layer_shapes(net, 32)]
    modules = common.split_modules("resnet32", 16, 3, "balanced", 32, acts)
    check_contiguous(modules, 16)
    totals = [sum(acts[i] for i in m) for m in modules]
    assert max(totals) < 0.5 * sum(acts)  # the first modules get fewer (wider) layers
    assert sizes(modules)[0] < sizes(modules)[-1]


def test_invalid_k_is_a_clear_error(common):
    for k in (0, 17, -1):
        with pytest.raises(SystemExit, match=r"--k .* choose K from 1 to 16"):
            common.split_modules("resnet32", 16, k)


def test_backbone_parameter_counts(common):
    assert common.count_params(common.cifar_resnet("resnet32", 10)) == 466_906
    assert common.count_params(common.cifar_resnet("resnet110", 10)) == 1_730_714


@pytest.mark.slow
def test_backbone_layers_and_shapes(common):
    net = common.cifar_resnet("resnet110", 10)
    assert len(net.layers) == 55
    shapes = common.layer_shapes(net, 32)
    assert shapes[0] == (16, 32, 32) and shapes[19] == (32, 16, 16) and shapes[54] == (64, 8, 8)
    assert common.layer_shapes(common.cifar_resnet("resnet32", 10), 96)[-1] == (64, 24, 24)


def test_he_init(common):
    torch.manual_seed(0)
    conv = common.cifar_resnet("resnet110", 10).layers[54].conv1
    assert abs(conv.weight.std().item() - math.sqrt(2 / (9 * 64))) < 0.005


def test_lr_schedule_matches_the_official_values(common):
    class A:
        lr, epochs, warmup_epochs, dataset = 0.8, 160, 10, "cifar10"
    expected = {1: 0.01, 2: 0.0890, 5: 0.3252, 10: 0.7141, 11: 0.7907, 80: 0.4, 120: 0.1172, 160: 0.0}
    for epoch, lr in expected.items():
        assert common.lr_at(epoch, A) == pytest.approx(lr, abs=1e-4)
    A.lr = 0.1
    assert common.lr_at(10, A) == pytest.approx(0.0901, abs=1e-4)


def test_synthetic_is_deterministic_and_needs_spatial_features(common):
    x1, y1 = common.synthetic_images(512, seed=3)
    x2, y2 = common.synthetic_images(512, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.dtype == torch.uint8
    assert set(y1.tolist()) == set(range(10))
    # The label lives in spatial structure: a nearest-class-mean classifier does far better on a
    # phase-free spatial feature (FFT magnitude) than on raw pixels, and is at chance on colour.
    def nearest_class_mean_accuracy(features):
        train_x, train_y = common.synthetic_images(2048, seed=1)
        test_x, test_y = common.synthetic_images(1024, seed=2)
        a, b = features(train_x.float()), features(test_x.float())
        means = torch.stack([a[train_y == c].mean(0) for c in range(10)])
        return (torch.cdist(b, means).argmin(1) == test_y).float().mean().item()
    pixels = nearest_class_mean_accuracy(lambda x: x.flatten(1))
    spectrum = nearest_class_mean_accuracy(
        lambda x: torch.fft.fft2(x - x.mean((2, 3), keepdim=True)).abs().mean(1).flatten(1))
    colour = nearest_class_mean_accuracy(lambda x: x.mean((2, 3)))
    assert spectrum > 0.9 and pixels < 0.5 and colour < 0.15


def test_augmentation_protocols(common):
    dev = torch.device("cpu")
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).remainder(256).to(torch.uint8).view(2, 3, 32, 32)
    for name in ("cifar10", "svhn"):
        data = common.Data(name, (x, torch.zeros(2)), (x, torch.zeros(2)), dev)
        gen = torch.Generator().manual_seed(0)
        out = data.augment(x, gen)
        assert out.shape == (2, 3, 32, 32)
        raw = out * data.std + data.mean  # back to [0, 1]
        p = data.spec.pad
        padded = F.pad(x.float() / 255, (p,) * 4, mode=data.spec.pad_mode)
        crops = [padded[:, :, dy:dy + 32, dx:dx + 32] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
        if data.spec.flip:
            crops += [c.flip(3) for c in crops]
        for i in range(2):  # every augmented image is one of the allowed crops (or its mirror)
            assert min((raw[i] - c[i]).abs().max().item() for c in crops) < 1e-5
    assert not common.DATASETS["svhn"].flip and common.DATASETS["svhn"].pad == 2
    assert common.DATASETS["cifar10"].pad_mode == "reflect" and common.DATASETS["stl10"].pad_mode == "constant"


# ---- the real loaders read each dataset's native files --------------------------------------------

def write_cifar(root, n, classes, folder, names, key):
    os.makedirs(os.path.join(root, folder))
    rng = np.random.default_rng(0)
    for name in names:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(os.path.join(root, folder, name), "wb") as f:
            pickle.dump({"data": data, key: list(rng.integers(0, classes, n))}, f)


def test_cifar10_reader(common, tmp_path):
    write_cifar(tmp_path, 4, 10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                "labels")
    (tx, ty), (vx, vy) = common.read_raw_dataset("cifar10", str(tmp_path))
    assert tx.shape == (20, 3, 32, 32) and vx.shape == (4, 3, 32, 32) and len(ty) == 20
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    assert np.array_equal(tx[4].reshape(-1), batch["data"][0]) and ty[4] == batch["labels"][0]


def test_cifar100_reader(common, tmp_path):
    write_cifar(tmp_path, 6, 100, "cifar-100-python", ["train", "test"], "fine_labels")
    (tx, ty), (vx, vy) = common.read_raw_dataset("cifar100", str(tmp_path))
    assert tx.shape == (6, 3, 32, 32) and max(ty) < 100


def test_svhn_reader(common, tmp_path):
    from scipy.io import savemat
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 3)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [4]][:n], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": X, "y": y})
        if split == "train":
            X_train = X
    (tx, ty), (vx, vy) = common.read_raw_dataset("svhn", str(tmp_path))
    assert tx.shape == (5, 3, 32, 32) and list(ty) == [0, 1, 2, 3, 4]  # label 10 is the digit 0
    assert tx[2, 1, 7, 9] == X_train[7, 9, 1, 2]


def test_stl10_reader(common, tmp_path):
    os.makedirs(tmp_path / "stl10_binary")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)  # N, C, H, W
    for split in ("train", "test"):
        images.transpose(0, 1, 3, 2).tofile(tmp_path / "stl10_binary" / f"{split}_X.bin")  # column-major
        np.array([1, 5, 10], dtype=np.uint8).tofile(tmp_path / "stl10_binary" / f"{split}_y.bin")
    (tx, ty), _ = common.read_raw_dataset("stl10", str(tmp_path))
    assert np.array_equal(tx, images) and list(ty) == [0, 4, 9]


def test_missing_dataset_offline_is_a_clear_error(common, tmp_path, monkeypatch):
    import torchvision
    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as e:
        common.read_raw_dataset("cifar10", str(tmp_path))
    message = str(e.value)
    assert "cifar-10-batches-py/data_batch_1" in message and str(tmp_path) in message
    assert "--dataset synthetic" in message and "\n" not in message


# ---- memory meter ---------------------------------------------------------------------------------

def test_saved_tensor_meter_counts_what_backward_holds(common):
    lin = torch.nn.Linear(100, 100)
    meter = common.SavedTensorMeter(lin.parameters())
    x = torch.randn(64, 100)
    with meter.hooks():
        y = torch.relu(lin(x))  # saves x (25.6 kB) and the relu output (25.6 kB); not the weight
        assert meter.bytes == 2 * 64 * 100 * 4
        y.sum().backward()
    assert meter.bytes == 0 and meter.peak == 2 * 64 * 100 * 4


# ---- bad input gives one line, no traceback -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--dataset", "imagenet1k"], "unknown --dataset 'imagenet1k'"),
    (["--arch", "resnet50x"], "unknown --arch 'resnet50x'"),
    (["--k", "99"], "--k 99 is not valid for resnet32"),
    (["--split", "fancy"], "unknown --split 'fancy'"),
])
def test_bad_arguments_fail_with_one_line(tmp_path, args, needle):
    cmd = [sys.executable, "dgl.py", "--dataset", "synthetic", "--subset", "64", "--device", "cpu",
           "--out", str(tmp_path / "run"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
