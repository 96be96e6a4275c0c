"""mlaan.py: leap tables, the gradients of the cascaded windows, the EMA copies, inference, learning."""
import pytest
import torch
import torch.nn.functional as F

import common
import mlaan
from conftest import (QUICK, GradientSum, build_method, checkpoint_state, gradient_dependence, module_inputs,
                      module_params, run_script, train_step)


def build(k, base="plain", arch="resnet32", *extra):
    return build_method("mlaan", *QUICK, "--arch", arch, "--k", k, "--base", base, *extra)


def batch(data, n=8, size=16):
    """A few training images, cropped to size x size (the nets are convolutional; it keeps CPU tests fast)."""
    return data.normalize(data.train_x[:n, :, :size, :size]), data.train_y[:n]


def blocks(spec, n):
    """'2.0 3.0 3.2 3.4' -> layer indices (block b of stage s is layer 1 + (s-1)*n + b)."""
    return [1 + (int(s) - 1) * n + int(b) for s, b in (blk.split(".") for blk in spec.split())]


# The official leap tables (the official MLAAN code, configAuxPlus_new.py), by the code's module index i.
SPEC_TABLES = {
    ("resnet32", 15): {**dict.fromkeys([0, 1, 3], "2.0 3.0 3.2 3.4"), **dict.fromkeys([2, 4], "2.0 3.0 3.3 3.4"),
                       **dict.fromkeys(range(5, 10), "3.0 3.2 3.3 3.4"),
                       10: "3.1 3.2 3.4", 11: "3.2 3.3 3.4", 12: "3.3 3.4", 13: "3.4"},
    ("resnet32", 8): {0: "2.0 3.0 3.2 3.4", 1: "2.0 3.0 3.2 3.4", 2: "2.0 3.0 3.3 3.4", 3: "3.0 3.2 3.3 3.4",
                      4: "3.0 3.2 3.3 3.4", 5: "3.2 3.3 3.4", 6: "3.3 3.4"},
    ("resnet110", 54): {**dict.fromkeys(range(18), "2.0 3.0 3.2 3.17"), **dict.fromkeys(range(18, 35), "3.0 3.2 3.3 3.17"),
                        35: "3.0 3.3 3.4 3.17", **dict.fromkeys(range(36, 43), "3.8 3.17"),
                        **dict.fromkeys(range(43, 47), "3.14 3.17"), **dict.fromkeys([47, 48], "3.15 3.17"),
                        **dict.fromkeys(range(49, 52), "3.16 3.17"), 52: "3.17"},
    ("resnet110", 32): {**dict.fromkeys(range(11), "2.0 3.0 3.2 3.17"), **dict.fromkeys(range(11, 21), "3.0 3.2 3.3 3.17"),
                        21: "3.0 3.3 3.4 3.17", **dict.fromkeys(range(22, 26), "3.8 3.17"),
                        26: "3.14 3.17", 27: "3.14 3.17", 28: "3.15 3.17", 29: "3.16 3.17", 30: "3.17"},
}
# ResNet-110 code K=32: the last block of each module (the official MLAAN code); not one of the shared splits.
R110_K32_ENDS = ([f"1.{b}" for b in (1, 2, 4, 5, 7, 9, 11, 13, 14, 16, 17)] + [f"2.{b}" for b in (1, 2, 4, 5, 7, 9, 11, 13, 14, 16, 17)]
                 + [f"3.{b}" for b in (1, 3, 4, 6, 7, 9, 11, 13, 15, 17)])


@pytest.mark.parametrize("arch,k,code_k,stem_alone", [("resnet32", 16, 15, True), ("resnet32", 15, 15, False),
                                                       ("resnet32", 8, 8, False), ("resnet110", 55, 54, True),
                                                       ("resnet110", 54, 54, False)])
def test_leap_paths_are_the_official_tables(arch, k, code_k, stem_alone):
    n = common.CIFAR_DEPTHS[arch]
    modules = common.split_modules(arch, 3 * n + 1, k)
    paths, source = mlaan.leap_paths(arch, modules, cifar_shapes(arch))
    assert source == f"the official table (code K={code_k})"
    code_paths = paths[1:] if stem_alone else paths  # with the stem as module 0, our module i+1 is the code's i
    table = SPEC_TABLES[(arch, code_k)]
    assert [code_paths[i] for i in range(code_k - 1)] == [blocks(table[i], n) for i in range(code_k - 1)]
    assert paths[-1] == []


def test_resnet110_k32_table_on_the_official_split():
    ends = blocks(" ".join(R110_K32_ENDS), 18)
    modules = common.modules_from_cuts(ends[:-1], 55)
    paths, source = mlaan.leap_paths("resnet110", modules, cifar_shapes("resnet110"))
    assert source == "the official table (code K=32)"
    assert paths[:-1] == [blocks(SPEC_TABLES[("resnet110", 32)][i], 18) for i in range(31)]
    assert common.split_modules("resnet110", 55, 32) != modules  # the shared K=32 split is an even one


def cifar_shapes(arch):
    return common.layer_shapes(common.cifar_resnet(arch, 10), 32)


def test_general_rule():
    stage, n = mlaan.stages(cifar_shapes("resnet32")), 5
    assert stage == [0] * 6 + [1] * 5 + [2] * 5  # the stem has stage 1's shape
    assert mlaan.general_leap(0, stage) == blocks("2.0 3.0 3.2 3.4", n)   # the stem
    assert mlaan.general_leap(3, stage) == blocks("2.0 3.0 3.2 3.4", n)   # ends in stage 1
    assert mlaan.general_leap(7, stage) == blocks("3.0 3.2 3.3 3.4", n)   # ends in stage 2
    assert mlaan.general_leap(11, stage) == blocks("3.3 3.4", n)          # ends at 3.0
    assert mlaan.general_leap(14, stage) == blocks("3.4", n)
    stage = mlaan.stages(cifar_shapes("resnet110"))
    assert mlaan.general_leap(5, stage) == blocks("2.0 3.0 3.2 3.17", 18)
    assert mlaan.general_leap(40, stage) == blocks("3.16 3.17", 18)
    # the stages of ImageNet ResNet-18 (stem, 2 blocks per stage) and VGG-13 (10 convs, 5 resolutions)
    assert mlaan.general_leap(1, [0, 0, 0, 1, 1, 2, 2, 3, 3]) == [3, 5, 7, 8]
    assert mlaan.general_leap(0, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]) == [2, 4, 6, 8, 9]


@pytest.mark.parametrize("arch", ["resnet32", "resnet110", "resnet50"])
def test_every_leap_path_fits_its_module(arch):
    """For every K and split: each path starts right where the module's output fits, runs forward,
    ends at the network's last block, and never uses the module's own or earlier layers."""
    size = 32 if arch in common.CIFAR_DEPTHS else 64
    net = common.cifar_resnet(arch, 10) if arch in common.CIFAR_DEPTHS else common.imagenet_backbone(arch, 10)
    shapes = common.layer_shapes(net, size)
    n_layers = len(net.layers)
    inputs = [(3, size, size)] + shapes[:-1]  # the input shape of every layer
    for split in ("official", "even", "balanced"):
        for k in range(2, n_layers + 1):
            modules = common.split_modules(arch, n_layers, k, split, size, [c * h * w for c, h, w in shapes])
            paths, _ = mlaan.leap_paths(arch, modules, shapes)
            for m, path in zip(modules[1:-1], paths[1:]):  # every module that can end a window
                assert path and path[-1] == n_layers - 1 and len(path) <= (4 if size == 32 else 5)
                assert path == sorted(set(path)) and path[0] > m[-1]
                assert inputs[path[0]] == shapes[m[-1]]
                assert all(inputs[b] == shapes[a] for a, b in zip(path, path[1:]))


def reference_gradients(net, modules, aux, base, x, y, imagenet=False):
    """Every trainable parameter's gradient as the official MLAAN code defines it, one loss at a
    time from the detached activations: window i = modules i-c+1..i + leap path, weight 0.999; the
    independent loss on module i alone, weight 0.001; the final CE on modules K-c..K-1, weight 1
    (ImageNet: 0.999, plus 0.001 * CE of module K-1 alone)."""
    c, k = 3 if imagenet else mlaan.BASES[base], len(modules)
    grads = GradientSum([p for p in (*net.parameters(), *aux.parameters()) if p.requires_grad])
    add, inputs = grads.add, module_inputs(net, modules, x)
    for window, i in zip(aux, range(c - 1, k - 1)):
        h = inputs[i - c + 1]
        for j in range(i - c + 1, i + 1):
            h = net.run(modules[j], h)
        z = window.leap[0](h) + window.ema(h)
        for block in window.leap[1:]:
            z = block(z)
        add(window.cascade(z, x, y)[0], 0.999)
        add(window.own(net.run(modules[i], inputs[i]), x, y)[0], 0.001)
    h = inputs[k - c]
    for layers in modules[k - c:]:
        h = net.run(layers, h)
    add(F.cross_entropy(net.head(h), y), 0.999 if imagenet else 1.0)
    if imagenet:
        add(F.cross_entropy(net.head(net.run(modules[-1], inputs[k - 1])), y), 0.001)
    return grads.params, grads.total


@pytest.mark.slow
@pytest.mark.parametrize("base,k", [("plain", 16), ("dgl", 5), ("infopro", 5)])
def test_gradients_are_those_of_the_windows(base, k):
    args, data, net, modules, aux = build(k, base)
    x, y = batch(data, size=32 if base == "infopro" else 16)  # the decoders reconstruct the full image
    params, expected = reference_gradients(net, modules, aux, base, x, y)
    train_step(mlaan, net, modules, aux, args, x, y)
    for p, g in zip(params, expected):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for w in aux for p in w.ema.parameters())


def build_imagenet(arch, k, base="plain"):
    return build_method("mlaan", "--dataset", "imagenet", "--fake-data", "--image-size", "32", "--arch", arch,
                        "--k", k, "--base", base, "--device", "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("base", ["plain", "dgl"])
def test_imagenet_gradients_are_those_of_the_official_imagenet_model(base):
    """Windows of 3 whatever the base, and the final loss mixed 0.999 : 0.001 with module K-1 alone."""
    args, data, net, modules, aux = build_imagenet("resnet18", 5, base)
    assert len(aux) == 5 - 3
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, data.num_classes, (4,))
    params, expected = reference_gradients(net, modules, aux, base, x, y, imagenet=True)
    train_step(mlaan, net, modules, aux, args, x, y)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


IMAGENET_TABLES = {  # the official MLAAN code, by the code's module index i (one block per module)
    ("resnet34", 16): ["2.0 2.1 3.0 4.0 4.2"] * 3 + ["2.1 3.0 4.0 4.2"] * 4 + ["3.1 4.0 4.1"] * 6
                      + ["4.1 4.1 4.2", "4.1 4.2"],
    ("resnet101", 33): ["2.0 3.0 4.0 4.2"] * 3 + ["3.0 4.0 4.1"] * 4 + ["4.0 4.1"] * 23 + ["4.1 4.2"] * 2,
}


@pytest.mark.parametrize("arch,code_k,stem_alone", [("resnet34", 16, False), ("resnet34", 16, True),
                                                    ("resnet101", 33, False), ("resnet101", 33, True)])
def test_imagenet_leap_paths_are_the_official_tables(arch, code_k, stem_alone):
    stage_blocks = {"resnet34": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}[arch]
    net = common.imagenet_backbone(arch, 1000)
    modules = common.split_modules(arch, len(net.layers), code_k + stem_alone)
    assert modules[0] == ([0] if stem_alone else [0, 1])
    paths, source = mlaan.leap_paths(arch, modules, common.layer_shapes(net, 64))
    assert source == f"the official table (code K={code_k})"
    layer = lambda blk: 1 + sum(stage_blocks[:int(blk.split(".")[0]) - 1]) + int(blk.split(".")[1])
    table = [[layer(b) for b in spec.split()] for spec in IMAGENET_TABLES[arch, code_k]]
    assert paths[stem_alone:-1] == table and paths[-1] == []


@pytest.mark.slow
def test_imagenet_heads_are_the_official_ones():
    """auxnet34.py: conv1x1 pair before the linear layer on 64/128-channel maps only; auxnet101.py:
    global pool + Linear everywhere; the cascaded head is global pool + Linear on the leap's output."""
    def head_params(arch, k):
        net = common.imagenet_backbone(arch, 1000)
        modules = common.split_modules(arch, len(net.layers), k)
        args = common.parse_args(["--dataset", "imagenet", "--arch", arch, "--k", str(k), "--out", "x"], "", "mlaan",
                                 16, 400, add_method_args=mlaan.method_args)
        data = type("Data", (), {"image_size": 224, "num_classes": 1000, "mean": None, "std": None})
        aux = mlaan.build_aux(args, net, modules, data)
        return ([common.count_params(w.own) for w in aux], [common.count_params(w.cascade) for w in aux],
                [common.count_params(w.leap) for w in aux])
    conv_pair = lambda c: 2 * c * c + 4 * c + 2 * c * c + 2 * c  # conv1x1 C->2C, BN, conv1x1 2C->C, BN
    linear = lambda c: c * 1000 + 1000
    own, cascade, _ = head_params("resnet34", 16)
    assert own == ([conv_pair(64) + linear(64)] + [conv_pair(128) + linear(128)] * 4 + [linear(256)] * 6
                   + [linear(512)] * 2)  # windows end at modules 2..14 (blocks 1.2 .. 4.1)
    assert cascade == [linear(512)] * 13
    own, cascade, leap = head_params("resnet101", 33)
    assert own == [linear(256)] + [linear(512)] * 4 + [linear(1024)] * 23 + [linear(2048)] * 2
    assert cascade == [linear(2048)] * 30


@pytest.mark.slow
def test_imagenet_leap_copies_are_drawn_anew():
    """The official ImageNet code re-initialises its leap and EMA copies; CIFAR copies the backbone."""
    _, _, net, _, aux = build_imagenet("resnet18", 5)
    window = aux[0]
    source = net.layers[window.ema_source]
    conv = lambda m: next(x for x in m.modules() if isinstance(x, torch.nn.Conv2d)).weight
    assert not torch.equal(conv(window.leap[0]), conv(source)) and not torch.equal(conv(window.ema), conv(source))
    assert not torch.equal(conv(window.leap[0]), conv(window.ema))
    _, _, net, _, aux = build(5, "plain")
    assert torch.equal(conv(aux[0].leap[0]), conv(net.layers[aux[0].ema_source]))


def test_imagenet_refuses_the_infopro_base():
    with pytest.raises(SystemExit, match="--base infopro is for the CIFAR ResNets"):
        build_imagenet("resnet18", 5, "infopro")


@pytest.mark.slow
def test_who_gets_which_gradient():
    """Perturbation check of the spec's table (windows of 3): a window's cascaded loss reaches exactly
    its 3 modules, its independent loss only its last module, the final CE only the last 3 modules."""
    args, data, net, modules, aux = build(5, "dgl", "resnet32", "--ema-decay", "1")
    x, y = batch(data)
    groups = {**{f"M{j}": module_params(net, m) for j, m in enumerate(modules)},
              **{f"own{i}": list(w.own.parameters()) for i, w in enumerate(aux, 2)},
              **{f"leap{i}": list(w.leap.parameters()) for i, w in enumerate(aux, 2)},
              **{f"cascade{i}": list(w.cascade.parameters()) for i, w in enumerate(aux, 2)},
              "head": list(net.head.parameters())}

    changed_by = gradient_dependence(lambda: train_step(mlaan, net, modules, aux, args, x, y), groups,
                                     (*net.parameters(), *aux.parameters()))

    assert changed_by(aux[1].cascade.parameters()) == {"M1", "M2", "M3", "leap3", "cascade3"}  # window i=3
    assert changed_by(aux[1].own.parameters()) == {"M3", "own3"}
    assert changed_by(net.head.parameters()) == {"M2", "M3", "M4", "head"}
    assert changed_by(aux[0].leap[0].parameters()) == {"M0", "M1", "M2", "leap2", "cascade2"}  # M0: window 2 only


@pytest.mark.slow
def test_ema_copies_follow_the_backbone_and_take_no_gradient():
    args, data, net, modules, aux = build(16, "plain", "resnet32", "--ema-decay", "0.9")
    paths, _ = mlaan.leap_paths("resnet32", modules, cifar_shapes("resnet32"))
    for i, window in enumerate(aux, 1):
        source = net.layers[paths[i][0]]
        assert window.ema_source == paths[i][0]
        for copy in (window.ema, window.leap[0]):  # both start from the backbone's initial weights
            assert copy is not source
            for a, b in zip(copy.state_dict().values(), source.state_dict().values()):
                assert torch.equal(a, b)
        assert not any(p.requires_grad for p in window.ema.parameters())
    with torch.no_grad():  # move the backbone away from the copies, as training does
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = [[p.clone() for p in w.ema.parameters()] for w in aux]
    backbone = [[p.clone() for p in net.layers[w.ema_source].parameters()] for w in aux]
    x, y = batch(data)
    train_step(mlaan, net, modules, aux, args, x, y)
    for w, before, target in zip(aux, ema, backbone):
        for p, e, t in zip(w.ema.parameters(), before, target):
            torch.testing.assert_close(p, 0.9 * e + 0.1 * t, rtol=0, atol=1e-6)
            assert p.grad is None and not torch.equal(p, e)
        assert all(p.grad is not None for p in w.leap.parameters())


@pytest.mark.slow
def test_inference_is_the_backbone_alone(tmp_path):
    out = tmp_path / "run"
    summary = run_script("mlaan", out, "--k", "8", "--epochs", "1")
    state = checkpoint_state(out)
    assert any(key.startswith("aux.") and ".ema." in key for key in state)
    args = common.parse_args(QUICK, "", "mlaan", 8, 400, add_method_args=mlaan.method_args)
    data = common.load_data(args, torch.device("cpu"))
    net = common.build_backbone(args, data, torch.device("cpu"))
    net.load_state_dict({key[4:]: v for key, v in state.items() if key.startswith("net.")})  # strict
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in data.test_batches(64))
    assert correct / len(data.test_y) == summary["final_test_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("base,k", [("plain", 16), ("dgl", 8), ("infopro", 8)])
def test_every_base_runs(tmp_path, base, k):
    summary = run_script("mlaan", tmp_path / "run", "--base", base, "--k", k, "--steps", "1", "--subset", "16",
                         "--batch-size", "16")
    assert summary["steps"] == 1 and summary["method"] == "mlaan"
    assert summary["params"]["aux"] > summary["params"]["backbone"]  # heads, leap paths and EMA copies


@pytest.mark.slow
def test_windows_keep_activation_memory_below_bp(tmp_path):
    """One backward per window: at K=16 a window holds about 0.57 of BP's saved activations (two
    blocks, the independent block, the leap path); one backward on the summed losses would hold
    every window at once, several times BP's."""
    bp = run_script("bp", tmp_path / "bp", "--steps", "1", "--subset", "64")
    ml = run_script("mlaan", tmp_path / "mlaan", "--k", "16", "--steps", "1", "--subset", "64")
    assert ml["act_mem_bytes"] < 0.7 * bp["act_mem_bytes"]


@pytest.mark.parametrize("args,message", [
    (["--k", "2"], r"--base plain cascades 2 modules per window, so --k must be at least 3"),
    (["--base", "dgl", "--k", "3"], r"--k must be at least 4"),
    (["--ema-decay", "1.5"], r"--ema-decay must be from 0 to 1"),
    (["--base", "e2e"], r"unknown --base 'e2e': choose plain"),
    (["--base", "infopro", "--lambdas", "1", "2"], r"--lambdas takes 4 weights"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run_script("mlaan", tmp_path / "run", *args)


@pytest.mark.slow
def test_mlaan_learns_on_synthetic(tmp_path):
    summary = run_script("mlaan", tmp_path / "run", "--k", "4", "--subset", "1024", "--epochs", "4", "--lr", "0.1")
    assert summary["final_test_acc"] > 0.7  # chance is 0.1; measured 0.97


def test_supcon_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    features, y = torch.randn(32, 128), torch.randint(0, 4, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mlaan.supcon_loss(features, y)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, mlaan.supcon_loss(features, y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [15, 16])
def test_infopro_lambdas_use_the_official_module_count(k):
    """resnetInfoProbin.py at code K=15 (ResNet-32, one block per module; our --k 15 and, with the stem
    as its own module, --k 16): ratio = stage / 13, λ1 = 5 (1 - ratio), λ2 = 0.5 (1 - ratio)."""
    _, _, _, modules, aux = build(k, "infopro")
    for window, i in zip(aux, range(len(modules) - len(aux) - 1, len(modules))):
        stage = 1 + (modules[i][-1] - 1) // 5 if modules[i][-1] > 0 else 1  # blocks 1-5, 6-10, 11-15
        ratio = stage / 13
        for loss in (window.own, window.cascade):
            assert loss.ixx == pytest.approx(5 * (1 - ratio), rel=1e-12)
            assert loss.ixy == pytest.approx(0.5 * (1 - ratio), rel=1e-12)


def test_imagenet_resnet34_zeroes_bn2_like_the_official_resnet34():
    """resnet34.py zeroes bn2.weight in every BasicBlock (backbone, leap and EMA copies); resnet101.py does not."""
    def blocks(arch, k):
        args = common.parse_args(["--dataset", "imagenet", "--arch", arch, "--k", str(k), "--out", "x"], "", "mlaan",
                                 16, 400, add_method_args=mlaan.method_args)
        net = common.imagenet_backbone(arch, 10)
        data = type("Data", (), {"image_size": 64, "num_classes": 10, "mean": None, "std": None})
        aux = mlaan.build_aux(args, net, common.split_modules(arch, len(net.layers), k), data)
        return [*net.layers[1:], *(b for w in aux for b in (*w.leap, w.ema))]
    resnet34 = blocks("resnet34", 16)  # 16 blocks, 13 windows: 13 EMA copies, 44 leap blocks
    assert len(resnet34) == 16 + 13 + 44 and all(not b.bn2.weight.any() and (b.bn1.weight == 1).all() for b in resnet34)
    assert all((m.weight == 1).all() for b in blocks("resnet101", 5) for m in b.modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_supcon_keeps_float64(float64):
    """Promoted to at least float32, never cast down (as infopro.py): float64 features give float64 SupCon."""
    import infopro
    torch.manual_seed(0)
    features, y = torch.randn(12, 128), torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 4, 4, 5])
    loss = mlaan.supcon_loss(features, y)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, infopro.supcon_loss(features, y), rtol=1e-12, atol=1e-12)
