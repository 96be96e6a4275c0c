"""hpff.py: the official head sizes and windows, the loss weights, the gradient each loss sends (across
one module boundary, not two), memory, learning, and the refused --pipeline."""
import functools

import pytest
import torch
import torch.nn.functional as F

import common
import hpff
from conftest import (QUICK, GradientSum, build_method, gradient_dependence, module_inputs, module_params, run_script,
                      saved_tensor_peak, train_step)


def build(k, arch="resnet32", *extra):
    return build_method("hpff", *QUICK, "--arch", arch, "--k", k, *extra)


def batch(data, n=8, size=16):
    """A few training images, cropped to size x size (the nets are convolutional; it keeps CPU tests fast)."""
    return data.normalize(data.train_x[:n, :, :size, :size]), data.train_y[:n]


def layer(stage, block, n):
    """Layer index of block `block` of stage `stage` (both as the official config writes them)."""
    return 1 + (stage - 1) * n + block


def test_head_sizes_are_the_official_ones():
    """auxiliary_net.py: Decoder (four quadrant decoders) and AuxClassifier('2c2f', feature_dim 128)."""
    for channels, decoder, head in ((16, 8_364, 19_466), (32, 15_276, 65_162), (64, 29_100, 83_594)):
        assert common.count_params(hpff.PatchDecoder(channels)) == decoder
        assert common.count_params(hpff.Head2c2f(channels, 10)) == head


@functools.lru_cache(maxsize=None)
def cifar_build(arch, k):
    """(modules, aux) of hpff.py for a CIFAR ResNet, built without loading data (read-only in the tests)."""
    args = common.parse_args(["--arch", arch, "--k", str(k), "--out", "x"], "", "hpff", 15, 400, hpff.method_args)
    net = common.cifar_resnet(arch, 10)
    data = type("Data", (), {"image_size": 32, "num_classes": 10, "mean": torch.zeros(1, 3, 1, 1),
                             "std": torch.ones(1, 3, 1, 1)})
    modules = common.split_modules(arch, len(net.layers), k)
    return modules, hpff.build_aux(args, net, modules, data)


@pytest.mark.parametrize("arch,k,windows,total", [
    ("resnet32", 15, 13, 1_702_336),    # the code's K=16 (the README's command)
    ("resnet32", 8, 6, 778_368),
    pytest.param("resnet110", 16, 14, 1_749_632, marks=pytest.mark.slow),
    pytest.param("resnet110", 54, 52, 6_761_728, marks=pytest.mark.slow),   # the code's K=55
])
def test_aux_parameters_equal_the_official_models_used_heads(arch, k, windows, total):
    _, aux = cifar_build(arch, k)
    assert len(aux) == windows and common.count_params(aux) == total


def test_windows_are_the_official_split():
    """Our --k 15 / --k 54 are the code's K=16 / K=55 (the stem in module 0, one block per module);
    code K=8 (ResNet-32) and K=16 (ResNet-110) are the shared official splits. Window i ends at
    module i = 1..K-2, whose last block is the code's config[i]; module 0 ends no window."""
    modules, aux = cifar_build("resnet32", 15)
    assert modules == [[0, 1]] + [[j] for j in range(2, 16)]
    assert [m[-1] for m in modules[1:-1]] == list(range(2, 15))  # blocks 1.1 .. 3.3
    assert [w.cascade.convs[0].in_channels for w in aux] == [16] * 4 + [32] * 5 + [64] * 4
    assert common.split_modules("resnet110", 55, 54) == [[0, 1]] + [[j] for j in range(2, 55)]
    modules = common.split_modules("resnet32", 16, 8)
    assert [m[-1] for m in modules[1:-1]] == [layer(s, b, 5) for s, b in ((1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2))]
    modules = common.split_modules("resnet110", 55, 16)
    ends = ((1, 4), (1, 7), (1, 10), (1, 13), (1, 16), (2, 1), (2, 4), (2, 7), (2, 11), (2, 15), (3, 1), (3, 5),
            (3, 9), (3, 13))
    assert [m[-1] for m in modules[1:-1]] == [layer(s, b, 18) for s, b in ends]
    modules, aux = cifar_build("resnet32", 16)  # the stem alone: one window more, (stem, block 1.0)
    assert modules[0] == [0] and len(aux) == 14 and aux[0].own.convs[0].in_channels == 16


@pytest.mark.parametrize("arch,k,code_k", [("resnet32", 15, 16),
                                           pytest.param("resnet110", 54, 55, marks=pytest.mark.slow)])
def test_loss_weights_are_the_official_ones_on_the_published_runs(arch, k, code_k):
    """The code's ratio i / (K_code - 2) with the README's 5 0.5 0 0: lambda1 = 5 (1 - r), lambda2 = lambda1 / 10."""
    _, aux = cifar_build(arch, k)
    for i, window in enumerate(aux, 1):
        r = i / (code_k - 2)
        assert window.ixx == pytest.approx(5 * (1 - r), rel=1e-12) and window.ixy == pytest.approx(0.5 * (1 - r), rel=1e-12)


def test_the_last_window_keeps_its_loss():
    """Where the code's K is the module count (ResNet-32 K=8) its ratio reaches 1 at the last window,
    which the README's weights turn into a zero loss; here r = i / (K - 1) stays below 1."""
    _, aux = cifar_build("resnet32", 8)
    assert [w.ixx for w in aux] == pytest.approx([5 * (1 - i / 7) for i in range(1, 7)], rel=1e-12)
    assert aux[-1].ixx > 0.7 and aux[-1].ixy > 0.07


def reference_gradients(net, modules, aux, x, y, imagenet=False):
    """Every parameter's gradient as the official code defines it, one loss at a time from the
    detached module inputs: window (i-1, i) from module i-1's input, 0.999 * (ixx * patch BCE + ixy
    * CE), plus 0.001 * CE of module i's independent head on module i alone; the final 0.999 *
    CE(head(modules K-2, K-1)) + 0.001 * CE(head(module K-1 alone)). ImageNet: cascaded terms only,
    weight 1."""
    grads = GradientSum([*net.parameters(), *aux.parameters()])
    add, inputs = grads.add, module_inputs(net, modules, x)
    image = x * aux[0].std + aux[0].mean
    w_cascade = 1.0 if imagenet else 0.999
    for i, window in enumerate(aux, 1):
        z = net.run(modules[i], net.run(modules[i - 1], inputs[i - 1]))
        add(window.ixx * window.decoder(z, image) + window.ixy * F.cross_entropy(window.cascade(z), y), w_cascade)
        if not imagenet:
            add(F.cross_entropy(window.own(net.run(modules[i], inputs[i])), y), 0.001)
    k = len(modules)
    add(F.cross_entropy(net.head(net.run(modules[k - 1], net.run(modules[k - 2], inputs[k - 2]))), y), w_cascade)
    if not imagenet:
        add(F.cross_entropy(net.head(net.run(modules[k - 1], inputs[k - 1])), y), 0.001)
    return grads.params, grads.total


@pytest.mark.slow
def test_gradients_are_those_of_the_windows():
    args, data, net, modules, aux = build(6)
    x, y = batch(data)
    params, expected = reference_gradients(net, modules, aux, x, y)
    train_step(hpff, net, modules, aux, args, x, y)
    for p, g in zip(params, expected):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_window_gradient_crosses_one_module_boundary_and_stops_at_the_next():
    """Perturbation check: window (1, 2)'s decoder and classifier reach modules 1 and 2 (across the
    1/2 boundary) and not module 0 (the window starts from module 0's detached output); module 2's
    independent head reaches module 2 only; the final loss modules 3 and 4; module 0 learns from
    window (0, 1) alone."""
    args, data, net, modules, aux = build(5)
    x, y = batch(data)
    groups = {**{f"M{j}": module_params(net, m) for j, m in enumerate(modules)},
              **{f"{part}{i}": list(getattr(w, part).parameters()) for i, w in enumerate(aux, 1)
                 for part in ("own", "decoder", "cascade")},
              "head": list(net.head.parameters())}

    changed_by = gradient_dependence(lambda: train_step(hpff, net, modules, aux, args, x, y), groups,
                                     (*net.parameters(), *aux.parameters()))

    assert changed_by(aux[1].cascade.parameters()) == {"M1", "M2", "cascade2"}
    assert changed_by(aux[1].decoder.parameters()) == {"M1", "M2", "decoder2"}
    assert changed_by(aux[1].own.parameters()) == {"M2", "own2"}
    assert changed_by(net.head.parameters()) == {"M3", "M4", "head"}
    assert changed_by(aux[0].cascade.parameters()) == {"M0", "M1", "cascade1"}


@pytest.mark.slow
def test_windows_keep_activation_memory_below_bp():
    """One backward per window: a window holds two blocks, the independent block and its heads,
    0.56 of BP's saved activations at K=15, batch 32 (one backward on the summed losses would hold
    every window at once, several times BP's)."""
    _, data, net, modules, aux = build(15)
    x, y = data.normalize(data.train_x[:32]), data.train_y[:32]
    bp_args, *_ = build_method("bp", *QUICK, "--k", "1")
    bp = saved_tensor_peak([net], lambda: train_step("bp", net, [list(range(16))], None, bp_args, x, y))
    args = build_method("hpff", *QUICK, "--k", "15")[0]
    local = saved_tensor_peak([net, aux], lambda: train_step(hpff, net, modules, aux, args, x, y))
    assert local < 0.6 * bp


def test_pipeline_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as stop:
        run_script("hpff", tmp_path / "run", "--pipeline")
    message = str(stop.value)
    assert message.startswith("error: hpff.py cannot pipeline its modules: each window trains two consecutive "
                              "modules") and "\n" not in message


def test_bad_lambdas_are_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match=r"--lambdas takes 4 weights >= 0"):
        run_script("hpff", tmp_path / "run", "--lambdas", "1", "2")


@pytest.mark.slow
def test_hpff_learns_on_synthetic(tmp_path):
    """K=3: one window (modules 0, 1) and the final one (1, 2). At K=4 the two reconstruction-heavy
    windows (lambda1 3.3 and 1.7 on four summed BCEs) leave the test accuracy near chance for the
    first 3 epochs of this short schedule."""
    summary = run_script("hpff", tmp_path / "run", "--k", "3", "--subset", "1024", "--epochs", "4", "--lr", "0.1")
    assert summary["method"] == "hpff" and summary["params"]["aux"] > 0
    assert summary["final_test_acc"] > 0.7  # chance is 0.1; measured 0.99


def test_imagenet_aux_nets_are_the_official_ones():
    """InfoProAux.py: on ResNet-101's 1024 x 14 x 14 cut, the decoder's 14 x 14 branch (228,995
    parameters) and the classifier (5,135,336 with 1000 classes); every branch reconstructs the image."""
    assert common.count_params(hpff.ImageNetDecoder(1024, 14, 224)) == 228_995
    assert common.count_params(hpff.ImageNetHead(1024, 1000)) == 5_135_336
    assert common.count_params(hpff.ImageNetHead(256, 1000)) == common.count_params(hpff.ImageNetHead(512, 1000)) - 256 * 128
    head = hpff.ImageNetHead(2048, 10)  # the official 2048 variant's BatchNorm widths do not match its convs
    assert head(torch.randn(2, 2048, 4, 4)).shape == (2, 10)
    for factor in (4, 8, 16, 32):
        decoder = hpff.ImageNetDecoder(64, 64 // factor, 64)
        assert decoder.convs(torch.randn(2, 64, 64 // factor, 64 // factor)).shape == (2, 3, 64, 64)


@pytest.mark.slow
def test_imagenet_gradients_are_those_of_the_official_imagenet_model():
    """Cascaded windows only, with the official constant weights 5 (BCE) and 0.75 (CE); the final
    loss the window's CE alone."""
    args, data, net, modules, aux = build_method("hpff", "--dataset", "imagenet", "--fake-data", "--image-size", "32",
                                                 "--arch", "resnet18", "--k", "4", "--device", "cpu")
    assert all(w.own is None for w in aux)
    assert args.lambdas == [5, 0.75, 5, 0.75] and [(w.ixx, w.ixy) for w in aux] == [pytest.approx((5, 0.75))] * 2
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, data.num_classes, (4,))
    x = (x - aux[0].mean) / aux[0].std
    params, expected = reference_gradients(net, modules, aux, x, y, imagenet=True)
    train_step(hpff, net, modules, aux, args, x, y)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
