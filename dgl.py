"""dgl.py: Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon; ICML 2020, arXiv 1901.08164).

The backbone is cut into K gradient-isolated modules. Every module but the last has its own small
auxiliary classifier (the paper's `mlp-sr` head) trained with cross-entropy on the module's output;
the local loss is back-propagated at once and the output is detached before the next module, so
no gradient crosses a module boundary and each module's activations are freed right away. The last
module trains on the network's own head. Inference is the plain backbone.

    python dgl.py --dataset synthetic --arch resnet32 --k 4          # CPU, a few minutes
    python dgl.py --dataset cifar10 --arch resnet110 --k 16
    torchrun --nproc_per_node=2 dgl.py --dataset cifar10 --arch resnet32 --k 8

Epochs: the default 160 is the InfoPro protocol, that of InfoPro's DGL rows (its Table 2);
`--epochs 400` is the protocol of AugLocal's and MLAAN's DGL rows (both codes train their DGL
baselines for 400 epochs, with their own versions of the head). On ImageNet the default is DGL's
own 50 epochs.

Differences from the official code (eugenium/DGL):
- One Nesterov SGD step per batch over all parameters (the shared protocol) instead of one SGD
  optimizer per module stepped right after its backward. Because module j+1 consumes the output
  computed before module j's step, the two give the same update for plain SGD with momentum.
- The official `auxillary_classifier2` also allocates a BatchNorm2d(C) that only its `mlp=0` variant
  uses; mlp-sr never touches it, so it is left out: each head has 2C parameters fewer than the
  official one (14,378 / 54,858 / 214,154 instead of 14,410 / 54,922 / 214,282 for C = 16 / 32 / 64).
- Splits, schedule and data follow the shared protocol (README, Protocol), not the DGL paper's CNNs.
- ImageNet: the official batch 256, lr 0.1 and 50 epochs, but with the shared cosine schedule and
  Nesterov instead of the official step decay (lr / 10 every 10 epochs, optimizers re-created at
  each decay, which resets momentum) and plain momentum; no fp16 (use --bf16). The heads sit on
  the true feature size (the official ResNet code's size tracker halves at layer1 by mistake).
- ImageNet VGG follows the official DGL VGG model (imagenet_dgl/models/vgg.py), not torchvision's
  classifier: the last module's head is max-pool, 25088-4096-4096-classes with ReLU and no Dropout,
  and every Linear layer, of that head and of the aux heads, starts from N(0, 0.01) with bias 0 (its
  `_initialize_weights` covers the aux heads). The head keeps torchvision's AdaptiveAvgPool2d(7),
  the identity at 224 x 224 (the official head has none, so it only runs at 224).
"""
import functools
import math

import torch.nn as nn
import torch.nn.functional as F

import common

# ================================= METHOD: DGL ====================================================


class MlpSrHead(nn.Module):
    """DGL's mlp-sr auxiliary classifier on a (C, S, S) feature map: average-pool to ceil(S/4),
    three 1x1 conv-BN-ReLU at C channels, average-pool to 2x2, then three Linear(4C, 4C)-BN1d-ReLU
    (with bias) and Linear(4C, classes)."""

    def __init__(self, channels, size, num_classes, n_conv=3, n_mlp=3):
        super().__init__()
        self.pool_size = math.ceil(size / 4)
        self.convs = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
                                     for _ in range(n_conv)])
        width = 4 * channels
        self.mlp = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True))
                                   for _ in range(n_mlp)], nn.Linear(width, num_classes))

    def forward(self, h):
        h = self.convs(F.adaptive_avg_pool2d(h, self.pool_size))
        return self.mlp(F.adaptive_avg_pool2d(h, 2).flatten(1))


def method_args(parser):
    pass  # DGL has no options beyond the shared ones


def build_aux(args, net, modules, data):
    """One mlp-sr head on the output of every module but the last. VGG follows the official DGL VGG
    model: no Dropout in the network's head, every Linear (head and aux heads) N(0, 0.01), bias 0."""
    shapes = common.layer_shapes(net, data.image_size)
    heads = [MlpSrHead(shapes[m[-1]][0], shapes[m[-1]][1], data.num_classes) for m in modules[:-1]]
    heads = common.init_weights(nn.ModuleList(heads))
    if args.arch.startswith("vgg"):  # torchvision already draws the head's Linear layers N(0, 0.01)
        net.head[-1] = nn.Sequential(*[m for m in net.head[-1] if not isinstance(m, nn.Dropout)])
        for m in heads.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
    return heads


def local_step(net, modules, aux, args, i, h, x, y):
    """Module i on its input h: its output, the cross-entropy of its mlp-sr head (the last module's:
    of the network's head) and that head's logits. common.run_modules back-propagates the loss at
    once and detaches the output before module i+1."""
    h = net.run(modules[i], h)
    logits = (aux[i] if i < len(aux) else net.head)(h)
    return h, F.cross_entropy(logits, y), logits


# ================================= END METHOD =====================================================


def main(argv=None):
    args = common.parse_args(argv, __doc__, "dgl", k=16, epochs=160, add_method_args=method_args,
                             imagenet=dict(epochs=50, batch_size=256, lr=0.1))
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
