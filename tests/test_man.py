"""man.py: the official sizes and tables, the loss weights, the EMA rule, gradient isolation, memory, learning."""
import pytest
import torch
import torch.nn.functional as F

import common
import man
from conftest import QUICK, build_method, module_params, run_script, saved_tensor_peak, summed_backward, train_step


def build(k, arch="resnet32", *extra):
    return build_method("man", *QUICK, "--arch", arch, "--k", k, *extra)


def batch(data, n=8):
    return data.normalize(data.train_x[:n]), data.train_y[:n]


class FakeData:
    """What build_aux reads of a dataset."""
    def __init__(self, image_size=32, num_classes=10):
        self.image_size, self.num_classes = image_size, num_classes
        self.mean, self.std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)


def aux_of(arch, k, *extra, dataset="cifar10"):
    """The aux nets man.py builds for arch and K (no data read)."""
    imagenet = arch in common.IMAGENET_ARCHS
    args = common.parse_args(["--dataset", dataset, "--arch", arch, "--k", str(k), "--out", "x", *extra], "", "man",
                             16, 400, add_method_args=man.method_args)
    net = common.imagenet_backbone(arch, 1000) if imagenet else common.cifar_resnet(arch, 10)
    data = FakeData(224 if imagenet else 32, 1000 if imagenet else 10)
    modules = common.split_modules(arch, len(net.layers), k)
    return net, modules, man.build_aux(args, net, modules, data)


def trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_aux_piece_sizes_are_the_official_ones():
    """Per-piece sizes of the official model (2c2f CE head, 10 classes; InfoPro's decoder)."""
    assert [common.count_params(man.Head2c2f(c, 10)) for c in (16, 32, 64)] == [19_466, 65_162, 83_594]
    assert [common.count_params(man.Decoder(c, 32)) for c in (16, 32, 64)] == [2_091, 3_819, 7_275]
    for channels, size, stride in ((16, 32, 2), (32, 16, 2), (64, 8, 1)):
        head = man.Head2c2f(channels, 10)
        assert head[0].stride == (stride, stride) and head[3].stride == (1, 1)
        assert head(torch.randn(2, channels, size, size)).shape == (2, 10)
        assert man.Decoder(channels, 32)(torch.randn(2, channels, size, size)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("arch,k,lb,total", [
    ("resnet32", 15, 461_120, 1_346_598),    # the official "K=16" (stem merged into module 0)
    ("resnet32", 8, 208_960, 640_755),
    ("resnet32", 16, 461_120 + 4_672, 1_372_827),  # the stem alone as module 0: one 16-channel aux net more
    ("resnet110", 16, 416_768, 1_254_491),
    pytest.param("resnet110", 54, 1_724_928, 4_968_697, marks=pytest.mark.slow),  # the official "K=55"
])
def test_trainable_aux_parameters_equal_the_official_model(arch, k, lb, total):
    _, modules, aux = aux_of(arch, k)
    assert len(aux) == len(modules) - 1
    assert trainable(aux) == total                                     # LB + decoders + 2c2f heads
    assert sum(common.count_params(a.lb) for a in aux) == lb
    assert common.count_params(aux) == total + lb                      # + the frozen EMA copies
    assert all(not p.requires_grad for a in aux for p in a.ema.parameters())


def test_imagenet_aux_nets_are_the_official_ones():
    """The official ImageNet model's 512-channel decoder and classifier (ResNet-101 K=2), and the
    1024 form, layer by layer (convs, BN 2 per channel)."""
    conv = lambda a, b, k, bias=False: a * b * k * k + (b if bias else 0) + 2 * b
    assert common.count_params(man.ImageNetDecoder(512, 224)) == 106_699
    assert common.count_params(man.ImageNetHead(512, 1000)) == 4_643_560
    assert common.count_params(man.ImageNetDecoder(1024, 224)) == (
        conv(1024, 192, 1, True) + conv(192, 64, 1, True) + conv(64, 32, 3, True) + conv(32, 12, 3, True) + 12 * 3 * 9 + 3)
    assert common.count_params(man.ImageNetHead(1024, 1000)) == (
        conv(1024, 256, 1) + conv(256, 256, 3) + conv(256, 512, 3) + conv(512, 2048, 1) + 2048 * 1000 + 1000)
    sizes = []
    decoder = man.ImageNetDecoder(1024, 224)
    for stage in decoder.stages[1:]:
        stage.register_forward_hook(lambda module, inputs, output: sizes.append(inputs[0].shape[-1]))
    assert decoder(torch.randn(1, 1024, 14, 14)).shape == (1, 3, 224, 224) and sizes == [28, 56, 112, 224]


@pytest.mark.slow
def test_imagenet_resnet101_k2_is_the_official_model():
    net, modules, aux = aux_of("resnet101", 2, dataset="imagenet")
    assert modules[0] == [0, 1, 2, 3, 4] and aux[0].source == 5        # cut after layer2[0]; copies of layer2[1]
    assert common.count_params(aux[0].lb) == common.count_params(aux[0].ema) == 280_064
    assert (aux[0].ixx, aux[0].ixy) == (5, 0.75)                        # the official constants
    assert common.count_params(aux[0].decoder) == 106_699 and common.count_params(aux[0].head) == 4_643_560
    assert not torch.equal(aux[0].lb.conv1.weight, net.layers[5].conv1.weight)  # drawn anew, as there


def test_imagenet_next_block_that_opens_a_stage():
    """The official ImageNet code sizes the heads by module i's width, which breaks when the next block
    widens the map; here they take the copied block's output."""
    args, data, net, modules, aux = build_method("man", "--dataset", "imagenet", "--fake-data", "--image-size", "32",
                                                 "--arch", "resnet18", "--k", "3", "--device", "cpu")
    assert [a.source for a in aux] == [3, 6]   # layer2[0] and layer3[1]: 64 -> 128 channels, then 256
    assert aux[0].head[0].in_channels == 128 and aux[1].head[0].in_channels == 256
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, data.num_classes, (2,))
    loss, logits = train_step("man", net, modules, aux, args, x, y)
    assert torch.isfinite(loss) and logits.shape == (2, data.num_classes)


def blocks(spec, n):
    """'1.4 2.0' -> layer indices (block b of stage s is layer 1 + (s-1)*n + b)."""
    return [1 + (int(s) - 1) * n + int(b) for s, b in (blk.split(".") for blk in spec.split())]


# The official split tables (the official MAN code, networks/config.py, dict InfoPro): the last block of every
# module by code key. Module 0 also holds the stem.
EVERY = "every block"
CODE_TABLES = {
    "resnet32": {2: "2.1 3.4", 3: "1.4 2.4 3.4", 4: "1.2 2.1 3.0 3.4", 8: "1.0 1.2 1.4 2.1 2.3 3.0 3.2 3.4", 16: EVERY},
    "resnet110": {2: "2.8 3.17", 3: "1.17 2.17 3.17", 4: "1.11 2.7 3.3 3.17", 8: "1.4 1.11 2.0 2.7 2.14 3.3 3.10 3.17",
                  16: "1.1 1.4 1.7 1.10 1.13 1.16 2.1 2.4 2.7 2.11 2.15 3.1 3.5 3.9 3.13 3.17", 55: EVERY},
}


@pytest.mark.parametrize("arch", ["resnet32", "resnet110"])
def test_splits_are_the_official_tables(arch):
    n = common.CIFAR_DEPTHS[arch]
    for code_k, table in CODE_TABLES[arch].items():
        ends = list(range(1, 3 * n + 1)) if table == EVERY else blocks(table, n)
        k = len(ends)  # our --k: the number of modules (code "K=16" / "K=55" have 15 / 54)
        modules = common.split_modules(arch, 3 * n + 1, k)
        assert [m[-1] for m in modules] == ends and modules[0][0] == 0, code_k
        assert man.code_module_count(modules) == code_k
    assert man.code_module_count(common.split_modules(arch, 3 * n + 1, 3 * n + 1)) == 3 * n + 1  # stem alone


def test_next_blocks_and_loss_weights_are_the_official_ones():
    """ResNet-110 code K=16: the next blocks the official model copies; ResNet-32 code K=16 (our --k 15):
    lambda = (5, 0.5) * (1 - stage / 14), stage = that of the next block."""
    _, _, aux = aux_of("resnet110", 16)
    assert [a.source for a in aux] == blocks("1.2 1.5 1.8 1.11 1.14 1.17 2.2 2.5 2.8 2.12 2.16 3.2 3.6 3.10 3.14", 18)
    _, modules, aux = aux_of("resnet32", 15)
    assert [a.source for a in aux] == list(range(2, 16))
    stages = [1 + (a.source - 1) // 5 for a in aux]  # block 2.0 (layer 6) is stage 2: module 4's copies open it
    assert stages == [1] * 4 + [2] * 5 + [3] * 5
    for a, s in zip(aux, stages):
        assert a.ixx == pytest.approx(5 * (1 - s / 14), rel=1e-12) and a.ixy == pytest.approx(0.5 * (1 - s / 14), rel=1e-12)
    assert [round(a.ixx, 3) for a in aux[3:5] + aux[-1:]] == [4.643, 4.286, 3.929]
    assert [a.head[0].in_channels for a in aux] == [16] * 4 + [32] * 5 + [64] * 5


def test_loss_weights_never_go_negative():
    """The official ratio stage / (K - 2) passes 1 for K = 3, 4 (ResNet-32 K=4: lambda1 = -2.5 before
    stage 3); it is clamped at 1 here."""
    assert man.lambda_schedule((5, 0.5, 0, 0), [1, 2, 3], 4) == [(2.5, 0.25), (0, 0), (0, 0)]
    assert man.lambda_schedule((5, 0.5, 0, 0), [2], 2) == [(5, 0.5)]  # K=2: ratio 0
    _, _, aux = aux_of("resnet32", 4, "--lambdas", "2", "1", "0", "3")
    assert [(a.ixx, a.ixy) for a in aux] == [(1, 2), (0, 3), (0, 3)]


def test_each_module_gets_exactly_the_gradient_of_its_own_local_loss():
    """Written out as the official model computes it, from the module's detached input: lambda1 *
    BCE(sigmoid(decoder(LB(h) + EMA(h))), image) + lambda2 * CE(head(...)); the EMA copy takes no
    gradient; module i's loss reaches no other module, not even module i+1's block that LB and EMA copy."""
    args, data, net, modules, aux = build(4, "resnet32", "--lambdas", "1", "1", "0.5", "2")
    x, y = batch(data)
    target = x * data.std + data.mean
    expected, h = [], x
    for k, layers in enumerate(modules):  # before the step: the EMA copies as the step uses them
        out = net.run(layers, h.detach())
        if k < len(aux):
            z = aux[k].lb(out) + aux[k].ema(out)
            local = (aux[k].ixx * F.binary_cross_entropy(aux[k].decoder(z).sigmoid(), target)
                     + aux[k].ixy * F.cross_entropy(aux[k].head(z), y))
            own = module_params(net, layers) + [p for p in aux[k].parameters() if p.requires_grad]
        else:
            local, own = F.cross_entropy(net.head(out), y), module_params(net, layers) + list(net.head.parameters())
        expected.append((own, torch.autograd.grad(local, own)))
        h = out
    step = lambda i, h, x, y: man.local_step(net, modules, aux, args, i, h, x, y)
    h, owners = x, {}
    for k in range(len(modules)):
        h, _, _ = common.run_modules(step, [k], h, x, y)
        for p in (*net.parameters(), *aux.parameters()):  # every gradient so far comes from modules 0..k
            if p.grad is not None:
                owners.setdefault(p, k)
        own, grads = expected[k]
        assert {p for p, o in owners.items() if o == k} == set(own), k
        for p, g in zip(own, grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for a in aux for p in a.ema.parameters())


def test_ema_rule_uses_the_weights_of_the_step_before_the_update():
    """After a step: EMA_i = m * EMA_i + (1 - m) * (module i+1's first block before the optimizer
    step), computed in that order, every copy every step; evaluation (--module-acc) leaves them."""
    args, data, net, modules, aux = build(8, "resnet32", "--ema-decay", "0.9")
    with torch.no_grad():  # move the backbone away from the copies, as training does
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = [[p.clone() for p in a.ema.parameters()] for a in aux]
    before = [[p.clone() for p in net.layers[a.source].parameters()] for a in aux]
    assert [a.source for a in aux] == [m[0] for m in modules[1:]]
    model = torch.nn.ModuleDict({"net": net, "aux": aux})
    opt = common.make_optimizer(args, model)
    x, y = batch(data)
    train_step("man", net, modules, aux, args, x, y)
    opt.step()
    for a, old, source in zip(aux, ema, before):
        after = list(net.layers[a.source].parameters())
        for p, e, b, moved in zip(a.ema.parameters(), old, source, after):
            assert torch.equal(p, e * 0.9 + b * (1 - 0.9)) and not torch.equal(p, e)
            assert not torch.equal(b, moved)  # the step moved the block: the EMA took its weights before
            assert p.grad is None
    state = [p.clone() for p in aux.parameters()]
    model.eval()
    with torch.no_grad():
        common.run_modules(lambda i, h, x, y: man.local_step(net, modules, aux, args, i, h, x, y),
                           range(len(modules) - 1), x, x, y, backward=False)
    assert all(torch.equal(a, b) for a, b in zip(state, aux.parameters()))


def test_contrast_option_uses_supcon():
    args, data, net, modules, aux = build(3, "resnet32", "--loss", "contrast")
    assert [a.head[-1].out_features for a in aux] == [man.FEATURE_DIM] * 2
    x, y = batch(data)
    loss, _ = train_step("man", net, modules, aux, args, x, y)
    assert torch.isfinite(loss) and all(p.grad is not None for p in aux.parameters() if p.requires_grad)
    one = torch.randn(1, 16, requires_grad=True)
    assert man.supcon_loss(one, torch.tensor([3])).item() == 0


@pytest.mark.slow
def test_memory_well_below_bp_and_saved_by_the_per_module_backward():
    """Saved activations of one MAN step (a module's blocks, its LB and EMA copies and heads at a time)
    against bp.py's single backward through the network, and against one backward on MAN's summed
    losses. ResNet-32 at 32 px, the published K (15 modules): the first modules, with two extra
    32 x 32 blocks and a full-size decoder each, set the peak."""
    args, data, net, modules, aux = build(15)
    x, y = batch(data, 8)

    def summed():
        summed_backward(man, net, modules, aux, args, x, y)

    local = saved_tensor_peak([net, aux], lambda: train_step("man", net, modules, aux, args, x, y))
    bp = saved_tensor_peak([net, aux], lambda: F.cross_entropy(net(x), y).backward())
    assert local < 0.6 * bp  # measured 0.53 (K=8: 0.60, K=16: 0.50)
    assert local < 0.2 * saved_tensor_peak([net, aux], summed)  # measured 0.11


@pytest.mark.parametrize("args,message", [
    (["--pipeline"], r"man\.py cannot pipeline its modules: module i's auxiliary net holds an EMA copy of module "
                     r"i\+1's first block"),
    (["--loss", "mse"], r"unknown --loss 'mse': choose ce"),
    (["--ema-decay", "1.5"], r"--ema-decay must be from 0 to 1"),
    (["--lambdas", "1", "2", "3", "--subset", "16"], r"--lambdas takes 4 weights >= 0"),
])
def test_refusals_are_one_line(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run_script("man", tmp_path / "run", *args)


@pytest.mark.slow
def test_man_learns_on_synthetic(tmp_path):
    """K=2 with the README's weights (5, 0.5) and EMA decay 0.995, 48 steps of 32 images (deeper splits
    learn too slowly for a test: at first half of every aux net's input comes from a random EMA block,
    which follows its block with a time constant of 200 steps)."""
    summary = run_script("man", tmp_path / "run", "--k", "2", "--subset", "512", "--batch-size", "32", "--epochs", "3",
                         "--lr", "0.1")
    assert summary["params"]["aux"] == 2 * 18_560 + 3_819 + 65_162  # LB + EMA (block 2.2) + decoder + 2c2f head
    assert summary["final_test_acc"] > 0.3  # chance is 0.1; measured 0.54
