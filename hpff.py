"""hpff.py: HPFF, Hierarchical Locally Supervised Learning with Patch Feature Fusion (Su, He, Zhu, Xu,
Guan, Si; ECCV 2024, arXiv 2407.05638), on InfoPro, as the official code releases it.

The backbone is cut into K modules. HiLo (two levels of local supervision): every module i = 1..K-2
has an independent head on its own output, computed from its detached input (CE, weight 0.001), and
ends a cascaded window (modules i-1, i): the real, shared modules i-1 and i run from the detached
output of module i-2, and the window's output feeds InfoPro's two aux nets, a reconstruction
decoder and a classifier, with weight 0.999 * (lambda1 * BCE + lambda2 * CE). Each window's loss is
back-propagated at once, so its gradient crosses one module boundary (into module i-1) and stops
at the detached input of module i-1: every interior module learns from its own head and from the
two windows that contain it; module 0 only from window 1. The last window (modules K-2, K-1) trains
on the network's own head, mixed 0.999 * CE(window) + 0.001 * CE(module K-1 alone on its detached
input). PFF (patch feature fusion), as the code does it: the decoder works on the four quadrants of
the feature map, each upsampled (bilinear) to half the image size and decoded by its own small
decoder (conv3x3-BN-ReLU-conv3x3) into the matching quadrant of the image; the four BCEs are summed.
Both classifiers are InfoPro's `2c2f` head (two conv3x3-BN-ReLU, global pool, Linear-ReLU-Linear).
One optimizer step per batch. Inference is the plain backbone.

    python hpff.py --dataset synthetic --arch resnet32 --k 4                  # CPU, a few minutes
    python hpff.py --dataset cifar10 --arch resnet32 --k 15                   # the paper's "K=16"
    python hpff.py --dataset cifar10 --arch resnet110 --k 54                  # the paper's "K=55"
    python hpff.py --dataset imagenet --data-dir DIR --arch resnet152 --k 4        # the official ImageNet run
    torchrun --nproc_per_node=2 hpff.py --dataset cifar10 --arch resnet32 --k 15

K. K counts the stem as a module when it stands alone (README, Modules and K). The official code merges
the stem into its first module and its "K" is one more than its module count for the published
runs: its K=16 on ResNet-32 is 15 modules, one block each with the stem in the first (our `--k 15`,
the default), and its K=55 on ResNet-110 is 54 modules (our `--k 54`). Those two commands reproduce
the published runs. Its other keys (K = 2, 3, 4, 8 on both nets, 16 on ResNet-110) count modules
correctly and are our `--split official` at the same K. `--k 16` on ResNet-32 (the stem alone) adds
one window, (stem, block 1.0), and an independent head on block 1.0.

Loss weights. Window i (i = 1..K-2, the index of its last module) uses lambda1 = IXX_1 (1 - r) + IXX_2 r
and lambda2 = IXY_1 (1 - r) + IXY_2 r with r = i / (K - 1) and `--lambdas IXX_1 IXY_1 IXX_2 IXY_2`
defaulting to the README's 5 0.5 0 0. That is the official i / (K_code - 2) on the published runs
(K_code = K + 1 there): lambda1 falls from 4.64 to 0.36 over the 13 windows of ResNet-32, from 4.91
to 0.09 over the 52 of ResNet-110.

Differences from the official code (Zeudfish/HPFF):
- The official train.py does not run as shipped: it imports `networks.resnetInfoPro_HPFF` but the
  folder is `network/`. (Its STL-10 is 10-way: HPFF's train.py tests 'stl10', without the 'sl10'
  typo of the InfoPro code it derives from.)
- The weight ratio is i / (K - 1) (above). The code's i / (K_code - 2) is the same on the published
  runs, but on its keys whose K is the module count (ResNet-32 K=3/4/8, ResNet-110 K=3/4/8/16) it
  gives the last window r = 1, so with the published 5 0.5 0 0 that window's loss is multiplied by 0.
- Module 0's separate, loss-free forward is left out (the code runs module 0 once for nothing
  before window 1 runs it again); the values and gradients are the same, only the BatchNorm running
  statistics of module 0's blocks get one update per step instead of two (every other module runs
  three times per step, the last one twice, as there).
- Only the heads used are built: the code also builds a decoder for every module that it never
  uses, and heads for module 0 and the last module (507,284 unused parameters on ResNet-32 K=16).
- The decoders' sigmoid + BCE is BCE with logits (the same loss, numerically stable, allowed under
  --bf16 autocast). Each quadrant is upsampled to the size of its image quadrant (the code: half
  the image size, the same on even sizes; it fails on odd ones).
- Splits, schedule and data follow the shared protocol (README, Protocol), the official recipe:
  400 epochs, Nesterov SGD, cosine with warm-up.
- ImageNet (the ResNets of common.py, VGG-13): the official ImageNet model. Cascaded windows only
  (no independent heads; the code comments them out), loss 5 * BCE + 0.75 * CE per window (hard-coded
  there: `--lambdas` defaults to 5 0.75 5 0.75 on ImageNet), the final loss the window's CE alone.
  Its decoder reconstructs the whole image and the BCE is the sum over the image's four quadrants
  (4 x the mean BCE: no patches of features). Decoder and classifier as the code's (its branches
  picked by the map's downsampling factor 4 / 8 / 16 / 32 instead of the 56 / 28 / 14 / 7 of a 224
  crop; the factor-32 branch, which the code cannot reach (a `size(4)` typo), is used as written;
  the classifier's widths, defined there for 256 / 512 / 1024 / 2048 channels, follow the rule
  max(128, C/4), max(256, C/4), max(512, C/2), 2048 for other widths, with the 2048 variant's
  BatchNorm widths fixed to match its convs), with as many outputs as classes, convs drawn with
  kaiming fan-out. Recipe: batch 128, lr 0.05, 90 epochs, cosine without warm-up, as the official
  script (single GPU, batch 128 per process there). Its K=4 split cuts after layer3[0], layer3[9]
  and layer3[17], which the shared splits do not have: `--k 4` is an even split (on ResNet-101 and
  ResNeXt-101 one block away from the official one, on ResNet-152 further).
"""
import functools

import torch.nn as nn
import torch.nn.functional as F

import common

# ================================= METHOD: HPFF ===================================================
import os  # the method's own imports: the lines above the METHOD section are shared by all scripts

# --pipeline is refused with this reason:
NO_PIPELINE = ("each window trains two consecutive modules under one loss, so a stage would have to send "
               "gradients back to the stage before it every step")
W_OWN, W_CASCADE = 0.001, 0.999  # independent / cascaded loss weights (constructor defaults in the official code)
FEATURE_DIM = 128                # hidden width of the 2c2f head (the README's --aux_net_feature_dim)
DECODER_WIDTH = 12               # hidden width of each quadrant decoder
HEAD_2C2F = {16: (32, 2), 32: (64, 2), 64: (64, 1)}  # 2c2f head: channels -> (conv width, first stride)
CIFAR_LAMBDAS = (5.0, 0.5, 0.0, 0.0)     # the README's --ixx_1 5 --ixy_1 0.5 --ixx_2 0 --ixy_2 0
IMAGENET_LAMBDAS = (5.0, 0.75, 5.0, 0.75)  # hard-coded in the official ImageNet model
# The official ImageNet decoder branches, by the feature map's downsampling factor: per conv, the
# size it is upsampled to first (image size / d; None: no upsampling), its output width and kernel.
# Every conv but the last is followed by BN-ReLU; all have a bias; sigmoid (here: in the BCE) at the end.
IMAGENET_DECODERS = {
    4: [(None, 128, 1), (2, 16, 3), (1, 3, 3)],
    8: [(None, 128, 1), (4, 32, 3), (2, 16, 3), (1, 3, 3)],
    16: [(None, 128, 1), (2, 64, 3), (4, 32, 3), (2, 16, 3), (1, 3, 3)],
    32: [(None, 128, 1), (16, 64, 3), (8, 32, 1), (4, 12, 3), (2, 6, 3), (1, 3, 3)],
}


def quadrants(t):
    """The four quadrants of a (B, C, H, W) map: top-left, top-right, bottom-left, bottom-right."""
    h, w = t.shape[-2] // 2, t.shape[-1] // 2
    return t[..., :h, :w], t[..., :h, w:], t[..., h:, :w], t[..., h:, w:]


class Head2c2f(nn.Module):
    """InfoPro's `2c2f` classifier: conv3x3(C->C', stride s)-BN-ReLU, conv3x3(C'->C')-BN-ReLU (no conv
    bias), global average pool, Linear(C', 128)-ReLU-Linear(128, classes). C', s = 32, 2 / 64, 2 /
    64, 1 for C = 16 / 32 / 64."""

    def __init__(self, channels, num_classes):
        super().__init__()
        width, stride = HEAD_2C2F[channels]
        self.convs = nn.Sequential(nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.fc = nn.Sequential(nn.Linear(width, FEATURE_DIM), nn.ReLU(inplace=True),
                                nn.Linear(FEATURE_DIM, num_classes))

    def forward(self, h):
        return self.fc(self.convs(h).mean((2, 3)))


class PatchDecoder(nn.Module):
    """PFF's decoder: four decoders, conv3x3(C->12, bias)-BN-ReLU-conv3x3(12->3, bias), one per
    quadrant of the feature map, each upsampled (bilinear, align_corners=True) to the size of the
    image's quadrant it reconstructs. The loss is the sum of the four mean BCEs."""

    def __init__(self, channels):
        super().__init__()
        self.decoders = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, DECODER_WIDTH, 3, 1, 1), nn.BatchNorm2d(DECODER_WIDTH),
                          nn.ReLU(inplace=True), nn.Conv2d(DECODER_WIDTH, 3, 3, 1, 1)) for _ in range(4))

    def forward(self, h, image):
        loss = 0
        for decoder, patch, target in zip(self.decoders, quadrants(h), quadrants(image)):
            patch = F.interpolate(patch, size=target.shape[-2:], mode="bilinear", align_corners=True)
            loss = loss + F.binary_cross_entropy_with_logits(decoder(patch), target)
        return loss


class ImageNetDecoder(nn.Module):
    """The official ImageNet decoder (IMAGENET_DECODERS): it reconstructs the whole image; the loss is
    the sum of the mean BCEs of its four quadrants."""

    def __init__(self, channels, feature_size, image_size):
        super().__init__()
        factor = min(IMAGENET_DECODERS, key=lambda d: abs(d - image_size / feature_size))
        layers, width = [], channels
        for n, (divisor, out, kernel) in enumerate(IMAGENET_DECODERS[factor], 1):
            if divisor:
                layers.append(nn.Upsample(size=(image_size // divisor,) * 2, mode="bilinear", align_corners=True))
            layers.append(nn.Conv2d(width, out, kernel, 1, kernel // 2))
            if n < len(IMAGENET_DECODERS[factor]):
                layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        self.convs = nn.Sequential(*layers)

    def forward(self, h, image):
        return sum(F.binary_cross_entropy_with_logits(p, t) for p, t in zip(quadrants(self.convs(h)), quadrants(image)))


class ImageNetHead(nn.Sequential):
    """The official ImageNet classifier: conv1x1 (C -> a), conv3x3 s2 (a -> b), conv3x3 s2 (b -> c),
    conv1x1 (c -> 2048), each BN-ReLU (no conv bias), global pool, Linear(2048, classes); a, b, c =
    128, 256, 512 (C = 256, 512), 256, 256, 512 (1024), 512, 512, 1024 (2048): max(128, C/4),
    max(256, C/4), max(512, C/2)."""

    def __init__(self, channels, num_classes):
        widths = [max(128, channels // 4), max(256, channels // 4), max(512, channels // 2), 2048]
        layers, width = [], channels
        for out, kernel, stride in zip(widths, (1, 3, 3, 1), (1, 2, 2, 1)):
            layers += [nn.Conv2d(width, out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            width = out
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, num_classes))


class Window(nn.Module):
    """The aux nets of the window (i-1, i): the independent head on module i's own output (None on
    ImageNet), the decoder and the cascaded classifier on the window's output, and their weights."""

    def __init__(self, own, decoder, cascade, ixx, ixy, data):
        super().__init__()
        self.own, self.decoder, self.cascade, self.ixx, self.ixy = own, decoder, cascade, float(ixx), float(ixy)
        self.register_buffer("mean", data.mean.detach().clone(), persistent=False)  # to de-normalise x
        self.register_buffer("std", data.std.detach().clone(), persistent=False)

    def forward(self, own, z, x, y):
        """The window's loss (back-propagated at once) and its cascaded classifier's logits:
        0.001 * CE(own head) + 0.999 * (ixx * BCE + ixy * CE) on CIFAR, ixx * BCE + ixy * CE on ImageNet."""
        logits = self.cascade(z)
        loss = self.ixx * self.decoder(z, x * self.std + self.mean) + self.ixy * F.cross_entropy(logits, y)
        if self.own is None:
            return loss, logits
        return W_OWN * F.cross_entropy(self.own(own), y) + W_CASCADE * loss, logits


def method_args(parser):
    parser.add_argument("--lambdas", type=float, nargs="+", default=None, metavar="W",
                        help="IXX_1 IXY_1 IXX_2 IXY_2: lambda1 (BCE) and lambda2 (CE) of the first and the last "
                        "window, linear in between; default: the README's 5 0.5 0 0 (imagenet: the official "
                        "model's constant 5 0.75)")


def lambda_schedule(lambdas, k):
    """(lambda1, lambda2) of windows i = 1..K-2: ratio r = i / (K-1)."""
    ixx_1, ixy_1, ixx_2, ixy_2 = lambdas
    return [(ixx_1 * (1 - i / (k - 1)) + ixx_2 * i / (k - 1), ixy_1 * (1 - i / (k - 1)) + ixy_2 * i / (k - 1))
            for i in range(1, k - 1)]


def build_aux(args, net, modules, data):
    """One Window per module i = 1..K-2 (the last module of the window (i-1, i))."""
    imagenet = args.arch in common.IMAGENET_ARCHS
    if args.lambdas is None:
        args.lambdas = list(IMAGENET_LAMBDAS if imagenet else CIFAR_LAMBDAS)  # the values used, for args.json
    if len(args.lambdas) != 4 or min(args.lambdas) < 0:
        common.die(f"--lambdas takes 4 weights >= 0 (IXX_1 IXY_1 IXX_2 IXY_2), got {args.lambdas}")
    shapes, k = common.layer_shapes(net, data.image_size), len(modules)
    ends = [shapes[m[-1]] for m in modules[1:-1]]
    if not imagenet and not {c for c, _, _ in ends} <= set(HEAD_2C2F):
        common.die(f"hpff's CIFAR heads take 16, 32 or 64 channels; {args.arch} needs --dataset imagenet")
    if not imagenet and any(min(hw) < 2 for _, *hw in ends):
        common.die(f"the patch decoder needs feature maps of at least 2 x 2; use larger images than {data.image_size}")
    schedule = lambda_schedule(args.lambdas, k)
    if int(os.environ.get("RANK", 0)) == 0 and not args.quiet:
        print(f"hpff: {len(schedule)} windows of 2 modules{' (ImageNet: cascaded only)' if imagenet else ''}; "
              f"(lambda1, lambda2) per window: {' '.join(f'({a:.4g}, {b:.4g})' for a, b in schedule)}", flush=True)
    windows = []
    for (channels, size, _), (ixx, ixy) in zip(ends, schedule):
        if imagenet:
            window = Window(None, ImageNetDecoder(channels, size, data.image_size),
                            ImageNetHead(channels, data.num_classes), ixx, ixy, data)
        else:
            window = common.init_weights(Window(Head2c2f(channels, data.num_classes), PatchDecoder(channels),
                                                Head2c2f(channels, data.num_classes), ixx, ixy, data))
        windows.append(window)
    aux = nn.ModuleList(windows)
    if imagenet:  # the official ImageNet init, which covers its aux nets
        for m in aux.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return aux


def local_step(net, modules, aux, args, i, u, x, y):
    """Step i trains the window (i-1, i) from u, the detached input of module i-1: modules i-1 and
    i, the window's decoder and classifier, and module i alone on module i-1's detached output for
    the independent head. Returns module i-1's detached output (the next window's input), the
    window's loss and its classifier's logits; common.run_modules back-propagates the loss at once.
    Step 0 only passes the input on (module 0 is trained by window 1). The last window trains on the
    network's head (0.999 : 0.001 with module K-1 alone; CE alone on ImageNet); K=1 is end-to-end."""
    if len(modules) == 1:
        logits = net.head(net.run(modules[0], u))
        return u, F.cross_entropy(logits, y), logits
    if i == 0:
        return u, None, None
    h = net.run(modules[i - 1], u)
    first = h.detach()
    z = net.run(modules[i], h)
    if i < len(modules) - 1:
        own = net.run(modules[i], first) if aux[i - 1].own is not None else None
        return first, *aux[i - 1](own, z, x, y)
    logits = net.head(z)
    loss = F.cross_entropy(logits, y)
    if args.arch not in common.IMAGENET_ARCHS:
        loss = W_CASCADE * loss + W_OWN * F.cross_entropy(net.head(net.run(modules[i], first)), y)
    return first, loss, logits


# ================================= END METHOD =====================================================


def main(argv=None):
    args = common.parse_args(argv, __doc__, "hpff", k=15, epochs=400, add_method_args=method_args,
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
