"""auglocal.py: AugLocal (Ma et al., "Scaling Supervised Local Learning with Augmented Auxiliary
Networks", ICLR 2024, arXiv 2402.17318).

Supervised local learning whose auxiliary networks are small copies of the rest of the network.
The backbone is cut into gradient-isolated modules; the auxiliary net of a module is d_i freshly
initialised residual blocks whose widths copy layers sampled uniformly from the layers after the
module (always ending at the last one), then global pooling, BatchNorm1d (only when d_i <= 1) and
a Linear classifier. The depth d_i shrinks linearly along the network from d to d - c(d-1) (the
"pyramid"; c = 0.5: from d to (d+1)/2). Each local CE loss is back-propagated at once and the
module's output detached; the final module trains on the network's own head. Inference is the
plain backbone.

    python auglocal.py --dataset synthetic --arch resnet32         # CPU, a few minutes
    python auglocal.py --dataset cifar10 --arch resnet110 --k 55   # the paper's ResNet-110 (d=3)
    python auglocal.py --dataset stl10 --arch resnet110 --k 16     # 3-4 blocks per module
    torchrun --nproc_per_node=8 auglocal.py --dataset imagenet --data-dir DIR --arch resnet34

Defaults: the published commands: --k 16, --aux-depth 2 on ResNet-32 and 3 on ResNet-110,
--pyramid-coeff 0.5 (0 gives every aux net depth d), 400 epochs, the shared protocol. ImageNet
(exp_imagenet/run.sh and its configs): one layer per module (K=17 on ResNet-34, 34 on ResNet-101,
10 on VGG-13, and likewise 9 / 17 / 51 / 34 on ResNet-18 / -50 / -152 / ResNeXt-101), --aux-depth 4,
no pyramid, 200 epochs, global batch 1024, lr 0.4.

K on CIFAR (the paper's convention): K=16 on ResNet-32 and K=55 on ResNet-110 mean one layer per
module (the stem alone first). A module whose auxiliary net would be the whole rest of the network
is merged into the final module, trained end-to-end with the head, so K - d modules are trained,
as in the official code. The general rule, for any split (n layers, d = --aux-depth):
  1. split the layers into K modules as every script does (common.make_modules: the official
     tables, one layer per module when K = n, else even);
  2. merge into the final module every module whose last layer l satisfies l >= n-1-d (at most d
     layers follow it); K' = the number of modules left. With K = n this is exactly the official
     K' = K - d: cuts after layers 0..K'-2, the last module is the last d+1 layers;
  3. module i = 0..K'-2, with last layer l, gets depth d_i = max(1, round(d - c(d-1) i/(K'-2)))
     (i/(K'-2) read as 0 when K' = 2) and copies the widths of layers round(l + (n-1-l) j/d_i),
     j = 1..d_i (Python's round, half to even, in both places, as in the official code);
  4. aux block strides: a counter adds log2(planes ratio) at each block; a block takes stride 2
     (and the counter loses 1) when the counter is >= 1: at most one stride 2 per block, and an
     unused reduction carries on to the next block.
summary.json's `k` is the --k asked for, `modules` the K' modules actually trained. A merge that
leaves a single module (K > 1) is an error: that would be plain backpropagation.

The official CIFAR code reads K < n differently (`--k-rule official` does the same): it trains K' =
K - d modules, the first K'-1 layers one per module (cuts after layers 0..K'-2) and everything
after them as one module, trained end to end with the head. ResNet-32 K=8, d=2: cuts after layers
0-4, then layers 5-15 together, where the rule above gives [0,1], [2,3], ..., [10,11], [12..15]. At
K = n the two are the same split. The default is the rule above: every published run uses K = n
(ResNet-32 K=16, ResNet-110 K=55, the README and run.sh), so both give the paper's numbers, and for
K < n it keeps what --k means in every other script (K modules of about equal depth) instead of
one module holding most of the network.

ImageNet networks (the torchvision ones, on any dataset) follow the official ImageNet code: no
merge (every module but the last has an aux net; near the end it copies all the layers that
remain), no pyramid unless asked, no BatchNorm1d, Bottleneck aux blocks on Bottleneck backbones
(planes drive the stride counter); VGG: per copied layer a max-pool when the width changes and
conv3x3-BN-ReLU, then the flattened map average-pooled to 512 and a 512-512 MLP.

Differences from the official code (ChenxiangMA/AugLocal):
- STL-10 is trained with 10 classes; the official code builds 100-way heads for it (a `sl10`
  typo in its class-count test).
- K < n follows the rule above unless --k-rule official (see above). With K' = 2 the official
  pyramid divides by zero (i / (K'-2)); here that ratio is read as 0.
- --aux-depth 0 gives aux nets without blocks (pool, BatchNorm1d, Linear) with or without the
  pyramid; the official `--pyramid` turns depth 0 into 1 through its max(1, .) clamp.
- The pyramid is on by default on CIFAR (the official flag is off by default, but every published
  command sets `--pyramid --pyramid_coeff 0.5`).
- Evaluation runs the backbone only (the official CIFAR eval also runs every aux net).
- ImageNet: one backward per module (the official default sums all losses into one backward,
  which gives the same gradients but saves no memory; its --layerwise_train mode is per module);
  the aux classifier's input is the last aux width (hard-coded 512 * expansion there); ResNet-18,
  -50, -152 and ResNeXt (Bottleneck blocks with the backbone's groups and width) go beyond its
  ResNet-34/101 and VGG-13 configs.
"""
import functools
import math

import torch.nn as nn
import torch.nn.functional as F

import common

# ================================= METHOD: AugLocal ===============================================

# Default aux depth d: the published commands (CIFAR README / run.sh; exp_imagenet/run.sh).
DEFAULT_DEPTH = {"resnet32": 2, "resnet110": 3}
IMAGENET_DEPTH = 4
DEFAULT_COEFF, IMAGENET_COEFF = 0.5, 0.0  # the ImageNet code has no pyramid
# ImageNet default K: one layer per module, the official configs (ResNet-34 17, ResNet-101 34, VGG-13 10),
# and the same rule for the other networks.
IMAGENET_K = {"resnet18": 9, "resnet34": 17, "resnet50": 17, "resnet101": 34, "resnet152": 51,
              "resnext101_32x8d": 34, "vgg13_bn": 10}
K_RULES = ("merge", "official")


def merge_point(modules, n_layers, depth):
    """Index of the first module whose last layer l has at most `depth` layers after it
    (l >= n-1-d): it and every module after it form the final, end-to-end trained module."""
    return next(m for m, layers in enumerate(modules) if layers[-1] >= n_layers - 1 - depth)


def pyramid_depths(depth, count, coeff):
    """Aux depth of local modules i = 0..count-1 (count = K'-1): linear from d down to
    d - c(d-1), Python's round (half to even), at least 1. Depth 0 stays 0."""
    if depth == 0:
        return [0] * count
    ratios = [i * coeff / (count - 1) if count > 1 else 0.0 for i in range(count)]
    return [max(1, round(depth * (1 - r) + r)) for r in ratios]


def aux_layer_ids(layer, n_layers, depth):
    """Layers whose widths the aux net of `layer` copies: uniformly sampled after it, ending at
    the last layer; all of them when depth >= what remains (on CIFAR never, after the merge)."""
    if depth >= n_layers - 1 - layer:
        return list(range(layer + 1, n_layers))
    return [round(layer + (n_layers - layer - 1) / depth * j) for j in range(1, depth + 1)]


def aux_strides(in_planes, planes):
    """A counter adds log2 of each planes ratio; stride 2 (counter - 1) once it reaches 1."""
    strides, pool = [], 0
    for p in planes:
        pool += int(math.log2(p // in_planes))
        if pool >= 1:
            strides.append(2)
            pool -= 1
        else:
            strides.append(1)
        in_planes = p
    return strides


def bottleneck(in_width, planes, stride, like):
    """A fresh torchvision Bottleneck shaped like the backbone's block `like` (groups, width)."""
    from torchvision.models.resnet import Bottleneck
    out = planes * Bottleneck.expansion
    base_width = like.conv2.out_channels * 64 // (like.conv2.groups * like.conv3.out_channels // Bottleneck.expansion)
    shortcut = None
    if stride != 1 or in_width != out:
        shortcut = nn.Sequential(nn.Conv2d(in_width, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    return Bottleneck(in_width, planes, stride, shortcut, like.conv2.groups, base_width)


def resnet_aux(net, widths, layer, ids, depth, num_classes, imagenet):
    """Fresh residual blocks copying the widths of layers `ids`, global pooling, BatchNorm1d when
    depth <= 1 (CIFAR code only), Linear. Bottleneck backbones get Bottleneck blocks."""
    is_bottleneck = hasattr(net.layers[-1], "conv3")
    planes = [w // 4 if is_bottleneck and i > 0 else w for i, w in enumerate(widths)]
    blocks, width = [], widths[layer]
    for j, stride in zip(ids, aux_strides(planes[layer], [planes[j] for j in ids])):
        blocks.append(bottleneck(width, planes[j], stride, net.layers[-1]) if is_bottleneck
                      else common.BasicBlock(width, widths[j], stride))
        width = widths[j]
    norm = [nn.BatchNorm1d(width)] if depth <= 1 and not imagenet else []
    head = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), *norm, nn.Linear(width, num_classes))
    return common.init_weights(head)  # the official init loop covers the aux nets (Kaiming fan-out)


def vgg_aux(widths, layer, ids, num_classes):
    """The official VGG aux: per copied layer a 2x2 max-pool when the width changes, then
    conv3x3-BN-ReLU; the flattened map average-pooled to 512, two Linear-BN1d-ReLU, Linear.
    PyTorch's default init (the official VGG init runs before the aux nets exist)."""
    ops, width = [], widths[layer]
    for j in ids:
        ops += [nn.MaxPool2d(2)] if widths[j] != width else []
        ops += [nn.Conv2d(width, widths[j], 3, padding=1), nn.BatchNorm2d(widths[j]), nn.ReLU(inplace=True)]
        width = widths[j]
    mlp = [m for _ in range(2) for m in (nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True))]
    return nn.Sequential(*ops, nn.Flatten(), nn.AdaptiveAvgPool1d(512), *mlp, nn.Linear(512, num_classes))


def method_args(parser):
    parser.add_argument("--aux-depth", type=int, default=None, metavar="D",
                        help="aux net depth d (blocks); default 2 for resnet32, 3 for resnet110, 4 for the "
                             "ImageNet networks")
    parser.add_argument("--pyramid-coeff", type=float, default=None, metavar="C",
                        help="depth shrinks from d to d-C(d-1) along the network; 0: depth d everywhere. "
                             f"Default {DEFAULT_COEFF} ({IMAGENET_COEFF} for the ImageNet networks)")
    parser.add_argument("--k-rule", default="merge", choices=K_RULES,
                        help="CIFAR ResNets: merge (split into K modules, then merge those near the end; "
                             "default) | official (the official code: K-d modules, the first K-d-1 layers "
                             "one each, the rest one module); the same at K = the number of layers")


def build_aux(args, net, modules, data):
    """One aux net per local module. CIFAR ResNets: the trailing modules are first merged into the
    final one (see the docstring); `modules` is changed in place, so that main keeps the skeleton
    shared with dgl.py and summary.json reports the modules actually trained."""
    imagenet = args.arch in common.IMAGENET_ARCHS
    depth = args.aux_depth if args.aux_depth is not None else (
        IMAGENET_DEPTH if imagenet else DEFAULT_DEPTH[args.arch])
    coeff = args.pyramid_coeff if args.pyramid_coeff is not None else (IMAGENET_COEFF if imagenet else DEFAULT_COEFF)
    if depth < 0:
        common.die(f"--aux-depth must be 0 or more (the number of blocks per aux net), got {depth}")
    if not 0 <= coeff <= 1:
        common.die(f"--pyramid-coeff must be between 0 (no pyramid) and 1, got {coeff}")
    args.aux_depth, args.pyramid_coeff = depth, coeff  # the values used, for args.json and --resume
    n_layers = len(net.layers)
    if args.k_rule == "official":
        kept = args.k - depth
        if imagenet:
            common.die(f"--k-rule official is the official CIFAR code's rule; on {args.arch} leave it out (the "
                       f"default K, one layer per module, is the official ImageNet split)")
        if kept < 2:
            common.die(f"--k-rule official trains K - d modules (here {kept}); use --k of at least d + 2")
        modules[:] = [[i] for i in range(kept - 1)] + [list(range(kept - 1, n_layers))]
    if not imagenet:  # the official CIFAR code trains K - d modules; its ImageNet code does not merge
        m = merge_point(modules, n_layers, depth)
        if m == 0 and len(modules) > 1:
            common.die(f"--aux-depth {depth} with --k {args.k} leaves no local module on {args.arch} (every aux "
                       f"net would be the rest of the network); use a smaller --aux-depth or a larger --k")
        modules[m:] = [sum(modules[m:], [])]
    widths = [c for c, _, _ in common.layer_shapes(net, data.image_size)]
    heads = []
    for layers, d in zip(modules[:-1], pyramid_depths(depth, len(modules) - 1, coeff)):
        ids = aux_layer_ids(layers[-1], n_layers, d) if d > 0 else []
        heads.append(vgg_aux(widths, layers[-1], ids, data.num_classes) if args.arch.startswith("vgg")
                     else resnet_aux(net, widths, layers[-1], ids, d, data.num_classes, imagenet))
    return nn.ModuleList(heads)


def local_step(net, modules, aux, args, i, h, x, y):
    """Module i on its input h: its output, the cross-entropy of its aux net (the last module's:
    of the network's head) and that head's logits. common.run_modules back-propagates the loss at
    once and detaches the output before module i+1."""
    h = net.run(modules[i], h)
    logits = (aux[i] if i < len(aux) else net.head)(h)
    return h, F.cross_entropy(logits, y), logits


# ================================= END METHOD =====================================================


def main(argv=None):
    args = common.parse_args(argv, __doc__, "auglocal", k=16, epochs=400, add_method_args=method_args,
                             imagenet=dict(epochs=200, k=IMAGENET_K))
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
