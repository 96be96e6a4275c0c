"""dgl.py: Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon; ICML 2020, arXiv 1901.08164).

The backbone is cut into K gradient-isolated modules. Every module but the last has its own small
auxiliary classifier (the paper's `mlp-sr` head) trained with cross-entropy on the module's output;
the local loss is back-propagated at once and the output is detached before the next module, so
no gradient crosses a module boundary and each module's activations are freed right away. The last
module trains on the network's own head. Inference is the plain backbone.

    python dgl.py --dataset synthetic --arch resnet32 --k 4          # CPU, a few minutes
    python dgl.py --dataset cifar10 --arch resnet110 --k 16
    torchrun --nproc_per_node=2 dgl.py --dataset cifar10 --arch resnet32 --k 8

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
    """One mlp-sr head on the output of every module but the last."""
    shapes = common.layer_shapes(net, data.image_size)
    heads = [MlpSrHead(shapes[m[-1]][0], shapes[m[-1]][1], data.num_classes) for m in modules[:-1]]
    return common.init_weights(nn.ModuleList(heads))


def train_step(net, modules, aux, args, x, y):
    """Per module: forward, local CE backward at once, detach. The last module trains on the head."""
    h = x
    for layers, head in zip(modules[:-1], aux):
        h = net.run(layers, h)
        F.cross_entropy(head(h), y).backward()
        h = h.detach()
    logits = net.head(net.run(modules[-1], h))
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.detach(), logits.detach()


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
    step = functools.partial(train_step, net, modules, aux, args)
    for epoch in run.start(model, opt, data):
        lr, train = common.train_epoch(run, args, data, model, opt, epoch, step)
        test = common.evaluate(run, args, data, model, net)
        run.end_epoch(epoch, lr, train, test, model, opt)
        if run.done():
            break
    return run.finish(model, modules)


if __name__ == "__main__":
    main()
