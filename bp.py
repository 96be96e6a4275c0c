"""bp.py: end-to-end backpropagation, the baseline every local-learning paper compares to.

The same backbone, data and protocol as the local methods, trained as one module (K=1): one
forward, one cross-entropy on the head, one backward. `--grad-checkpoint N` recomputes the forward
of N segments during backward instead of storing their activations (gradient checkpointing, Chen
et al. 2016), the memory baseline of InfoPro's Table 3. The recomputed forward leaves BatchNorm's
running statistics alone (they are put back after it), so the trained model is the same with and
without checkpointing.

Epochs: the default 160 is the InfoPro protocol, that of InfoPro's end-to-end rows (ContSup's
presumably come from it); `--epochs 400` is the protocol of AugLocal's and MLAAN's BP rows (both
codes train their BP baselines for 400 epochs).

    python bp.py --dataset synthetic --arch resnet32                 # CPU, a few minutes
    python bp.py --dataset cifar10 --arch resnet110 --grad-checkpoint 4
    torchrun --nproc_per_node=2 bp.py --dataset cifar10 --arch resnet32

BP has no official code of its own: the papers' baselines come from their codes run end to end
(InfoPro at K=1, AugLocal's `--rule BP`, MLAAN's K=1), which train as the shared protocol does.
Differences from them:
- ImageNet: InfoPro's recipe (90 epochs, global batch 1024, lr 0.4, cosine). DGL's end-to-end
  baseline (imagenet.py) trains 50 epochs at batch 256, lr 0.1 divided by 10 every 10 epochs, with
  torchvision's VGG head (Dropout included, as here); `--epochs 50 --batch-size 256 --lr 0.1` is
  the nearest, with the cosine schedule.
- MLAAN's ImageNet K=1 branch trains without the stem's max-pool, which its evaluation uses; here
  both use it.
"""
import contextlib
import functools

import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common

# ================================= METHOD: BP =====================================================


NO_PIPELINE = "end-to-end training is one module"  # --pipeline is refused with this reason


def method_args(parser):
    parser.add_argument("--grad-checkpoint", type=int, default=0, metavar="N",
                        help="recompute activations in N segments during backward (0: off)")


def build_aux(args, net, modules, data):
    """End to end: no auxiliary networks, one module."""
    if args.k != 1:
        common.die(f"bp.py trains end to end, so --k must be 1 (got {args.k}); local methods take --k")
    if not 0 <= args.grad_checkpoint <= len(net.layers):
        common.die(f"--grad-checkpoint must be from 0 to {len(net.layers)} (the number of layers)")
    return nn.ModuleList()


@functools.cache
def checkpoint_segments(layers, n):
    """The layers cut into n contiguous segments of about equal length."""
    cuts = common.even_cuts([1] * len(layers), n)
    return [[layers[i] for i in seg] for seg in common.modules_from_cuts(cuts, len(layers))]


@contextlib.contextmanager
def buffers_restored(net, layers):
    """Put back the buffers of the layers (BatchNorm's running statistics and num_batches_tracked)
    when the block ends: the forward recomputed in backward must not count the batch twice."""
    buffers = [b for i in layers for b in net.layers[i].buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:  # checkpoint may end the recomputation early, by an exception
        for b, before in zip(buffers, saved):
            b.copy_(before)


def checkpoint_contexts(net, layers):
    """checkpoint's context_fn: the forward as usual, the recomputation leaves the buffers as they were."""
    return contextlib.nullcontext(), buffers_restored(net, layers)


def local_step(net, modules, aux, args, i, h, x, y):
    """The one module: forward through every layer and the head, cross-entropy (common.run_modules
    back-propagates it)."""
    (layers,) = modules
    if args.grad_checkpoint:
        for segment in checkpoint_segments(tuple(layers), args.grad_checkpoint):
            h = checkpoint(net.run, segment, h, use_reentrant=False,
                           context_fn=functools.partial(checkpoint_contexts, net, segment))
    else:
        h = net.run(layers, h)
    logits = net.head(h)
    return h, F.cross_entropy(logits, y), logits


# ================================= END METHOD =====================================================


def main(argv=None):
    args = common.parse_args(argv, __doc__, "bp", k=1, epochs=160, add_method_args=method_args,
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
