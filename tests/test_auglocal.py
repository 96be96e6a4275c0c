"""auglocal.py: the official aux-net construction (as in the official AugLocal code), the K - d merge and
its generalisation to modules of several layers, gradient isolation and learning."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import auglocal
import common
from conftest import QUICK, assert_greedy_gradients, build_method, run_script

N_LAYERS = {"resnet32": 16, "resnet110": 55}


def build(arch="resnet32", k=16, depth=None, coeff=None, seed=0):
    argv = [*QUICK, "--arch", arch, "--k", str(k), "--seed", str(seed), "--subset", "64"]
    argv += ["--aux-depth", str(depth)] if depth is not None else []
    argv += ["--pyramid-coeff", str(coeff)] if coeff is not None else []
    return build_method("auglocal", *argv)  # build_aux merges `modules` in place


def plan(arch, k, depth, coeff=0.5):
    """(depth, selected layers) of every local module, from the split of K, as build_aux does it."""
    n = N_LAYERS[arch]
    modules = common.split_modules(arch, n, k)
    m = auglocal.merge_point(modules, n, depth)
    depths = auglocal.pyramid_depths(depth, m, coeff)
    return [(d, auglocal.aux_layer_ids(layers[-1], n, d)) for layers, d in zip(modules[:m], depths)]


def expand(runs):
    """{(first, last): value} -> list indexed by layer."""
    return [v for (a, b), v in sorted(runs.items()) for _ in range(a, b + 1)]


# §2.3, ResNet-32 K=16 with the pyramid (c = 0.5): layers copied by the aux net of layer l.
R32_SELECTED = {
    1: expand({(0, 13): [15]}),
    2: expand({(0, 2): [8, 15], (3, 3): [9, 15], (4, 6): [10, 15], (7, 7): [11, 15], (8, 10): [12, 15],
               (11, 11): [13, 15], (12, 12): [14, 15]}),
    3: [[5, 10, 15], [6, 10, 15], [6, 11, 15], [7, 11, 15], [8, 11, 15], [8, 12, 15],
        [10, 15], [11, 15], [12, 15], [12, 15], [12, 15], [13, 15]],
    4: [[4, 8, 11, 15], [4, 8, 12, 15], [5, 8, 12, 15], [6, 9, 12, 15],
        [8, 11, 15], [8, 12, 15], [9, 12, 15], [10, 12, 15], [10, 13, 15], [11, 13, 15], [12, 15]],
    5: [[3, 6, 9, 12, 15], [4, 7, 9, 12, 15], [5, 7, 10, 12, 15],
        [6, 9, 12, 15], [7, 10, 12, 15], [8, 10, 12, 15], [8, 10, 13, 15],
        [10, 12, 15], [10, 13, 15], [11, 13, 15]],
}
R110_FIRST = {2: [27, 54], 3: [18, 36, 54], 4: [14, 27, 40, 54], 5: [11, 22, 32, 43, 54]}
# §2.2 depth lists, (depth, number of consecutive layers) from layer 0.
DEPTHS = {
    "resnet32": {1: [(1, 14)], 2: [(2, 13)], 3: [(3, 6), (2, 6)], 4: [(4, 4), (3, 6), (2, 1)],
                 5: [(5, 3), (4, 4), (3, 3)]},
    "resnet110": {1: [(1, 53)], 2: [(2, 52)], 3: [(3, 25), (2, 26)], 4: [(4, 17), (3, 32), (2, 1)],
                  5: [(5, 12), (4, 25), (3, 12)]},
}
# §2.4 total aux parameters of the official model (10 classes), K = n; coeff 0 = no pyramid.
AUX_PARAMS = {
    ("resnet32", 1, 0.5): 806_412, ("resnet32", 2, 0.5): 1_341_058, ("resnet32", 3, 0.5): 1_511_608,
    ("resnet32", 4, 0.5): 1_705_390, ("resnet32", 5, 0.5): 1_684_388,
    ("resnet32", 3, 0): 1_844_664, ("resnet32", 4, 0): 2_075_566, ("resnet32", 5, 0): 2_244_068,
    ("resnet110", 1, 0.5): 3_166_354, ("resnet110", 3, 0.5): 7_240_702, ("resnet110", 5, 0.5): 10_279_466,
    ("resnet110", 5, 0): 13_516_714,
}


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_selected_layers_resnet32(depth):
    assert [ids for _, ids in plan("resnet32", 16, depth)] == R32_SELECTED[depth]


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_selected_layers_resnet110_first_layer(depth):
    assert plan("resnet110", 55, depth)[0][1] == R110_FIRST[depth]


@pytest.mark.parametrize("arch", ["resnet32", "resnet110"])
def test_pyramid_depths_use_round_half_to_even(arch):
    n = N_LAYERS[arch]
    for depth, runs in DEPTHS[arch].items():
        assert [d for d, _ in plan(arch, n, depth)] == [d for d, count in runs for _ in range(count)]
    assert auglocal.pyramid_depths(4, 11, 0.5)[10] == 2  # 2.5 rounds to 2 (half-up would give 3)
    assert auglocal.pyramid_depths(3, 12, 0) == [3] * 12  # coefficient 0: no pyramid


@pytest.mark.parametrize("arch", ["resnet32", "resnet110"])
def test_k_equal_n_trains_k_minus_d_modules(arch):
    """§2.1: cuts after layers 0..K'-2 with K' = K - d; the last module is the last d+1 layers."""
    n = N_LAYERS[arch]
    for depth in range(0, 6):
        modules = common.split_modules(arch, n, n)
        m = auglocal.merge_point(modules, n, depth)
        assert m + 1 == n - depth
        assert modules[:m] == [[i] for i in range(n - depth - 1)]
        assert sum(modules[m:], []) == list(range(n - depth - 1, n))


def test_default_resnet32_trains_14_modules():
    args, data, net, modules, aux = build()  # K=16, d=2 by default
    assert modules == [[i] for i in range(13)] + [[13, 14, 15]]
    assert len(aux) == 13
    assert common.count_params(aux) == AUX_PARAMS.get(("resnet32", 2, 0.5))


@pytest.mark.parametrize("arch,depth,coeff", AUX_PARAMS)
def test_aux_parameters_equal_the_official_model(arch, depth, coeff):
    args, data, net, modules, aux = build(arch, N_LAYERS[arch], depth, coeff)
    assert len(modules) == N_LAYERS[arch] - depth
    assert common.count_params(aux) == AUX_PARAMS[arch, depth, coeff]


def blocks(head):
    return [(b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0]) for b in head
            if isinstance(b, common.BasicBlock)]


def test_aux_blocks_are_fresh_with_the_official_strides_and_tail():
    args, data, net, modules, aux = build()  # ResNet-32, K=16, d=2
    expected = {range(0, 6): [(16, 32, 2), (32, 64, 2)], range(6, 7): [(32, 32, 1), (32, 64, 2)],
                range(7, 11): [(32, 64, 2), (64, 64, 1)], range(11, 13): [(64, 64, 1), (64, 64, 1)]}
    for layers, want in expected.items():
        for l in layers:
            assert blocks(aux[l]) == want, l
    assert not any(isinstance(m, nn.BatchNorm1d) for m in aux.modules())  # depth 2: no BN1d
    backbone = {p.data_ptr() for p in net.parameters()}
    assert not backbone & {p.data_ptr() for p in aux.parameters()}
    assert aux[0](torch.randn(2, 16, 32, 32)).shape == (2, 10)
    # depth 1: one 16->64 block with a single stride 2 (the leftover reduction is unused), BN1d, Linear
    _, _, _, _, aux1 = build(depth=1)
    assert blocks(aux1[0]) == [(16, 64, 2)]
    assert [type(m) for m in aux1[0]][-4:] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.BatchNorm1d, nn.Linear]
    # the counter carries an unused reduction to the next block
    assert auglocal.aux_strides(16, [64, 64, 64]) == [2, 2, 1]
    assert auglocal.aux_strides(16, [16, 32, 64, 64]) == [1, 2, 2, 1]


def test_depth_zero_is_a_linear_head_on_every_module():
    args, data, net, modules, aux = build(depth=0)
    assert len(modules) == 16 and len(aux) == 15
    assert [type(m) for m in aux[0]] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.BatchNorm1d, nn.Linear]


def test_generalised_rule_on_modules_of_several_layers():
    # ResNet-110 K=16 (3-4 blocks per module), d=3: the last non-final module ends at layer 50 < 54-3,
    # so nothing merges; the pyramid runs over K'-2 = 14 (i = 7 gives 2.5 -> 2).
    modules = common.split_modules("resnet110", 55, 16)
    args, data, net, merged, aux = build("resnet110", 16)
    assert merged == modules and len(aux) == 15
    assert [d for d, _ in plan("resnet110", 16, 3)] == [3] * 7 + [2] * 8
    assert plan("resnet110", 16, 3)[0] == (3, [19, 37, 54])  # after layer 2: round(2 + 52 j / 3)
    # ResNet-32 K=8 (2 layers each), d=4: the modules ending at 11 and 13 have <= 4 layers after them.
    args, data, net, merged, aux = build("resnet32", 8, depth=4)
    assert merged == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], list(range(10, 16))]
    assert [len(blocks(h)) for h in aux] == [4, 4, 3, 3, 2]  # round(4 - 1.5 i / 4): i = 4 gives 2.5 -> 2


@pytest.mark.slow
@pytest.mark.parametrize("k", [16, 55])
def test_resnet110_runs(tmp_path, k):
    """The generalised rule (K=16) and the paper's one layer per module (K=55, d=3: 52 modules)."""
    summary = run_script("auglocal", tmp_path / "run", "--arch", "resnet110", "--k", k, "--steps", "1",
                         "--batch-size", "16")
    modules = common.split_modules("resnet110", 55, 16) if k == 16 else [[i] for i in range(51)] + [[51, 52, 53, 54]]
    assert summary["k"] == k and summary["modules"] == modules
    assert summary["steps"] == 1 and summary["params"]["backbone"] == 1_730_714
    assert summary["params"]["aux"] == (AUX_PARAMS["resnet110", 3, 0.5] if k == 55 else summary["params"]["aux"]) > 0


def test_official_k_rule():
    """--k-rule official: K - d modules, the first K-d-1 layers one each, the rest one module (the
    official CIFAR code); the default splits into K modules first. Both agree at K = n."""
    def modules(k, *flags):
        _, _, _, modules, aux = build_method("auglocal", *QUICK, "--subset", "64", "--k", k, *flags)
        assert len(aux) == len(modules) - 1
        return modules
    assert modules(8, "--k-rule", "official") == [[0], [1], [2], [3], [4], list(range(5, 16))]
    assert modules(8) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13, 14, 15]]
    assert modules(4, "--k-rule", "official", "--aux-depth", "1") == [[0], [1], list(range(2, 16))]
    assert modules(16, "--k-rule", "official") == modules(16) == [[i] for i in range(13)] + [[13, 14, 15]]


@pytest.mark.slow
def test_summary_reports_the_merged_modules(tmp_path):
    summary = run_script("auglocal", tmp_path / "run", "--k", "16", "--aux-depth", "3", "--steps", "1")
    assert summary["modules"] == [[i] for i in range(12)] + [[12, 13, 14, 15]]
    assert summary["params"]["aux"] == AUX_PARAMS["resnet32", 3, 0.5]


@pytest.mark.parametrize("flags,message", [
    (["--aux-depth", "-1"], "--aux-depth must be 0 or more"),
    (["--pyramid-coeff", "1.5"], "--pyramid-coeff must be between 0"),
    (["--aux-depth", "15"], "leaves no local module"),
    (["--k-rule", "official", "--k", "3"], r"--k-rule official trains K - d modules \(here 1\)"),
])
def test_bad_input_is_one_clear_line(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run_script("auglocal", tmp_path / "run", *flags, "--steps", "1")


@pytest.mark.slow
def test_each_module_gets_exactly_the_gradient_of_its_own_local_loss():
    args, data, net, modules, aux = build(k=4)
    assert len(modules) == 4 and len(aux) == 3
    assert_greedy_gradients("auglocal", args, net, modules, aux, data.normalize(data.train_x[:32]), data.train_y[:32])


@pytest.mark.slow
def test_per_module_backward_keeps_activation_memory_low(tmp_path):
    bp_summary = run_script("bp", tmp_path / "bp", "--steps", "1")
    al = run_script("auglocal", tmp_path / "al", "--steps", "1")
    assert al["act_mem_bytes"] < 0.5 * bp_summary["act_mem_bytes"]


@pytest.mark.slow
def test_auglocal_learns_on_synthetic(tmp_path):
    summary = run_script("auglocal", tmp_path / "run", "--k", "4", "--subset", "1024", "--epochs", "4", "--lr", "0.1")
    assert summary["final_test_acc"] > 0.7  # chance is 0.1; measured 1.0 (d=2)


def imagenet_aux(arch, k, *flags, image_size=224, num_classes=1000):
    """Build an ImageNet backbone and its aux nets on the meta device (shapes only, no memory)."""
    args = common.parse_args(["--dataset", "imagenet", "--arch", arch, "--k", str(k), "--out", "x", *flags], "",
                             "auglocal", 16, 400, auglocal.method_args)
    with torch.device("meta"):
        net = common.imagenet_backbone(arch, num_classes)
        modules = common.split_modules(arch, len(net.layers), k)
        aux = auglocal.build_aux(args, net, modules, SimpleNamespace(image_size=image_size, num_classes=num_classes))
    return modules, aux


def test_imagenet_resnets_follow_the_official_imagenet_code():
    """§2.6: no K - d merge, depth truncated near the end, no pyramid, no BN1d, d = 4; the official
    aux parameter totals (1000 classes) and ResNet-34's layer-0 aux."""
    modules, aux = imagenet_aux("resnet34", 17)
    assert len(modules) == 17 and len(aux) == 16
    assert [len(blocks(h)) for h in aux] == [4] * 13 + [3, 2, 1]
    assert blocks(aux[0]) == [(64, 128, 2), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in aux.modules())
    assert common.count_params(aux) == 154_359_936
    modules, aux = imagenet_aux("resnet101", 34)
    assert len(aux) == 33 and common.count_params(aux) == 406_928_616
    assert all(type(b).__name__ == "Bottleneck" for b in aux[0][:4])
    assert [(b.conv1.in_channels, b.conv3.out_channels, b.conv2.stride[0]) for b in aux[0][:4]] == \
        [(64, 1024, 2), (1024, 1024, 2), (1024, 1024, 1), (1024, 2048, 2)]  # planes 256: the counter carries


def test_imagenet_vgg_aux():
    modules, aux = imagenet_aux("vgg13_bn", 10, image_size=32, num_classes=10)
    assert len(aux) == 9
    # layer 0 (64 wide) copies layers 2, 4, 7, 9 (128, 256, 512, 512): a max-pool before each width change
    kinds = [type(m).__name__ for m in aux[0]]
    assert kinds[:12] == ["MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU"] * 3
    assert kinds[12:] == ["Conv2d", "BatchNorm2d", "ReLU", "Flatten", "AdaptiveAvgPool1d", "Linear", "BatchNorm1d",
                          "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [m.out_channels for m in aux[0] if isinstance(m, nn.Conv2d)] == [128, 256, 512, 512]


@pytest.mark.slow
def test_imagenet_network_runs_a_step_with_one_layer_per_module_by_default(tmp_path):
    summary = run_script("auglocal", tmp_path / "run", "--dataset", "imagenet", "--fake-data", "--image-size", "32",
                         "--arch", "resnet18", "--batch-size", "4", "--steps", "1", "--device", "cpu", quick=False)
    assert summary["k"] == 9 and summary["steps"] == 1
    assert summary["modules"] == [[i] for i in range(9)]  # no merge on ImageNet


def test_imagenet_default_k_is_one_layer_per_module():
    """The official configs: ResNet-34 K=17, ResNet-101 K=34, VGG-13 K=10; the others likewise."""
    assert {a: auglocal.IMAGENET_K[a] for a in ("resnet34", "resnet101", "vgg13_bn")} == \
        {"resnet34": 17, "resnet101": 34, "vgg13_bn": 10}
    assert set(auglocal.IMAGENET_K) == set(common.IMAGENET_ARCHS)
    for arch, k in auglocal.IMAGENET_K.items():
        with torch.device("meta"):
            assert len(common.imagenet_backbone(arch, 10).layers) == k
    with pytest.raises(SystemExit, match="--k-rule official is the official CIFAR code's rule"):
        imagenet_aux("resnet18", 9, "--k-rule", "official")
