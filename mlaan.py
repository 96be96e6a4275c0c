"""mlaan.py: MLAAN, Multilaminar Leap Augmented Auxiliary Network (Zhang, Zhang, Wang, Zhu, Guan, Su,
Liu, Cai; AAAI 2025, arXiv 2406.16633), alone and plugged into DGL and InfoPro.

The backbone is cut into K modules. MLM (multilaminar local modules): module i is trained by an
independent auxiliary head on its own output (its input detached; weight 0.001) and by cascaded
windows: the window that ends at module i runs the real, shared backbone modules i-c+1..i (c = 2, or
3 with --base dgl/infopro) from the detached output of module i-c, then a leap path, then a head
(weight 0.999). Each window's loss is back-propagated at once, so every interior module gets
gradient from its own head and from the c windows that contain it. The last window (modules K-c..K-1)
trains on the network's own head; one optimizer step per batch. LAM (leap augmented modules): the
leap path is trainable copies of a few deeper backbone blocks (to the last stage's width), whose
first block is summed with an EMA copy of that backbone block, theta_ema <- m * theta_ema +
(1 - m) * theta_backbone, updated after the step's backwards from the weights the step used (as in
the official code). EMA copies take no gradient. Inference is the plain backbone.

    python mlaan.py --dataset synthetic --arch resnet32 --k 16                   # CPU, about 7 minutes
    python mlaan.py --dataset cifar10 --arch resnet32 --k 16                     # MLAAN (plain heads)
    python mlaan.py --dataset stl10 --arch resnet110 --k 55 --base infopro       # InfoPro + MLAAN
    torchrun --nproc_per_node=2 mlaan.py --dataset cifar10 --arch resnet32 --k 16 --base dgl
    torchrun --nproc_per_node=8 mlaan.py --dataset imagenet --data-dir DIR --arch resnet34 --k 16

Bases (official CIFAR files): `plain` (resnetMLAAN.py, the model the official train.py builds):
global pool + Linear heads, CE, windows of 2 modules. `dgl` (resnetDGLbin.py): the official auxDGL
head (3 x conv1x1-BN-ReLU at 128 ch, global pool, 3 x Linear(., 512)-BN1d-ReLU, Linear) on both
sides, CE, windows of 3 (not dgl.py's mlp-sr head). `infopro` (resnetInfoProbin.py): windows of 3;
the independent side is InfoPro's decoder (BCE reconstruction) + 1c2f SupCon head, the cascaded side
decoder + 1c2f CE head, each lambda1 * BCE + lambda2 * task with `--lambdas` (IXX_1 IXY_1 IXX_2 IXY_2,
default the MLAAN README's 5 0.5 0 0) interpolated by ratio = stage / (K - 2), stage (1..3) being the
stage of the window's last block and K the official code's module count, in which the stem is merged
into the first module (see below: code K=15 for our --k 15 and --k 16 on ResNet-32); the official
rule, clamped at 1 here so small K get no negative λ.

K and leap paths. K counts the stem as a module when it stands alone (README, Modules and K). The official code
merges the stem into its first module and keys its tables by that count: code K=15 (ResNet-32, one
block per module) is our `--k 15` (same split) and our `--k 16` (the stem as module 0, the paper's
"K=16"); code K=54 (ResNet-110) is our `--k 54` / `--k 55`; code K=8 (ResNet-32) is our `--k 8`. On
those splits the leap paths are the official tables (configAuxPlus_new.py); with the stem as module
0 there is one window more than in the code, (stem, block 1.0), and it uses the table's entry for
block 1.0, which the code defines but never uses. Code K=32 (ResNet-110) needs the official
32-module split, which the shared splits do not give (our K=32 is an even one): its table is here
and is used for any split that matches. Any other split, and any other backbone, uses the general
rule, close to the tables (stages are runs of layers with the same output shape): a module that
ends before the last stage leaps through the first layer of every later stage, then layers 3, 4,
... of the last stage, up to 4 layers (or one per later stage plus one), ending with the network's
last layer; a module in the last stage leaps through the last two layers (or the last one).

Differences from the official code (Wendy231015/MLAAN):
- Every EMA copy is updated every step, as the paper describes (and the ImageNet code does). The
  CIFAR code updates only the penultimate module's copy, so the others stay frozen at the initial
  weights, and its --momentum defaults to 1.0 (no update at all); --ema-decay defaults to 0.995,
  the README's value. Only the first leap block has an EMA copy (the code keeps copies of the whole
  leap path but uses only the first); the infopro base freezes them too (resnetInfoProbin.py forgets
  to, so SGD trains them as well).
- The independent side reuses the window's detached activations instead of a separate forward
  pass: no loss-free forwards of the first c-1 modules, no discarded last-module x-path. Values and
  gradients are the same; only the BatchNorm running statistics of those modules get fewer updates.
- STL-10 has 10 classes (the code's 'sl10' typo gives it 100). Only the heads used are built (the
  code builds 825 to 2,970 unused ones). Leap copies start from the backbone's initial weights, as
  in the CIFAR code. BCE is computed from the decoder's logits (the same value, autocast-safe).
  Under --bf16 (autocast; the official code has none) SupCon runs in float32; otherwise in the
  features' dtype, as there.
- Splits, schedule and data follow the shared protocol (README, Protocol), the official recipe: 400 epochs.
- ImageNet (the ResNets of common.py): the official ImageNet model (ImageNet/networks/resnet34.py,
  resnet101.py). Windows of 3 modules whatever the base; --base plain uses its heads (auxnet34.py /
  auxnet101.py: a 64- or 128-channel map gets conv1x1 (C -> 2C)-BN-ReLU-conv1x1 (2C -> C)-BN-ReLU
  before global pool + Linear, wider maps only global pool + Linear; conv biases off, an assumption;
  the cascaded head is global pool + Linear), --base dgl the auxDGL heads (a generalisation), and
  --base infopro is refused (the official ImageNet code parses its flags but never uses them). The
  last window's loss is 0.001 * CE(head(module K-1 on its own detached input)) + 0.999 * CE(head(
  window)), as there. Leap paths: the official tables for ResNet-34 code K=16 and ResNet-101 code K=33
  (one block per module, the stem merged into module 0: our --k 16 / --k 33, or 17 / 34 with the stem
  alone), the general rule otherwise; leap and EMA copies are freshly initialised (torchvision's
  kaiming fan-out init), as the official ImageNet code re-initialises them. ResNet-34 follows
  resnet34.py's init, which zeroes the weight of bn2 in every BasicBlock (the backbone, the leap and
  the EMA copies: its init loop has no zero_init_residual guard); ResNet-101 keeps torchvision's
  init, as resnet101.py does (its guard is off), and so do the other networks. That code updates the last
  window's EMA copy twice per step (after its window and again after the final backward); here every
  copy is updated once. Defaults: the official recipe's lr 0.05, 150 epochs (cosine, no warm-up) and
  batch 128, which is global here and per process there (on 8 GPUs pass --batch-size 1024); its
  README's ResNet-101 example uses 64 per GPU.
"""
import functools

import torch.nn as nn
import torch.nn.functional as F

import common

# ================================= METHOD: MLAAN ==================================================
import copy  # the method's own imports: the lines above the METHOD section are shared by all scripts
import os

import torch

BASES = {"plain": 2, "dgl": 3, "infopro": 3}  # base -> modules per cascaded window (official files)
# --pipeline is refused with this reason:
NO_PIPELINE = ("its windows span several modules and its leap paths hold EMA copies of deeper blocks, so "
               "stages would exchange gradients and weights")
W_OWN, W_CASCADE = 0.001, 0.999  # independent / cascaded loss weights (hard-coded in the official code)
FEATURE_DIM = 128                # auxDGL conv width, InfoPro's SupCon embedding and hidden FC width
TEMPERATURE = 0.07               # SupCon temperature (= base temperature)
HEAD_1C2F = {16: (32, 2), 32: (64, 2), 64: (64, 1)}  # InfoPro 1c2f head: channels -> (conv width, stride)

STAGE_BLOCKS = {"resnet32": (5, 5, 5), "resnet110": (18, 18, 18), "resnet34": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
# The official leap tables (CIFAR configAuxPlus_new.py on the config2.py splits, ImageNet configs.py),
# per code K: the last block of every module, and the leap path of every module but the last
# ("stage.block").
OFFICIAL_LEAPS = {
    "resnet32": {
        8: ("1.0 1.2 1.4 2.1 2.3 3.0 3.2 3.4",
            ["2.0 3.0 3.2 3.4"] * 2 + ["2.0 3.0 3.3 3.4"] + ["3.0 3.2 3.3 3.4"] * 2 + ["3.2 3.3 3.4", "3.3 3.4"]),
        15: ("every block",
             ["2.0 3.0 3.2 3.4"] * 2 + ["2.0 3.0 3.3 3.4", "2.0 3.0 3.2 3.4", "2.0 3.0 3.3 3.4"]
             + ["3.0 3.2 3.3 3.4"] * 5 + ["3.1 3.2 3.4", "3.2 3.3 3.4", "3.3 3.4", "3.4"]),
    },
    "resnet110": {
        32: ("1.1 1.2 1.4 1.5 1.7 1.9 1.11 1.13 1.14 1.16 1.17 2.1 2.2 2.4 2.5 2.7 2.9 2.11 2.13 2.14 2.16 2.17 "
             "3.1 3.3 3.4 3.6 3.7 3.9 3.11 3.13 3.15 3.17",
             ["2.0 3.0 3.2 3.17"] * 11 + ["3.0 3.2 3.3 3.17"] * 10 + ["3.0 3.3 3.4 3.17"] + ["3.8 3.17"] * 4
             + ["3.14 3.17"] * 2 + ["3.15 3.17", "3.16 3.17", "3.17"]),
        54: ("every block",
             ["2.0 3.0 3.2 3.17"] * 18 + ["3.0 3.2 3.3 3.17"] * 17 + ["3.0 3.3 3.4 3.17"] + ["3.8 3.17"] * 7
             + ["3.14 3.17"] * 4 + ["3.15 3.17"] * 2 + ["3.16 3.17"] * 3 + ["3.17"]),
    },
    "resnet34": {16: ("every block", ["2.0 2.1 3.0 4.0 4.2"] * 3 + ["2.1 3.0 4.0 4.2"] * 4 + ["3.1 4.0 4.1"] * 6
                      + ["4.1 4.1 4.2", "4.1 4.2"])},
    "resnet101": {33: ("every block", ["2.0 3.0 4.0 4.2"] * 3 + ["3.0 4.0 4.1"] * 4 + ["4.0 4.1"] * 23
                       + ["4.1 4.2"] * 2)},
}


def layer_of(block, stage_blocks):
    """Layer index of block "s.b" (stage s from 1, block b from 0), given the blocks per stage."""
    stage, b = map(int, block.split("."))
    return 1 + sum(stage_blocks[:stage - 1]) + b


def stages(shapes):
    """The stage (from 0) of every layer: a stage is a run of layers with the same output shape
    (the CIFAR stem joins stage 1, which has its width and resolution)."""
    stage = [0]
    for a, b in zip(shapes, shapes[1:]):
        stage.append(stage[-1] + (a != b))
    return stage


def general_leap(end, stage):
    """The leap path after a module that ends at layer `end` (see the docstring)."""
    last = len(stage) - 1
    later = list(range(end + 1, last + 1))
    firsts = [j for j in later if stage[j] != stage[j - 1]]  # the first layer of every later stage
    if not firsts:  # a module in the last stage
        return later[-2:]
    fill = [j for j in later if stage[j] == stage[last]][2:-1]  # the last stage from its third layer
    path = firsts + fill[:max(4, len(firsts) + 1) - len(firsts) - 1]
    return path if path[-1] == last else path + [last]


def leap_paths(arch, modules, shapes):
    """The layers of every module's leap path and where they come from. Empty for the last module
    and for a stem-alone module 0: no window ends there."""
    ends = [m[-1] for m in modules]
    n = STAGE_BLOCKS.get(arch)
    for code_k, (blocks, table) in OFFICIAL_LEAPS.get(arch, {}).items():
        split = list(range(1, sum(n) + 1)) if blocks == "every block" else [layer_of(b, n) for b in blocks.split()]
        if ends in (split, [0] + split):  # the code's split, or the same with the stem as module 0
            by_end = {e: [layer_of(b, n) for b in path.split()] for e, path in zip(split, table)}
            return [by_end.get(e, []) for e in ends], f"the official table (code K={code_k})"
    stage = stages(shapes)
    return [general_leap(e, stage) for e in ends[:-1]] + [[]], "the general rule"


class LinearHead(nn.Module):
    """MLAAN's own heads (auxMLAAN.py): global average pool, Linear; cross-entropy."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h, x, y):
        logits = self.fc(h.mean((2, 3)))
        return F.cross_entropy(logits, y), logits


class ImageNetHead(nn.Module):
    """The official ImageNet independent heads (auxnet34.py / auxnet101.py): on a 64- or 128-channel
    map conv1x1 (C -> 2C)-BN-ReLU-conv1x1 (2C -> C)-BN-ReLU first, then global pool, Linear; CE."""

    def __init__(self, channels, num_classes):
        super().__init__()
        pair = ((channels, 2 * channels), (2 * channels, channels)) if channels in (64, 128) else ()
        self.convs = nn.Sequential(*[nn.Sequential(nn.Conv2d(a, b, 1, bias=False), nn.BatchNorm2d(b),
                                                   nn.ReLU(inplace=True)) for a, b in pair])
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h, x, y):
        logits = self.fc(self.convs(h).mean((2, 3)))
        return F.cross_entropy(logits, y), logits


class DGLHead(nn.Module):
    """The official DGL+MLAAN head (auxDGL.py): 3 x [conv1x1 (no bias)-BN-ReLU] at 128 channels,
    global average pool, 3 x [Linear(., 512)-BN1d-ReLU], Linear(512, classes); cross-entropy."""

    def __init__(self, channels, num_classes, width=FEATURE_DIM):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width),
                                                   nn.ReLU(inplace=True)) for c in (channels, width, width)])
        hidden = 4 * width
        self.mlp = nn.Sequential(*[nn.Sequential(nn.Linear(f, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
                                   for f in (width, hidden, hidden)], nn.Linear(hidden, num_classes))

    def forward(self, h, x, y):
        logits = self.mlp(self.convs(h).mean((2, 3)))
        return F.cross_entropy(logits, y), logits


def supcon_loss(features, y, temperature=TEMPERATURE):
    """Supervised contrastive loss of one view (Khosla et al. 2020, as in InfoPro's code): each sample
    is an anchor, its positives are the other samples of its class, the softmax runs over all other
    samples; an anchor without positives adds 0 but counts in the mean."""
    if len(y) < 2:
        return features.sum() * 0.0
    with torch.autocast(features.device.type, enabled=False):  # at least fp32 similarities (--bf16)
        z = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=1)
        sim = z @ z.T / temperature
        sim = sim - sim.max(1, keepdim=True).values.detach()
        others = ~torch.eye(len(y), dtype=torch.bool, device=y.device)
        positives = (y[:, None] == y[None, :]) & others
        log_prob = sim - torch.logsumexp(sim.masked_fill(~others, float("-inf")), 1, keepdim=True)
        return -((log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)).mean()


class InfoProLoss(nn.Module):
    """InfoPro's aux nets on a C-channel map: the decoder (bilinear upsampling to the image size,
    conv3x3-BN-ReLU-conv3x3, sigmoid in the loss) and the 1c2f head (conv3x3-BN-ReLU, global pool,
    Linear-ReLU-Linear); loss ixx * BCE(reconstruction, de-normalised x) + ixy * (SupCon or CE)."""

    def __init__(self, channels, data, contrast, ixx, ixy):
        super().__init__()
        self.size, self.contrast, self.ixx, self.ixy = data.image_size, contrast, ixx, ixy
        self.decoder = nn.Sequential(nn.Conv2d(channels, 12, 3, 1, 1), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
                                     nn.Conv2d(12, 3, 3, 1, 1))
        width, stride = HEAD_1C2F[channels]
        self.conv = nn.Sequential(nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.fc = nn.Sequential(nn.Linear(width, FEATURE_DIM), nn.ReLU(inplace=True),
                                nn.Linear(FEATURE_DIM, FEATURE_DIM if contrast else data.num_classes))
        self.register_buffer("mean", data.mean.detach().clone(), persistent=False)  # to de-normalise x
        self.register_buffer("std", data.std.detach().clone(), persistent=False)

    def forward(self, h, x, y):
        up = F.interpolate(h, size=(self.size, self.size), mode="bilinear", align_corners=True)
        reconstruction = F.binary_cross_entropy_with_logits(self.decoder(up), x * self.std + self.mean)
        out = self.fc(self.conv(h).mean((2, 3)))
        if self.contrast:
            return self.ixx * reconstruction + self.ixy * supcon_loss(out, y), None
        return self.ixx * reconstruction + self.ixy * F.cross_entropy(out, y), out


class Window(nn.Module):
    """The auxiliary networks of the window that ends at module i: the independent loss on module i's
    own output, the leap path (trainable copies of backbone blocks, the first summed with a frozen
    EMA copy of backbone layer `ema_source`) and the cascaded loss after it."""

    def __init__(self, own, leap, ema, cascade, ema_source):
        super().__init__()
        self.own, self.leap, self.ema, self.cascade = own, nn.ModuleList(leap), ema, cascade
        self.ema_source = ema_source
        self.ema.requires_grad_(False)

    def forward(self, own, z, x, y):
        """0.001 * independent loss + 0.999 * cascaded loss (one backward per window), and the
        cascaded head's logits (every head returns its loss and logits, None for SupCon)."""
        z = self.leap[0](z) + self.ema(z)
        for block in self.leap[1:]:
            z = block(z)
        own_loss, _ = self.own(own, x, y)
        cascade_loss, logits = self.cascade(z, x, y)
        return W_OWN * own_loss + W_CASCADE * cascade_loss, logits


def base_name(value):
    if value not in BASES:
        common.die(f"unknown --base {value!r}: choose plain (MLAAN), dgl (DGL + MLAAN) or infopro (InfoPro + MLAAN)")
    return value


def ema_decay(value):
    if not 0.0 <= float(value) <= 1.0:
        common.die(f"--ema-decay must be from 0 to 1 (got {value}); the paper's value is 0.995")
    return float(value)


def method_args(parser):
    parser.add_argument("--base", default="plain", type=base_name,
                        help="plain (linear heads, windows of 2) | dgl | infopro (their heads and losses, "
                        "windows of 3)")
    parser.add_argument("--ema-decay", type=ema_decay, default=0.995, metavar="M",
                        help="EMA decay m of the leap paths' EMA copies, all updated every step (default 0.995)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[5.0, 0.5, 0.0, 0.0], metavar="W",
                        help="--base infopro: IXX_1 IXY_1 IXX_2 IXY_2 (default: the MLAAN README's 5 0.5 0 0)")


def fresh_copy(layer):
    """A copy of a backbone layer with torchvision's ResNet init drawn anew (the ImageNet code)."""
    layer = copy.deepcopy(layer)
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
    return layer


def build_aux(args, net, modules, data):
    """One Window per module i = c-1..K-2 (c = modules per window): its heads, leap path and EMA copy."""
    imagenet = args.arch in common.IMAGENET_ARCHS
    c, k = 3 if imagenet else BASES[args.base], len(modules)
    if imagenet and args.base == "infopro":
        common.die(f"--base infopro is for the CIFAR ResNets (InfoPro's CIFAR heads); on {args.arch} use "
                   f"--base plain (the official ImageNet model) or dgl")
    if k < c + 1:
        common.die(f"--base {args.base} cascades {c} modules per window{' on ImageNet' if imagenet else ''}, so --k "
                   f"must be at least {c + 1} (got {k}); MLAAN's default is 16")
    if len(args.lambdas) != 4 or min(args.lambdas) < 0:
        common.die(f"--lambdas takes 4 weights >= 0 (IXX_1 IXY_1 IXX_2 IXY_2), got {args.lambdas}")
    shapes = common.layer_shapes(net, data.image_size)
    if args.base == "infopro" and not {s[0] for s in shapes} <= set(HEAD_1C2F):
        common.die(f"--base infopro uses InfoPro's CIFAR heads (16, 32 or 64 channels); for {args.arch} "
                   f"use --base plain or dgl")
    paths, source = leap_paths(args.arch, modules, shapes)
    stage = stages(shapes)
    code_k = k - (modules[0] == [0])  # the official module count: its first module holds the stem
    windows = []
    for i in range(c - 1, k - 1):
        path, channels = paths[i], shapes[modules[i][-1]][0]
        leap_channels = shapes[path[-1]][0]
        if args.base == "plain":
            own = (ImageNetHead if imagenet else LinearHead)(channels, data.num_classes)
            cascade = LinearHead(leap_channels, data.num_classes)
        elif args.base == "dgl":
            own, cascade = DGLHead(channels, data.num_classes), DGLHead(leap_channels, data.num_classes)
        else:  # the official ratio: the stage (1..3) of module i's last block over (code K) - 2
            ixx_1, ixy_1, ixx_2, ixy_2 = args.lambdas
            r = min(1.0, (stage[modules[i][-1]] + 1) / (code_k - 2))
            ixx, ixy = ixx_1 * (1 - r) + ixx_2 * r, ixy_1 * (1 - r) + ixy_2 * r
            own = InfoProLoss(channels, data, True, ixx, ixy)
            cascade = InfoProLoss(leap_channels, data, False, ixx, ixy)
        # Trainable leap copies and the EMA copy: CIFAR copies the backbone's initial weights, ImageNet
        # draws them anew.
        clone = fresh_copy if imagenet else copy.deepcopy
        leap = [clone(net.layers[j]) for j in path]
        windows.append(Window(common.init_weights(own), leap, clone(net.layers[path[0]]),
                              common.init_weights(cascade), path[0]))
    aux = nn.ModuleList(windows)
    if args.arch == "resnet34":  # the official resnet34.py (not resnet101.py) zeroes bn2's weight in every block
        from torchvision.models.resnet import BasicBlock
        for m in (*net.modules(), *aux.modules()):  # the backbone, the leap and the EMA copies
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
    if int(os.environ.get("RANK", 0)) == 0 and not args.quiet:
        print(f"mlaan: base {args.base}, {len(windows)} windows of {c} modules, EMA decay {args.ema_decay}, "
              f"leap paths from {source}", flush=True)
    return aux


@torch.no_grad()
def update_ema(net, aux, decay):
    """theta_ema <- m * theta_ema + (1 - m) * theta_backbone for every window's EMA copy."""
    ema = [p for window in aux for p in window.ema.parameters()]
    backbone = [p for window in aux for p in net.layers[window.ema_source].parameters()]
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, backbone, alpha=1.0 - decay)


def local_step(net, modules, aux, args, i, u, x, y):
    """Step i trains the window that ends at module i (there is none before module c-1, c modules
    per window), from u, the detached input of the window's first module: modules i-c+1..i, leap
    path and cascaded loss, plus module i alone on the detached output of module i-1 for the
    independent loss. Returns the detached output of the window's first module (the next window's
    input), the window's loss and its cascaded head's logits; common.run_modules back-propagates
    the loss at once. The last window
    trains on the network's head (on ImageNet mixed 0.999 : 0.001 with module K-1 alone on its
    detached input, as the official ImageNet code); then the EMA copies follow the backbone (its
    weights before the update, which the backward does not change)."""
    c = len(modules) - len(aux)  # modules per window: the windows end at modules c-1..K-2
    if i < c - 1:
        return u, None, None
    h = net.run(modules[i - c + 1], u)
    first = h.detach()
    for j in range(i - c + 2, i):
        h = net.run(modules[j], h)
    if i < len(modules) - 1:
        own = net.run(modules[i], h.detach())
        return first, *aux[i - c + 1](own, net.run(modules[i], h), x, y)
    logits = net.head(net.run(modules[i], h))
    loss = F.cross_entropy(logits, y)
    if args.arch in common.IMAGENET_ARCHS:
        loss = W_CASCADE * loss + W_OWN * F.cross_entropy(net.head(net.run(modules[i], h.detach())), y)
    update_ema(net, aux, args.ema_decay)
    return first, loss, logits


# ================================= END METHOD =====================================================


def main(argv=None):
    args = common.parse_args(argv, __doc__, "mlaan", k=16, epochs=400, add_method_args=method_args,
                             imagenet=dict(epochs=150, batch_size=128, lr=0.05),
                             no_pipeline=NO_PIPELINE)
    run = common.Run(args)
    data = common.load_data(args, run.device)
    net = common.build_backbone(args, data, run.device)
    modules = common.make_modules(args, net, data)
    aux = build_aux(args, net, modules, data).to(run.device)
    model = nn.ModuleDict({"net": net, "aux": aux})
    opt = common.make_optimizer(args, model)
    step = functools.partial(local_step, net, modules, aux, args)
    for epoch in run.start(model, opt, data, modules, step):
        lr, train = common.train_epoch(run, args, data, model, opt, epoch, step)
        test = common.evaluate(run, args, data, model, net)
        run.end_epoch(epoch, lr, train, test, model, opt)
        if run.done():
            break
    return run.finish(model, modules)


if __name__ == "__main__":
    main()
