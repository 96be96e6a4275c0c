"""FLOP counts in summary.json: exact relations between the methods' training and inference compute."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import common
from conftest import build_method, run_script

# One step at batch 16 on random CIFAR-shaped images, then one evaluation batch.
TINY = ["--dataset", "cifar10", "--fake-data", "--arch", "resnet32", "--batch-size", "16", "--steps", "1",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    """summary(script, *flags): the summary.json of a tiny run, each run once per module."""
    @functools.cache
    def run(name, *flags):
        return run_script(name, tmp_path_factory.mktemp(name), *TINY, *flags, quick=False)
    return run


def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.slow
def test_k1_equals_bp_in_any_precision(summary):
    bp, dgl = summary("bp"), summary("dgl", "--k", "1")
    assert bp["train_flops_per_image"] > 3 * bp["inference_flops_per_image"] * 0.99 > 0
    for key in ("train_flops_per_image", "inference_flops_per_image"):
        assert dgl[key] == bp[key]
    # The counter composes with the activation meter, autocast and NHWC: the same operations.
    fast = summary("bp", "--bf16", "--channels-last")
    assert fast["train_flops_per_image"] == bp["train_flops_per_image"] and 0 < fast["act_mem_bytes"]


@pytest.mark.slow
def test_aux_nets_add_exactly_their_flops(summary):
    """dgl K=4 = bp.py + every head's forward and backward (into its module) - the input gradients
    that the cuts skip (the first convolutions of modules 2..4 no longer reach their detached input)."""
    bp, dgl = summary("bp"), summary("dgl", "--k", "4")
    args, data, net, modules, aux = build_method("dgl", *TINY, "--k", "4", "--out", "unused")
    shapes, n = common.layer_shapes(net, data.image_size), 16
    heads = 0
    for layers, head in zip(modules, aux):
        h, y = torch.randn(n, *shapes[layers[-1]], requires_grad=True), torch.randint(0, 10, (n,))
        heads += flops(lambda: F.cross_entropy(head(h), y).backward())
    skipped = 0
    for layers in modules[1:]:
        block = net.layers[layers[0]]
        h = torch.randn(n, *shapes[layers[0] - 1])
        skipped += flops(lambda: (block.conv1(h), block.shortcut(h)))  # grad input = forward FLOPs
    assert heads > 0 and skipped > 0
    assert dgl["train_flops_per_image"] == bp["train_flops_per_image"] + (heads - skipped) / n
    # On ResNet-32 the small mlp-sr heads cost less than the skipped input gradients (measured
    # 0.972 x bp.py), the larger aux nets of InfoPro cost more.
    assert dgl["train_flops_per_image"] < bp["train_flops_per_image"] < summary("infopro", "--k", "4")[
        "train_flops_per_image"]
    assert dgl["inference_flops_per_image"] == bp["inference_flops_per_image"]  # the same backbone


@pytest.mark.slow
def test_grad_checkpoint_recomputes_one_forward(summary):
    """Checkpointing recomputes the forward of every segment (all layers, not the head) during
    backward: exactly one inference forward less the head's Linear(64, 10), about 4/3 of the
    training step (forward F + backward about 2F; the stem's input needs no gradient)."""
    plain, ckpt = summary("bp"), summary("bp", "--grad-checkpoint", "4")
    head = 2 * 64 * 10
    assert ckpt["train_flops_per_image"] - plain["train_flops_per_image"] == plain["inference_flops_per_image"] - head
    assert 1.33 < ckpt["train_flops_per_image"] / plain["train_flops_per_image"] < 1.34  # measured 1.334


@pytest.mark.slow
def test_contsup_inference_includes_the_context_encoders(summary):
    """ContSup's inference network (the default context E) is the backbone plus one image encoder
    E_i(x) per context node: exactly their FLOPs more than bp.py's."""
    bp, contsup = summary("bp"), summary("contsup", "--k", "4")
    *_, aux = build_method("contsup", *TINY, "--k", "4", "--out", "unused")
    x = torch.randn(4, 3, 32, 32)
    encoders = flops(lambda: [node.image(x) for node in aux["context"].nodes]) / 4
    assert encoders > 0
    assert contsup["inference_flops_per_image"] == bp["inference_flops_per_image"] + encoders
