"""Helpers shared by the tests: run a method script in-process on a small synthetic run."""
import importlib
import json
import os
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


def checkpoint_state(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]


@pytest.fixture
def common():
    return importlib.import_module("common")
