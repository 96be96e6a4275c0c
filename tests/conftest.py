"""Helpers shared by the tests: run a method script in-process on a small synthetic run."""
import functools
import importlib
import json
import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))

# A quick run: 256 synthetic training images in batches of 64 (4 steps per epoch).
QUICK = ["--dataset", "synthetic", "--arch", "resnet32", "--subset", "256", "--batch-size", "64",
         "--device", "cpu"]


def run_script(name, out, *args, quick=True):
    """Run `<name>.main` in this process; returns its summary dict."""
    module = importlib.import_module(name)
    return module.main([*(QUICK if quick else []), "--out", str(out), *map(str, args)])


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def metrics_but_time(run_dir):
    """A run's metrics.jsonl without the wall time: what an exactly resumed or pipelined run repeats."""
    lines = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return [{k: v for k, v in line.items() if k != "elapsed_s"} for line in lines]


def build_method(name, *argv, data=None):
    """What `<name>.main(argv)` builds before training, on the CPU: (args, data, net, modules, aux)."""
    common, script = importlib.import_module("common"), importlib.import_module(name)
    args = common.parse_args(list(map(str, argv)), "", name, 16, 160, script.method_args)
    data = data or common.load_data(args, torch.device("cpu"))
    net = common.build_backbone(args, data, torch.device("cpu"))
    modules = common.make_modules(args, net, data)
    return args, data, net, modules, script.build_aux(args, net, modules, data)


def train_step(script, net, modules, aux, args, x, y):
    """One batch through every module of `script` (a module or its name) in this process."""
    script = importlib.import_module(script) if isinstance(script, str) else script
    step = functools.partial(script.local_step, net, modules, aux, args)
    return importlib.import_module("common").train_step(step, len(modules), x, y)


def summed_backward(script, net, modules, aux, args, x, y):
    """The same batch with every module's loss summed into one backward (the wrong way, which keeps
    every module's activations alive): what the per-module backward is compared with."""
    script = importlib.import_module(script) if isinstance(script, str) else script
    losses, h = [], x
    for i in range(len(modules)):
        h, loss, _ = script.local_step(net, modules, aux, args, i, h, x, y)
        losses.append(loss)
        h = h.detach()
    sum(losses).backward()


def gradient_dependence(step, groups, params):
    """`changed_by(ps)`: the names of `groups` (name -> parameters) whose gradients after `step()`
    change when the parameters `ps` are scaled by 1.5 (restored afterwards); `params` are cleared
    of gradients before each step."""
    def grads():
        for p in params:
            p.grad = None
        step()
        return {name: [p.grad.clone() for p in ps] for name, ps in groups.items()}

    before = grads()

    def changed_by(ps):
        ps = list(ps)
        saved = [p.detach().clone() for p in ps]
        with torch.no_grad():
            for p in ps:
                p.mul_(1.5)
        after = grads()
        with torch.no_grad():
            for p, v in zip(ps, saved):
                p.copy_(v)
        return {name for name in groups if not all(torch.equal(a, b) for a, b in zip(before[name], after[name]))}
    return changed_by


class GradientSum:
    """Reference gradients: each loss's gradient (times its weight) added into `total`, one
    autograd.grad per loss, as an official code's separate backward calls accumulate them."""

    def __init__(self, params):
        self.params, self.total = params, [torch.zeros_like(p) for p in params]

    def add(self, loss, weight):
        for t, g in zip(self.total, torch.autograd.grad(weight * loss, self.params, allow_unused=True)):
            if g is not None:
                t += g


@torch.no_grad()
def module_inputs(net, modules, x):
    """inputs[j]: the input of module j (inputs[K]: the last module's output)."""
    inputs = [x]
    for layers in modules:
        inputs.append(net.run(layers, inputs[-1]))
    return inputs


def saved_tensor_peak(modules, step):
    """The peak bytes of activations saved for backward while `step()` runs (parameters of the
    given nn.Modules not counted)."""
    meter = importlib.import_module("common").SavedTensorMeter([p for m in modules for p in m.parameters()])
    with meter.hooks():
        step()
    return meter.peak


def module_params(net, layers):
    return [p for i in layers for p in net.layers[i].parameters()]


def assert_greedy_gradients(name, args, net, modules, aux, x, y):
    """After one step of a greedy method (one CE head per module), every module and its head hold
    exactly the gradient of that head's loss on the module's detached input."""
    torch.manual_seed(1)
    train_step(name, net, modules, aux, args, x, y)
    h = x
    for k, layers in enumerate(modules):
        head = aux[k] if k < len(aux) else net.head
        own = module_params(net, layers) + list(head.parameters())
        out = net.run(layers, h.detach())
        expected = torch.autograd.grad(torch.nn.functional.cross_entropy(head(out), y), own)
        for p, g in zip(own, expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        h = out


def checkpoint_state(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]


@pytest.fixture
def common():
    return importlib.import_module("common")


@pytest.fixture(autouse=True)
def no_run_left_behind():
    """Every run of a test, finished or stopped by an error or a signal, gives back its folder's lock
    and its signal handlers (common.release_run): nothing of it reaches the next test."""
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    yield
    common = sys.modules.get("common")
    if common is not None:
        assert not common.RunFolder._locked and not common.StopRequest._catching, "a run was left behind"
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers


@pytest.fixture
def float64():
    """Run the test with float64 as the default dtype (a float64 run), restored afterwards."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
