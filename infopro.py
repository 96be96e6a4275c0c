"""infopro.py: InfoPro and InfoPro* (Wang, Ni, Song, Yang, Huang; ICLR 2021, arXiv 2101.10832).

The backbone is cut into K gradient-isolated modules. Every module but the last is trained by the
InfoPro loss on its output h, which keeps information about the input while collecting information
about the label: lambda1 * BCE(decoder(h), x) + lambda2 * L_task(head(h), y). The decoder
upsamples h bilinearly to the input size and reconstructs the de-normalised image (conv3x3-BN-
ReLU-conv3x3-sigmoid); the `1c2f` head (conv3x3-BN-ReLU, global pool, two Linear) estimates
I(h, y) with a supervised contrastive loss (`--loss contrast`, 128-d, temperature 0.07; the
default) or with cross-entropy (`--loss ce`). Each local loss is back-propagated at once and h is
detached before the next module; the last module trains on the network's own head. Inference is
the plain backbone. InfoPro* is the same method on the memory-balanced splits (`--split
balanced`). ImageNet backbones get the official ImageNet aux nets (a 4-conv decoder upsampling to
I/4, I/2 and I, a 4-conv head) and `--loss ce` by default, as in the paper's InfoPro*, K=2.

    python infopro.py --dataset synthetic --arch resnet32 --k 4      # CPU, a few minutes
    python infopro.py --dataset cifar10 --arch resnet110 --k 16
    python infopro.py --dataset stl10 --arch resnet110 --k 4 --split balanced      # InfoPro*
    torchrun --nproc_per_node=8 infopro.py --dataset imagenet --data-dir DIR --arch resnet101 --k 2

The weights are linear in the local-module index i = 0..K-2, from (ixx_1, ixy_1) at the first module
to (ixx_2, ixy_2) at the last local one (ratio i / (K-2), 0 when K = 2). Defaults: the published
values (comand.sh; the ImageNet README) for the dataset, arch, K and split (`balanced` = InfoPro*;
`official` and `even` use the InfoPro rows); `synthetic` uses the CIFAR-10 rows. Any other
combination uses the fallback (ixx_1, ixy_1, ixx_2, ixy_2) = (5, 0.5, 0.5, 1), close to the
published ones (much reconstruction early, the task term growing with depth). The values used are
printed at start; `--lambdas IXX_1 IXY_1 IXX_2 IXY_2` overrides them.

Differences from the official code (blackfeather-wang/InfoPro-Pytorch):
- STL-10 has 10 classes. The official code tests `dataset in ['cifar10', 'sl10', 'svhn']` (typo) and
  so trains STL-10 with a 100-way final layer (and 100-way aux heads with --loss ce). The ImageNet
  aux head has as many outputs as there are classes (officially always 1000).
- The weights default to the published values (above) instead of 0, which would train the local
  modules on nothing. No CIFAR values were published for `--loss ce`: it uses the Contrast ones.
- The decoder's sigmoid + BCE is computed as BCE with logits: the same loss, but numerically stable
  and allowed under --bf16 autocast. SupCon runs in fp32 under --bf16.
- The SupCon loss of a batch with a single sample is 0 (the official one is NaN there).
- The CIFAR aux nets are fixed to the published configuration: `1c2f`, widen 1, feature dim 128.
  The ImageNet ones, officially only for the 512 x 28 x 28 cut, take any cut (sizes as above).
- Splits, schedule, data and the one optimizer step per batch follow the shared protocol
  (README, Protocol), which is the official recipe.
"""
import functools

import torch.nn as nn
import torch.nn.functional as F

import common

# ================================= METHOD: InfoPro ================================================
import os  # the method's own imports: the lines above the METHOD section are shared by all scripts

import torch

LOSSES = ("contrast", "ce")
TEMPERATURE = 0.07  # SupCon temperature (= base temperature, so the loss is not rescaled)
FEATURE_DIM = 128   # contrastive embedding, and the hidden width of the 1c2f head
HEAD_WIDTH = {16: (32, 2), 32: (64, 2), 64: (64, 1)}  # 1c2f: input channels -> (conv channels, stride)

# The published (ixx_1, ixy_1, ixx_2, ixy_2), keyed by (dataset, arch, K, memory-balanced split =
# InfoPro*): the official comand.sh (all --loss contrast) and the ImageNet README (--loss ce, K=2,
# where the official split is the balanced one).
PUBLISHED_LAMBDAS = {
    ("cifar10", "resnet32", 2, False): (5, 1, 0, 0),
    ("cifar10", "resnet32", 4, False): (6, 0, 1, 2),
    ("cifar10", "resnet32", 8, False): (5, 0, 0, 2),
    ("cifar10", "resnet32", 16, False): (5, 0.05, 0.2, 0.5),
    ("cifar10", "resnet110", 2, False): (5, 0.5, 0, 0),
    ("cifar10", "resnet110", 4, False): (1, 0, 0, 1),
    ("cifar10", "resnet110", 8, False): (5, 0, 0, 1),
    ("cifar10", "resnet110", 16, False): (5, 0, 0.5, 1),
    ("cifar10", "resnet110", 2, True): (5, 0.1, 0, 0),
    ("cifar10", "resnet110", 3, True): (5, 0, 5, 0.1),
    ("cifar10", "resnet110", 4, True): (5, 0, 5, 0.1),
    ("stl10", "resnet110", 2, False): (10, 1, 0, 0),
    ("stl10", "resnet110", 4, False): (20, 0.2, 5, 2),
    ("stl10", "resnet110", 8, False): (20, 0.2, 5, 1),
    ("stl10", "resnet110", 16, False): (20, 0.5, 10, 0.1),
    ("stl10", "resnet110", 2, True): (20, 1, 0, 0),
    ("stl10", "resnet110", 3, True): (20, 0.5, 5, 2),
    ("stl10", "resnet110", 4, True): (20, 0.5, 10, 1),
    ("svhn", "resnet110", 2, False): (1, 0.1, 0, 0),
    ("svhn", "resnet110", 4, False): (5, 0, 0.5, 1),
    ("svhn", "resnet110", 8, False): (5, 0, 0.5, 2),
    ("svhn", "resnet110", 16, False): (5, 0.2, 0.5, 1),
    **{("imagenet", arch, 2, balanced): (5, ixy, 0, 0) for balanced in (False, True)
       for arch, ixy in (("resnet101", 0.75), ("resnet152", 1), ("resnext101_32x8d", 0.75))},
}
LAMBDA_TABLE_OF = {"synthetic": "cifar10"}  # datasets that use another dataset's rows
FALLBACK_LAMBDAS = (5, 0.5, 0.5, 1)         # any combination without a published command


class Decoder(nn.Module):
    """Reconstructs the image from h (estimates I(h, x)): bilinear upsampling to the input size
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


class Head1c2f(nn.Module):
    """The `1c2f` auxiliary head (estimates I(h, y)): conv3x3(C->C', stride s, no bias)-BN-ReLU,
    global average pool, Linear(C', 128)-ReLU-Linear(128, out). C', s = 32, 2 / 64, 2 / 64, 1 for
    C = 16 / 32 / 64."""

    def __init__(self, channels, out):
        super().__init__()
        if channels not in HEAD_WIDTH:
            common.die(f"InfoPro's 1c2f head takes 16, 32 or 64 channels, not {channels}; use a CIFAR ResNet")
        width, stride = HEAD_WIDTH[channels]
        self.conv = nn.Sequential(nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.fc = nn.Sequential(nn.Linear(width, FEATURE_DIM), nn.ReLU(inplace=True), nn.Linear(FEATURE_DIM, out))

    def forward(self, h):
        return self.fc(self.conv(h).mean((2, 3)))


def conv_bn_relu(cin, cout, kernel, stride=1, bias=False):
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ImageNetDecoder(nn.Module):
    """The ImageNet decoder: conv1x1(C->128)-BN-ReLU, then upsampling to I/4, conv3x3(128->32)-BN-
    ReLU, to I/2, conv3x3(32->12)-BN-ReLU, to I, conv3x3(12->3) (all convs with bias; bilinear,
    align_corners=True; logits, as above). Officially only for 512 x 28 x 28 (I = 224: 56, 112, 224)."""

    def __init__(self, channels, image_size):
        super().__init__()
        self.sizes = (image_size // 4, image_size // 2, image_size)
        self.stages = nn.ModuleList([nn.Sequential(*conv_bn_relu(channels, 128, 1, bias=True)),
                                     nn.Sequential(*conv_bn_relu(128, 32, 3, bias=True)),
                                     nn.Sequential(*conv_bn_relu(32, 12, 3, bias=True)), nn.Conv2d(12, 3, 3, 1, 1)])

    def forward(self, h):
        h = self.stages[0](h)
        for size, stage in zip(self.sizes, self.stages[1:]):
            h = stage(F.interpolate(h, size=(size, size), mode="bilinear", align_corners=True))
        return h


class ImageNetHead(nn.Sequential):
    """The ImageNet auxiliary head (no conv bias): conv1x1(C->128), conv3x3 s2 (128->256), conv3x3
    s2 (256->512), conv1x1(512->2048), each BN-ReLU, global average pool, Linear(2048, out)."""

    def __init__(self, channels, out):
        super().__init__(*conv_bn_relu(channels, 128, 1), *conv_bn_relu(128, 256, 3, 2), *conv_bn_relu(256, 512, 3, 2),
                         *conv_bn_relu(512, 2048, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, out))


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


class LocalLoss(nn.Module):
    """The aux nets of one module and its InfoPro loss
    ixx * BCE(decoder(h), de-normalised x) + ixy * (SupCon or CE) of the head."""

    def __init__(self, decoder, head, loss, ixx, ixy, data):
        super().__init__()
        self.decoder, self.head, self.loss, self.ixx, self.ixy = decoder, head, loss, float(ixx), float(ixy)
        # The data statistics, to rebuild the [0, 1] image from the normalised input (not saved).
        self.register_buffer("mean", data.mean.detach().clone(), persistent=False)
        self.register_buffer("std", data.std.detach().clone(), persistent=False)

    def forward(self, h, x, y):
        reconstruction = F.binary_cross_entropy_with_logits(self.decoder(h), x * self.std + self.mean)
        out = self.head(h)
        if self.loss == "contrast":
            return self.ixx * reconstruction + self.ixy * supcon_loss(out, y), None
        return self.ixx * reconstruction + self.ixy * F.cross_entropy(out, y), out  # a zero weight still runs its net


def loss_mode(value):
    if value not in LOSSES:
        common.die(f"unknown --loss {value!r}: choose contrast (SupCon, the paper's CIFAR default) or ce")
    return value


def method_args(parser):
    parser.add_argument("--loss", default=None, type=loss_mode, help="estimator of I(h,y): contrast "
                        "(SupCon, 128-d, tau 0.07; the default) | ce (softmax; the default on ImageNet)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=None, metavar="W",
                        help="IXX_1 IXY_1 IXX_2 IXY_2: the loss weights of the first and the last local "
                        "module; default: the published ones for the dataset, arch, K and split")


def default_lambdas(dataset, arch, k, balanced):
    """(ixx_1, ixy_1, ixx_2, ixy_2) and where they come from."""
    key = (LAMBDA_TABLE_OF.get(dataset, dataset), arch, k, balanced)
    name = ("InfoPro*" if balanced else "InfoPro") + f" {key[0]} {arch} K={k}"
    if key in PUBLISHED_LAMBDAS:
        return PUBLISHED_LAMBDAS[key], f"the published command ({name})"
    return FALLBACK_LAMBDAS, f"the fallback (no published command for {name})"


def lambda_schedule(lambdas, k):
    """(lambda1, lambda2) of local modules i = 0..K-2, linear in i (ratio i / (K-2), 0 when K = 2)."""
    ixx_1, ixy_1, ixx_2, ixy_2 = lambdas
    ratios = [i / (k - 2) if k > 2 else 0.0 for i in range(k - 1)]
    return [(ixx_1 * (1 - r) + ixx_2 * r, ixy_1 * (1 - r) + ixy_2 * r) for r in ratios]


def build_aux(args, net, modules, data):
    """A decoder and a head on the output of every module but the last, each with its weights."""
    imagenet = args.arch in common.IMAGENET_ARCHS
    loss = args.loss or ("ce" if imagenet else "contrast")
    if args.lambdas is None:
        lambdas, source = default_lambdas(args.dataset, args.arch, len(modules), args.split == "balanced")
    elif len(args.lambdas) == 4 and min(args.lambdas) >= 0:
        lambdas, source = tuple(args.lambdas), "--lambdas"
    else:
        common.die(f"--lambdas takes 4 weights >= 0 (IXX_1 IXY_1 IXX_2 IXY_2), got {args.lambdas}")
    args.loss, args.lambdas = loss, list(lambdas)  # the values used, for args.json and --resume
    schedule = lambda_schedule(lambdas, len(modules))
    if schedule and int(os.environ.get("RANK", 0)) == 0 and not args.quiet:
        print(f"infopro: --loss {loss}, (ixx_1, ixy_1, ixx_2, ixy_2) = ({', '.join(f'{w:g}' for w in lambdas)}) "
              f"from {source}; (lambda1, lambda2) per local module: {' '.join(f'({a:g}, {b:g})' for a, b in schedule)}",
              flush=True)
    shapes, out = common.layer_shapes(net, data.image_size), FEATURE_DIM if loss == "contrast" else data.num_classes
    aux = []
    for m, (ixx, ixy) in zip(modules[:-1], schedule):
        channels = shapes[m[-1]][0]
        decoder = (ImageNetDecoder if imagenet else Decoder)(channels, data.image_size)
        aux.append(LocalLoss(decoder, (ImageNetHead if imagenet else Head1c2f)(channels, out), loss, ixx, ixy, data))
    return common.init_weights(nn.ModuleList(aux))


def local_step(net, modules, aux, args, i, h, x, y):
    """Module i on its input h: its output, its InfoPro loss and its head's logits (None for
    SupCon); the last module: the network head's cross-entropy. common.run_modules back-propagates
    the loss at once and detaches the output before module i+1."""
    h = net.run(modules[i], h)
    if i == len(aux):
        logits = net.head(h)
        return h, F.cross_entropy(logits, y), logits
    return h, *aux[i](h, x, y)


# ================================= END METHOD =====================================================


def main(argv=None):
    args = common.parse_args(argv, __doc__, "infopro", k=16, epochs=160, add_method_args=method_args)
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
