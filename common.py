"""Shared plumbing for the local-learning scripts: backbones split into modules, data on the device,
the training protocol, memory measurement, outputs and multi-process (torchrun) training.

Everything a method script needs that is not the method itself lives here, so that
`diff dgl.py auglocal.py` shows the method and nothing else. Import-only: no side effects.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def die(message):
    """Stop with a one-line error that tells the user what to do (no traceback)."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------
# Backbones: a flat list of layers (0 = stem, then every residual block) plus the head.
# ----------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """CIFAR ResNet block: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. Projection shortcut
    (1x1 conv + BN, "option B") whenever the stride or the width changes."""

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def cifar_stem(width=16):
    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))


def init_weights(module):
    """The official CIFAR init (InfoPro/AugLocal): convs N(0, sqrt(2 / (k*k*out))), BN weight 1 and
    bias 0, Linear left at PyTorch's default. Methods apply it to their auxiliary nets too."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
    return module


class Backbone(nn.Module):
    """`layers[0]` is the stem, then one entry per residual block; `head` is global pool + fc and
    always belongs to the last module. `forward` is the plain network (inference)."""

    def __init__(self, layers, head):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = head

    def run(self, layer_ids, h):
        """Run the given layers (one module) in order."""
        for i in layer_ids:
            h = self.layers[i](h)
        return h

    def forward(self, x):
        return self.head(self.run(range(len(self.layers)), x))


CIFAR_DEPTHS = {"resnet32": 5, "resnet110": 18}  # BasicBlocks per stage
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext101_32x8d", "vgg13_bn")
ARCHS = (*CIFAR_DEPTHS, *IMAGENET_ARCHS)


def cifar_resnet(arch, num_classes):
    """ResNet-32/110 of the official local-learning code: stages of n blocks at 16/32/64 channels."""
    n = CIFAR_DEPTHS[arch]
    layers, in_ch = [cifar_stem(16)], 16
    for stage, width in enumerate((16, 32, 64)):
        for b in range(n):
            layers.append(BasicBlock(in_ch, width, 2 if stage > 0 and b == 0 else 1))
            in_ch = width
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    return init_weights(Backbone(layers, head))


def imagenet_backbone(arch, num_classes):
    """torchvision's model definition (and init), re-listed as layers: ResNets: the stem (conv, BN,
    ReLU, max-pool), then every block; VGG: every conv-BN-ReLU with the max-pool before it. The
    head is the global pool and the classifier (VGG: its last max-pool too)."""
    import torchvision
    m = getattr(torchvision.models, arch)(num_classes=num_classes)
    if arch.startswith("vgg"):
        layers, pending = [], []
        for op in m.features:
            pending.append(op)
            if isinstance(op, nn.ReLU):
                layers.append(nn.Sequential(*pending))
                pending = []
        return Backbone(layers, nn.Sequential(*pending, m.avgpool, nn.Flatten(), m.classifier))
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    blocks = [block for stage in (m.layer1, m.layer2, m.layer3, m.layer4) for block in stage]
    return Backbone([stem, *blocks], nn.Sequential(m.avgpool, nn.Flatten(), m.fc))


def build_backbone(args, data, device):
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    if args.arch in IMAGENET_ARCHS:
        return imagenet_backbone(args.arch, data.num_classes).to(device)
    return cifar_resnet(args.arch, data.num_classes).to(device)


@torch.no_grad()
def layer_shapes(net, image_size):
    """(channels, height, width) of every layer's output, from one dummy sample."""
    was_training = net.training
    net.eval()
    h = torch.zeros(1, 3, image_size, image_size, device=next(net.parameters()).device)
    shapes = []
    for layer in net.layers:
        h = layer(h)
        shapes.append(tuple(h.shape[1:]))
    net.train(was_training)
    return shapes


def count_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Splitting the layers into K gradient-isolated modules.
# ----------------------------------------------------------------------------------------------

# Official InfoPro split tables (networks/configs.py), written as the global layer index after which
# each cut falls (0 = stem, block b of stage s = 1 + (s-1)*n + b).
# ImageNet: InfoPro*'s single cut inside layer2 (after block 0 / 5 / 2; layer1 has 3 blocks) and
# DGL's VGG-13 grouping of 3 convs per module (--block_size 3, the leftover conv its own module).
IMAGENET_CUTS = {"resnet101": {2: [4]}, "resnet152": {2: [9]}, "resnext101_32x8d": {2: [6]}}
OFFICIAL_CUTS = {
    "resnet32": {2: [7], 3: [5, 10], 4: [3, 7, 11], 8: [1, 3, 5, 7, 9, 11, 13], 16: list(range(15))},
    "resnet110": {2: [27], 3: [18, 36], 4: [12, 26, 40], 8: [5, 12, 19, 26, 33, 40, 47],
                  16: [2, 5, 8, 11, 14, 17, 20, 23, 26, 30, 34, 38, 42, 46, 50]},
    "vgg13_bn": {4: [2, 5, 8]},
    **IMAGENET_CUTS,
}
# InfoPro* memory-balanced tables: ResNet-110 per input resolution, 32 px (the CIFAR-10 table, also
# used for the other 32 px datasets) and 96 px (the STL-10 table); the ImageNet cuts at any size.
BALANCED_CUTS = {
    ("resnet110", 32): {2: [15], 3: [10, 21], 4: [7, 15, 27]},
    ("resnet110", 96): {2: [15], 3: [9, 20], 4: [7, 15, 27]},
    **{(arch, None): table for arch, table in IMAGENET_CUTS.items()},
}
SPLITS = ("official", "even", "balanced")


def modules_from_cuts(cuts, n_layers):
    bounds = [-1] + list(cuts) + [n_layers - 1]
    return [list(range(a + 1, b + 1)) for a, b in zip(bounds, bounds[1:])]


def even_cuts(weights, k):
    """Cut a sequence of per-layer weights into k contiguous non-empty runs of about equal total."""
    total, cuts, acc = sum(weights), [], 0.0
    for i, w in enumerate(weights[:-1]):
        acc += w
        need_after = k - 1 - len(cuts)  # cuts still to place
        if need_after == 0:
            break
        layers_left = len(weights) - 1 - i
        if acc >= total * (len(cuts) + 1) / k - 1e-9 or layers_left == need_after:
            cuts.append(i)
    return cuts


def split_modules(arch, n_layers, k, split="official", image_size=32, activation_sizes=None):
    """List of K lists of layer indices. `official`: the papers' tables where they exist (InfoPro
    for ResNet-32/110, InfoPro* and DGL on ImageNet), one layer per module when K equals the number
    of layers, else an even split by layer count. `balanced`: the InfoPro* tables where they exist,
    else cuts at equal activation size. `even`: by layer count."""
    if not isinstance(k, int) or not 1 <= k <= n_layers:
        die(f"--k {k} is not valid for {arch}: choose K from 1 to {n_layers} (the number of layers)")
    if split not in SPLITS:
        die(f"unknown --split {split!r}: choose one of {', '.join(SPLITS)}")
    if split == "balanced":
        table = BALANCED_CUTS.get((arch, image_size)) or BALANCED_CUTS.get((arch, None), {})
        if k in table:
            return modules_from_cuts(table[k], n_layers)
        return modules_from_cuts(even_cuts(activation_sizes, k), n_layers)
    if split == "official" and k in OFFICIAL_CUTS.get(arch, {}):
        return modules_from_cuts(OFFICIAL_CUTS[arch][k], n_layers)
    return modules_from_cuts(even_cuts([1] * n_layers, k), n_layers)


def make_modules(args, net, data):
    shapes = layer_shapes(net, data.image_size)
    return split_modules(args.arch, len(net.layers), args.k, args.split, data.image_size,
                         [c * h * w for c, h, w in shapes])


# ----------------------------------------------------------------------------------------------
# Data: small datasets live on the device as uint8 and are augmented per batch on the device.
# ----------------------------------------------------------------------------------------------

CIFAR_MEAN, CIFAR_STD = (125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    image_size: int
    batch_size: int
    lr: float
    mean: tuple
    std: tuple
    pad: int            # random-crop padding
    pad_mode: str       # 'reflect' (CIFAR) or 'constant' (zero, SVHN / STL-10)
    flip: bool
    epochs: int = 0     # 0: the method's paper default
    warmup_epochs: int = 10
    cosine_from_zero: bool = False  # ImageNet codes: lr0 at the first epoch, cos(pi * (epoch - 1) / E)


DATASETS = {
    "cifar10": DatasetSpec(10, 32, 1024, 0.8, CIFAR_MEAN, CIFAR_STD, 4, "reflect", True),
    "cifar100": DatasetSpec(100, 32, 1024, 0.8, CIFAR_MEAN, CIFAR_STD, 4, "reflect", True),
    "svhn": DatasetSpec(10, 32, 1024, 0.8, HALF, HALF, 2, "constant", False),
    "stl10": DatasetSpec(10, 96, 128, 0.1, HALF, HALF, 4, "constant", True),
    # In-memory, for the tests and the offline quick start: short schedule, small batches.
    "synthetic": DatasetSpec(10, 32, 64, 0.05, HALF, HALF, 2, "constant", False, epochs=6, warmup_epochs=1),
    # InfoPro / AugLocal ImageNet: global batch 1024, lr 0.4, cosine without warm-up.
    "imagenet": DatasetSpec(1000, 224, 1024, 0.4, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0, "constant",
                            True, warmup_epochs=0, cosine_from_zero=True),
}
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2048, 1024


def synthetic_images(n, seed, size=32, num_classes=10):
    """Oriented gratings: class = (orientation, frequency), with random phase, colour, contrast and
    noise. Every pixel has the same distribution in every class, so only spatial features (how
    intensity varies across neighbouring pixels) can separate the classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    angle = (y % 5).float() * (math.pi / 5)
    freq = torch.where(y < 5, 2.0, 4.0) * 2 * math.pi / size
    phase = torch.rand(n, generator=g) * 2 * math.pi
    coords = torch.arange(size, dtype=torch.float32)
    i, j = coords.view(1, size, 1), coords.view(1, 1, size)
    wave = torch.cos(freq.view(n, 1, 1) * (i * angle.cos().view(n, 1, 1) + j * angle.sin().view(n, 1, 1))
                     + phase.view(n, 1, 1))
    colour = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2
    contrast = torch.rand(n, 1, 1, 1, generator=g) * 0.3 + 0.2  # fainter gratings stall heads that pool globally
    img = 0.5 + contrast * colour * wave.unsqueeze(1) + 0.2 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


def fake_images(spec, n, seed):
    """Random uint8 images and labels of a dataset's shape: data for speed and memory benchmarks."""
    g = torch.Generator().manual_seed(seed)
    size = spec.image_size
    return (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, spec.num_classes, (n,), generator=g))


def _unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _read_cifar(root, folder, train_files, test_files, label_key):
    def read(files):
        batches = [_unpickle(os.path.join(root, folder, f)) for f in files]
        x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        return x, np.concatenate([b[label_key] for b in batches])
    return read(train_files), read(test_files)


def _read_svhn(root):
    from scipy.io import loadmat
    def read(split):
        m = loadmat(os.path.join(root, f"{split}_32x32.mat"))
        y = m["y"].astype(np.int64).squeeze(1)
        return np.transpose(m["X"], (3, 2, 0, 1)), np.where(y == 10, 0, y)  # label 10 means digit 0
    return read("train"), read("test")


def _read_stl10(root):
    def read(split):
        base = os.path.join(root, "stl10_binary", split)
        x = np.fromfile(base + "_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        return x, np.fromfile(base + "_y.bin", dtype=np.uint8).astype(np.int64) - 1  # labels 1..10
    return read("train"), read("test")


# name: (files that must exist under --data-dir, reader, torchvision class and its split arguments)
RAW_FILES = {
    "cifar10": (["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"],
                lambda r: _read_cifar(r, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                                      ["test_batch"], "labels"),
                "CIFAR10", [{"train": True}, {"train": False}]),
    "cifar100": (["cifar-100-python/train", "cifar-100-python/test"],
                 lambda r: _read_cifar(r, "cifar-100-python", ["train"], ["test"], "fine_labels"),
                 "CIFAR100", [{"train": True}, {"train": False}]),
    "svhn": (["train_32x32.mat", "test_32x32.mat"], _read_svhn, "SVHN", [{"split": "train"}, {"split": "test"}]),
    "stl10": (["stl10_binary/train_X.bin", "stl10_binary/test_X.bin"], _read_stl10, "STL10",
              [{"split": "train"}, {"split": "test"}]),
}


def read_raw_dataset(name, data_dir):
    """Read a small dataset from its native files under data_dir, downloading it through
    torchvision's dataset class when missing. Returns ((train_x, train_y), (test_x, test_y)), NCHW uint8."""
    files, reader, tv_class, tv_splits = RAW_FILES[name]
    if not all(os.path.exists(os.path.join(data_dir, f)) for f in files):
        try:
            import torchvision
            for split in tv_splits:
                getattr(torchvision.datasets, tv_class)(data_dir, download=True, **split)
        except Exception as e:  # offline, blocked, disk full: one clear line
            die(f"{name} is not in {os.path.abspath(data_dir)} (expected {', '.join(files)}) and could not "
                f"be downloaded ({type(e).__name__}); put the files there, pass --data-dir, or run "
                f"offline with --dataset synthetic")
    return reader(data_dir)


class Data:
    """A small dataset resident on the training device as uint8, augmented per batch on the device."""

    def __init__(self, name, train, test, device, channels_last=False, augment=True):
        self.name, self.spec = name, DATASETS[name]
        as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
        self.train_x, self.train_y, self.test_x, self.test_y = (
            as_tensor(a).to(device) for a in (*train, *test))
        self.train_y, self.test_y = self.train_y.long(), self.test_y.long()
        self.num_classes, self.image_size = self.spec.num_classes, self.train_x.shape[-1]
        self.mean = torch.tensor(self.spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.spec.std, device=device).view(1, 3, 1, 1)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.augment_train = augment

    def normalize(self, x_uint8):
        return (x_uint8.float() / 255 - self.mean) / self.std

    def augment(self, x, gen):
        """Random crop with padding (reflect or zero) and optional horizontal flip, per sample."""
        s, p, n = self.spec, self.spec.pad, x.shape[0]
        x = F.pad(x.float() / 255, (p, p, p, p), mode=s.pad_mode)  # pad the raw image, normalise last
        size = self.image_size
        dy, dx = (torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=gen) for _ in range(2))
        rows = (dy.view(n, 1) + torch.arange(size, device=x.device)).view(n, 1, size, 1)
        cols = (dx.view(n, 1) + torch.arange(size, device=x.device)).view(n, 1, 1, size)
        x = x.gather(2, rows.expand(n, 3, size, x.shape[3])).gather(3, cols.expand(n, 3, size, size))
        if s.flip:
            flip = torch.rand(n, device=x.device, generator=gen) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        return (x - self.mean) / self.std

    def train_batches(self, epoch, batch_size, seed, rank=0, world=1):
        """Shuffled, augmented batches of one epoch, deterministic in (seed, epoch): the same
        permutation on every rank, each rank taking its shard of every global batch."""
        shuffle = torch.Generator(device=self.device).manual_seed(seed * 100003 + epoch)
        order = torch.randperm(len(self.train_y), device=self.device, generator=shuffle)
        aug = torch.Generator(device=self.device).manual_seed((seed * 100003 + epoch) * 1009 + rank + 1)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2 * world:  # BatchNorm needs 2+ samples on every rank: drop a tiny last batch
                break
            idx = idx[rank::world]
            x = self.augment(self.train_x[idx], aug) if self.augment_train else self.normalize(self.train_x[idx])
            yield x.contiguous(memory_format=self.memory_format), self.train_y[idx]

    def test_batches(self, batch_size, rank=0, world=1):
        for start in range(0, len(self.test_y), batch_size):
            sl = slice(start + rank, start + batch_size, world)
            yield self.normalize(self.test_x[sl]).contiguous(memory_format=self.memory_format), self.test_y[sl]

    @property
    def resident_bytes(self):
        return sum(t.numel() * t.element_size() for t in (self.train_x, self.train_y, self.test_x, self.test_y))


class ImageFolderData:
    """ImageNet from `DIR/train` and `DIR/val` (ImageFolder layout), read by DataLoader workers:
    RandomResizedCrop + flip for training, Resize (256/224 of the crop) + CenterCrop for testing.
    Each rank reads its shard through a DistributedSampler; the same interface as `Data`."""

    def __init__(self, args, device):
        import torchvision.datasets as datasets
        import torchvision.transforms as T
        spec, size = DATASETS["imagenet"], args.image_size
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(args.data_dir, split)):
                die(f"imagenet needs {os.path.join(os.path.abspath(args.data_dir), split)} in ImageFolder layout "
                    f"(one folder of images per class); pass --data-dir, or run offline with --dataset synthetic")
        norm = T.Normalize(spec.mean, spec.std)
        self.train_set = datasets.ImageFolder(os.path.join(args.data_dir, "train"), T.Compose(
            [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
        self.test_set = datasets.ImageFolder(os.path.join(args.data_dir, "val"), T.Compose(
            [T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm]))
        self.name, self.spec, self.image_size = "imagenet", spec, size
        self.num_classes = len(self.train_set.classes)
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        self.device, self.workers, self.resident_bytes = device, args.workers, 0
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def _batches(self, dataset, sampler, batch_size, seed, min_size=1):
        if self.workers == 0:  # the transforms then draw from this process's RNG: make it repeatable
            torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(seed))
        for x, y in loader:
            if len(y) < min_size:  # the sampler gives every rank the same sizes, so all ranks skip it
                break
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)

    def train_batches(self, epoch, batch_size, seed, rank=0, world=1):
        sampler = torch.utils.data.DistributedSampler(self.train_set, world, rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)  # every rank has the same number of batches (the sampler pads)
        # BatchNorm (and SupCon) need 2+ samples: a last batch of 1 is dropped, as in Data.train_batches.
        return self._batches(self.train_set, sampler, batch_size // world, (seed * 100003 + epoch) * 1009 + rank, 2)

    def test_batches(self, batch_size, rank=0, world=1):
        shard = list(range(rank, len(self.test_set), world))
        return self._batches(self.test_set, shard, batch_size // world, seed=0)


def load_data(args, device):
    if args.dataset == "imagenet" and not args.fake_data:
        return ImageFolderData(args, device)
    if args.dataset == "synthetic":
        train = synthetic_images(SYNTHETIC_TRAIN, seed=1)
        test = synthetic_images(SYNTHETIC_TEST, seed=2)
    elif args.fake_data:
        spec = DATASETS[args.dataset]
        if args.dataset == "imagenet":
            spec = dataclasses.replace(spec, image_size=args.image_size)
        train, test = (fake_images(spec, n, seed) for n, seed in ((8 * args.batch_size, 1), (args.batch_size, 2)))
    else:
        train, test = read_raw_dataset(args.dataset, args.data_dir)
    if args.subset:
        train, test = [(x[:args.subset], y[:args.subset]) for x, y in (train, test)]
    return Data(args.dataset, train, test, device, args.channels_last, augment=not args.no_augment)


# ----------------------------------------------------------------------------------------------
# Arguments and the training protocol.
# ----------------------------------------------------------------------------------------------

# Arguments that may change when a run is resumed; every other one must match the run's args.json.
RESUMABLE_ARGS = {"out", "resume", "device", "data_dir", "steps", "workers"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows every option's default: appended where the
    help text does not state it already (defaults resolved after parsing, e.g. per dataset, are
    written out in their help texts); flags (no value) are off by default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)".strip()


def per_dataset(specs, field):
    """'cifar10 1024, ...': a per-dataset default for the help texts."""
    return ", ".join(f"{name} {getattr(spec, field)}" for name, spec in specs.items())


def parse_args(argv, doc, method, k, epochs, add_method_args=None, imagenet=None):
    """The shared command line. Dataset-dependent defaults (batch, lr, schedule) are filled in
    after parsing; `k` and `epochs` are the method's paper defaults, and `imagenet` its ImageNet
    `epochs`, `batch_size` and `lr` where they differ from InfoPro's (90, 1024, 0.4)."""
    imagenet = dataclasses.replace(DATASETS["imagenet"], **{"epochs": 90, **(imagenet or {})})
    specs = {**DATASETS, "imagenet": imagenet}  # the defaults this method resolves per dataset
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default="./data", help="where datasets are read from / downloaded to")
    p.add_argument("--arch", default="resnet32", help=f"one of {', '.join(ARCHS)}")
    p.add_argument("--k", type=int, default=k, help="number of gradient-isolated modules, the last included")
    p.add_argument("--split", default="official", help="official | even | balanced (InfoPro*)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {epochs} (the paper's); synthetic "
                   f"{specs['synthetic'].epochs}, imagenet {specs['imagenet'].epochs}")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch; default per dataset: {per_dataset(specs, 'batch_size')}")
    p.add_argument("--lr", type=float, default=None,
                   help=f"initial lr; default per dataset: {per_dataset(specs, 'lr')}")
    p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum of the SGD optimizer")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="weight decay of every parameter (backbone and auxiliary nets)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="epochs of blend from lr 0.01 into the cosine; default per dataset: "
                   + per_dataset(specs, "warmup_epochs"))
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the data order and the augmentation (and the synthetic set)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="output folder; default runs/<method>-<dataset>-<arch>-k<K>")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--steps", type=int, default=None,
                   help="stop after this many optimizer steps (default: train every epoch)")
    p.add_argument("--workers", type=int, default=8, help="ImageNet DataLoader workers per process")
    p.add_argument("--image-size", type=int, default=224, help="ImageNet training crop (smaller for quick runs)")
    p.add_argument("--subset", type=int, default=None, metavar="N",
                   help="use only the first N training and N test images (quick checks; default: all)")
    p.add_argument("--fake-data", action="store_true",
                   help="random images of the dataset's shape instead of its files (benchmarks)")
    p.add_argument("--no-augment", action="store_true", help="train on the images as they are (no crop, no flip)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (no grad scaler); fp32 by default")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the model and data")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every layer, the head and every auxiliary net (backwards stay per module)")
    if add_method_args:
        add_method_args(p)
    args = p.parse_args(argv)
    args.method = method
    if args.dataset not in DATASETS:
        die(f"unknown --dataset {args.dataset!r}: choose one of {', '.join(DATASETS)}")
    if args.arch not in ARCHS:
        die(f"unknown --arch {args.arch!r}: choose one of {', '.join(ARCHS)}")
    if args.dataset == "imagenet" and args.arch not in IMAGENET_ARCHS:
        die(f"--arch {args.arch} is a CIFAR network; for imagenet choose one of {', '.join(IMAGENET_ARCHS)}")
    spec = specs[args.dataset]
    args.epochs = args.epochs or spec.epochs or epochs
    args.batch_size = args.batch_size or spec.batch_size
    args.lr = spec.lr if args.lr is None else args.lr
    args.warmup_epochs = spec.warmup_epochs if args.warmup_epochs is None else args.warmup_epochs
    args.out = args.out or os.path.join("runs", f"{method}-{args.dataset}-{args.arch}-k{args.k}")
    for name in ("epochs", "batch_size", "steps", "subset", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            die(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def lr_at(epoch, args):
    """The official per-epoch schedule (epoch counts from 1): cosine from lr0 to 0, blended during
    the first W epochs with a linear warm-up from 0.01 (InfoPro/AugLocal `--cos_lr`)."""
    offset = 1 if DATASETS[args.dataset].cosine_from_zero else 0
    cosine = 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - offset) / args.epochs))
    w = args.warmup_epochs
    if epoch <= w:
        return cosine * (epoch - 1) / w + 0.01 * (w + 1 - epoch) / w
    return cosine


def make_optimizer(args, model):
    """One Nesterov SGD over every parameter (backbone and auxiliary nets), stepped once per batch."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                           weight_decay=args.weight_decay)


# ----------------------------------------------------------------------------------------------
# Memory: bytes autograd holds for backward (any device) and CUDA peak allocation.
# ----------------------------------------------------------------------------------------------

class SavedTensorMeter:
    """Peak bytes of the tensors autograd saves for backward, counted once per storage and
    excluding parameters. It needs no GPU, and it is exactly what a per-module backward frees:
    one backward on the summed losses keeps every module's tensors alive and shows here."""

    def __init__(self, params):
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.live, self.bytes, self.peak = {}, 0, 0

    def _pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.param_storages or storage.nbytes() == 0:
            return t
        if key in self.live:
            self.live[key][0] += 1
        else:
            self.live[key] = [1, storage.nbytes()]
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
        return _Held(self, key, t)

    def _release(self, key):
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.tensor if isinstance(h, _Held) else h)


class _Held:
    """A saved tensor; when autograd drops it (after backward) its bytes stop counting."""
    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter, key, tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter._release(self.key)


# ----------------------------------------------------------------------------------------------
# A run: device and torchrun setup, outputs, checkpoints, metrics and the summary.
# ----------------------------------------------------------------------------------------------

WARMUP_STEPS = 2  # steps before CUDA peak memory and throughput are measured (cuDNN autotuning)


class Run:
    def __init__(self, args):
        self.args = args
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            die(f"--device {device} but no CUDA device is visible; use --device cpu")
        if device == "cuda" and self.world > 1:
            device = f"cuda:{local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0
        if args.batch_size % self.world:
            die(f"--batch-size {args.batch_size} does not split over {self.world} processes; use a multiple")
        self.ckpt_path = os.path.join(args.out, "checkpoint.pt")
        self.metrics_path = os.path.join(args.out, "metrics.jsonl")
        self.start_epoch, self.steps, self.best_acc, self.acc = 1, 0, 0.0, None
        self.interrupted = False  # --steps stopped an epoch before its end
        self.act_meter = None
        self.act_mem_bytes = None
        self.process_steps, self.timed_images, self.timed_s, self._t0 = 0, 0, 0.0, None
        self.peak_mem_bytes = self.peak_reserved_bytes = None
        self.mem_base = 0
        self._prepare_out()

    def _prepare_out(self):
        args, saved = self.args, os.path.join(self.args.out, "args.json")
        if args.resume:
            if not os.path.exists(self.ckpt_path):
                die(f"--resume: no checkpoint at {self.ckpt_path}; start the run without --resume")
            with open(saved) as f:
                before = json.load(f)
            for key, value in vars(args).items():
                if key not in RESUMABLE_ARGS and before.get(key) != value:
                    flag = "--" + key.replace("_", "-")
                    die(f"--resume: the run in {args.out} has {flag} {before.get(key)}, not {value}; "
                        f"resume with the same arguments or choose another --out")
        elif os.path.exists(saved):
            die(f"{args.out} already holds a run; pass --resume to continue it or --out to start another")
        if self.world > 1:
            dist.barrier()  # every rank has checked the folder before rank 0 writes to it
        if self.main:
            os.makedirs(args.out, exist_ok=True)
            atomic_write_text(saved, json.dumps(vars(args), indent=2) + "\n")

    # -- model state ----------------------------------------------------------------------------
    def start(self, model, opt, data):
        """Resume from the checkpoint if asked, apply --channels-last and --compile, and remember
        the resident data for memory accounting. Returns the epochs still to train."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mem_base = data.resident_bytes
        self.act_meter = SavedTensorMeter(model.parameters())
        if self.args.resume:
            ckpt = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            self.start_epoch, self.steps, self.best_acc = ckpt["epoch"] + 1, ckpt["steps"], ckpt["best_test_acc"]
            self.acc = ckpt["test_acc"]
            if self.main:  # drop metrics of work after the checkpoint (a run stopped mid-epoch)
                with open(self.metrics_path) as f:
                    lines = [l for l in f if json.loads(l)["epoch"] <= ckpt["epoch"]]
                atomic_write_text(self.metrics_path, "".join(lines))
        if self.args.channels_last:
            model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its parameters
        if self.args.compile:  # per piece, so that every local backward still runs at once
            torch._dynamo.config.recompile_limit = 64  # many blocks share one forward; train and eval
            for piece in (*model["net"].layers, model["net"].head, *model["aux"].children(),
                          *[m for name, m in model.items() if name not in ("net", "aux")]):
                piece.compile()
        return range(self.start_epoch, self.args.epochs + 1)

    def done(self):
        return self.args.steps is not None and self.steps >= self.args.steps

    # -- per step (no host syncs here, except once at the end of the warm-up) ----------------------
    def activation_hooks(self):
        """Count the bytes saved for backward during the first step of this process only."""
        return self.act_meter.hooks() if self.process_steps == 0 else contextlib.nullcontext()

    def before_step(self):
        if self.process_steps == WARMUP_STEPS:
            self._sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self._t0, self.timed_images, self.timed_s = time.perf_counter(), 0, 0.0

    def after_step(self, batch):
        if self.process_steps == 0:
            self.act_mem_bytes = self.act_meter.peak  # per process, like CUDA memory
        self.process_steps += 1
        self.steps += 1
        if self._t0 is not None:
            self.timed_images += batch * self.world

    def average_gradients(self, params):
        """All-reduce every gradient (one flat buffer) after the local backwards: data parallelism
        over all modules at once, with no DDP wrapper to tangle with the per-module backwards."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))

    def sync_buffers(self, model):
        """Average BatchNorm running statistics over ranks so every rank holds the same model."""
        if self.world == 1:
            return
        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b /= self.world

    def rank_divergence(self, model):
        """Largest difference between any rank's parameters and buffers and rank 0's (0.0 when
        the data-parallel training kept every rank's model identical, as it must)."""
        flat = torch.cat([t.detach().float().reshape(-1) for t in (*model.parameters(), *model.buffers())])
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat)
        return max((g - gathered[0]).abs().max().item() for g in gathered)

    def all_sum(self, tensor):
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pause_clock(self):
        """End of an epoch's training: stop timing, read the CUDA peak of the training steps."""
        self._sync()
        if self._t0 is not None:
            self.timed_s += time.perf_counter() - self._t0
            self._t0 = None
            if self.device.type == "cuda":
                allocated = torch.cuda.max_memory_allocated(self.device) - self.mem_base
                reserved = torch.cuda.max_memory_reserved(self.device)
                self.peak_mem_bytes = max(self.peak_mem_bytes or 0, allocated)
                self.peak_reserved_bytes = max(self.peak_reserved_bytes or 0, reserved)

    def resume_clock(self):
        if self.process_steps >= WARMUP_STEPS:
            self._sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)  # evaluation is not training memory
            self._t0 = time.perf_counter()

    # -- end of epoch and end of run --------------------------------------------------------------
    def end_epoch(self, epoch, lr, train, test, model, opt):
        """Log the epoch; checkpoint it unless --steps cut it short (a checkpoint is always a
        whole number of epochs, so resuming continues exactly)."""
        self.acc, self.best_acc = test["test_acc"], max(self.best_acc, test["test_acc"])
        line = {"epoch": epoch, "lr": lr, **train, **test, "best_test_acc": self.best_acc, "steps": self.steps}
        if self.main:
            print(json.dumps(line), flush=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            if not self.interrupted:
                ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                        "steps": self.steps, "best_test_acc": self.best_acc, "test_acc": self.acc}
                atomic_save(ckpt, self.ckpt_path)

    def finish(self, model, modules):
        params = {"backbone": count_params(model["net"]), "aux": count_params(model["aux"])}
        params.update({name: count_params(m) for name, m in model.items() if name not in ("net", "aux")})
        a = self.args
        summary = {
            "method": a.method, "dataset": a.dataset, "arch": a.arch, "k": a.k, "split": a.split,
            "modules": modules, "params": params, "epochs": a.epochs, "steps": self.steps,
            "batch_size": a.batch_size, "world_size": self.world,
            "best_test_acc": self.best_acc, "final_test_acc": self.acc,
            "peak_mem_bytes": self.peak_mem_bytes, "peak_reserved_bytes": self.peak_reserved_bytes,
            "act_mem_bytes": self.act_mem_bytes,
            "images_per_s": self.timed_images / self.timed_s if self.timed_s > 0 else None,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        }
        if self.world > 1:
            summary["rank_max_abs_diff"] = self.rank_divergence(model)
        if self.main:
            atomic_write_text(os.path.join(a.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
            print(json.dumps({k: summary[k] for k in ("method", "k", "final_test_acc", "best_test_acc",
                                                      "act_mem_bytes", "peak_mem_bytes", "images_per_s")}))
        if self.world > 1:
            dist.destroy_process_group()
        return summary


def atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_save(obj, path):
    """Write to a temporary file and rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The epoch: training (the method's step on every batch) and evaluation.
# ----------------------------------------------------------------------------------------------

def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def train_epoch(run, args, data, model, opt, epoch, train_step):
    """One epoch of `train_step(x, y) -> (final loss, logits)`, which does the method's forward and
    its per-module backwards; then gradients are averaged over ranks and one optimizer step is
    taken. Statistics stay on the device until the epoch ends."""
    lr = lr_at(epoch, args)
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    stats = torch.zeros(3, device=run.device)  # loss sum, correct, seen
    run.resume_clock()
    run.interrupted = False
    for x, y in data.train_batches(epoch, args.batch_size, args.seed, run.rank, run.world):
        if run.done():
            run.interrupted = True
            break
        run.before_step()
        opt.zero_grad(set_to_none=True)
        with run.activation_hooks(), autocast(args, run.device):
            loss, logits = train_step(x, y)
        run.average_gradients(model.parameters())
        opt.step()
        run.after_step(len(y))
        stats += torch.stack([loss.float() * len(y), (logits.argmax(1) == y).sum().float(),
                              torch.tensor(float(len(y)), device=run.device)])
    run.pause_clock()
    run.sync_buffers(model)
    loss_sum, correct, seen = run.all_sum(stats).tolist()
    if not math.isfinite(loss_sum):
        die(f"the training loss became {loss_sum} in epoch {epoch}; lower --lr (it was {lr:.4g}) "
            f"or check the data. The last good checkpoint is {run.ckpt_path}")
    return lr, {"train_loss": loss_sum / seen, "train_acc": correct / seen}


@torch.no_grad()
def evaluate(run, args, data, model, predict):
    """Top-1 (and top-5) accuracy of `predict` (the backbone and its head, unless the method's
    inference network has more) on the test split, sharded over ranks."""
    model.eval()
    counts = torch.zeros(3, device=run.device)  # top-1 right, top-5 right, seen
    for x, y in data.test_batches(args.batch_size, run.rank, run.world):
        with autocast(args, run.device):
            logits = predict(x)
        top5 = (logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]).any(1)
        counts += torch.stack([(logits.argmax(1) == y).sum().float(), top5.sum().float(),
                               torch.tensor(float(len(y)), device=run.device)])
    top1, top5, seen = run.all_sum(counts).tolist()
    return {"test_acc": top1 / seen, "test_top5": top5 / seen}
