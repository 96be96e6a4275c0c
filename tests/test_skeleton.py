"""`diff dgl.py <method>.py` shows the method and nothing else: outside the docstring, the imports
and the METHOD section, every script is dgl.py line for line, but for the method's defaults (the
parse_args call) and the few main lines a method's inference network changes (ContSup's context)."""
import importlib
import os
import re

import pytest

from conftest import ROOT

SCRIPTS = [s for s in ("bp", "infopro", "auglocal", "contsup", "mlaan", "predsim", "man", "hpff")
           if os.path.exists(os.path.join(ROOT, f"{s}.py"))]
ALLOWED = [r"^\s+args = common\.parse_args\(", r"^\s+imagenet=dict\(", r"^\s+no_pipeline=NO_PIPELINE\)$",
           r"^import |^from "]
ALLOWED_FOR = {"contsup": [r"context", r"model = nn\.ModuleDict\(", r"common\.evaluate\("]}  # its encoders infer too


def skeleton(name):
    text = open(os.path.join(ROOT, f"{name}.py")).read()
    text = re.sub(r'\A""".*?"""\n', "", text, flags=re.S)  # the docstring
    text = re.sub(r"# =+ METHOD.*?# =+ END METHOD =+\n", "", text, flags=re.S)
    return text.splitlines()


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_differs_from_dgl_only_in_the_method(name):
    import difflib
    allowed = ALLOWED + ALLOWED_FOR.get(name, [])
    diff = [l for l in difflib.unified_diff(skeleton("dgl"), skeleton(name), lineterm="", n=0)
            if l[:1] in "+-" and not l.startswith(("+++", "---"))]
    stray = [l for l in diff if l[1:].strip() and not any(re.search(p, l[1:]) for p in allowed)]
    assert not stray, f"{name}.py differs from dgl.py outside the method:\n" + "\n".join(stray)


@pytest.mark.parametrize("name", ["dgl", *SCRIPTS])
def test_script_has_marked_method_section_and_main(name):
    text = open(os.path.join(ROOT, f"{name}.py")).read()
    assert text.startswith('"""') and re.search(r"# =+ METHOD: ", text) and "# ===" in text
    assert 'if __name__ == "__main__":\n    main()' in text


# Each script's defaults: the paper's K and epochs, and the ImageNet recipe where it is not InfoPro's.
DEFAULTS = {"dgl": '"dgl", k=16, epochs=160', "bp": '"bp", k=1, epochs=160', "infopro": '"infopro", k=16, epochs=160',
            "auglocal": '"auglocal", k=16, epochs=400', "contsup": '"contsup", k=16, epochs=160',
            "mlaan": '"mlaan", k=16, epochs=400', "predsim": '"predsim", k=16, epochs=400',
            "man": '"man", k=15, epochs=400', "hpff": '"hpff", k=15, epochs=400'}
IMAGENET = {"dgl": "imagenet=dict(epochs=50, batch_size=256, lr=0.1)", "auglocal": "imagenet=dict(epochs=200, k=IMAGENET_K)",
            "mlaan": "imagenet=dict(epochs=150, batch_size=128, lr=0.05)", "predsim": "imagenet=dict(k=IMAGENET_K)",
            "man": "imagenet=dict(epochs=90, batch_size=128, lr=0.05)",
            "hpff": "imagenet=dict(epochs=90, batch_size=128, lr=0.05)"}


@pytest.mark.parametrize("name", ["dgl", *SCRIPTS])
def test_script_defaults(name):
    text = open(os.path.join(ROOT, f"{name}.py")).read()
    call = re.search(r"common\.parse_args\((.*?)\)\n    run = ", text, re.S).group(1)
    assert call.startswith(f"argv, __doc__, {DEFAULTS[name]}, add_method_args=method_args")
    assert ("imagenet=dict(" in call) == (name in IMAGENET) and IMAGENET.get(name, "") in call



def help_entries(name, capsys):
    """`<name>.py --help` as {option: (its spec, e.g. '--k K', and its help text on one line)}."""
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(name).main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    entries = {}
    for entry in re.split(r"\n(?=  -)", text.strip("\n")):
        spec, *rest = re.split(r"\s{2,}", entry.strip(), maxsplit=1)
        entries[spec.split(", ")[-1].split()[0]] = (spec, " ".join(rest[0].split()) if rest else "")
    return entries



@pytest.mark.parametrize("name", ["dgl", *SCRIPTS])
def test_help_gives_every_default(name, capsys):
    specs = help_entries(name, capsys)
    entries = {option: text for option, (_, text) in specs.items()}
    k = re.search(r"k=(\d+)", DEFAULTS[name]).group(1)
    assert f"(default: {k})" in entries["--k"]
    assert "(default: cifar10)" in entries["--dataset"] and "(default: official)" in entries["--split"]
    assert entries["--momentum"] == "Nesterov momentum of the SGD optimizer (default: 0.9)"
    assert entries["--weight-decay"].startswith("weight decay of every")
    assert entries["--weight-decay"].endswith("(default: 0.0001)")
    assert entries["--seed"].startswith("seed of the initial weights") and entries["--seed"].endswith("(default: 0)")
    # defaults resolved per dataset are written out
    assert "synthetic 64" in entries["--batch-size"] and "stl10 0.1" in entries["--lr"]
    assert "synthetic 1" in entries["--warmup-epochs"] and "synthetic 6" in entries["--epochs"]
    with_value = [option for option, (spec, _) in specs.items() if " " in spec.split(", ")[-1]]
    assert len(with_value) >= 17, with_value
    for option in with_value:
        assert "default" in entries[option].lower(), f"{name}.py --help: {option} shows no default"


def test_common_has_its_map_and_short_parts():
    """common.py opens with a map of its sections, in the order of its section banners, and no class
    or function in it is longer than 150 lines (one job each, found in one place)."""
    import ast
    text = open(os.path.join(ROOT, "common.py")).read()
    tree = ast.parse(text)
    parts = re.findall(r"^  (\w+(?: \w+)?) {2,}\S", ast.get_docstring(tree), re.M)
    banners = re.findall(r"^# ---- ([\w ]+):", text, re.M)
    assert parts == banners and len(parts) >= 10, (parts, banners)
    defs = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    too_long = [f"{node.name} (line {node.lineno})" for node in defs if node.end_lineno - node.lineno + 1 > 150]
    assert not too_long, too_long  # every def counts, also one whose name another def reuses (__init__, load)
