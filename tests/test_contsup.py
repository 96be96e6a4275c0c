"""contsup.py: context encoders and their parameter counts, gradient isolation through the context
paths, inference with the context, the modes' validity rules, the local losses, learning."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import common
import contsup
from conftest import QUICK, build_method, module_params, run_script, saved_tensor_peak, train_step


@functools.cache
def quick_data():
    return common.load_data(common.parse_args(QUICK, "", "contsup", 16, 160), torch.device("cpu"))


def build(k, *extra, arch="resnet32"):
    return build_method("contsup", *QUICK, "--arch", arch, "--k", k, *extra, data=quick_data())


def batch(data, n=16):
    return data.normalize(data.train_x[:n]), data.train_y[:n]


# Context parameters the official model actually uses (the official ContSup code), ResNet-32 at K=4 / 16.
@pytest.mark.slow
@pytest.mark.parametrize("mode,k4,k16", [("R0", 0, 0), ("E", 13_512, 62_232), ("R1", 2_944, 21_808),
                                         ("R1E", 16_360, 83_944), ("R2", 4_352, 40_752)])
def test_context_parameters_equal_the_official_used_ones(mode, k4, k16):
    for k, expected in ((4, k4), (16, k16)):
        *_, aux = build(k, "--context", mode)
        assert common.count_params(aux["context"]) == expected
        assert len(aux["context"].nodes) == k - 1


@pytest.mark.slow
def test_which_encoders_each_node_has():
    *_, aux = build(4, "--context", "R1E")  # node 0: E only; later nodes: E + the previous module input
    assert [(n.image is not None, len(n.recent)) for n in aux["context"].nodes] == [(True, 0), (True, 1), (True, 1)]
    *_, aux = build(4, "--context", "R2")  # x counts as in_0: node i sees in_i .. in_{i-1}
    nodes = aux["context"].nodes
    assert [(n.image, len(n.recent)) for n in nodes] == [(None, 1), (None, 2), (None, 2)]
    assert [[enc[0].in_channels for enc in n.recent] for n in nodes] == [[3], [16, 3], [32, 16]]
    assert [n.recent[0][0].out_channels for n in nodes] == [16, 32, 64]
    image = build(16, "--context", "E")[-1]["context"].nodes[14].image  # full resolution, then pooled
    assert [image[0].stride, image[3].stride, image[6].output_size] == [(1, 1), (1, 1), 8]


def supcon_reference(features, y, temperature=0.07):
    """SupCon written out per anchor, straight from the definition."""
    z = F.normalize(features, dim=1)
    sim = z @ z.T / temperature
    losses = []
    for i in range(len(y)):
        others = [j for j in range(len(y)) if j != i]
        log_denominator = torch.logsumexp(sim[i, others], 0)
        positives = [j for j in others if y[j] == y[i]]
        losses.append(sum(log_denominator - sim[i, j] for j in positives) / len(positives) if positives
                      else sim.new_zeros(()))
    return torch.stack(losses).mean()


def test_supcon_loss_matches_the_definition():
    torch.manual_seed(0)
    features, y = torch.randn(12, 128), torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 4, 4, 5])  # 2 and 5: no positive
    torch.testing.assert_close(contsup.supcon_loss(features, y), supcon_reference(features, y))


def test_supcon_loss_keeps_float64():
    """Promoted to at least float32, never cast down: a float64 run computes SupCon in float64."""
    torch.manual_seed(0)
    features, y = torch.randn(12, 128, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 4, 4, 5])
    loss = contsup.supcon_loss(features, y)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, supcon_reference(features, y), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["contrast", "ce"])
def test_r0_step_is_plain_greedy_training(loss):
    """With no context, every parameter gets exactly the gradient of a hand-written greedy step with
    the same 1c2f heads; inference is the plain backbone."""
    args, data, net, modules, aux = build(4, "--context", "R0", "--loss", loss)
    x, y = batch(data)
    train_step(contsup, net, modules, aux, args, x, y)
    h = x
    for k, layers in enumerate(modules):
        out = net.run(layers, h.detach())
        if k < len(modules) - 1:
            head = aux["local"][k].head
            z = head(out)
            local = supcon_reference(z, y) if loss == "contrast" else F.cross_entropy(z, y)
        else:
            head = net.head
            local = F.cross_entropy(head(out), y)
        own = module_params(net, layers) + list(head.parameters())
        for p, g in zip(own, torch.autograd.grad(local, own)):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
        h = out
    net.eval(), aux.eval()
    with torch.no_grad():
        assert torch.equal(contsup.predict(net, modules, aux["context"], x), net(x))


@pytest.mark.parametrize("mode", ["E", "R1E", "R2"])
def test_each_loss_trains_its_module_and_the_encoders_feeding_it(mode):
    """in_{k+1} = detach(h_k) + E_k(x) + sum_r R_{k,r}(detach(in_{k-r})), written out by hand: every
    parameter gets the gradient of exactly one loss, its owner's, so no gradient reaches an earlier
    module through a context path, and the encoders of node k learn only from module k+1's loss."""
    args, data, net, modules, aux = build(4, "--context", mode)
    x, y = batch(data)
    train_step(contsup, net, modules, aux, args, x, y)
    nodes, seen = aux["context"].nodes, set()
    inputs = [x]  # in_0 .. in_k
    for k, layers in enumerate(modules):
        out = net.run(layers, inputs[-1])
        last = k == len(modules) - 1
        loss = F.cross_entropy(net.head(out), y) if last else aux["local"][k](out, x, y)[0]
        own = module_params(net, layers) + list((net.head if last else aux["local"][k]).parameters())
        own += list(nodes[k - 1].parameters()) if k else []
        for p, g in zip(own, torch.autograd.grad(loss, own)):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
        seen |= {id(p) for p in own}
        if not last:
            nxt = out.detach()
            if mode.endswith("E"):
                nxt = nxt + nodes[k].image(x)
            sources = inputs[::-1] if mode != "R1E" else inputs[:0:-1]  # newest first; R1E: x via E only
            for encoder, source in zip(nodes[k].recent, sources):
                nxt = nxt + encoder(source.detach())
            inputs.append(nxt)
    everything = [*net.parameters(), *aux.parameters()]
    assert seen == {id(p) for p in everything} and len(seen) == len(everything)  # each owned once


def test_no_gradient_reaches_an_earlier_module_through_the_context():
    """Changing later encoders, heads and modules leaves the gradients of earlier ones untouched."""
    args, data, net, modules, aux = build(4, "--context", "R1E")
    x, y = batch(data)
    nodes, local = aux["context"].nodes, aux["local"]
    early = [*module_params(net, modules[0]), *module_params(net, modules[1]), *local[0].parameters(),
             *local[1].parameters(), *nodes[0].parameters()]
    later = [*nodes[1].parameters(), *nodes[2].parameters(), *local[2].parameters(), *net.head.parameters(),
             *module_params(net, modules[2]), *module_params(net, modules[3])]

    def grads(params):
        for p in [*net.parameters(), *aux.parameters()]:
            p.grad = None
        train_step(contsup, net, modules, aux, args, x, y)
        return [p.grad.clone() for p in params]
    before = grads(early + later)
    with torch.no_grad():
        for p in later:
            p.mul_(1.5)
    after = grads(early + later)
    assert all(torch.equal(a, b) for a, b in zip(before[:len(early)], after[:len(early)]))
    assert not all(torch.equal(a, b) for a, b in zip(before[len(early):], after[len(early):]))  # can fail


def test_inference_uses_the_context():
    args, data, net, modules, aux = build(4, "--context", "R1E")
    x, y = batch(data, 8)
    _, logits = train_step(contsup, net, modules, aux, args, x, y)
    with torch.no_grad():  # the same forward as in training
        torch.testing.assert_close(contsup.predict(net, modules, aux["context"], x), logits)
    net.eval(), aux.eval()
    with torch.no_grad():
        before = contsup.predict(net, modules, aux["context"], x)
        assert not torch.allclose(before, net(x))
        aux["context"].nodes[1].image[0].weight.mul_(2)
        assert not torch.allclose(contsup.predict(net, modules, aux["context"], x), before)


@pytest.mark.slow
def test_compute_of_the_inference_network():
    """Multiply-adds per image (conv and linear), as counted on the official model (the official ContSup code
    §1.8): the full-resolution E encoders nearly double ResNet-32 at K=16."""
    def macs(mode):
        args, data, net, modules, aux = build(16, "--context", mode)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            contsup.predict(net, modules, aux["context"], torch.zeros(1, 3, 32, 32))
        return counter.get_total_flops() / 2
    assert [round(macs(mode) / 1e5) for mode in ("R0", "E", "R1", "R1E")] == [691, 1307, 734, 1349]


@pytest.mark.slow
def test_summary_params_and_evaluation_through_the_context(tmp_path, monkeypatch):
    calls = []
    predict = contsup.predict

    def spy(net, modules, context, x):
        calls.append(len(context.nodes))
        return predict(net, modules, context, x)
    monkeypatch.setattr(contsup, "predict", spy)
    summary = run_script("contsup", tmp_path / "run", "--k", "4", "--context", "R1E", "--loss", "ce", "--steps", "1",
                         "--subset", "64")
    assert summary["params"] == {"backbone": 466_906, "aux": 84_958, "context": 16_360}  # 1c2f CE heads: spec
    assert calls == [3]  # the test set (one batch) went through the 3 context nodes


def test_reconstruct_adds_the_weighted_decoder_term():
    args, data, net, modules, aux = build(2, "--reconstruct", "--lambdas", 2, 3, 0, 0)
    local = aux["local"][0]
    assert common.count_params(local) == 43_392 + (9 * 32 * 12 + 12 + 24 + 9 * 12 * 3 + 3)  # head + decoder
    x, y = batch(data, 16)
    h = net.run(modules[0], x)
    image = x * 0.5 + 0.5  # synthetic is normalised with mean = std = 0.5
    expected = 2 * F.binary_cross_entropy(local.decoder(h), image) + 3 * supcon_reference(local.head(h), y)
    torch.testing.assert_close(local(h, x, y)[0], expected)


def test_reconstruct_runs_in_float64(float64):
    """Under a float64 default dtype the decoder's BCE and SupCon stay in float64 (and run at all)."""
    args, data, net, modules, aux = build_method("contsup", *QUICK, "--k", 2, "--reconstruct", "--lambdas", 2, 3, 0, 0)
    x, y = batch(data, 8)
    local = aux["local"][0]
    h = net.run(modules[0], x)
    expected = 2 * F.binary_cross_entropy(local.decoder(h), x * 0.5 + 0.5) + 3 * supcon_reference(local.head(h), y)
    assert expected.dtype == torch.float64
    torch.testing.assert_close(local(h, x, y)[0], expected, rtol=1e-12, atol=1e-12)
    loss, _ = train_step(contsup, net, modules, aux, args, x, y)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)


def test_loss_weights_follow_the_official_table():
    def weights(*argv):
        args = common.parse_args([*argv, "--reconstruct"], "", "contsup", 16, 160, contsup.method_args)
        return contsup.loss_weights(args, args.k)
    assert weights("--arch", "resnet110", "--k", "4") == [(1, 0), (0.5, 0.5), (0, 1)]
    assert weights("--arch", "resnet32", "--k", "2") == [(5, 1)]
    assert [w[1] for w in weights("--arch", "resnet110", "--dataset", "svhn", "--k", "4")] == [0, 0, 0]  # as run
    assert weights("--k", "3", "--lambdas", "4", "1", "0", "3") == [(4, 1), (0, 3)]


@pytest.mark.parametrize("extra,message", [
    (["--context", "R3"], "unknown --context 'R3': choose one of R0, E, R1, R1E, R2, R4, R8, R16"),
    (["--context", "R2E"], "unknown --context 'R2E'"),
    (["--context", "R2", "--k", "2"], "--context R2 needs --k 4 or more"),
    (["--context", "R8", "--k", "4"], "--context R8 needs --k 8 or more"),
    (["--context", "R16", "--k", "8"], "--context R16 needs --k 16 or more"),
    (["--loss", "softmax"], "unknown --loss 'softmax': choose contrast or ce"),
    (["--reconstruct"], "--reconstruct has no official loss weights for resnet32 on synthetic at --k 4; pass"),
    (["--lambdas", "1", "1", "0", "0"], "--lambdas weights the decoder term; add --reconstruct"),
])
def test_invalid_options_give_clear_errors(extra, message):
    with pytest.raises(SystemExit, match="^error: " + message):
        build(4, *extra)  # a later --k overrides the 4


def test_memory_stays_local_with_context():
    """The context adds encoders but keeps the per-module backward: far below end to end."""
    args, data, net, modules, aux = build(4, "--context", "R1E")
    x, y = batch(data, 32)
    local = saved_tensor_peak([net, aux], lambda: train_step(contsup, net, modules, aux, args, x, y))
    assert local < 0.6 * saved_tensor_peak([net, aux], lambda: F.cross_entropy(net(x), y).backward())


@pytest.mark.slow
def test_contsup_learns_on_synthetic(tmp_path):
    summary = run_script("contsup", tmp_path / "run", "--k", "4", "--subset", "1024", "--epochs", "4", "--lr", "0.1")
    assert summary["final_test_acc"] > 0.7  # chance is 0.1; measured 0.98


def imagenet_aux(arch, k, *flags, split="official"):
    args = common.parse_args(["--dataset", "imagenet", "--arch", arch, "--k", str(k), "--split", split, "--out", "x",
                              *flags], "", "contsup", 16, 160, add_method_args=contsup.method_args)
    net = common.imagenet_backbone(arch, 1000)
    data = type("Data", (), {"image_size": 224, "num_classes": 1000, "mean": torch.zeros(1, 3, 1, 1),
                             "std": torch.ones(1, 3, 1, 1)})
    modules = common.split_modules(arch, len(net.layers), k, split, 224, None)
    return net, modules, contsup.build_aux(args, net, modules, data)


@pytest.mark.slow
def test_imagenet_generalisation():
    """ImageNet (no official code): InfoPro's ImageNet head with CE by default, E's convs at stride 2
    (1/4 of the image size, the stem's output size), Rn as on CIFAR."""
    net, modules, aux = imagenet_aux("resnet101", 2, "--context", "R1E", split="balanced")
    assert [m[-1] for m in modules[:-1]] == [4]  # InfoPro* K=2: the cut after block 0 of layer2 (512 x 28 x 28)
    head = aux["local"][0].head
    assert head[-1].out_features == 1000 and aux["local"][0].loss == "ce"  # CE: InfoPro's ImageNet loss
    assert common.count_params(head) == (512 * 128 + 2 * 128 + 128 * 256 * 9 + 2 * 256 + 256 * 512 * 9 + 2 * 512
                                         + 512 * 2048 + 2 * 2048 + 2048 * 1000 + 1000)
    node = aux["context"].nodes[0]
    convs = [m for m in node.image if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2)] and convs[-1].out_channels == 512
    x = torch.randn(2, 3, 64, 64)
    assert node.image(x).shape == (2, 512, 28, 28)  # pooled to the node's size
    # R1E's node 0 has no R encoder (the image reaches it through E); E params: 3*12*9+12 + 2*12 + 12*512*9+512 + 2*512
    assert common.count_params(aux["context"]) == 3 * 12 * 9 + 12 + 24 + 12 * 512 * 9 + 512 + 1024
    _, _, aux = imagenet_aux("resnet18", 3, "--context", "R1", "--loss", "contrast", "--reconstruct",
                             "--lambdas", "5", "1", "0", "0")
    assert aux["local"][0].loss == "contrast" and aux["local"][0].head[-1].out_features == 128
    assert isinstance(aux["local"][0].decoder, contsup.ImageNetDecoder)
    assert all(node.image is None and len(node.recent) == 1 for node in aux["context"].nodes)


def test_imagenet_decoder_is_infopros_with_a_sigmoid():
    """ContSup's ImageNet decoder (built with --reconstruct): InfoPro's, its output squashed into [0, 1]."""
    import infopro
    ours, infopros = contsup.ImageNetDecoder(512, 224), infopro.ImageNetDecoder(512, 224)
    infopros.load_state_dict({k.replace("stages.3.0.", "stages.3."): v for k, v in ours.state_dict().items()})
    h = torch.randn(2, 512, 28, 28)
    out = ours(h)
    assert out.shape == (2, 3, 224, 224) and torch.equal(out, torch.sigmoid(infopros(h)))


def test_imagenet_reconstruct_needs_lambdas():
    with pytest.raises(SystemExit, match=r"--reconstruct has no official loss weights for resnet18 on imagenet"):
        imagenet_aux("resnet18", 3, "--reconstruct")
