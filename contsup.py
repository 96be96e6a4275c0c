"""contsup.py: ContSup, greedy local learning with context supply (Yu, Zhang, Ma, Wang, Li: "Go beyond
End-to-End Training: Boosting Greedy Local Learning with Context Supply", arXiv 2312.07636).

The backbone is cut into K gradient-isolated modules trained as in InfoPro: every module but the last
has a `1c2f` aux head with a supervised contrastive (or CE) loss on its output, optionally plus
InfoPro's reconstruction term, back-propagated at once; the last module trains on the network's head.
ContSup adds a context node at every split: module i+1's input is module i's detached output plus a
sum of context terms, each a small trainable encoder of a detached source: the image (E: two 3x3
convs at full resolution, then average pooling) or the inputs of the n most recent modules (Rn: a
1x1 conv, then pooling). Module i's local loss is taken before its context is added. The encoders of
node i are trained only by module i+1's loss, and they are part of the inference network.

    python contsup.py --dataset synthetic --arch resnet32 --k 4       # CPU, a few minutes
    python contsup.py --dataset cifar10 --arch resnet32 --k 16 --context R1E --loss ce --out runs/contsup-r1e-ce
    python contsup.py --dataset svhn --arch resnet110 --k 8 --context R1E --reconstruct
    torchrun --nproc_per_node=8 contsup.py --dataset imagenet --data-dir DIR --arch resnet101 --k 2 --context R1
    torchrun --nproc_per_node=2 contsup.py --dataset cifar10 --arch resnet32 --k 8

--context, with in_0 = x: R0 no context (plain greedy local learning) | E: + E_i(x) | R1: + R_i(in_i),
a gradient-isolated residual connection around each module | R1E: both (node 0: E only) | R2, R4,
R8, R16: + the n most recent module inputs in_i .. in_{i-n+1}. The stored inputs include their context.
Multiply-adds of the inference network, ResNet-32 at 32x32 (backbone 69.1M): at K=16, E 130.7M
(+89%), R1 +6%, R1E +95%, R2 +13%, R4 +27%, R8 +57%, R16 +88%; at K=4, E +19%, R1 +2%, R1E +21%.
The E encoders dominate: each node runs two convolutions at full resolution, up to 64 channels.

Differences from the official code (Tab-ct/ContSup):
- Only the encoders a mode uses are built. The official model allocates an image encoder at every
  node and a 1x1 encoder for every (node, lag) in every mode, and decoders without --h_reconstruct;
  the unused ones never get a gradient (all image encoders in R0 and Rn, R_{0,0} in R1E). So the
  reported `params.context` is what the network uses, e.g. ResNet-32 K=16: R0 0, E 62,232, R1 21,808
  and R1E 83,944 context parameters, where the official model allocates 62,232 / 62,232 / 84,040 / 84,040.
- STL-10 trains 10-way heads; the official code uses 100 (a typo, 'sl10', in its class-count test).
- Rn with n >= 2 needs K >= max(n, 4): the official asserts (R2, R4: K in {4, 8, 16}; R8: K in
  {8, 16}; R16: K = 16) on its K values, extended to every K this project splits.
- The loss weights apply only with --reconstruct: the official train.py reads its table in every run
  and so crashes for K=1, K=3 and ResNet-32 on SVHN / STL-10. Where the table has no entry,
  --reconstruct asks for --lambdas. SVHN K=4 keeps the code's lam2 = 0 (reconstruction only); InfoPro's
  value is --lambdas 5 0 0.5 1. --reconstruct and --lambdas replace `--h_reconstruct` (a `type=bool`
  flag that reads "False" as true).
- The context is summed out of place (the official code adds it in place into the detached output).
- Under --bf16 (autocast; the official code has none) SupCon and the reconstruction BCE run in
  float32; otherwise in the features' dtype, as there (float64 in a float64 run).
- ImageNet is a generalisation: neither the paper nor the code has one. The local losses use
  InfoPro's ImageNet aux nets (head: conv1x1 C->128, conv3x3 s2 128->256, conv3x3 s2 256->512,
  conv1x1 512->2048, each BN-ReLU, global pool, Linear; decoder: conv1x1 C->128, then bilinear
  upsampling to I/4, I/2 and I with conv3x3 128->32, 32->12 (BN-ReLU) and 12->3) and --loss defaults
  to ce (InfoPro's ImageNet loss). E's two 3x3 convs take stride 2 each, so they run at 1/2 and 1/4
  of the image size (the resolution of the ImageNet stem's output) rather than at 224 x 224; then
  average pooling to the node's size, as on CIFAR. Rn is unchanged (1x1 conv at the source's size,
  then pooling). --reconstruct needs --lambdas (there is no table).
- The shared protocol (README, Protocol) for data, schedule and outputs; the head is fixed at `1c2f`, width
  1, 128 features, no dropout; no nn.DataParallel. --split balanced uses common.py's splits, which for
  ResNet-32 are not ContSup's table.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# =============================== METHOD: ContSup ==================================================

# --context: (image encoder E on?, how many recent module inputs R feed each node).
CONTEXT_MODES = {"R0": (False, 0), "E": (True, 0), "R1": (False, 1), "R1E": (True, 1),
                 "R2": (False, 2), "R4": (False, 4), "R8": (False, 8), "R16": (False, 16)}
LOSSES = ("contrast", "ce")

# --reconstruct: (ixx_1, ixy_1, ixx_2, ixy_2) of the official configs.local_loss_scale, per (arch,
# dataset) and K. InfoPro's published values, except SVHN K=4 (ixy_2 = 0 here, 1 in InfoPro).
LAMBDAS = {
    ("resnet32", "cifar10"): {2: (5, 1, 0, 0), 4: (6, 0, 1, 2), 8: (5, 0, 0, 2), 16: (5, 0.05, 0.2, 0.5)},
    ("resnet110", "cifar10"): {2: (5, 0.5, 0, 0), 4: (1, 0, 0, 1), 8: (5, 0, 0, 1), 16: (5, 0, 0.5, 1)},
    ("resnet110", "stl10"): {2: (10, 1, 0, 0), 4: (20, 0.2, 5, 2), 8: (20, 0.2, 5, 1), 16: (20, 0.5, 10, 0.1)},
    ("resnet110", "svhn"): {2: (1, 0.1, 0, 0), 4: (5, 0, 0.5, 0), 8: (5, 0, 0.5, 2), 16: (5, 0.2, 0.5, 1)},
}
# With --split balanced (official local_loss_scale_for_memory_balance).
BALANCED_LAMBDAS = {
    ("resnet32", "cifar10"): {2: (5, 0.1, 0, 0), 3: (5, 0, 5, 0.1), 4: (5, 0, 0, 0.1), 8: (5, 0, 0, 2)},
    ("resnet110", "cifar10"): {2: (5, 0.1, 0, 0), 3: (5, 0, 5, 0.1), 4: (5, 0, 0, 0.1)},
}


def aux_head(channels, out, hidden=128):
    """InfoPro's `1c2f` head on a C-channel map: conv3x3 (C -> 32 / 64 / 64, stride 2 / 2 / 1 for
    C = 16 / 32 / 64, no bias)-BN-ReLU, global average pool, Linear(., 128)-ReLU-Linear(128, out)."""
    if channels not in (16, 32, 64):
        common.die(f"the 1c2f aux head takes 16, 32 or 64 channels, not {channels}; use a CIFAR ResNet")
    wide, stride = {16: (32, 2), 32: (64, 2), 64: (64, 1)}[channels]
    return nn.Sequential(nn.Conv2d(channels, wide, 3, stride, 1, bias=False), nn.BatchNorm2d(wide),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(wide, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


def supcon_loss(features, y, temperature=0.07):
    """Supervised contrastive loss (Khosla et al. 2020) with one view, as in InfoPro: anchors are the
    batch samples, positives the other samples of the same class; an anchor without positives
    contributes 0 but still counts in the mean. temperature = base_temperature, so no rescaling.
    Computed in at least float32 (also under --bf16: logits up to 1/0.07 need the precision)."""
    with torch.autocast(features.device.type, enabled=False):
        z = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=1)
        logits = z @ z.T / temperature
        logits = logits - logits.max(1, keepdim=True).values.detach()
        self_pair = torch.eye(len(y), dtype=torch.bool, device=y.device)
        log_prob = logits - logits.masked_fill(self_pair, float("-inf")).logsumexp(1, keepdim=True)
        positive = (y[:, None] == y[None, :]) & ~self_pair
        return -((log_prob * positive).sum(1) / positive.sum(1).clamp(min=1)).mean()


def conv_bn_relu(cin, cout, kernel, stride=1, bias=False):
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def imagenet_head(channels, out):
    """InfoPro's ImageNet aux head (no conv bias): conv1x1 (C -> 128), conv3x3 s2 (128 -> 256), conv3x3
    s2 (256 -> 512), conv1x1 (512 -> 2048), each BN-ReLU, global average pool, Linear(2048, out)."""
    return nn.Sequential(*conv_bn_relu(channels, 128, 1), *conv_bn_relu(128, 256, 3, 2), *conv_bn_relu(256, 512, 3, 2),
                         *conv_bn_relu(512, 2048, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, out))


class ImageNetDecoder(nn.Module):
    """InfoPro's ImageNet decoder: conv1x1 (C -> 128)-BN-ReLU, bilinear upsampling (align_corners) to
    I/4, conv3x3 (128 -> 32)-BN-ReLU, to I/2, conv3x3 (32 -> 12)-BN-ReLU, to I, conv3x3 (12 -> 3),
    sigmoid (all convs with bias)."""

    def __init__(self, channels, image_size):
        super().__init__()
        self.sizes = (image_size // 4, image_size // 2, image_size)
        self.stages = nn.ModuleList([nn.Sequential(*conv_bn_relu(channels, 128, 1, bias=True)),
                                     nn.Sequential(*conv_bn_relu(128, 32, 3, bias=True)),
                                     nn.Sequential(*conv_bn_relu(32, 12, 3, bias=True)),
                                     nn.Sequential(nn.Conv2d(12, 3, 3, 1, 1), nn.Sigmoid())])

    def forward(self, h):
        h = self.stages[0](h)
        for size, stage in zip(self.sizes, self.stages[1:]):
            h = stage(F.interpolate(h, size=(size, size), mode="bilinear", align_corners=True))
        return h


class Decoder(nn.Module):
    """InfoPro's reconstruction net: bilinear upsample to the image size (align_corners), conv3x3
    (C -> 12, bias)-BN-ReLU-conv3x3 (12 -> 3, bias)-sigmoid."""

    def __init__(self, channels, image_size, hidden=12):
        super().__init__()
        self.size = image_size
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, 1, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, 3, 3, 1, 1), nn.Sigmoid())

    def forward(self, h):
        return self.net(F.interpolate(h, size=(self.size, self.size), mode="bilinear", align_corners=True))


class LocalLoss(nn.Module):
    """The local objective of one module on its raw output h (before any context is added): the
    head's SupCon or CE loss, or with a decoder lam1 * BCE(decoder(h), image in [0, 1]) + lam2 * that."""

    def __init__(self, channels, loss, imagenet, data, weights=None):
        super().__init__()
        self.loss = loss
        self.head = (imagenet_head if imagenet else aux_head)(channels, 128 if loss == "contrast" else data.num_classes)
        decoder = ImageNetDecoder if imagenet else Decoder
        self.decoder = None if weights is None else decoder(channels, data.image_size)
        self.weights = weights
        self.register_buffer("mean", data.mean.clone(), persistent=False)  # to undo the normalisation
        self.register_buffer("std", data.std.clone(), persistent=False)

    def forward(self, h, x, y):
        out = self.head(h)
        task, logits = (supcon_loss(out, y), None) if self.loss == "contrast" else (F.cross_entropy(out, y), out)
        if self.decoder is None:
            return task, logits
        dtype = torch.promote_types(h.dtype, torch.float32)  # float32 under --bf16, float64 stays float64
        image = self.decoder(h).to(dtype)
        target = (x.detach() * self.std + self.mean).clamp(0, 1).to(dtype)
        with torch.autocast(h.device.type, enabled=False):  # BCE is not autocast-safe
            bce = F.binary_cross_entropy(image, target)
        return self.weights[0] * bce + self.weights[1] * task, logits


def image_encoder(channels, size, stride=1, hidden=12):
    """E: conv3x3 (3 -> 12, bias)-BN-ReLU-conv3x3 (12 -> C, bias)-BN-ReLU at full image resolution
    (stride 2 each on ImageNet), then average-pool to the target size."""
    return nn.Sequential(*conv_bn_relu(3, hidden, 3, stride, bias=True),
                         *conv_bn_relu(hidden, channels, 3, stride, bias=True),
                         nn.AdaptiveAvgPool2d(size))


def input_encoder(in_channels, channels, size):
    """R: conv1x1 (C_src -> C, bias)-BN-ReLU at the source resolution, then average-pool."""
    return nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(size))


class ContextNode(nn.Module):
    """The encoders of one split: `image` (E, or None) and `recent[r]`, the encoder of the module
    input r modules back (R)."""

    def __init__(self, image, recent):
        super().__init__()
        self.image, self.recent = image, nn.ModuleList(recent)

    def forward(self, h, x, sources):
        """The next module's input: detach(h) + E(x) + sum_r R_r(sources[r]), added out of place."""
        out = h.detach()
        if self.image is not None:
            out = out + self.image(x.detach())
        for encoder, source in zip(self.recent, sources):
            out = out + encoder(source)
        return out


class ContextSupply(nn.Module):
    """The K-1 context nodes. Node i turns module i's output h_i into module i+1's input
    in_{i+1} = detach(h_i) + E_i(x) + sum_r R_{i,r}(in_{i-r}), every source detached. The R sources
    are the most recent module inputs (context included), newest first; x is in_0, except in R1E,
    where the image reaches the next module through E only. Only encoders that are used are built."""

    def __init__(self, mode, image_shape, split_shapes, image_stride=1):
        super().__init__()
        self.use_image, self.depth = CONTEXT_MODES[mode]
        source_shapes = [] if self.use_image else [image_shape]  # R sources before node 0 (newest first)
        nodes = []
        for c, size, _ in split_shapes:
            image = image_encoder(c, size, image_stride) if self.use_image else None
            nodes.append(ContextNode(image, [input_encoder(s[0], c, size) for s in source_shapes[:self.depth]]))
            source_shapes.insert(0, (c, size, size))
        self.nodes = nn.ModuleList(nodes)

    def sources(self, x):
        """The R sources before node 0: the image, unless there are none or E carries it."""
        return [x] if self.depth and not self.use_image else []

    def forward(self, i, h, x, sources):
        """Node i: returns module i+1's input and the R sources after it."""
        out = self.nodes[i](h, x, sources)
        return out, [out.detach(), *sources][:self.depth]

    def compile(self, *args, **kwargs):
        """--compile compiles each piece of the model: here, each node."""
        for node in self.nodes:
            node.compile(*args, **kwargs)


def method_args(parser):
    parser.add_argument("--context", default="E", help=f"context mode: {' | '.join(CONTEXT_MODES)} (default E)")
    parser.add_argument("--loss", default=None, help="local loss of the aux heads: contrast (SupCon, tau 0.07; "
                        "the default) | ce (cross-entropy; the default on ImageNet)")
    parser.add_argument("--reconstruct", action="store_true",
                        help="add InfoPro's decoder term: lam1 * BCE + lam2 * aux loss (official --h_reconstruct)")
    parser.add_argument("--lambdas", type=float, nargs=4, default=None, metavar=("IXX_1", "IXY_1", "IXX_2", "IXY_2"),
                        help="with --reconstruct: lam1, lam2 of the first and last local module, linear in "
                        "between (default: the official table for the arch, dataset and K)")


def loss_weights(args, k):
    """(lam1, lam2) of each of the K-1 local modules, linear in the module index from
    (ixx_1, ixy_1) to (ixx_2, ixy_2)."""
    table = (BALANCED_LAMBDAS if args.split == "balanced" else LAMBDAS).get((args.arch, args.dataset), {})
    scale = args.lambdas or table.get(k)
    if scale is None:
        split = " with --split balanced" if args.split == "balanced" else ""
        common.die(f"--reconstruct has no official loss weights for {args.arch} on {args.dataset} at --k {k}"
                   f"{split}; pass --lambdas IXX_1 IXY_1 IXX_2 IXY_2 (e.g. --lambdas 5 1 0 0)")
    args.lambdas = list(scale)  # the values used, for args.json and --resume
    ixx1, ixy1, ixx2, ixy2 = scale
    ratios = [i / (k - 2) if k > 2 else 0.0 for i in range(k - 1)]
    return [(ixx1 * (1 - r) + ixx2 * r, ixy1 * (1 - r) + ixy2 * r) for r in ratios]


def build_aux(args, net, modules, data):
    """A ModuleDict: "local", the loss nets of modules 1..K-1 (training only), and "context", the
    context encoders (part of the inference network)."""
    k, imagenet = len(modules), args.arch in common.IMAGENET_ARCHS
    loss = args.loss or ("ce" if imagenet else "contrast")
    if args.context not in CONTEXT_MODES:
        common.die(f"unknown --context {args.context!r}: choose one of {', '.join(CONTEXT_MODES)}")
    depth = CONTEXT_MODES[args.context][1]
    if depth >= 2 and k < max(depth, 4):
        common.die(f"--context {args.context} needs --k {max(depth, 4)} or more (the official code allows "
                   f"R2 and R4 from K=4, R8 from K=8, R16 at K=16); use more modules or a smaller Rn")
    if loss not in LOSSES:
        common.die(f"unknown --loss {loss!r}: choose contrast or ce")
    if args.lambdas is not None and not args.reconstruct:
        common.die("--lambdas weights the decoder term; add --reconstruct or drop --lambdas")
    args.loss = loss  # the value used, for args.json and --resume
    shapes = common.layer_shapes(net, data.image_size)
    split_shapes = [shapes[m[-1]] for m in modules[:-1]]  # (C, S, S) of each module's output but the last
    weights = loss_weights(args, k) if args.reconstruct and k > 1 else [None] * (k - 1)
    local = nn.ModuleList(LocalLoss(c, loss, imagenet, data, w) for (c, _, _), w in zip(split_shapes, weights))
    context = ContextSupply(args.context, (3, data.image_size, data.image_size), split_shapes, 2 if imagenet else 1)
    return common.init_weights(nn.ModuleDict({"local": local, "context": context}))


def local_step(net, modules, aux, args, i, h, x, y):
    """Module i: context node i-1 builds its input from h = (module i-1's detached raw output, the
    R sources), so node i-1's encoders train with module i's loss; then the forward and the local
    loss on the raw output, before any context is added (the last module: the network head's CE).
    Returns (raw output, R sources), the loss and the head's logits (None for SupCon);
    common.run_modules back-propagates the loss at once and detaches the output."""
    local, context = aux["local"], aux["context"]
    if i == 0:
        h, sources = x, context.sources(x)
    else:
        h, sources = context(i - 1, h[0], x, h[1])
    out = net.run(modules[i], h)
    if i == len(local):
        logits = net.head(out)
        return (out, sources), F.cross_entropy(logits, y), logits
    return (out, sources), *local[i](out, x, y)


def predict(net, modules, context, x):
    """Inference: the backbone with its context nodes (the encoders are part of the network)."""
    h, sources = x, context.sources(x)
    for i, layers in enumerate(modules[:-1]):
        h, sources = context(i, net.run(layers, h), x, sources)
    return net.head(net.run(modules[-1], h))


# ================================= END METHOD =====================================================


def main(argv=None):
    args = common.parse_args(argv, __doc__, "contsup", k=16, epochs=160, add_method_args=method_args)
    run = common.Run(args)
    data = common.load_data(args, run.device)
    net = common.build_backbone(args, data, run.device)
    modules = common.make_modules(args, net, data)
    aux = build_aux(args, net, modules, data).to(run.device)
    model = nn.ModuleDict({"net": net, "aux": aux["local"], "context": aux["context"]})
    opt = common.make_optimizer(args, model)
    step = functools.partial(local_step, net, modules, aux, args)
    for epoch in run.start(model, opt, data, modules, step):
        lr, train = common.train_epoch(run, args, data, model, opt, epoch, step)
        test = common.evaluate(run, args, data, model, functools.partial(predict, net, modules, aux["context"]))
        run.end_epoch(epoch, lr, train, test, model, opt)
        if run.done():
            break
    return run.finish(model, modules)


if __name__ == "__main__":
    main()
