"""predsim.py: the official heads (pool kernels, parameter counts), the similarity loss and its
target, the per-module loss and gradient isolation, memory, pipelining and learning."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import predsim
from conftest import QUICK, build_method, module_params, run_script, saved_tensor_peak, summed_backward, train_step


def build(k=4, arch="resnet32", *extra):
    return build_method("predsim", *QUICK, "--arch", arch, "--k", k, "--subset", "64", *extra)


def batch(data, n=16):
    return data.normalize(data.train_x[:n]), data.train_y[:n]


def official_aux(arch, k, image_size, num_classes=10, *flags):
    """The heads build_aux makes for a CIFAR ResNet at this image size (no data needed)."""
    args = common.parse_args(["--arch", arch, "--k", str(k), "--out", "unused", *flags], "", "predsim", 16, 400,
                             predsim.method_args)
    net = common.cifar_resnet(arch, num_classes)
    modules = common.split_modules(arch, len(net.layers), k)
    return modules, predsim.build_aux(args, net, modules, SimpleNamespace(image_size=image_size,
                                                                          num_classes=num_classes))


# The official AvgPool of the pred head (AugLocal's get_pool_layer with --hidden_dim 512) on the
# module output of C channels: (image size, C) -> (kernel, padding, pooled features, pred-head
# parameters for 10 classes).
POOLS = {(32, 16): ((8, 4), (0, 0), 512, 5_130), (32, 32): ((4, 4), (0, 0), 512, 5_130),
         (32, 64): ((4, 2), (0, 0), 512, 5_130), (96, 16): ((32, 16), (0, 0), 288, 2_890),
         (96, 32): ((16, 16), (0, 0), 288, 2_890), (96, 64): ((16, 8), (8, 0), 384, 3_850)}
SIM_PARAMS = {16: 2_304, 32: 9_216, 64: 36_864}  # conv3x3 C -> C, no bias


@pytest.mark.parametrize("size,channels", POOLS)
def test_pred_and_sim_heads_are_the_official_ones(size, channels):
    kernel, padding, features, pred_params = POOLS[size, channels]
    side = size * 16 // channels  # the map size of the CIFAR ResNet stages
    head = predsim.PredSimLoss(channels, side, side, 10)
    pool = head.pred[0]
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == kernel and pool.stride == kernel
    assert pool.padding == padding and pool.count_include_pad
    assert head.pred[-1].in_features == features and common.count_params(head.pred) == pred_params
    assert common.count_params(head.sim) == SIM_PARAMS[channels] and head.sim.bias is None
    h = torch.randn(3, channels, side, side)
    assert pool(h).flatten(1).shape == (3, features)
    loss, logits = head(h, torch.tensor([0, 1, 0]))
    assert logits.shape == (3, 10) and loss.shape == ()
    # A map small enough needs no pool; a 1 x 1 map is not pooled further.
    assert isinstance(predsim.pool_layer(8, 8, 8)[0], nn.Identity) and predsim.pool_layer(8, 8, 8)[1] == 512
    assert predsim.pool_layer(2048, 7, 7)[1] == 2048


# Total aux parameters of the official model (10 classes): (arch, K, image size) -> count.
AUX_PARAMS = {("resnet32", 16, 32): 284_310, ("resnet110", 55, 32): 1_113_372, ("resnet110", 16, 32): 284_310,
              ("resnet32", 16, 96): 254_550, ("resnet110", 55, 96): 1_008_732}


@pytest.mark.parametrize("arch,k,size", AUX_PARAMS)
def test_aux_parameters_equal_the_official_model(arch, k, size):
    modules, aux = official_aux(arch, k, size)
    assert len(aux) == k - 1
    assert common.count_params(aux) == AUX_PARAMS[arch, k, size]
    if k == {"resnet32": 16, "resnet110": 55}[arch]:  # the published split: one layer per module
        assert modules == [[i] for i in range(k)]
    # the Linear keeps PyTorch's default init (the original PredSim code zero-initialises it)
    assert aux[0].pred[-1].weight.abs().sum() > 0
    assert abs(aux[0].sim.weight.std().item() - (2 / (9 * 16)) ** 0.5) < 0.02  # the official conv init


def written_out_similarity(x):
    """The official similarity matrix, step by step: spatial std (N - 1), centre each row, divide by
    1e-8 + its norm, matrix product, clamp."""
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        n = flat.shape[2]
        x = (((flat - flat.mean(2, keepdim=True)) ** 2).sum(2) / (n - 1)).sqrt()
    x = x.reshape(x.shape[0], -1)
    centred = x - x.mean(1, keepdim=True)
    unit = centred / (1e-8 + (centred ** 2).sum(1, keepdim=True).sqrt())
    return (unit @ unit.T).clamp(-1, 1)


@pytest.mark.parametrize("classes", [10, 100])
def test_the_similarity_target_is_one_within_a_class_and_minus_one_over_classes_minus_one_across(classes):
    y = torch.tensor([0, 3, 0, 7, 3, 9, 0])
    target = predsim.similarity_matrix(F.one_hot(y, classes).double())
    expected = torch.where(y[:, None] == y[None, :], 1.0, -1 / (classes - 1)).double()
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-7)  # the 1e-8 in the norm: 1 - 2e-8 within
    torch.testing.assert_close(target, written_out_similarity(F.one_hot(y, classes).double()), rtol=0, atol=1e-15)


def test_similarity_of_a_feature_map_is_the_written_out_one():
    torch.manual_seed(0)
    h = torch.randn(6, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    got, want = predsim.similarity_matrix(h), written_out_similarity(h)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), h)[0], torch.autograd.grad(want.sum(), h)[0])
    assert got.shape == (6, 6) and torch.allclose(got.diagonal(), torch.ones(6, dtype=torch.float64))
    # one spatial value per channel (height 1): flattened instead of the std
    flat = torch.randn(5, 32, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(predsim.similarity_matrix(flat), written_out_similarity(flat.flatten(1)))
    # the loss is the MSE over all B^2 entries, diagonal included
    y = torch.tensor([0, 1, 0, 2, 1, 1])
    target = written_out_similarity(F.one_hot(y, 10).double())
    torch.testing.assert_close(predsim.sim_loss(h, y, 10), ((want - target) ** 2).sum() / 36)


def test_bf16_autocast_keeps_the_similarity_in_fp32():
    torch.manual_seed(0)
    h, y = torch.randn(8, 16, 8, 8), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = predsim.sim_loss(h, y, 10)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, predsim.sim_loss(h, y, 10), rtol=0, atol=0)


def test_each_module_gets_exactly_the_gradient_of_its_own_predsim_loss():
    args, data, net, modules, aux = build(4)
    x, y = batch(data)
    train_step(predsim, net, modules, aux, args, x, y)
    h = x
    for k, layers in enumerate(modules):
        own = module_params(net, layers) + list((aux[k] if k < len(aux) else net.head).parameters())
        out = net.run(layers, h.detach())
        if k < len(aux):  # 0.99 * MSE(S(conv3x3(h)), S(onehot(y))) + 0.01 * CE(Linear(AvgPool(h)), y)
            target = written_out_similarity(F.one_hot(y, 10).float())
            sim = F.mse_loss(written_out_similarity(aux[k].sim(out)), target)
            local = 0.99 * sim + 0.01 * F.cross_entropy(aux[k].pred(out), y)
        else:
            local = F.cross_entropy(net.head(out), y)
        expected = torch.autograd.grad(local, own)
        for p, g in zip(own, expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
        h = out


def test_each_backward_reaches_only_its_own_module_and_heads():
    """The official model's per-backward parameter sets: module i's loss touches module i's layers
    and its two heads, nothing before it (its input is detached) or after it."""
    args, data, net, modules, aux = build(16)
    x, y = batch(data, 8)
    owners = {p: i for i, layers in enumerate(modules) for p in module_params(net, layers)}
    owners.update({p: i for i, head in enumerate(aux) for p in head.parameters()})
    owners.update({p: len(modules) - 1 for p in net.head.parameters()})
    h = x
    for i in range(len(modules)):
        h, loss, _ = predsim.local_step(net, modules, aux, args, i, h, x, y)
        loss.backward()
        h = h.detach()
        touched = {owners[p] for p in owners if p.grad is not None}
        assert touched == set(range(i + 1)), i  # every module so far, each by its own backward
        own = [p for p, j in owners.items() if j == i]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own if p.dim() > 1), i
    # Changing later heads leaves the gradients of earlier modules untouched.
    before = [[p.grad.clone() for p in module_params(net, layers)] for layers in modules[:4]]
    for p in [*net.parameters(), *aux.parameters()]:
        p.grad = None
    with torch.no_grad():
        for p in [*aux[3].parameters(), *aux[9].parameters(), *net.head.parameters()]:
            p.mul_(1.5)
    train_step(predsim, net, modules, aux, args, x, y)
    after = [[p.grad for p in module_params(net, layers)] for layers in modules[:4]]
    for i in (0, 1, 2):
        assert all(torch.equal(a, b) for a, b in zip(before[i], after[i])), i
    assert not all(torch.equal(a, b) for a, b in zip(before[3], after[3]))  # the check can fail


def test_bad_input_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match=r"--beta is the weight of the similarity loss, between 0 and 1, got 1.5"):
        run_script("predsim", tmp_path / "a", "--beta", "1.5", "--subset", "64")
    with pytest.raises(SystemExit, match=r"--pred-dim must be at least 1, got 0"):
        run_script("predsim", tmp_path / "b", "--pred-dim", "0", "--subset", "64")


def test_options_change_the_heads():
    _, aux = official_aux("resnet32", 4, 32, 10, "--beta", "0.5", "--pred-dim", "2048")
    assert aux[0].beta == 0.5 and aux[0].pred[-1].in_features == 2048  # 16 x 32 x 32 pooled (4, 2): 16 x 8 x 16


def test_imagenet_networks_default_to_one_layer_per_module():
    assert set(predsim.IMAGENET_K) == set(common.IMAGENET_ARCHS)
    args = common.parse_args(["--dataset", "imagenet", "--arch", "resnet18", "--out", "x"], "", "predsim", 16, 400,
                             predsim.method_args, imagenet=dict(k=predsim.IMAGENET_K))
    with torch.device("meta"):
        for arch, k in predsim.IMAGENET_K.items():
            assert len(common.imagenet_backbone(arch, 10).layers) == k
        net = common.imagenet_backbone("resnet18", 1000)
        modules = common.split_modules("resnet18", 9, args.k)
        aux = predsim.build_aux(args, net, modules, SimpleNamespace(image_size=224, num_classes=1000))
    assert args.k == 9 and modules == [[i] for i in range(9)] and len(aux) == 8
    # stem 64 x 56 x 56 -> pooled (32, 16) to 64 x 2 x 4; the 512 x 7 x 7 block -> 512 x 1 x 1
    assert [a.pred[-1].in_features for a in aux] == [512, 512, 512, 512, 512, 512, 512, 512]
    assert aux[0].pred[0].kernel_size == (32, 16) and aux[-1].pred[0].kernel_size == (8, 8)


@pytest.mark.slow
def test_per_module_backward_keeps_activation_memory_low():
    """The published split (K=16) holds well under half of what end-to-end backprop holds, and a
    single backward of the summed losses would lose the saving."""
    args, data, net, modules, aux = build(16)
    bp_args = build_method("bp", *QUICK, "--subset", "64", "--k", "1", data=data)[0]
    x, y = batch(data, 64)

    def summed():
        summed_backward(predsim, net, modules, aux, args, x, y)

    local = saved_tensor_peak([net, aux], lambda: train_step(predsim, net, modules, aux, args, x, y))
    end_to_end = saved_tensor_peak([net], lambda: train_step("bp", net, [list(range(16))], None, bp_args, x, y))
    assert local < 0.5 * end_to_end
    assert local < 0.5 * saved_tensor_peak([net, aux], summed)


@pytest.mark.slow
def test_pipeline_equals_sequential_training(tmp_path):
    """The similarity loss needs the whole batch: the pipeline keeps it whole, so it is exact."""
    from test_pipeline import assert_same_run, sequential, torchrun
    args = ["--k", 4, "--epochs", 2, "--steps", 6]
    sequential("predsim", tmp_path / "seq", *args)
    proc = torchrun("predsim", tmp_path / "p2", 2, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "seq", tmp_path / "p2")


@pytest.mark.slow
def test_predsim_learns_on_synthetic(tmp_path):
    summary = run_script("predsim", tmp_path / "run", "--k", "2", "--subset", "1024", "--epochs", "4", "--lr", "0.1")
    # chance is 0.1; measured 0.99 (K=4: 0.76, slower: the pred heads, at weight 0.01, stay near chance,
    # and the channel-std similarity alone makes the features learn slowly)
    assert summary["final_test_acc"] > 0.7
