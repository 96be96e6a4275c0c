"""Shared plumbing for the local-learning scripts: everything a method script needs that is not
the method itself, so that `diff dgl.py auglocal.py` shows the method and nothing else.
Import-only: no side effects.

The parts, in the order they appear:
  Backbones      the networks as a flat list of layers (stem, every block) plus the head
  Splits         the layers cut into K gradient-isolated modules (the official tables)
  Data           small datasets on the device, augmented per batch; ImageNet by DataLoader
  Arguments      the shared command line, the schedule and the optimizer (the protocol)
  Local step     a batch through the modules, each loss back-propagated at once; per-module statistics
  Measurement    bytes saved for backward, CUDA peaks, FLOPs, images per second, wall time
  Processes      one process, or pipeline stages times data-parallel replicas, and their collectives
  Pipeline       the modules cut into stages trained by one process each per replica (--pipeline)
  Run folder     args.json, metrics.jsonl, checkpoint.pt, summary.json: atomic writes, resume checks
  Stop requests  SIGTERM / SIGINT: finish the step, checkpoint, every process stops at the same step
  Progress       the start line and the progress lines
  Run            the parts above put together, the training position, the epoch loop's hooks
  Epoch          train_epoch and evaluate: the loop every script runs
"""
import argparse
import atexit
import collections
import contextlib
import copy
import dataclasses
import errno
import fcntl
import functools
import glob
import json
import math
import multiprocessing
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode


def die(message):
    """Stop with a one-line error that tells the user what to do (no traceback)."""
    release_run()
    raise SystemExit(f"error: {message}" if first_to_fail() else 1)


def release_run():
    """Give back what a run holds in its process beyond its objects, the run folder's lock and the
    signal handlers, however it ends, so that a later run in this same process (tests, a notebook, a
    benchmark's next case) finds the folder free and Ctrl-C working as before."""
    RunFolder.unlock()
    StopRequest.restore_all()


def first_to_fail():
    """Whether this process is the first of its torchrun launch on this machine to stop on an error
    (it creates the launch's marker file), so that the ranks do not all print the same line."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return True
    marker = os.path.join(tempfile.gettempdir(), "local-learning-{}-{}-{}.failed".format(
        os.getppid(), os.environ["TORCHELASTIC_RUN_ID"], os.environ.get("TORCHELASTIC_RESTART_COUNT")))
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    except OSError:  # no writable temporary folder: print
        pass
    return True


# ---- Backbones: a flat list of layers (0 = stem, then every residual block) plus the head --------

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
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    layers, in_ch = [stem], 16
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
    build = imagenet_backbone if args.arch in IMAGENET_ARCHS else cifar_resnet
    return build(args.arch, data.num_classes).to(device)


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


# ---- Splits: the layers cut into K gradient-isolated modules (the official tables) ---------------

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


# ---- Data: small datasets live on the device as uint8 and are augmented per batch on the device ----

CIFAR_MEAN, CIFAR_STD = (125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)
HALF = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
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
    return (torch.randint(0, 256, (n, 3, spec.image_size, spec.image_size), dtype=torch.uint8, generator=g),
            torch.randint(0, spec.num_classes, (n,), generator=g))


@contextlib.contextmanager
def damaged_file(path):
    """A file that cannot be parsed (truncated, garbage) stops the run with one line naming it."""
    try:
        yield
    except Exception as e:  # pickle, numpy and scipy each raise their own kinds
        die(f"{path} is damaged ({type(e).__name__}); replace it, or delete the dataset's files under "
            f"--data-dir to download them again")


def _check_sizes(x, y):
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    return x, y


def _read_cifar(root, folder, train_files, test_files, label_key):
    def read_one(path):
        with damaged_file(path), open(path, "rb") as f:
            b = pickle.load(f, encoding="latin1")
            return _check_sizes(b["data"].reshape(-1, 3, 32, 32), np.asarray(b[label_key]))

    def read(files):
        batches = [read_one(os.path.join(root, folder, f)) for f in files]
        return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
    return read(train_files), read(test_files)


def _read_svhn(root):
    from scipy.io import loadmat
    def read(split):
        path = os.path.join(root, f"{split}_32x32.mat")
        with damaged_file(path):
            m = loadmat(path)
            y = m["y"].astype(np.int64).squeeze(1)
            # label 10 means digit 0
            return _check_sizes(np.transpose(m["X"], (3, 2, 0, 1)), np.where(y == 10, 0, y))
    return read("train"), read("test")


def _read_stl10(root):
    def read(split):
        base = os.path.join(root, "stl10_binary", split)
        with damaged_file(base + "_X.bin"):
            x = np.fromfile(base + "_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        with damaged_file(base + "_y.bin"):
            return _check_sizes(x, np.fromfile(base + "_y.bin", dtype=np.uint8).astype(np.int64) - 1)  # labels 1..10
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
    if os.path.isfile(data_dir):
        die(f"--data-dir {data_dir} is a file, not a folder; pass the folder that holds (or will hold) the dataset")
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
        self.name, self.spec, self.device, self.augment_train = name, DATASETS[name], device, augment
        as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
        (self.train_x, self.train_y), (self.test_x, self.test_y) = (
            (as_tensor(x).to(device), as_tensor(y).to(device).long()) for x, y in (train, test))
        self.num_classes, self.image_size = self.spec.num_classes, self.train_x.shape[-1]
        self.mean, self.std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (self.spec.mean, self.spec.std))
        self.num_train = len(self.train_y)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.aug_gen = None  # the running epoch's augmentation generator (its state goes into mid-epoch checkpoints)

    def steps_per_epoch(self, batch_size, world=1):
        return full_batches(self.num_train, batch_size, 2 * world)

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

    def train_batches(self, epoch, batch_size, seed, rank=0, world=1, first_batch=0, aug_state=None):
        """Shuffled, augmented batches of one epoch, deterministic in (seed, epoch): the same
        permutation on every rank, each rank taking its shard of every global batch. A resumed
        epoch starts at `first_batch` with the augmentation generator's saved state."""
        shuffle = torch.Generator(device=self.device).manual_seed(seed * 100003 + epoch)
        order = torch.randperm(len(self.train_y), device=self.device, generator=shuffle)
        aug = torch.Generator(device=self.device).manual_seed((seed * 100003 + epoch) * 1009 + rank + 1)
        if aug_state is not None:
            aug.set_state(aug_state)
        self.aug_gen = aug
        for start in range(first_batch * batch_size, len(order), batch_size):
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


def full_batches(n, batch_size, min_last):
    """Batches of an epoch over n images when a last batch under min_last images is dropped."""
    return n // batch_size + (n % batch_size >= min_last)


class UnreadableImage(Exception):
    """An image file PIL cannot decode (raised in a DataLoader worker, reported by _batches)."""


def _worker_init(worker_id):
    """DataLoader workers leave SIGINT / SIGTERM to the main process, which finishes its step and
    checkpoints; a worker that died on the signal would break that last step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_workers_at_exit():
    """At exit multiprocessing ends its daemonic children (the DataLoader workers of a loader that is
    still alive, e.g. held by an error's traceback) with SIGTERM and waits for them; ours ignore
    SIGTERM, so it would wait forever. Registered after multiprocessing's exit handler, this runs first."""
    if hasattr(signal, "SIGCHLD"):  # torch's handler would report the killed worker as a failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def load_image(path):
    from torchvision.datasets.folder import default_loader
    try:
        return default_loader(path)
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise UnreadableImage(f"{path} ({e})") from None


class ImageFolderData:
    """ImageNet from `DIR/train` and `DIR/val` (ImageFolder layout), read by DataLoader workers:
    RandomResizedCrop + flip for training, Resize (256/224 of the crop) + CenterCrop for testing.
    Each rank reads its shard through a DistributedSampler; the same interface as `Data`."""

    def __init__(self, args, device):
        import torchvision.transforms as T
        spec, size = DATASETS["imagenet"], args.image_size
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(args.data_dir, split)):
                die(f"imagenet needs {os.path.join(os.path.abspath(args.data_dir), split)} in ImageFolder layout "
                    f"(one folder of images per class); pass --data-dir, or run offline with --dataset synthetic")
        norm = T.Normalize(spec.mean, spec.std)
        self.train_set = self._folder(args.data_dir, "train",
                                      [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        self.test_set = self._folder(args.data_dir, "val",
                                     [T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
        self.name, self.spec, self.image_size = "imagenet", spec, size
        self.num_classes, self.num_train, self.aug_gen = len(self.train_set.classes), len(self.train_set), None
        self.mean, self.std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
        self.device, self.workers, self.resident_bytes = device, args.workers, 0
        if self.workers:
            atexit.unregister(_kill_workers_at_exit)  # once, however many loaders a process builds
            atexit.register(_kill_workers_at_exit)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    @staticmethod
    def _folder(data_dir, split, transforms):
        """The ImageFolder of one split. A class folder without images stops the run at once; a
        corrupt image stops it when read, naming the file (skipping it would change the batches)."""
        import torchvision.datasets as datasets
        import torchvision.transforms as T
        root = os.path.join(os.path.abspath(data_dir), split)
        try:
            return datasets.ImageFolder(root, T.Compose(transforms), loader=load_image)
        except FileNotFoundError as e:
            die(f"{root}: {e}; add the images or remove the empty class folders")

    def _batches(self, dataset, sampler, batch_size, seed, min_size=1):
        if self.workers == 0:  # the transforms then draw from this process's RNG: make it repeatable
            torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers, worker_init_fn=_worker_init,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(seed))
        try:
            for x, y in loader:
                if len(y) < min_size:  # the sampler gives every rank the same sizes, so all ranks skip it
                    break
                x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                yield x, y.to(self.device, non_blocking=True)
        except UnreadableImage as e:  # from a worker, the message is its traceback: the last line names the file
            die(f"cannot read the image {str(e).strip().splitlines()[-1].split('UnreadableImage: ')[-1]}; "
                f"replace or delete the file")

    def steps_per_epoch(self, batch_size, world=1):
        return full_batches(math.ceil(self.num_train / world), batch_size // world, 2)

    def train_batches(self, epoch, batch_size, seed, rank=0, world=1, first_batch=0, aug_state=None):
        """A resumed epoch skips the sampler's first `first_batch` batches (the same images follow;
        the workers' crops and flips are drawn anew)."""
        sampler = torch.utils.data.DistributedSampler(self.train_set, world, rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)  # every rank has the same number of batches (the sampler pads)
        order = list(sampler)[first_batch * (batch_size // world):]
        # BatchNorm (and SupCon) need 2+ samples: a last batch of 1 is dropped, as in Data.train_batches.
        return self._batches(self.train_set, order, batch_size // world, (seed * 100003 + epoch) * 1009 + rank, 2)

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


# ---- Arguments: the shared command line and the training protocol (schedule, optimizer) ----------

# Arguments that may change when a run is resumed; every other one must match the checkpoint's (args.json).
# A pipelined and a sequential run train the same model, so either may resume the other.
RESUMABLE_ARGS = {"out", "resume", "device", "data_dir", "steps", "workers", "save_every", "quiet", "pipeline",
                  "pipeline_cuts", "module_acc"}
SAVE_EVERY_IMAGENET = 1000  # steps: a mid-epoch checkpoint every 10-30 minutes on 8 GPUs


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


def parse_args(argv, doc, method, k, epochs, add_method_args=None, imagenet=None, no_pipeline=None):
    """The shared command line, with per-dataset defaults filled in. `k`, `epochs`: the method's
    paper defaults; `imagenet`: its ImageNet `epochs`, `batch_size`, `lr` where they differ from
    InfoPro's (90, 1024, 0.4) and `k` per network ({arch: K}); `no_pipeline`: why it cannot pipeline."""
    imagenet = dict(imagenet or {})
    k_by_arch = imagenet.pop("k", {})
    imagenet = dataclasses.replace(DATASETS["imagenet"], **{"epochs": 90, **imagenet})
    specs = {**DATASETS, "imagenet": imagenet}  # the defaults this method resolves per dataset
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default="./data", help="where datasets are read from / downloaded to")
    p.add_argument("--arch", default="resnet32", help=f"one of {', '.join(ARCHS)}")
    p.add_argument("--k", type=int, default=None, help=f"number of gradient-isolated modules, the last included "
                   f"(default: {k})" + ("; imagenet: one module per layer of the network" if k_by_arch else ""))
    p.add_argument("--split", default="official", help="official | even | balanced (InfoPro*)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {epochs} (the paper's); synthetic "
                   f"{specs['synthetic'].epochs}, imagenet {specs['imagenet'].epochs}")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch; default " + per_dataset(specs, "batch_size"))
    p.add_argument("--lr", type=float, default=None, help=f"initial lr; default {per_dataset(specs, 'lr')}")
    p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum of the SGD optimizer")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay of every parameter (aux nets too)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="epochs of blend from lr 0.01 into the cosine; "
                   "default " + per_dataset(specs, "warmup_epochs"))
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, data order and augmentation")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="output folder; default runs/<method>-<dataset>-<arch>-k<K>")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps (default: all)")
    p.add_argument("--workers", type=int, default=8, help="ImageNet DataLoader workers per process")
    p.add_argument("--image-size", type=int, default=224, help="ImageNet training crop (smaller for quick runs)")
    p.add_argument("--subset", type=int, default=None, metavar="N", help="only the first N training and N test "
                   "images (quick checks; default: all)")
    p.add_argument("--fake-data", action="store_true", help="random images of the dataset's shape (benchmarks)")
    p.add_argument("--no-augment", action="store_true", help="train on the images as they are (no crop, no flip)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (no grad scaler); fp32 by default")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the model and data")
    p.add_argument("--compile", action="store_true", help="torch.compile every layer, the head and every "
                   "auxiliary net (backwards stay per module)")
    p.add_argument("--save-every", type=int, default=None, metavar="N", help=f"also checkpoint every N steps "
                   f"within an epoch (0: at epoch ends only); default {SAVE_EVERY_IMAGENET} on imagenet, else 0")
    p.add_argument("--quiet", action="store_true", help="no start and progress lines (the JSON lines stay)")
    p.add_argument("--pipeline", type=int, nargs="?", const=True, default=False, metavar="P",
                   help="under torchrun --nproc_per_node=N: the K modules as P pipelined stages times N/P data-"
                   "parallel replicas (rank r: stage r %% P, replica r // P); alone: P = N (default: data parallel)")
    p.add_argument("--pipeline-cuts", type=int, nargs="+", default=None, metavar="M", help="the first module of "
                   "every stage after the first; default: cuts that balance the stages' measured step times")
    p.add_argument("--module-acc", action="store_true",
                   help="also every module's auxiliary classifier's test accuracy (one more pass of the modules)")
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
    if args.k is None:
        args.k = k_by_arch.get(args.arch, k) if args.dataset == "imagenet" else k
    spec = specs[args.dataset]
    args.epochs = (spec.epochs or epochs) if args.epochs is None else args.epochs
    args.batch_size = spec.batch_size if args.batch_size is None else args.batch_size
    args.lr = spec.lr if args.lr is None else args.lr
    args.warmup_epochs = spec.warmup_epochs if args.warmup_epochs is None else args.warmup_epochs
    if args.save_every is None:
        args.save_every = SAVE_EVERY_IMAGENET if args.dataset == "imagenet" else 0
    args.out = args.out or os.path.join("runs", f"{method}-{args.dataset}-{args.arch}-k{args.k}")
    minimum = {"epochs": 1, "batch_size": 2, "steps": 1, "subset": 1, "image_size": 1, "warmup_epochs": 0,
               "workers": 0, "save_every": 0, "momentum": 0, "weight_decay": 0}
    for name, low in minimum.items():
        value = getattr(args, name)
        if value is not None and not value >= low:
            why = " (BatchNorm needs 2+ images per batch)" if name == "batch_size" else ""
            die(f"--{name.replace('_', '-')} must be at least {low}{why}, got {value}")
    if not 0 < args.lr < math.inf:
        die(f"--lr must be a positive number, got {args.lr}")
    for name in ("momentum", "weight_decay"):  # 1 or more makes SGD diverge or erase the weights
        if not getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be below 1, got {getattr(args, name)}")
    if not isinstance(args.pipeline, bool) and args.pipeline < 2:  # a number of stages (True: one per process)
        die(f"--pipeline {args.pipeline}: a pipeline has at least 2 stages; give P >= 2, or leave --pipeline out "
            f"for data parallelism")
    if args.pipeline and no_pipeline:
        die(f"{method}.py cannot pipeline its modules: {no_pipeline}; run it without --pipeline")
    if args.pipeline_cuts and not args.pipeline:
        die("--pipeline-cuts sets the stages of --pipeline; add --pipeline or drop --pipeline-cuts")
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


def compile_pieces(model):
    """--compile: torch.compile per piece (every layer, the head, every auxiliary net), so that
    every local backward still runs at once."""
    torch._dynamo.config.recompile_limit = 64  # many blocks share one forward; train and eval
    for piece in (*model["net"].layers, model["net"].head, *model["aux"].children(),
                  *[m for name, m in model.items() if name not in ("net", "aux")]):
        piece.compile()


def autocast(args, device):
    """bfloat16 autocast with --bf16 (no grad scaler), else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


# ---- Local step: the modules of a batch one after another, and their statistics ------------------

def run_modules(step, ids, h, x, y, backward=True):
    """The method's local step of modules `ids` in order, from h (the first one's input):
    `step(i, h, x, y)` gives module i's output, local loss and auxiliary logits (or None). Each
    loss is back-propagated at once and the output detached, so no gradient crosses a module
    boundary and each module's activations are freed right away. Returns the last output and
    every module's loss and logits, detached."""
    losses, logits = [], []
    for i in ids:
        h, loss, scores = step(i, h, x, y)
        if backward and loss is not None:
            loss.backward()
        h = tree_map_only(torch.Tensor, torch.Tensor.detach, h)  # ContSup passes its context sources too
        losses.append(None if loss is None else loss.detach())
        logits.append(None if scores is None else scores.detach())
    return h, losses, logits


def train_step(step, k, x, y):
    """One batch through all k modules in this process (tests, benchmarks): the final loss and logits."""
    _, losses, logits = run_modules(step, range(k), x, x, y)
    return losses[-1], logits[-1]


class ModuleMeter:
    """One epoch's training statistics per module, summed on the device (no host sync per batch):
    the local loss and, where the auxiliary net is a classifier, the samples it classified right.
    The last module's are the network's own (train_loss, train_acc)."""

    def __init__(self, k, device):
        self.loss, self.right = torch.zeros(k, device=device), torch.zeros(k, device=device)
        self.seen = np.zeros((k, 2))  # samples with a loss, samples with logits (host counts)
        self.index = {}               # module ids -> the same on the device, made once

    def _ids(self, ids):
        if ids not in self.index:
            self.index[ids] = torch.tensor(ids, device=self.loss.device)
        return self.index[ids]

    def add(self, ids, losses, logits, y):
        with_loss = [(i, l) for i, l in zip(ids, losses) if l is not None]
        with_logits = [(i, s) for i, s in zip(ids, logits) if s is not None]
        for column, pairs in enumerate((with_loss, with_logits)):
            if not pairs:
                continue
            ids_here, values = zip(*pairs)
            if column == 0:
                self.loss.index_add_(0, self._ids(ids_here), torch.stack([l.float() for l in values]) * len(y))
            else:
                right = (torch.stack(values).argmax(2) == y).sum(1).float()
                self.right.index_add_(0, self._ids(ids_here), right)
            self.seen[list(ids_here), column] += len(y)

    def state(self):
        """The sums so far, for a mid-epoch checkpoint."""
        return torch.stack([self.loss.double(), self.right.double(),
                            *torch.tensor(self.seen.T, dtype=torch.float64, device=self.loss.device)])

    def load(self, state, own):
        """Partial sums of a mid-epoch checkpoint, for the modules `own` this process trains: each
        module's sums go on where it is trained, in the precision they were added in."""
        trained_here = torch.zeros(len(self.seen), dtype=torch.float64)
        trained_here[list(own)] = 1
        state = state.cpu() * trained_here
        self.loss.copy_(state[0])
        self.right.copy_(state[1])
        self.seen = state[2:].T.cpu().numpy()

    def mean_loss(self, i):
        return (self.loss[i] / max(self.seen[i, 0], 1)).item()

    def result(self, procs):
        """Summed over the processes (data-parallel shards or pipeline stages)."""
        loss, right, with_loss, with_logits = procs.all_sum(self.state()).tolist()
        module_loss = [l / n if n else None for l, n in zip(loss, with_loss)]
        module_acc = [r / n if n else None for r, n in zip(right, with_logits)]
        return {"train_loss": module_loss[-1], "train_acc": module_acc[-1],
                "module_loss": module_loss, "module_acc": module_acc}


# ---- Measurement: memory held for backward (any device), CUDA peaks, FLOPs, throughput, wall time ----

WARMUP_STEPS = 2  # steps before CUDA peak memory and throughput are measured (cuDNN autotuning)


class SavedTensorMeter:
    """Peak bytes of the tensors autograd saves for backward, counted once per storage and
    excluding parameters. It needs no GPU, and it is exactly what a per-module backward frees:
    one backward on the summed losses keeps every module's tensors alive and shows here."""

    def __init__(self, params):
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.holders, self.bytes, self.peak = collections.Counter(), 0, 0  # saved tensors per storage

    def _pack(self, t):
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self.param_storages or size == 0:
            return t
        if self.holders[key] == 0:
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
        self.holders[key] += 1
        return _Held(self, key, size, t)

    def _release(self, key, size):
        self.holders[key] -= 1
        if self.holders[key] == 0:
            self.bytes -= size
            del self.holders[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.tensor if isinstance(h, _Held) else h)


class _Held:
    """A saved tensor; when autograd drops it (after backward) its bytes stop counting."""
    __slots__ = ("meter", "key", "size", "tensor")

    def __init__(self, meter, key, size, tensor):
        self.meter, self.key, self.size, self.tensor = meter, key, size, tensor

    def __del__(self):
        self.meter._release(self.key, self.size)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Measurements:
    """What a process measures of its training: the bytes saved for backward and the FLOPs of its
    first step (only there, so that neither slows a timed step) and of its first inference batch;
    from WARMUP_STEPS on, evaluation left out, the CUDA peak and the images per second; the wall
    time across resumes. FIELDS travel in checkpoints, so that summary.json keeps them."""
    FIELDS = ("act_mem_bytes", "peak_mem_bytes", "peak_reserved_bytes", "timed_images", "timed_s",
              "train_flops_per_image", "inference_flops_per_image")

    def __init__(self, device, replicas):
        self.device, self.replicas = device, replicas
        self.act_mem_bytes = self.peak_mem_bytes = self.peak_reserved_bytes = None
        self.train_flops_per_image = self.inference_flops_per_image = None
        self.timed_images, self.timed_s = 0, 0.0  # go on from a resumed checkpoint
        self.process_steps = 0       # steps this process took (from 0 again after a resume)
        self.mem_base = 0            # the dataset resident on the GPU, not training memory
        self.saved_tensors = None    # the SavedTensorMeter of the first step
        self._flops = None           # the FlopCounterMode of the first step while it runs
        self._t0 = None              # start of the timed stretch under way
        self.clock_start, self.elapsed_before = time.perf_counter(), 0.0

    def watch(self, params, resident_bytes):
        """Count saved tensors other than these parameters; on CUDA, leave the dataset out."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mem_base = resident_bytes
        self.saved_tensors = SavedTensorMeter(params)

    def state(self):
        return {name: getattr(self, name) for name in self.FIELDS}

    def load(self, state):
        for name, value in state.items():
            setattr(self, name, value)

    @contextlib.contextmanager
    def first_step(self):
        """Count the saved bytes and the FLOPs of the step under way if it is this process's first."""
        if self.process_steps != 0:
            yield
            return
        self._flops = FlopCounterMode(display=False)
        with self.saved_tensors.hooks(), self._flops:
            yield

    @contextlib.contextmanager
    def inference_flops(self, images):
        """Count the FLOPs of the first inference forward of this process (one evaluation batch)."""
        if self.inference_flops_per_image is not None:
            yield
            return
        with FlopCounterMode(display=False) as counter:
            yield
        self.inference_flops_per_image = counter.get_total_flops() / images

    def before_step(self, all_processes):
        """Start the clock after the warm-up steps: with `all_processes` at a barrier, so that every
        pipeline stage times from a full start (the later stages are still on the slow first steps,
        FLOP counting and cuDNN autotuning, otherwise)."""
        if self.process_steps == WARMUP_STEPS:
            if all_processes:
                dist.barrier()
            self.resume()

    def after_step(self, batch):
        if self.process_steps == 0:
            self.act_mem_bytes = self.saved_tensors.peak  # per process, like CUDA memory
            self.train_flops_per_image = self._flops.get_total_flops() / batch
            self._flops = None
        self.process_steps += 1
        if self._t0 is not None:
            self.timed_images += batch * self.replicas

    def pause(self):
        """Stop timing (an epoch's training ends, a checkpoint is written) and read the CUDA peak."""
        sync(self.device)
        if self._t0 is not None:
            self.timed_s += time.perf_counter() - self._t0
            self._t0 = None
            if self.device.type == "cuda":
                allocated = torch.cuda.max_memory_allocated(self.device) - self.mem_base
                reserved = torch.cuda.max_memory_reserved(self.device)
                self.peak_mem_bytes = max(self.peak_mem_bytes or 0, allocated)
                self.peak_reserved_bytes = max(self.peak_reserved_bytes or 0, reserved)

    def resume(self):
        """(Re)start the clock once past the warm-up steps."""
        if self.process_steps >= WARMUP_STEPS:
            sync(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)  # evaluation is not training memory
            self._t0 = time.perf_counter()

    def images_per_s(self):
        return self.timed_images / self.timed_s if self.timed_s > 0 else None

    def elapsed_s(self):
        """Wall time of the run so far, the segments before a resume included."""
        return self.elapsed_before + time.perf_counter() - self.clock_start


# ---- Processes: one, or pipeline stages x data-parallel replicas (torchrun), and their collectives ----

class Processes:
    """This process's place in the run, its device and the collectives. Under torchrun the N
    processes are P pipeline stages (1 without --pipeline, N with a plain --pipeline) times
    R = N / P data-parallel replicas, each on its shard of every batch. Rank r is stage r % P of
    replica r // P: P consecutive ranks are one pipeline, so the activations sent every step stay
    on a node; only a stage's gradient all-reduce leaves it. args.device is resolved here."""

    def __init__(self, args):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if args.device is None:
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        device = args.device
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            die(f"--device {device} is not a device this script runs on: use cpu, cuda or cuda:N")
        if device.startswith("cuda") and not torch.cuda.is_available():
            die(f"--device {device} but no CUDA device is visible; use --device cpu")
        if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
            die(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1})")
        if device == "cuda" and self.world > 1:
            device = f"cuda:{local_rank}"
        self.device = torch.device(device)
        self._layout(args)  # before the process group exists: a wrong layout stops every process at once
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        self.replica_group = None  # the processes that average this one's gradients (None: all of them)
        if self.world > 1:
            # Imported before the group exists: the first step's FlopCounterMode imports torch._dynamo,
            # and imported after init_process_group it keeps a reference to the group, so that
            # destroy_process_group no longer ends its gloo threads (see close).
            import torch._dynamo as _  # noqa: F401
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            sys.excepthook = functools.partial(report_lost_contact, sys.excepthook)
            if 1 < self.replicas < self.world:  # every process creates every stage's group, in one order
                groups = [dist.new_group(list(range(s, self.world, self.stage_count)))
                          for s in range(self.stage_count)]
                self.replica_group = groups[self.stage]
        self.main = self.rank == 0

    def _layout(self, args):
        """P stages (args.pipeline: False, True for one per process, or P) times R replicas."""
        if args.pipeline is True and self.world < 2:
            die("--pipeline trains one stage per process: launch the script with torchrun --nproc_per_node=P "
                "(P >= 2 stages)")
        p = self.stage_count = self.world if args.pipeline is True else args.pipeline or 1
        if p > self.world or self.world % p:
            die(f"--pipeline {p} needs a multiple of {p} processes (P stages times R replicas), and this run has "
                f"{self.world}; launch torchrun --nproc_per_node with a multiple of {p}")
        self.stage, self.data_rank = self.rank % p, self.rank // p
        self.replicas = self.world // p  # processes that split every batch, this one taking shard data_rank
        if args.batch_size % self.replicas:
            die(f"--batch-size {args.batch_size} does not split over {self.replicas} data-parallel replicas; use a "
                f"multiple of {self.replicas}")
        if args.batch_size < 2 * self.replicas:
            die(f"--batch-size {args.batch_size} leaves fewer than 2 images per replica (BatchNorm needs 2+); use at "
                f"least {2 * self.replicas}")

    def all_sum(self, tensor):
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, tensor):
        """Every process's copy of a small tensor, on the CPU."""
        if self.world == 1:
            return [tensor.cpu()]
        tensor = tensor.to(self.device)
        gathered = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(gathered, tensor)
        return [t.cpu() for t in gathered]

    def average_gradients(self, params):
        """All-reduce every gradient (one flat buffer) after the local backwards: data parallelism
        over all modules at once, with no DDP wrapper to tangle with the per-module backwards."""
        if self.replicas == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.replica_group)
        flat /= self.replicas
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))

    def average_buffers(self, buffers):
        """The replicas' BatchNorm running statistics averaged, so that every replica holds one model."""
        if self.replicas == 1:
            return
        for b in buffers:
            if b.is_floating_point():
                dist.all_reduce(b, group=self.replica_group)
                b /= self.replicas

    def divergence(self, model):
        """Largest difference between any process's parameters and buffers and rank 0's (0.0 when
        the training kept every process's model identical, as it must)."""
        flat = torch.cat([t.detach().float().reshape(-1) for t in (*model.parameters(), *model.buffers())])
        gathered = self.gather(flat)
        return max((g - gathered[0]).abs().max().item() for g in gathered)

    def close(self):
        """All processes leave together, once each has finished (and dropped) every communication it
        started (StopRequest.settle, the stages' flush): gloo threads left alive into interpreter
        shutdown, by a work object or by the group itself, sometimes aborted a process that had
        written its results (SIGABRT, "terminate called without an active exception")."""
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()


LOST_CONTACT = re.compile(r"closed by peer|reset by peer|broken pipe|timed out|NCCL communicator|NCCL error", re.I)


def report_lost_contact(hook, kind, error, trace):
    """Under torchrun, a collective that fails because another process of the run has stopped (its
    connections closed, reset or timed out) ends this one with a line, not a traceback from deep
    inside torch.distributed: the process that stopped first printed the error to act on."""
    if not (isinstance(error, RuntimeError) and LOST_CONTACT.search(str(error))):
        return hook(kind, error, trace)
    if first_to_fail():
        cause = re.sub(r"^\[[^]]*\] *", "", str(error).strip().splitlines()[0]).split(". ")[0]
        print(f"error: lost contact with another process of the run ({cause}): that one stopped first, and "
              f"its own output says why", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # now: a shutdown with the group's gloo threads alive can abort (see Processes.close)


# ---- Pipeline: the K modules cut into P contiguous stages, one process each per replica ----------

PROBE_PASSES = 3  # timed passes of every module before a pipelined run (after one warm-up pass)


def probe_modules(model, data, step, k, args, device, batch):
    """Training steps of every module on random images, leaving the model as it was. On two images,
    per module: its training FLOPs, the parameters it gives a gradient and the buffers it updates
    (the stage that owns them) and its output's structure (what travels to the next stage). On
    `batch` images: each module's seconds, the least of PROBE_PASSES passes after a warm-up (others'
    work on the machine only adds time; one pass picked near-tied cuts by chance)."""
    state = copy.deepcopy(model.state_dict())
    params, buffers = list(model.parameters()), list(model.buffers())
    was_training = model.training
    model.train()
    x = torch.randn(2, 3, data.image_size, data.image_size, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.arange(2, device=device) % data.num_classes
    flops, param_owner, buffer_owner, outputs, h = [], {}, {}, [], x
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(k):
            before = [b.clone() for b in buffers]
            with FlopCounterMode(display=False) as counter, autocast(args, device):
                h, _, _ = run_modules(step, [i], h, x, y)
            flops.append(counter.get_total_flops())
            param_owner.update({j: i for j, p in enumerate(params) if p.grad is not None and j not in param_owner})
            buffer_owner.update({j: i for j, (b, old) in enumerate(zip(buffers, before))
                                 if j not in buffer_owner and not torch.equal(b, old)})
            leaves, spec = tree_flatten(h)
            outputs.append((spec, [(t.shape[1:], t.dtype) for t in leaves if t is not None]))
        x = torch.randn(batch, 3, data.image_size, data.image_size, device=device)
        y = torch.randint(0, data.num_classes, (batch,), device=device)
        passes = [time_modules(step, k, x, y, args, device) for _ in range(1 + PROBE_PASSES)]
        seconds = np.min(passes[1:], axis=0).tolist()
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return flops, seconds, param_owner, buffer_owner, outputs


def time_modules(step, k, x, y, args, device):
    """The seconds of each module's training step in one pass of the batch through all K."""
    seconds, h = [], x
    for i in range(k):
        sync(device)
        start = time.perf_counter()
        with autocast(args, device):
            h, _, _ = run_modules(step, [i], h, x, y)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def balanced_cuts(costs, parts):
    """The first index of every part but the first, cutting `costs` into `parts` contiguous
    non-empty runs whose largest total is as small as possible (exact, by dynamic programming)."""
    n, prefix = len(costs), np.concatenate([[0.0], np.cumsum(costs)])
    best = [{0: (0.0, [])}]  # best[p][e]: (largest total, starts) of the first e items in p parts
    for p in range(1, parts + 1):
        best.append({end: min((max(best[p - 1][start][0], prefix[end] - prefix[start]), best[p - 1][start][1] + [start])
                              for start in best[p - 1] if start < end)
                     for end in range(p, n - (parts - p) + 1)})
    return best[parts][n][1][1:]


class OneStage:
    """Every module trained by this process (no --pipeline): the batch is the first module's input,
    nothing is sent on, and at an epoch end data-parallel replicas average their BatchNorm running
    statistics, so that every replica holds the same model."""

    def __init__(self, procs, args, model, data, modules, step):
        self.procs, self.own = procs, range(len(modules))

    def receive(self, x, batch):
        return x

    def send(self, h):
        pass

    def flush(self):
        pass

    def sync(self, model, opt):
        self.procs.average_buffers(model.buffers())


class Pipeline:
    """Module-parallel training: the K modules cut into P contiguous stages, stage s trained by rank
    replica * P + s. No gradient crosses a module boundary, so a stage needs from the previous one
    only its last module's detached output (point-to-point, within the replica). Each stage draws
    its replica's shard of the batch itself, steps the parameters its modules own (gradients
    averaged over the stage's replicas) and sends its output on while the next stage works on the
    previous batch (at most DEPTH in flight). Module j's update depends only on its input and its
    loss, so the run equals the data-parallel one of R processes. At every epoch end each stage
    sends its parameters, buffers and momentum to all, so every process holds the whole model."""
    DEPTH = 2

    def __init__(self, procs, args, model, data, modules, step):
        k, parts = len(modules), procs.stage_count
        if parts > k:
            die(f"--pipeline over {parts} stages needs at least {parts} modules, and this run has {k}; use "
                f"fewer stages (--pipeline P, --nproc_per_node) or a larger --k")
        flops, seconds, param_owner, buffer_owner, self.outputs = probe_modules(
            model, data, step, k, args, procs.device, args.batch_size // procs.replicas)
        seconds = procs.all_sum(torch.tensor(seconds, dtype=torch.float64, device=procs.device)).tolist()  # all agree
        cuts = args.pipeline_cuts or balanced_cuts(seconds, parts)
        if len(cuts) != parts - 1 or list(cuts) != sorted(set(cuts)) or not 0 < cuts[0] <= cuts[-1] < k:
            die(f"--pipeline-cuts needs {parts - 1} increasing module indices from 1 to {k - 1} (the first module "
                f"of every stage after the first), got {' '.join(map(str, cuts))}")
        bounds = [0, *cuts, k]
        self.stages = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        self.stage, self.last, self.device, self.procs = procs.stage, parts - 1, procs.device, procs
        self.own = self.stages[self.stage]
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.momentum = args.momentum > 0
        stage_of = {i: s for s, stage in enumerate(self.stages) for i in stage}
        owned = lambda tensors, owner, s: [t for j, t in enumerate(tensors) if stage_of.get(owner.get(j)) == s]
        self.params = [owned(list(model.parameters()), param_owner, s) for s in range(parts)]
        self.buffers = [owned(list(model.buffers()), buffer_owner, s) for s in range(parts)]
        share = lambda costs: [sum(costs[i] for i in stage) / max(sum(costs), 1e-12) for stage in self.stages]
        self.time_share, self.flops_share = share(seconds), share(flops)
        self.speedup = 1 / max(self.time_share)  # the step time over the slowest stage's: what the cut should give
        self.pending = collections.deque()
        if procs.main and not args.quiet:
            described = [f"stage {s}: modules {st.start}-{st.stop - 1} (layers {modules[st.start][0]}-"
                         f"{modules[st.stop - 1][-1]}), {busy:.0%} of the step time, {flops:.0%} of the FLOPs"
                         for s, (st, busy, flops) in enumerate(zip(self.stages, self.time_share, self.flops_share))]
            replicas = f", each on {procs.replicas} data-parallel replicas" if procs.replicas > 1 else ""
            print("pipeline: " + "; ".join(described) + f"{replicas}; predicted speed-up {self.speedup:.2f}x",
                  flush=True)

    def receive(self, x, batch):
        if self.stage == 0:
            return x
        spec, leaves = self.outputs[self.own.start - 1]
        tensors = [torch.empty((batch, *shape), dtype=dtype, device=self.device) for shape, dtype in leaves]
        for t in tensors:
            dist.recv(t, self.procs.rank - 1)  # the previous stage of this replica
        tensors = [t.contiguous(memory_format=self.memory_format) if t.dim() == 4 else t for t in tensors]
        return tree_unflatten(tensors, spec)

    def send(self, h):
        if self.stage == self.last:
            return
        tensors = [t.contiguous() for t in tree_flatten(h)[0]]
        self.pending.append(([dist.isend(t, self.procs.rank + 1) for t in tensors], tensors))  # keep them alive
        while len(self.pending) > self.DEPTH:
            self._wait_oldest()

    def _wait_oldest(self):
        for work in self.pending.popleft()[0]:
            work.wait()

    def flush(self):
        while self.pending:
            self._wait_oldest()

    def sync(self, model, opt):
        """The stage's BatchNorm statistics averaged over its replicas (its parameters and momentum
        are the same on all of them), then every stage's parameters, buffers and momentum buffers
        from its first replica (rank s) to every process."""
        self.flush()
        self.procs.average_buffers(self.buffers[self.stage])
        for s in range(len(self.stages)):
            tensors = [p.data for p in self.params[s]] + self.buffers[s]
            if self.momentum:  # the other stages never stepped these: give them the owner's momentum
                for p in self.params[s]:
                    if opt.state[p].get("momentum_buffer") is None:
                        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    tensors.append(opt.state[p]["momentum_buffer"])
            for dtype in sorted({t.dtype for t in tensors}, key=str):  # the same order on every process
                group = [t for t in tensors if t.dtype == dtype]
                flat = torch.cat([t.reshape(-1) for t in group])
                dist.broadcast(flat, s)
                for t, new in zip(group, flat.split([t.numel() for t in group])):
                    t.copy_(new.view_as(t))

    def report(self, act_mem_bytes):
        """Per stage: its modules, its share of the step time and of the training FLOPs and its
        activation memory (that of its first replica, rank s)."""
        gathered = self.procs.gather(torch.tensor([float(act_mem_bytes or 0)]))[:len(self.stages)]
        return [{"modules": list(stage), "time_share": round(busy, 4), "flops_share": round(flops, 4),
                 "act_mem_bytes": int(m.item())}
                for stage, busy, flops, m in zip(self.stages, self.time_share, self.flops_share, gathered)]


# ---- Run folder: args.json, metrics.jsonl, checkpoint.pt and summary.json, written atomically ----

class RunFolder:
    """The run's folder (--out) and its files, written by the main process only. A folder holds one
    run once it has a checkpoint: a fresh start refuses it, a resume must have the same arguments;
    a run that died before its first checkpoint blocks nothing. A live run holds an exclusive lock
    on `.lock` (released by the kernel however the process ends): a second run there stops at once."""
    _locked = []  # the lock file this process holds, if any

    def __init__(self, args, procs):
        self.args, self.procs, self.main = args, procs, procs.main
        self.checkpoint = os.path.join(args.out, "checkpoint.pt")
        self.metrics = os.path.join(args.out, "metrics.jsonl")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            die(f"--out {args.out} is a file, not a folder; choose another --out")
        if args.resume and not os.path.exists(self.checkpoint):
            die(f"--resume: no checkpoint at {self.checkpoint}; start the run without --resume")
        if not args.resume and os.path.exists(self.checkpoint):
            die(f"{args.out} already holds a run; pass --resume to continue it or --out to start another")
        if procs.world > 1:
            dist.barrier()  # every process has checked the folder before the main one writes to it
        if self.main:
            with writing(args.out):
                os.makedirs(args.out, exist_ok=True)
                self._lock(os.path.join(args.out, ".lock"))
                for tmp in glob.glob(os.path.join(glob.escape(args.out), "*.tmp[0-9]*")):
                    os.remove(tmp)  # left by a process killed while it was saving
            if not args.resume:  # clear what an attempt that died before its first checkpoint left
                atomic_write(self.metrics, "")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(args.out, "summary.json"))

    def _lock(self, path):
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            die(f"{self.args.out} is in use by {holder}, which is still running; wait for it to end (or stop it), "
                f"or choose another --out")
        lock.truncate(0)
        lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        RunFolder._locked.append(lock)

    @staticmethod
    def unlock():
        while RunFolder._locked:
            RunFolder._locked.pop().close()

    def write_args(self):
        """args.json: the arguments of a fresh start, as resolved (the model was built with them)."""
        if self.main:
            atomic_write(os.path.join(self.args.out, "args.json"), json.dumps(vars(self.args), indent=2) + "\n")

    def load(self, model, opt, device):
        """The checkpoint, checked against this run's arguments and loaded into model and opt."""
        try:
            ckpt = torch.load(self.checkpoint, map_location=device, weights_only=False)
        except Exception as e:  # truncated, or not a checkpoint at all
            die(f"--resume: cannot read {self.checkpoint} ({type(e).__name__}): the file is damaged; restore a "
                f"copy, or delete it to start the run again")
        if "args" in ckpt:
            self._check_same_run(ckpt["args"])
        else:  # written before checkpoints carried their arguments
            with open(os.path.join(self.args.out, "args.json")) as f:
                self._check_same_run(json.load(f))
        if ckpt["epoch"] >= self.args.epochs and ckpt.get("partial") is None:  # nothing left: change nothing
            if self.main:
                print(f"{self.args.out}: the run is complete ({ckpt['epoch']} epochs, {ckpt['steps']} steps); "
                      f"nothing to resume", flush=True)
            self.procs.close()
            release_run()
            raise SystemExit(0)
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            die(f"--resume: {self.checkpoint} does not fit this model ({str(e).splitlines()[0]}); it belongs to "
                f"another run: choose another --out")
        return ckpt

    def _check_same_run(self, before):
        """Refuse to resume with other arguments than the checkpoint's (as resolved: build_aux
        stores the method's defaults in args), naming the first that differs."""
        now = json.loads(json.dumps(vars(self.args)))  # tuples as lists, as in args.json
        for key in sorted(now, key=lambda k: k != "method"):  # another script first: its K differs too
            if key in RESUMABLE_ARGS or before.get(key) == now[key]:
                continue
            if key == "method":
                die(f"--resume: the run in {self.args.out} is a {before.get(key)}.py run, not {now[key]}.py; "
                    f"resume it with {before.get(key)}.py or choose another --out")
            die(f"--resume: the run in {self.args.out} has --{key.replace('_', '-')} {before.get(key)}, not "
                f"{now[key]}; resume with the same arguments or choose another --out")

    def save(self, ckpt):
        if self.main:
            atomic_write(self.checkpoint, ckpt)

    def trim_metrics(self, epoch):
        """Drop metrics.jsonl's lines after `epoch` (work after the checkpoint of a run stopped
        mid-epoch) and a half-written last line (a kill while appending)."""
        if not self.main:
            return
        kept, lines = [], []
        if os.path.exists(self.metrics):
            with open(self.metrics) as f:
                lines = f.read().splitlines()
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break
                die(f"{self.metrics} line {i + 1} is not JSON; repair or delete that line")
            if not isinstance(entry, dict) or not isinstance(entry.get("epoch"), int):
                die(f"{self.metrics} line {i + 1} is not an epoch's entry; repair or delete that line")
            if entry["epoch"] <= epoch:
                kept.append(line + "\n")
        atomic_write(self.metrics, "".join(kept))

    def append_metrics(self, line):
        if self.main:
            with writing(self.metrics):
                with open(self.metrics, "a") as f:
                    f.write(json.dumps(line) + "\n")

    def write_summary(self, summary):
        if self.main:
            atomic_write(os.path.join(self.args.out, "summary.json"), json.dumps(summary, indent=2) + "\n")


@contextlib.contextmanager
def writing(path, tmp=None):
    """A write that fails (full disk, read-only file system) stops the run with one line, and
    removes its temporary file so that it does not keep the disk full."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(e, OSError) and e.strerror and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            die(f"cannot write {path} ({e.strerror}); choose a writable --out")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "write failed"  # torch's: a full disk
        die(f"cannot write {path} ({reason}); free disk space or choose another --out")


def atomic_write(path, content):
    """Write text (or any object, by torch.save) to a temporary file and rename it: a crash never
    leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(path, tmp):
        if isinstance(content, str):
            with open(tmp, "w") as f:
                f.write(content)
        else:
            torch.save(content, tmp)
        os.replace(tmp, path)


# ---- Stop requests: SIGTERM / SIGINT finish the step, and every process stops at the same one ----

STOP_CHECK_STEPS = 10  # under torchrun the processes agree on a SIGTERM / SIGINT every this many steps


class StopRequest:
    """The first SIGTERM (a scheduler's pre-emption) or SIGINT (Ctrl-C) is remembered and acted on
    after the current step: the run checkpoints and exits. A second one stops at once, as without
    this handler. A process started by torchrun whose launcher is gone (killed with SIGKILL: its
    processes live on in their own session) stops as on SIGTERM."""
    _catching = []  # the requests whose handlers are installed, newest last

    def __init__(self, procs):
        self.procs, self.signal = procs, None  # the signal received, if one was
        self.launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._vote = None                      # the processes' sum of their flags, under way
        self._old_handlers = {}

    def catch(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            StopRequest._catching.append(self)

    def restore(self):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        if self in StopRequest._catching:
            StopRequest._catching.remove(self)

    @staticmethod
    def restore_all():
        while StopRequest._catching:
            StopRequest._catching[-1].restore()

    def _on_signal(self, signum, frame):
        if self.signal is not None:  # the run is abandoned: its folder is free (a notebook may go on)
            release_run()
            signal.raise_signal(signum)
            return
        self.signal = signum

    def exit(self, steps, saved):
        """Stop the run after `steps`, with this process's signal or the one another process received."""
        sig = signal.Signals(self.signal or signal.SIGTERM)
        if self.procs.main:
            print(f"stopped by {sig.name} after step {steps}: {saved}; run the same command with --resume to "
                  f"continue", file=sys.stderr, flush=True)
        self.restore()
        self.settle()
        self.procs.close()
        release_run()
        raise SystemExit(128 + sig)

    def settle(self):
        """Wait for the vote under way and drop it: a work object alive at destroy_process_group keeps
        the group's connections and their gloo thread alive."""
        if self._vote is not None:
            self._vote[0].wait()
            self._vote = None

    def requested(self, steps, now=False):
        """Whether to stop after this step. Under torchrun every process must stop at the same step
        (one that went on would wait in the next collective): they sum their flags every
        STOP_CHECK_STEPS steps, read STOP_CHECK_STEPS steps later so that no one waits there
        (stages run batches apart), and at every epoch end (`now`)."""
        if self.signal is None and self.launcher is not None and os.getppid() != self.launcher:
            self.signal = signal.SIGTERM  # orphaned: this process now belongs to init (or a subreaper)
        if self.procs.world == 1:
            return self.signal is not None
        if not now and steps % STOP_CHECK_STEPS:
            return False
        stop = False
        if self._vote is not None:
            work, votes = self._vote
            work.wait()
            stop = votes.item() > 0
        flag = torch.tensor([float(self.signal is not None)], device=self.procs.device)
        if now:
            dist.all_reduce(flag)
            self._vote = None
            return stop or flag.item() > 0
        self._vote = (dist.all_reduce(flag, async_op=True), flag)
        return stop


# ---- Progress: the start line, then one every PROGRESS_STEPS steps or PROGRESS_S seconds ---------

PROGRESS_STEPS, PROGRESS_S = 500, 60.0  # a progress line after this many steps or seconds, whichever first
FIRST_LINE_STEPS = WARMUP_STEPS + 3      # and one after a process's first few timed steps


class Progress:
    """Lines for a person watching the run (the main process, unless --quiet): the start line, then
    now and then the epoch, the step, the loss of this process's last module (the network's head,
    or with --pipeline this stage's last module), the speed and the time left."""

    def __init__(self, args, main, steps_per_epoch, k, last_module, steps):
        self.args, self.on, self.k, self.last_module = args, main and not args.quiet, k, last_module
        self.steps_per_epoch, self.total = steps_per_epoch, steps_per_epoch * args.epochs
        self.total = min(self.total, args.steps or self.total)
        self.t_start = time.perf_counter()
        self._line = (self.t_start, steps)  # (time, steps) of the last line

    def start(self, images, params, start_epoch, world, device):
        """The start line, and a note when most epochs would train at lr 0.01 or 0."""
        if not self.on:
            return
        a = self.args
        modules = f"K={a.k} modules" + (f" ({self.k} trained: merged as the method does)" if self.k != a.k else "")
        print(f"{a.method}: {a.dataset} ({images:,} training images, {self.steps_per_epoch} steps per epoch), {a.arch} "
              f"in {modules}, {params:,} parameters, epochs {start_epoch}-{a.epochs} on {world} x {device}, "
              f"output in {a.out}", flush=True)
        idle = sum((e == 1 and a.warmup_epochs > 0) or lr_at(e, a) == 0 for e in range(1, a.epochs + 1))
        if 2 * idle > a.epochs:
            print(f"note: {idle} of the {a.epochs} epochs train at lr 0.01 (the warm-up's start) or 0 (the cosine "
                  f"ends at 0 in the last epoch, as in the official codes); use more --epochs for a run that learns",
                  flush=True)

    def update(self, epoch, steps, process_steps, meter):
        """A line when due; its speed and ETA come from the steps since the last line (for the first
        line, since the warm-up steps)."""
        now = time.perf_counter()
        last_t, last_steps = self._line
        due = process_steps == FIRST_LINE_STEPS or steps - last_steps >= PROGRESS_STEPS or now - last_t >= PROGRESS_S
        if not (self.on and due):
            if process_steps == WARMUP_STEPS:
                self._line = (now, steps)
            return
        loss = meter.mean_loss(self.last_module)  # the only host sync, once per line
        seconds_per_step = (now - last_t) / (steps - last_steps)
        name = "train_loss" if self.last_module == self.k - 1 else f"module_{self.last_module}_loss"
        print(f"epoch {epoch}/{self.args.epochs} step {steps}/{self.total} {name} {loss:.4f} "
              f"{self.args.batch_size / seconds_per_step:.1f} images/s elapsed {_hms(now - self.t_start)} "
              f"eta {_hms((self.total - steps) * seconds_per_step)}", flush=True)
        self._line = (now, steps)


def _hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---- Run: the parts above put together, the training position and the epoch loop's hooks ---------

class Run:
    """One training run as main() and train_epoch see it: the parts above (`procs`, `folder`,
    `measure`, `stop`, `progress`, `stages`: the modules this process trains) put together, and
    where the training stands (the epoch to start from, the steps, the batch in the epoch, accuracy)."""

    def __init__(self, args):
        self.args, self.procs = args, Processes(args)
        self.device, self.main = self.procs.device, self.procs.main
        self.folder = RunFolder(args, self.procs)
        self.measure = Measurements(self.device, self.procs.replicas)
        self.stop = StopRequest(self.procs)
        self.progress = self.stages = None
        self.start_epoch, self.steps, self.best_acc, self.acc = 1, 0, 0.0, None
        self.batch = 0            # batches done in the running epoch
        self.partial = None       # where a mid-epoch checkpoint stopped (the epoch to resume there)
        self.interrupted = False  # --steps stopped an epoch before its end
        self.saved = None         # the last good checkpoint, in words
        self.data, self.steps_per_epoch, self.step, self.k = None, 0, None, None

    def start(self, model, opt, data, modules, step):
        """Take the method's local step `step(i, h, x, y)` of modules 0..K-1 (as stages with
        --pipeline), resume if asked (else record the arguments), catch SIGTERM / SIGINT, print the
        start line, apply --channels-last and --compile. Returns the epochs to train."""
        args = self.args
        self.data, self.steps_per_epoch = data, data.steps_per_epoch(args.batch_size, self.procs.replicas)
        if self.steps_per_epoch == 0:
            die(f"--batch-size {args.batch_size} leaves no training step on {data.num_train} training images "
                f"(a last batch under 2 images per process is dropped for BatchNorm); use a smaller "
                f"--batch-size or more images (--subset)")
        self.step, self.k = step, len(modules)
        self.stages = (Pipeline if args.pipeline else OneStage)(self.procs, args, model, data, modules, step)
        if args.resume:
            self._resume(model, opt)
        else:
            self.folder.write_args()
        self.stop.catch()
        self.progress = Progress(args, self.main, self.steps_per_epoch, self.k, self.stages.own[-1], self.steps)
        self.progress.start(data.num_train, count_params(model), self.start_epoch, self.procs.world, self.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its parameters
        if args.compile:
            compile_pieces(model)
        self.measure.watch(model.parameters(), data.resident_bytes)  # the parameters as they train
        return range(self.start_epoch, args.epochs + 1)

    def _resume(self, model, opt):
        ckpt = self.folder.load(model, opt, self.device)
        self.start_epoch, self.steps, self.best_acc = ckpt["epoch"] + 1, ckpt["steps"], ckpt["best_test_acc"]
        self.acc, self.partial = ckpt["test_acc"], ckpt.get("partial")
        self.measure.elapsed_before = ckpt.get("elapsed_s", 0.0)
        self.measure.load(ckpt.get("measured", {}))
        if self.partial is not None and self.partial["replicas"] != self.procs.replicas:
            die(f"--resume: {self.folder.checkpoint} was written mid-epoch by {self.partial['replicas']} "
                f"data-parallel replicas; resume it with as many (processes / --pipeline stages)")
        self.saved = _describe(ckpt["epoch"], self.partial)
        self.folder.trim_metrics(ckpt["epoch"])

    def done(self):
        return self.args.steps is not None and self.steps >= self.args.steps

    # -- the epoch loop's hooks (no host sync per step, except to print or save) -----------------------
    def begin_epoch(self, epoch, meter):
        """Where the epoch's batches start: from zero, or where a mid-epoch checkpoint stopped (with
        its statistics in `meter` and its augmentation state), so that it equals the uninterrupted one."""
        self.batch, position = 0, {}
        if self.partial is not None and self.partial["epoch"] == epoch:
            p, self.partial = self.partial, None
            self.batch, stats = p["batch"], p["stats"]  # per replica (older pipelined checkpoints: per stage)
            meter.load(stats[self.procs.data_rank] if len(stats) == self.procs.replicas else sum(stats),
                       self.stages.own)
            position = {"first_batch": p["batch"], "aug_state": p["aug"][self.procs.data_rank]}
        return position

    def after_step(self, epoch, lr, batch, meter, model, opt):
        """After every optimizer step: count it; now and then a progress line; a --save-every
        checkpoint; on SIGTERM / SIGINT a checkpoint and the exit."""
        self.measure.after_step(batch)
        self.steps += 1
        self.batch += 1
        self.progress.update(epoch, self.steps, self.measure.process_steps, meter)
        stop = self.stop.requested(self.steps)
        every = self.args.save_every
        if stop or (every and self.steps % every == 0 and self.batch < self.steps_per_epoch):
            self._save_mid_epoch(epoch, lr, meter, model, opt)
        if stop:
            self.stop.exit(self.steps, f"{self.folder.checkpoint} holds {self.saved}")

    def pause_clock(self):
        """End of an epoch's training (or a checkpoint): stop timing once the next stage has this
        stage's last output."""
        self.stages.flush()
        self.measure.pause()

    # -- checkpoints, the end of an epoch and of the run -------------------------------------------
    def _save(self, model, opt, epoch, partial=None):
        """Checkpoint after `epoch` whole epochs (and `partial`, a part of the next). It carries the
        arguments, so that a resume checks them, and what was measured, so that summary.json keeps it."""
        self.folder.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                          "steps": self.steps, "best_test_acc": self.best_acc, "test_acc": self.acc,
                          "args": dict(vars(self.args)), "measured": self.measure.state(), "partial": partial,
                          "elapsed_s": self.measure.elapsed_s()})
        self.saved = _describe(epoch, partial)

    def _save_mid_epoch(self, epoch, lr, meter, model, opt):
        """A checkpoint inside epoch `epoch`: the model (made the same on every process first, as at
        an epoch end), where the epoch's batches stand, the partial statistics and the augmentation
        random state of every process."""
        self.pause_clock()
        self.stages.sync(model, opt)
        if nonfinite(model).item():
            die_nonfinite(self, epoch, lr, model)
        aug = self.data.aug_gen.get_state() if self.data.aug_gen is not None else torch.zeros(0, dtype=torch.uint8)
        # One entry per data-parallel replica, whatever the stage layout: replica r is ranks r * P to
        # r * P + P - 1 (Processes), each holding the sums of the modules it trains, so adding them
        # adds zeros only (exact); its stages share one augmentation state.
        p, stats, augs = self.procs.stage_count, self.procs.gather(meter.state()), self.procs.gather(aug)
        partial = {"epoch": epoch, "batch": self.batch, "stats": [sum(stats[r * p:(r + 1) * p])
                                                                  for r in range(self.procs.replicas)],
                   "aug": augs[::p], "replicas": self.procs.replicas}
        self._save(model, opt, epoch - 1, partial)
        self.measure.resume()

    def end_epoch(self, epoch, lr, train, test, model, opt):
        """Log the epoch; checkpoint it unless --steps cut it short (resuming then continues from
        the last checkpoint, which ends a whole epoch or stands where --save-every wrote it)."""
        self.acc, self.best_acc = test["test_acc"], max(self.best_acc, test["test_acc"])
        line = {"epoch": epoch, "lr": lr, **train, **test, "best_test_acc": self.best_acc, "steps": self.steps,
                "elapsed_s": round(self.measure.elapsed_s(), 3)}
        if self.main:
            print(json.dumps(line), flush=True)
        self.folder.append_metrics(line)
        if not self.interrupted:
            self._save(model, opt, epoch)
            # a signal during evaluation: stop here, unless the run is complete anyway
            if epoch < self.args.epochs and self.stop.requested(self.steps, now=True):
                self.stop.exit(self.steps, f"{self.folder.checkpoint} holds {self.saved}")

    def finish(self, model, modules):
        """Write summary.json, print its headline and leave the process group."""
        summary = summarize(self, model, modules)
        self.folder.write_summary(summary)
        if self.main:
            print(json.dumps({k: summary[k] for k in ("method", "k", "final_test_acc", "best_test_acc",
                                                      "act_mem_bytes", "peak_mem_bytes", "images_per_s")}))
        self.stop.restore()
        self.stop.settle()
        self.stages.flush()
        self.procs.close()
        release_run()
        return summary


def _describe(epoch, partial):
    """Where a checkpoint stands, in words."""
    return f"epoch {epoch}" if partial is None else f"epoch {partial['epoch']}, batch {partial['batch']}"


def nonfinite(model):
    """How many parameters and floating buffers hold a NaN or an infinity, as a 1-element tensor on
    the device (no host sync)."""
    flags = [~torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return torch.stack(flags).sum().float().view(1)


def die_nonfinite(run, epoch, lr, model, loss=None):
    """Stop before a NaN or inf loss or model state is checkpointed, naming the lr of the epoch."""
    if loss is not None:
        what = f"the training loss became {loss} in epoch {epoch}"
    else:
        bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        what = f"the model state became non-finite in epoch {epoch} (NaN or inf in {len(bad)} tensors, e.g. {bad[0]})"
    last = (f"the last good checkpoint is {run.folder.checkpoint} ({run.saved})" if run.saved
            else "no checkpoint was written")
    die(f"{what}; lower --lr (it was {lr:.4g} in epoch {epoch}) or check the data; {last}")


def summarize(run, model, modules):
    """summary.json: what was trained, how well, and what it cost (memory, FLOPs, speed, time). With
    --pipeline also each stage's share; under torchrun the largest difference between the
    processes' models (0.0)."""
    params = {"backbone": count_params(model["net"]), "aux": count_params(model["aux"])}
    params.update({name: count_params(m) for name, m in model.items() if name not in ("net", "aux")})
    a, m, procs = run.args, run.measure, run.procs
    summary = {
        "method": a.method, "dataset": a.dataset, "arch": a.arch, "k": a.k, "split": a.split,
        "modules": modules, "params": params, "epochs": a.epochs, "steps": run.steps,
        "batch_size": a.batch_size, "world_size": procs.world,
        "best_test_acc": run.best_acc, "final_test_acc": run.acc,
        "peak_mem_bytes": m.peak_mem_bytes, "peak_reserved_bytes": m.peak_reserved_bytes,
        "act_mem_bytes": m.act_mem_bytes,
        "train_flops_per_image": m.train_flops_per_image,
        "inference_flops_per_image": m.inference_flops_per_image,
        "images_per_s": m.images_per_s(),
        "device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "elapsed_s": round(m.elapsed_s(), 3),
    }
    if a.pipeline:
        summary["stages"] = run.stages.report(m.act_mem_bytes)
        summary["predicted_speedup"] = round(run.stages.speedup, 4)  # from the probe's module times
        flops = torch.tensor([m.train_flops_per_image or 0.0], dtype=torch.float64, device=run.device)
        summary["train_flops_per_image"] = procs.all_sum(flops).item() / procs.replicas  # each stage counted its own
    if procs.world > 1:
        summary["rank_max_abs_diff"] = procs.divergence(model)
    return summary


# ---- Epoch: training (the method's step on every batch) and evaluation ---------------------------

def train_epoch(run, args, data, model, opt, epoch, step):
    """One epoch: on every batch the method's local step of each module this process trains (all
    of them, or its pipeline stage's), each module's loss back-propagated at once; then gradients
    are averaged over the data-parallel replicas (of this stage) and one optimizer step is taken.
    Statistics stay on the device until the epoch ends."""
    lr = lr_at(epoch, args)
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    meter = ModuleMeter(run.k, run.device)
    position = run.begin_epoch(epoch, meter)  # where a mid-epoch checkpoint stopped, if it did
    run.measure.resume()
    run.interrupted = False
    procs = run.procs
    for x, y in data.train_batches(epoch, args.batch_size, args.seed, procs.data_rank, procs.replicas, **position):
        if run.done():
            run.interrupted = True
            break
        run.measure.before_step(all_processes=args.pipeline)
        opt.zero_grad(set_to_none=True)
        with run.measure.first_step(), autocast(args, run.device):
            h, losses, logits = run_modules(step, run.stages.own, run.stages.receive(x, len(y)), x, y)
            run.stages.send(h)
        procs.average_gradients(model.parameters())
        opt.step()
        meter.add(run.stages.own, losses, logits, y)
        run.after_step(epoch, lr, len(y), meter, model, opt)
    run.pause_clock()
    run.stages.sync(model, opt)
    train = meter.result(procs)
    loss = train["train_loss"]
    if (loss is not None and not math.isfinite(loss)) or procs.all_sum(nonfinite(model)).item():
        die_nonfinite(run, epoch, lr, model, None if loss is None or math.isfinite(loss) else loss)
    return lr, train


@torch.no_grad()
def evaluate(run, args, data, model, predict):
    """Top-1 (and top-5) accuracy of `predict` (the backbone and its head, unless the method's
    inference network has more) on the test split, sharded over the processes. With --module-acc
    also the test accuracy of every module's auxiliary classifier (the local steps' forward, no
    backward)."""
    model.eval()
    counts = torch.zeros(3, device=run.device)  # top-1 right, top-5 right, seen
    module_right, classifies = torch.zeros(run.k, device=run.device), [False] * run.k
    for x, y in data.test_batches(args.batch_size, run.procs.rank, run.procs.world):
        with autocast(args, run.device), run.measure.inference_flops(len(y)):
            logits = predict(x)
            if args.module_acc:
                _, _, scores = run_modules(run.step, range(run.k - 1), x, x, y, backward=False)
                for i, s in enumerate(scores):
                    if s is not None:
                        module_right[i] += (s.argmax(1) == y).sum()
                        classifies[i] = True
        top5 = (logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]).any(1)
        counts += torch.stack([(logits.argmax(1) == y).sum().float(), top5.sum().float(),
                               torch.tensor(float(len(y)), device=run.device)])
    top1, top5, seen = run.procs.all_sum(counts).tolist()
    test = {"test_acc": top1 / seen, "test_top5": top5 / seen}
    if args.module_acc:
        right = run.procs.all_sum(module_right).tolist()
        test["module_test_acc"] = [r / seen if c else None for r, c in zip(right[:-1], classifies)] + [top1 / seen]
    return test
