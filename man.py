"""man.py: MAN, Momentum Auxiliary Network (Su, Cai, Zhu, He, Xu, Guan, Si; "Momentum Auxiliary Network
for Supervised Local Learning", ECCV 2024, arXiv 2407.05623), on InfoPro, as the released code runs it.

The backbone is cut into K gradient-isolated modules trained with InfoPro's local loss, but every
module but the last sees its output h through two copies of the first block of the next module
before its InfoPro nets: y = LB(h) + EMA(h). LB is a trainable copy; EMA is a frozen copy whose
parameters follow the next module's real block, theta_ema <- m * theta_ema + (1 - m) * theta_block
(m = --ema-decay, 0.995), updated right after the module's backward from the weights the step used
(before the optimizer step), every copy every step. So a module is trained through a stand-in of
the layers after it that keeps pace with them, while no gradient crosses a module boundary (the
real block is only read, never differentiated; the EMA copy takes no gradient, but gradient flows
through it into h). On y: lambda1 * BCE(decoder(y), de-normalised x) + lambda2 * CE(head(y), y_true)
with InfoPro's decoder (bilinear upsampling to the image, conv3x3-BN-ReLU-conv3x3) and the `2c2f`
head (two conv3x3-BN-ReLU, global pool, Linear-ReLU-Linear), both at the copied block's output
width and resolution. `--loss contrast` uses SupCon (128-d, temperature 0.07) instead of CE. The
last module trains on the network's own head; one optimizer step per batch. Inference is the plain
backbone.

    python man.py --dataset synthetic --arch resnet32 --k 8           # CPU, about 5 minutes
    python man.py --dataset cifar10 --arch resnet32                   # the paper's ResNet-32 "K=16" (--k 15)
    python man.py --dataset cifar10 --arch resnet110 --k 54           # the paper's ResNet-110 "K=55"
    torchrun --nproc_per_node=8 man.py --dataset imagenet --data-dir DIR --arch resnet152 --k 2

K. --k counts the modules, the last included, and the stem is a layer (README, Modules and K). The
official code merges the stem into its first module, so its one-block-per-module tables have one
module fewer than their key: code "K=16" on ResNet-32 is 15 modules, our `--k 15` (the same split:
stem + block 1.0, then one block each), and code "K=55" on ResNet-110 is our `--k 54`; those are the
paper's "K=16" / "K=55" runs, and `--k 15` is the default. Its other keys count modules as we do:
code K=2, 3, 4, 8 (both nets) and 16 (ResNet-110) are our `--k` with the default (official) split.
Our `--k 16` / `--k 55` (the stem alone as module 0) is a generalisation: the stem's aux net copies
block 1.0 and has 16-channel heads (as the authors' later MAN++ code does).

Loss weights (the official rule): with (ixx_1, ixy_1, ixx_2, ixy_2) = --lambdas, default the
README's (5, 0.5, 0, 0), the module whose next block is in stage s (1, 2, 3; ImageNet ResNets
1..4) gets lambda = w_1 (1 - r) + w_2 r with r = s / (K_code - 2) (0 when K_code <= 2), K_code
being the official key (our K, plus 1 on the one-block-per-module split with the stem merged).
The weights used are printed at start. On ImageNet they are 5 and 0.75 in every module (hard-coded
in the official ImageNet code): --lambdas defaults to 5 0.75 5 0.75 there.

Differences from the official code (JunhaoSu0/MAN):
- --ema-decay defaults to the README's 0.995; the official --momentum defaults to 1.0 (the EMA copy
  stays a frozen random block). --lambdas defaults to the README's values; the official ones
  default to 0 (the local modules would train on nothing).
- The ratio r is clamped at 1. Unclamped, it gives negative weights when K_code is 3 or 4 (ResNet-32
  K=4: lambda1 = -2.5 for the module before stage 3); clamped, those modules get weight 0 (MAN is
  meant for K >= 8, where r < 1).
- STL-10 has 10 classes (the official `'sl10'` typo gives it 100). The ImageNet aux head has as
  many outputs as there are classes (officially always 1000).
- The decoder's sigmoid + BCE is computed as BCE with logits: the same loss, numerically stable and
  allowed under --bf16 autocast. SupCon runs in float32 under --bf16, and a one-sample batch gives
  SupCon 0 (officially NaN).
- Only the heads used are built. The official model builds a decoder and a classifier for every
  block position (ResNet-110: 54 pairs, most unused) and an unused `fc`, so its parameter count
  differs; params.aux in summary.json counts the LB and EMA copies and the used heads.
- The aux nets are the released configuration: `2c2f` (the official --aux_net_config default, which
  the README's command keeps; InfoPro itself uses 1c2f), widen 1, feature dim 128; --loss ce is the
  default (the README's cross_entropy; the official argparse default is contrast).
- LB and EMA start from their own random draws, not from the block they copy, as in the official
  code (its init loop runs after the deep copies). The EMA copy averages parameters only; its
  BatchNorm running statistics are its own.
- The EMA copy of module i is updated when module i+1's step starts, which is right after module
  i's backward (no parameter moves in between): the official order, so the same values.
- ResNet-110 code K=32 uses MAN's own 32-module split, which the shared splits do not give (our
  K=32 is an even split); any --k runs, with the rule above.
- Data parallelism (torchrun): each process computes SupCon (--loss contrast) and BatchNorm on its
  shard of the batch, as in infopro.py; the official code runs on one GPU.
- Splits, schedule and data follow the shared protocol (README, Protocol), the official recipe:
  400 epochs, cosine with a 10-epoch warm-up, Nesterov SGD, wd 1e-4.
- ImageNet (the official ImageNet model, Exp on ImageNet/networks/resnetInfoPro_MAN.py): LB and EMA
  copies of the next block, freshly initialised (kaiming fan-out); its decoder and head chosen by
  the copied block's output width: from 1024 channels up the 1024 form (decoder conv1x1 C-192,
  then up to I/8 conv1x1 192-64, I/4 conv3x3 64-32, I/2 conv3x3 32-12, I conv3x3 12-3; head conv1x1
  C-256, conv3x3 s2 256-256, conv3x3 s2 256-512, conv1x1 512-2048, global pool, Linear), below it
  the 512 form (decoder conv1x1 C-128, I/4 conv3x3 128-32, I/2 32-12, I 12-3; head conv1x1 C-128,
  conv3x3 s2 128-256, then as above); conv BN-ReLU throughout, decoder convs with bias, head convs
  without. The code has only the 512 and 1024 widths, upsamples to fixed sizes (28 / 56 / 112 / 224,
  the same at 224 px) and indexes the heads by module i's width, which crashes when the next block
  opens a stage; here any cut works. The code's recipe: batch 128, lr 0.05, 90 epochs, per-epoch
  cosine without warm-up (the defaults here; the batch is global). Its HEAD has only K=2 splits:
  ResNet-101 and -152 are the shared K=2 splits (after layer2[0] / layer2[5]); its ResNeXt-101 cut
  (after layer2[0]) differs from the shared one (after layer2[2], InfoPro*'s), and the paper's K=4
  splits (an earlier commit) are not shared splits. ResNet-18/34 and VGG, which the code cannot
  run, are a generalisation.
"""
import functools

import torch.nn as nn
import torch.nn.functional as F

import common

# ================================= METHOD: MAN ====================================================
import copy  # the method's own imports: the lines above the METHOD section are shared by all scripts
import math
import os

import torch

LOSSES = ("ce", "contrast")
# --pipeline is refused with this reason:
NO_PIPELINE = ("module i's auxiliary net holds an EMA copy of module i+1's first block, so every step a stage "
               "would need the next stage's weights")
TEMPERATURE = 0.07  # SupCon temperature (= base temperature, so the loss is not rescaled)
FEATURE_DIM = 128   # contrastive embedding, and the hidden width of the 2c2f head
HEAD_WIDTH = {16: (32, 2), 32: (64, 2), 64: (64, 1)}  # 2c2f: input channels -> (conv channels, first stride)
README_LAMBDAS = (5.0, 0.5, 0.0, 0.0)    # the official README's --ixx_1 --ixy_1 --ixx_2 --ixy_2
IMAGENET_LAMBDAS = (5.0, 0.75, 5.0, 0.75)  # hard-coded in the official ImageNet model
EMA_DECAY = 0.995


class Decoder(nn.Module):
    """InfoPro's CIFAR decoder (estimates I(y, x)): bilinear upsampling to the input size
    (align_corners=True), conv3x3(C->12, bias)-BN-ReLU-conv3x3(12->3, bias). It returns logits:
    the official final sigmoid is part of the loss (BCE with logits)."""

    def __init__(self, channels, image_size, hidden=12):
        super().__init__()
        self.image_size = image_size
        self.convs = nn.Sequential(nn.Conv2d(channels, hidden, 3, 1, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                   nn.Conv2d(hidden, 3, 3, 1, 1))

    def forward(self, h):
        size = (self.image_size, self.image_size)
        return self.convs(F.interpolate(h, size=size, mode="bilinear", align_corners=True))


class Head2c2f(nn.Sequential):
    """The `2c2f` auxiliary head (estimates I(y, label)): conv3x3(C->C', stride s, no bias)-BN-ReLU,
    conv3x3(C'->C', no bias)-BN-ReLU, global average pool, Linear(C', 128)-ReLU-Linear(128, out).
    C', s = 32, 2 / 64, 2 / 64, 1 for C = 16 / 32 / 64."""

    def __init__(self, channels, out):
        if channels not in HEAD_WIDTH:
            common.die(f"MAN's 2c2f head takes 16, 32 or 64 channels, not {channels}; use a CIFAR ResNet")
        width, stride = HEAD_WIDTH[channels]
        super().__init__(*conv_bn_relu(channels, width, 3, stride), *conv_bn_relu(width, width, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, FEATURE_DIM), nn.ReLU(inplace=True),
                         nn.Linear(FEATURE_DIM, out))


def conv_bn_relu(cin, cout, kernel, stride=1, bias=False):
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ImageNetDecoder(nn.Module):
    """The official ImageNet decoders (logits; bilinear, align_corners=True; convs with bias): from
    1024 channels up conv1x1(C->192)-BN-ReLU, then at I/8 conv1x1(192->64), at I/4 conv3x3(64->32),
    at I/2 conv3x3(32->12) (each BN-ReLU), at I conv3x3(12->3); below 1024 conv1x1(C->128)-BN-ReLU,
    then at I/4 conv3x3(128->32), at I/2 conv3x3(32->12), at I conv3x3(12->3)."""

    def __init__(self, channels, image_size):
        super().__init__()
        if channels >= 1024:
            widths, kernels, self.sizes = (192, 64, 32, 12), (1, 1, 3, 3), [image_size // d for d in (8, 4, 2, 1)]
        else:
            widths, kernels, self.sizes = (128, 32, 12), (1, 3, 3), [image_size // d for d in (4, 2, 1)]
        ins = (channels, *widths)
        self.stages = nn.ModuleList([nn.Sequential(*conv_bn_relu(a, b, k, bias=True))
                                     for a, b, k in zip(ins, widths, kernels)] + [nn.Conv2d(12, 3, 3, 1, 1)])

    def forward(self, h):
        h = self.stages[0](h)
        for size, stage in zip(self.sizes, self.stages[1:]):
            h = stage(F.interpolate(h, size=(size, size), mode="bilinear", align_corners=True))
        return h


class ImageNetHead(nn.Sequential):
    """The official ImageNet auxiliary classifier (no conv bias): conv1x1(C->W), conv3x3 s2 (W->256),
    conv3x3 s2 (256->512), conv1x1(512->2048), each BN-ReLU, global pool, Linear(2048, out); W = 256
    from 1024 channels up, else 128."""

    def __init__(self, channels, out):
        width = 256 if channels >= 1024 else 128
        super().__init__(*conv_bn_relu(channels, width, 1), *conv_bn_relu(width, 256, 3, 2),
                         *conv_bn_relu(256, 512, 3, 2), *conv_bn_relu(512, 2048, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(2048, out))


def supcon_loss(features, y, temperature=TEMPERATURE):
    """Supervised contrastive loss (Khosla et al. 2020) of one view, as in the official code: every
    sample is an anchor, its positives are the other samples of its class, the denominator runs
    over all other samples. An anchor without positives contributes 0 but counts in the mean."""
    if len(y) < 2:  # no pairs at all (the official loss is NaN here)
        return features.sum() * 0.0
    with torch.autocast(features.device.type, enabled=False):  # fp32 similarities under --bf16
        z = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=1)
        sim = z @ z.T / temperature
        logits = sim - sim.max(1, keepdim=True).values.detach()  # for numerical stability only
        others = ~torch.eye(len(y), dtype=torch.bool, device=y.device)
        positives = (y[:, None] == y[None, :]) & others
        log_prob = logits - (logits.exp() * others).sum(1, keepdim=True).log()
        return -((log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)).mean()


class MomentumAux(nn.Module):
    """The aux nets of one module: LB and EMA, two copies of backbone layer `source` (the next
    module's first block), each freshly initialised, EMA frozen; then the InfoPro loss on their
    summed outputs, ixx * BCE(decoder(y), de-normalised x) + ixy * (CE or SupCon) of the head."""

    def __init__(self, block, source, decoder, head, loss, ixx, ixy, data):
        super().__init__()
        self.lb = common.init_weights(copy.deepcopy(block))
        self.ema = common.init_weights(copy.deepcopy(block)).requires_grad_(False)
        self.decoder, self.head = common.init_weights(decoder), common.init_weights(head)
        self.source, self.loss, self.ixx, self.ixy = source, loss, float(ixx), float(ixy)
        # The data statistics, to rebuild the [0, 1] image from the normalised input (not saved).
        self.register_buffer("mean", data.mean.detach().clone(), persistent=False)
        self.register_buffer("std", data.std.detach().clone(), persistent=False)

    def forward(self, h, x, y):
        z = self.lb(h) + self.ema(h)
        reconstruction = F.binary_cross_entropy_with_logits(self.decoder(z), x * self.std + self.mean)
        out = self.head(z)
        if self.loss == "contrast":
            return self.ixx * reconstruction + self.ixy * supcon_loss(out, y), None
        return self.ixx * reconstruction + self.ixy * F.cross_entropy(out, y), out  # a zero weight still runs its net


@torch.no_grad()
def update_ema(ema, block, decay):
    """theta_ema <- m * theta_ema + (1 - m) * theta_block over the parameters, in the official order."""
    for e, b in zip(ema.parameters(), block.parameters()):
        e.copy_(e * decay + b * (1 - decay))


def loss_mode(value):
    if value not in LOSSES:
        common.die(f"unknown --loss {value!r}: choose ce (the README's) or contrast (SupCon)")
    return value


def ema_decay(value):
    if not 0.0 <= float(value) <= 1.0:
        common.die(f"--ema-decay must be from 0 to 1 (got {value}); the paper's value is {EMA_DECAY}")
    return float(value)


def method_args(parser):
    parser.add_argument("--loss", default="ce", type=loss_mode,
                        help="estimator of I(y, label): ce (the README's) | contrast (SupCon, 128-d, tau 0.07)")
    parser.add_argument("--ema-decay", type=ema_decay, default=EMA_DECAY, metavar="M",
                        help=f"decay m of the EMA copies of the next blocks, all updated every step "
                        f"(default {EMA_DECAY})")
    parser.add_argument("--lambdas", type=float, nargs="+", default=None, metavar="W",
                        help="IXX_1 IXY_1 IXX_2 IXY_2: the loss weights, interpolated by the stage of the next "
                        "block; default: the README's 5 0.5 0 0 (imagenet: 5 0.75 5 0.75, the official constants)")


def code_module_count(modules):
    """K as the official code keys its tables: one more on the one-block-per-module split with the
    stem merged into module 0 (code "K=16" on ResNet-32 is 15 modules)."""
    merged = len(modules) > 1 and modules[0] == [0, 1] and all(len(m) == 1 for m in modules[1:])
    return len(modules) + merged


def lambda_schedule(lambdas, stages, code_k):
    """(lambda1, lambda2) of every local module from the stage (from 1) of its next block: the
    official ratio stage / (K_code - 2) (0 when K_code <= 2), clamped at 1."""
    ixx_1, ixy_1, ixx_2, ixy_2 = lambdas
    ratios = [min(1.0, s / (code_k - 2)) if code_k > 2 else 0.0 for s in stages]
    return [(ixx_1 * (1 - r) + ixx_2 * r, ixy_1 * (1 - r) + ixy_2 * r) for r in ratios]


def build_aux(args, net, modules, data):
    """One MomentumAux per module but the last, on copies of the next module's first layer."""
    imagenet = args.arch in common.IMAGENET_ARCHS
    if args.lambdas is None:
        lambdas = IMAGENET_LAMBDAS if imagenet else README_LAMBDAS
    elif len(args.lambdas) == 4 and min(args.lambdas) >= 0:
        lambdas = tuple(args.lambdas)
    else:
        common.die(f"--lambdas takes 4 weights >= 0 (IXX_1 IXY_1 IXX_2 IXY_2), got {args.lambdas}")
    args.lambdas = list(lambdas)  # the values used, for args.json and --resume
    shapes = common.layer_shapes(net, data.image_size)
    sources = [m[-1] + 1 for m in modules[:-1]]  # the first layer of the next module
    stages = [1 + round(math.log2(shapes[1][1] / shapes[j][1])) for j in sources]  # by resolution
    schedule = lambda_schedule(lambdas, stages, code_module_count(modules))
    if schedule and int(os.environ.get("RANK", 0)) == 0 and not args.quiet:
        print(f"man: --loss {args.loss}, --ema-decay {args.ema_decay:g}, (ixx_1, ixy_1, ixx_2, ixy_2) = "
              f"({', '.join(f'{w:g}' for w in lambdas)}), K_code {code_module_count(modules)}; (lambda1, lambda2) "
              f"per local module: {' '.join(f'({a:.4g}, {b:.4g})' for a, b in schedule)}", flush=True)
    out = FEATURE_DIM if args.loss == "contrast" else data.num_classes
    aux = []
    for j, (ixx, ixy) in zip(sources, schedule):
        channels = shapes[j][0]  # the heads see the copied block's output
        decoder = (ImageNetDecoder if imagenet else Decoder)(channels, data.image_size)
        head = (ImageNetHead if imagenet else Head2c2f)(channels, out)
        aux.append(MomentumAux(net.layers[j], j, decoder, head, args.loss, ixx, ixy, data))
    return nn.ModuleList(aux)


def local_step(net, modules, aux, args, i, h, x, y):
    """Module i on its input h: its output, its loss (lambda1 BCE + lambda2 task loss on LB(h) +
    EMA(h); the last module: the network head's cross-entropy) and its head's logits (None for
    SupCon). common.run_modules back-propagates the loss at once and detaches the output before
    module i+1. A training step starts by moving module i-1's EMA copy towards this module's first
    block: module i-1's backward is done and no weight has moved yet (the official order)."""
    if i > 0 and net.training:
        update_ema(aux[i - 1].ema, net.layers[aux[i - 1].source], args.ema_decay)
    h = net.run(modules[i], h)
    if i == len(aux):
        logits = net.head(h)
        return h, F.cross_entropy(logits, y), logits
    return h, *aux[i](h, x, y)


# ================================= END METHOD =====================================================


def main(argv=None):
    args = common.parse_args(argv, __doc__, "man", k=15, epochs=400, add_method_args=method_args,
                             imagenet=dict(epochs=90, batch_size=128, lr=0.05),
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
