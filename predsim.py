"""predsim.py: PredSim (Nøkland, Eidnes; ICML 2019, arXiv 1901.06656), as AugLocal's code runs it.

The backbone is cut into K gradient-isolated modules. Every module but the last has two heads on
its output h (not detached). The prediction head average-pools h to at most 512 features (the
kernel doubled in height, then in width, until C x h' x w' <= 512), then a Linear classifier
trained by cross-entropy. The similarity head maps h by a conv3x3 (C->C, no bias), takes each
channel's spatial standard deviation, and matches the batch's B x B centred cosine-similarity
matrix of these to that of the one-hot labels (1 within a class, -1/(classes-1) across), by mean
squared error. The local loss is beta * sim + (1 - beta) * pred with beta = 0.99 in every module;
it is back-propagated at once and h is detached before the next module. The last module trains on
the network's own head (cross-entropy, weight 1). Inference is the plain backbone.

    python predsim.py --dataset synthetic --arch resnet32 --k 4     # CPU, a few minutes
    python predsim.py --dataset cifar10 --arch resnet32             # the published ResNet-32 run (K=16)
    python predsim.py --dataset cifar10 --arch resnet110 --k 55     # the published ResNet-110 run
    torchrun --nproc_per_node=4 predsim.py --dataset cifar10 --arch resnet110 --k 55 --pipeline

The official commands (AugLocal's run.sh, --rule PredSim; its PredSim baseline rows) train one
layer per module, the stem alone first: K=16 on ResNet-32 (the default here) and K=55 on
ResNet-110, the last module being the last block and the head, for 400 epochs (the default) with
the shared protocol (batch 1024, lr 0.8; STL-10 128, 0.1). Other K use the shared splits (README,
Protocol); the heads go on each module's last layer.

The similarity loss is a function of the whole batch (its B x B matrices; the MSE averages B^2
entries, so the batch size also sets its scale). Module-parallel training (--pipeline) keeps each
batch whole in every module and is exact. Under data parallelism (torchrun without --pipeline) each
process builds the matrices from its own shard only, as the official code would under
DataParallel and as InfoPro's contrastive loss does here: 8 processes at batch 1024 match 128 x 128
matrices, not 1024 x 1024 (the gradients are then averaged as usual).

Differences from the official code (ChenxiangMA/AugLocal, --rule PredSim):
- STL-10 has 10 classes. The official code tests `dataset in ['cifar10', 'sl10', 'svhn']` (typo) and
  so trains STL-10 with 100-way heads and a -1/99 similarity target.
- The pooling kernel is computed from the module output's actual size (the official head derives it
  as image_size * 16 / C and accepts only C in {16, 32, 64} at 32 or 96 px). On the CIFAR ResNets
  the kernels are the same: (8,4), (4,4), (4,2) at 32 px; (32,16), (16,16), (16,8) with vertical
  padding 8 at 96 px.
- K other than one layer per module: the official code's other split keys are prefix lists (the
  first K-1 layers one each, the rest one module); here every script's splits are used.
- The loss weights are --beta (sim) and 1 - beta (pred), the original's parametrisation, instead of
  the official --ixx / --ixy pair (run.sh: 0.99 / 0.01, the same thing). --pred-dim is the
  official --hidden_dim (512; the original PredSim code used 2048 or 4096).
- The row norm of the similarity matrix has gradient 0 at a constant row (the official
  sqrt(sum(x^2)) gives NaN there; the values are the same elsewhere). Under --bf16 the similarity
  matrices and their MSE are computed in fp32.
- Evaluation runs the backbone only (the official eval also runs the prediction heads, unused).
- ImageNet networks (a generalisation: neither AugLocal nor the original code has a PredSim recipe
  for them): one layer per module by default, as the original PredSim trains every layer locally
  (K=9 on ResNet-18, 17 on ResNet-34 and -50, 34 on ResNet-101 and ResNeXt-101, 51 on ResNet-152, 10
  on VGG-13), the same two heads (the pool stops at a 1 x 1 map, so the pred head's input is C there),
  and the shared ImageNet protocol (90 epochs, batch 1024, lr 0.4). The C -> C sim convs make the
  heads large on Bottleneck networks: 336M aux parameters on ResNet-101 (8.0M on ResNet-18).
"""
import functools
import math

import torch.nn as nn
import torch.nn.functional as F

import common

# ================================= METHOD: PredSim ================================================
import torch  # the method's own imports: the lines above the METHOD section are shared by all scripts

BETA = 0.99      # weight of the similarity loss; the prediction loss gets 1 - BETA (run.sh's ixx / ixy)
PRED_DIM = 512   # the prediction head pools h to at most this many features (official --hidden_dim)
# ImageNet default K: one layer per module, as the original PredSim trains each layer locally.
IMAGENET_K = {"resnet18": 9, "resnet34": 17, "resnet50": 17, "resnet101": 34, "resnet152": 51,
              "resnext101_32x8d": 34, "vgg13_bn": 10}


def pool_layer(channels, height, width, target=PRED_DIM):
    """The prediction head's average pool: double the kernel's height, then (if still too many) its
    width, until C x ceil(H/kh) x ceil(W/kw) <= target or the kernel is as tall as the map. Stride =
    kernel, padding centres the last partial window (zeros count in the mean). Returns the pool
    (Identity when none is needed) and the number of pooled features."""
    kh = kw = 1
    out_h, out_w = height, width
    while channels * out_h * out_w > target and kh < height:
        kh *= 2
        out_h = math.ceil(height / kh)
        if channels * out_h * out_w > target:
            kw *= 2
            out_w = math.ceil(width / kw)
    features = channels * out_h * out_w
    if kh == kw == 1:
        return nn.Identity(), features
    padding = (kh * (out_h - height // kh) // 2, kw * (out_w - width // kw) // 2)
    return nn.AvgPool2d((kh, kw), padding=padding), features


def similarity_matrix(x):
    """The B x B cosine similarity of the rows of x after centring each row over its features. A
    4-D map with more than 3 channels and height above 1 is first reduced to each channel's spatial
    standard deviation (unbiased); anything else is flattened."""
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        x = x.flatten(2).std(dim=2)
    x = x.flatten(1)
    centred = x - x.mean(dim=1, keepdim=True)
    unit = centred / (1e-8 + torch.linalg.vector_norm(centred, dim=1, keepdim=True))
    return (unit @ unit.T).clamp(-1, 1)


def sim_loss(features, y, num_classes):
    """MSE between the similarity matrices of the features and of the one-hot labels (fp32 at least)."""
    with torch.autocast(features.device.type, enabled=False):
        features = features.to(torch.promote_types(features.dtype, torch.float32))
        target = similarity_matrix(F.one_hot(y, num_classes).to(features.dtype))
        return F.mse_loss(similarity_matrix(features), target)


class PredSimLoss(nn.Module):
    """The two heads of one module and its loss beta * sim + (1 - beta) * pred: `pred` is
    AvgPool-Flatten-Linear(-> classes) with cross-entropy, `sim` a conv3x3 (C->C, no bias) whose
    output's similarity matrix is matched to the labels'."""

    def __init__(self, channels, height, width, num_classes, beta=BETA, pred_dim=PRED_DIM):
        super().__init__()
        self.num_classes, self.beta = num_classes, float(beta)
        self.sim = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        pool, features = pool_layer(channels, height, width, pred_dim)
        self.pred = nn.Sequential(pool, nn.Flatten(), nn.Linear(features, num_classes))

    def forward(self, h, y):
        logits = self.pred(h)
        loss = self.beta * sim_loss(self.sim(h), y, self.num_classes) + (1 - self.beta) * F.cross_entropy(logits, y)
        return loss, logits


def method_args(parser):
    parser.add_argument("--beta", type=float, default=BETA, metavar="B",
                        help="weight of the similarity loss; the prediction loss gets 1 - B (default: 0.99)")
    parser.add_argument("--pred-dim", type=int, default=PRED_DIM, metavar="D",
                        help="the prediction head average-pools the module output to at most D features "
                             "(default: 512)")


def build_aux(args, net, modules, data):
    """The two heads on the output of every module but the last. Convs get the official init
    (N(0, sqrt(2 / (9C)))), the Linear layers PyTorch's default, as in the official code."""
    if not 0 <= args.beta <= 1:
        common.die(f"--beta is the weight of the similarity loss, between 0 and 1, got {args.beta}")
    if args.pred_dim < 1:
        common.die(f"--pred-dim must be at least 1, got {args.pred_dim}")
    shapes = common.layer_shapes(net, data.image_size)
    heads = [PredSimLoss(*shapes[m[-1]], data.num_classes, args.beta, args.pred_dim) for m in modules[:-1]]
    return common.init_weights(nn.ModuleList(heads))


def local_step(net, modules, aux, args, i, h, x, y):
    """Module i on its input h: its output, its PredSim loss and its prediction head's logits (the
    last module: the network head's cross-entropy and logits). common.run_modules back-propagates
    the loss at once and detaches the output before module i+1."""
    h = net.run(modules[i], h)
    if i == len(aux):
        logits = net.head(h)
        return h, F.cross_entropy(logits, y), logits
    return h, *aux[i](h, y)


# ================================= END METHOD =====================================================


def main(argv=None):
    args = common.parse_args(argv, __doc__, "predsim", k=16, epochs=400, add_method_args=method_args,
                             imagenet=dict(k=IMAGENET_K))
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
