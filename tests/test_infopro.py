"""infopro.py: aux nets, the lambda schedule, SupCon, gradient isolation, memory, learning."""
import pytest
import torch
import torch.nn.functional as F

import common
import infopro
from conftest import QUICK, build_method, checkpoint_state, run_script, saved_tensor_peak, summed_backward, train_step


def build(k=4, arch="resnet32", *extra):
    return build_method("infopro", *QUICK, "--arch", arch, "--k", k, *extra)


def batch(data, n=16):
    return data.normalize(data.train_x[:n]), data.train_y[:n]


# Expected sizes, by hand from the layer lists of the official InfoPro code (conv weights + biases, BN 2 per channel).
def decoder_params(c):
    return (c * 12 * 9 + 12) + 2 * 12 + (12 * 3 * 9 + 3)


def head_params(c, out):
    width = {16: 32, 32: 64, 64: 64}[c]
    return c * width * 9 + 2 * width + (width * 128 + 128) + (128 * out + out)


def test_decoder_and_head_parameter_counts():
    assert [decoder_params(c) for c in (16, 32, 64)] == [2091, 3819, 7275]
    assert [head_params(c, 128) for c in (16, 32, 64)] == [25_408, 43_392, 61_824]
    for channels, size in ((16, 32), (32, 16), (64, 8)):
        decoder = infopro.Decoder(channels, 32)
        assert common.count_params(decoder) == decoder_params(channels)
        assert decoder(torch.randn(2, channels, size, size)).shape == (2, 3, 32, 32)
        for dim in (128, 10):
            head = infopro.Head1c2f(channels, dim)
            assert common.count_params(head) == head_params(channels, dim)
            assert head(torch.randn(2, channels, size, size)).shape == (2, dim)
    assert infopro.Head1c2f(64, 10).conv[0].stride == (1, 1)  # stride 1 at 64 channels, 2 below
    assert infopro.Head1c2f(32, 10).conv[0].stride == (2, 2)


def test_imagenet_decoder_and_head():
    """InfoPro's ImageNet aux nets (the official code), on the 512 x 28 x 28 cut of ResNet-101 at 224 px."""
    decoder, head = infopro.ImageNetDecoder(512, 224), infopro.ImageNetHead(512, 1000)
    assert common.count_params(decoder) == ((512 * 128 + 128) + 256 + (128 * 32 * 9 + 32) + 64
                                            + (32 * 12 * 9 + 12) + 24 + (12 * 3 * 9 + 3))
    assert common.count_params(head) == (512 * 128 + 256 + 128 * 256 * 9 + 512 + 256 * 512 * 9 + 1024
                                         + 512 * 2048 + 4096 + 2048 * 1000 + 1000)
    sizes = []
    for stage in decoder.stages[1:]:
        stage.register_forward_hook(lambda module, inputs, output: sizes.append(inputs[0].shape[-1]))
    h = torch.randn(2, 512, 28, 28)
    assert decoder(h).shape == (2, 3, 224, 224) and sizes == [56, 112, 224]
    assert head(h).shape == (2, 1000)


@pytest.mark.slow
def test_aux_nets_sit_on_module_outputs_with_their_weights(tmp_path, capsys):
    summary = run_script("infopro", tmp_path / "run", "--k", "4", "--steps", "1", "--subset", "64")
    printed = capsys.readouterr().out
    assert "--loss contrast, (ixx_1, ixy_1, ixx_2, ixy_2) = (6, 0, 1, 2) from the published command " \
           "(InfoPro cifar10 resnet32 K=4)" in printed
    assert "(6, 0) (3.5, 1) (1, 2)" in printed
    # Cuts after layers 3, 7, 11: 16, 32 and 64 channels.
    assert summary["params"] == {"backbone": 466_906,
                                 "aux": sum(decoder_params(c) + head_params(c, 128) for c in (16, 32, 64))}
    state = checkpoint_state(tmp_path / "run")
    assert not any(key.endswith((".mean", ".std")) for key in state)  # data statistics are not saved
    _, _, _, _, aux = build(4, "resnet32", "--loss", "ce")
    assert [(a.ixx, a.ixy) for a in aux] == [(6, 0), (3.5, 1), (1, 2)]
    assert [a.head.fc[-1].out_features for a in aux] == [10] * 3


@pytest.mark.slow
def test_lambda_schedule_and_defaults():
    assert infopro.default_lambdas("cifar10", "resnet110", 4, False)[0] == (1, 0, 0, 1)
    assert infopro.lambda_schedule((1, 0, 0, 1), 4) == [(1, 0), (0.5, 0.5), (0, 1)]  # the spec's example
    assert infopro.lambda_schedule((5, 0.5, 0, 0), 2) == [(5, 0.5)]  # K=2: only the first pair
    assert infopro.lambda_schedule((5, 0, 0, 1), 1) == []
    sixteen = infopro.lambda_schedule((5, 0.05, 0.2, 0.5), 16)
    assert len(sixteen) == 15 and sixteen[0] == (5, 0.05) and sixteen[-1] == pytest.approx((0.2, 0.5))
    assert sixteen[7] == pytest.approx((5 - 4.8 * 7 / 14, 0.05 + 0.45 * 7 / 14))
    assert infopro.default_lambdas("stl10", "resnet110", 3, True)[0] == (20, 0.5, 5, 2)  # InfoPro*
    assert infopro.default_lambdas("synthetic", "resnet32", 16, False)[0] == (5, 0.05, 0.2, 0.5)  # CIFAR-10 row
    for combination in (("cifar10", "resnet32", 3, False), ("cifar100", "resnet32", 4, False),
                        ("svhn", "resnet110", 4, True), ("cifar10", "resnet110", 5, False)):
        lambdas, source = infopro.default_lambdas(*combination)
        assert lambdas == infopro.FALLBACK_LAMBDAS == (5, 0.5, 0.5, 1) and source.startswith("the fallback")
    _, _, _, _, aux = build(3, "resnet110", "--lambdas", "2", "1", "0", "3")
    assert [(a.ixx, a.ixy) for a in aux] == [(2, 1), (0, 3)]


def reference_supcon(features, y, tau=0.07):
    """SupCon written out: a double loop over anchors and their positives."""
    z = F.normalize(features, dim=1)
    n, total = len(y), 0
    for i in range(n):
        denominator = sum(torch.exp(z[i] @ z[a] / tau) for a in range(n) if a != i)
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        terms = [torch.log(torch.exp(z[i] @ z[p] / tau) / denominator) for p in positives]
        total = total + (-sum(terms) / len(terms) if terms else 0)
    return total / n


@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 1, 0, 3, 1], [4, 4, 4, 4, 4, 4], [0, 1, 2, 3, 4, 5]])
def test_supcon_matches_the_written_out_loss(labels):
    torch.manual_seed(0)
    y = torch.tensor(labels)  # the first batch has singleton classes 2 and 3
    features = torch.randn(len(y), 16, dtype=torch.float64, requires_grad=True)
    loss = infopro.supcon_loss(features, y)
    expected = reference_supcon(features, y)
    torch.testing.assert_close(loss, torch.as_tensor(expected, dtype=torch.float64))
    if len(set(labels)) < len(labels):
        torch.testing.assert_close(torch.autograd.grad(loss, features)[0],
                                   torch.autograd.grad(expected, features)[0])
    else:
        assert loss.item() == 0  # no anchor has a positive
    one = torch.randn(1, 16, requires_grad=True)
    single = infopro.supcon_loss(one, torch.tensor([3]))
    single.backward()
    assert single.item() == 0 and torch.equal(one.grad, torch.zeros_like(one))


def test_bf16_autocast_keeps_the_losses_in_fp32():
    torch.manual_seed(0)
    features, y = torch.randn(16, 128), torch.randint(0, 4, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = infopro.supcon_loss(features, y)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, infopro.supcon_loss(features, y), rtol=0, atol=0)
    _, data, _, _, aux = build(2)
    x, y = batch(data, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # BCE on probabilities would refuse to autocast on CUDA
        loss, _ = aux[0](torch.randn(8, 32, 16, 16), x, y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in aux.parameters())


def module_params(net, layers):
    return [p for i in layers for p in net.layers[i].parameters()]


@pytest.mark.parametrize("loss", [pytest.param("contrast", marks=pytest.mark.slow), "ce"])
def test_each_module_gets_exactly_the_gradient_of_its_own_local_loss(loss):
    args, data, net, modules, aux = build(4, "resnet32", "--loss", loss)
    x, y = batch(data)
    train_step(infopro, net, modules, aux, args, x, y)
    target = x * data.std + data.mean
    h = x
    for k, layers in enumerate(modules):
        own = module_params(net, layers) + list((aux[k] if k < len(aux) else net.head).parameters())
        out = net.run(layers, h.detach())
        if k < len(aux):  # written out again: lambda1 * BCE + lambda2 * task loss
            task = aux[k].head(out)
            task = infopro.supcon_loss(task, y) if loss == "contrast" else F.cross_entropy(task, y)
            reconstruction = F.binary_cross_entropy(aux[k].decoder(out).sigmoid(), target)  # the official form
            local = aux[k].ixx * reconstruction + aux[k].ixy * task
        else:
            local = F.cross_entropy(net.head(out), y)
        expected = torch.autograd.grad(local, own)
        for p, g in zip(own, expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
        h = out
    assert torch.count_nonzero(aux[0].decoder.convs[0].weight.grad) > 0
    assert torch.count_nonzero(aux[0].head.fc[-1].weight.grad) == 0  # lambda2 = 0 on module 1: zero gradient
    assert all(p.grad is not None for p in aux.parameters())  # ... but a gradient (weight decay, momentum)


@pytest.mark.slow
def test_per_module_backward_is_what_saves_memory():
    args, data, net, modules, aux = build(4)
    x, y = batch(data)

    def summed():
        summed_backward(infopro, net, modules, aux, args, x, y)

    local = saved_tensor_peak([net, aux], lambda: train_step(infopro, net, modules, aux, args, x, y))
    assert local < 0.6 * saved_tensor_peak([net, aux], summed)


def test_bad_input_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown --loss 'mse': choose contrast"):
        run_script("infopro", tmp_path / "a", "--loss", "mse")
    with pytest.raises(SystemExit, match=r"--lambdas takes 4 weights >= 0 \(IXX_1 IXY_1 IXX_2 IXY_2\), "
                                         r"got \[1.0, 2.0, 3.0\]"):
        run_script("infopro", tmp_path / "b", "--lambdas", "1", "2", "3", "--subset", "64")
    with pytest.raises(SystemExit, match="--lambdas takes 4 weights >= 0"):
        run_script("infopro", tmp_path / "c", "--lambdas", "1", "2", "3", "-1", "--subset", "64")


@pytest.mark.slow
def test_every_loss_falls_when_fitting_one_batch():
    """On one fixed batch every module's reconstruction and SupCon losses and the final CE fall
    within a few steps. (At lr 0.05 a 1c2f head can collapse on one batch: its SupCon then stays
    near log(31); the method's own risk, not what this test is about.)"""
    args, data, net, modules, aux = build(4, "resnet32", "--lambdas", "1", "1", "1", "1")
    x, y = batch(data, 32)
    opt = torch.optim.SGD([*net.parameters(), *aux.parameters()], lr=0.02, momentum=0.9, nesterov=True)

    @torch.no_grad()
    def losses():
        out, h = [], x
        for layers, local in zip(modules[:-1], aux):
            h = net.run(layers, h)
            out += [F.binary_cross_entropy_with_logits(local.decoder(h), x * data.std + data.mean).item(),
                    infopro.supcon_loss(local.head(h), y).item()]
        return out + [F.cross_entropy(net.head(net.run(modules[-1], h)), y).item()]

    before = losses()
    for _ in range(40):
        opt.zero_grad()
        train_step(infopro, net, modules, aux, args, x, y)
        opt.step()
    after = losses()
    assert all(a < 0.9 * b for a, b in zip(after[0:6:2], before[0:6:2])), (before, after)  # reconstruction
    assert all(a < 0.7 * b for a, b in zip(after[1:6:2], before[1:6:2])), (before, after)  # SupCon (max 0.59)
    assert after[-1] < 0.3 < 2 < before[-1], (before, after)  # the final CE (0.07)


@pytest.mark.slow
def test_infopro_learns_on_synthetic(tmp_path):
    """The published CIFAR-10 K=4 weights (6, 0, 1, 2) and SupCon, end to end."""
    summary = run_script("infopro", tmp_path / "run", "--k", "4", "--subset", "1024", "--epochs", "4", "--lr", "0.1")
    assert summary["final_test_acc"] > 0.7  # chance is 0.1; measured 0.95
