"""Safe loading, checked on the source with `ast` (not a regex: comments, docstrings and strings don't count,
aliases do).

* Nothing in the package or the scripts unpickles: no pickle-family import, no `torch.load` without a literal
  `weights_only=True`, no `numpy.load(..., allow_pickle=True)`.
* Every module of `modeling_aft/` can run as transformers remote code next to a checkpoint: it imports only the
  standard library, torch, transformers and its siblings through `from .x import ...`, never `modeling_aft` itself.
* `save_pretrained` writes safetensors and no pickle-based weight file.

Both checkers are themselves tested on tables of good and bad snippets, so a checker that sees nothing fails.
"""

import ast
import sys
from pathlib import Path

import pytest
import torch

from modeling_aft import AFTConfig, AFTForCausalLM

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "modeling_aft"
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
REMOTE_CODE_DEPENDENCIES = {"torch", "transformers"}


def package_files() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def checked_sources() -> list[Path]:
    """The package, the scripts and any top-level module (tests are not shipped)."""
    return sorted({*package_files(), *(ROOT / "scripts").rglob("*.py"), *ROOT.glob("*.py")})


def _dotted(node) -> str | None:
    """`a.b.c` for Name/Attribute chains, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _aliases(tree) -> dict[str, str]:
    """Local name → fully qualified name for every import in the module (function-level ones too)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.partition(".")[0]] = alias.name if alias.asname else \
                    alias.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(func, aliases) -> str | None:
    dotted = _dotted(func)
    if dotted is None:
        return None
    head, _, rest = dotted.partition(".")
    head = aliases.get(head, head)
    return f"{head}.{rest}" if rest else head


def unsafe_deserialization(source: str) -> list[str]:
    """Every pickle-family import and every call that may unpickle, as 'line N: what'."""
    tree = ast.parse(source)
    aliases, found = _aliases(tree), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: imports {m}" for m in modules
                      if getattr(node, "level", 0) == 0 and m.partition(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.Call):
            name = _qualified(node.func, aliases)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("torch.load", "torch.serialization.load"):
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"line {node.lineno}: {name} without weights_only=True")
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"line {node.lineno}: {name or 'call'} with allow_pickle")
            if name in ("importlib.import_module", "__import__") and node.args and isinstance(
                    node.args[0], ast.Constant) and str(node.args[0].value).partition(".")[0] in PICKLE_MODULES:
                found.append(f"line {node.lineno}: dynamically imports {node.args[0].value}")
    return found


def _import_root_ok(module: str) -> bool:
    root = module.partition(".")[0]
    return root in REMOTE_CODE_DEPENDENCIES or root in sys.stdlib_module_names


def remote_code_import_problems(source: str, siblings: set[str]) -> list[str]:
    """Imports that would break (or escape) transformers' remote-code copy of the package, as 'line N: what'."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if not _import_root_ok(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not _import_root_ok(node.module):
                    found.append(f"line {node.lineno}: from {node.module} import ...")
            elif node.level > 1:
                found.append(f"line {node.lineno}: relative import leaves the package (level {node.level})")
            else:
                targets = [node.module] if node.module else [a.name for a in node.names]
                found += [f"line {node.lineno}: from .{t} (no sibling module {t}.py)" for t in targets
                          if t.partition(".")[0] not in siblings]
        elif isinstance(node, ast.Call) and _dotted(node.func) in ("importlib.import_module", "__import__") and \
                node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) and \
                not node.args[0].value.startswith(".") and not _import_root_ok(node.args[0].value):
            found.append(f"line {node.lineno}: dynamic import of {node.args[0].value}")
    return found


UNSAFE_SNIPPETS = [  # (source, is flagged)
    ("import pickle", True),
    ("import pickle as p", True),
    ("from pickle import loads", True),
    ("import _pickle", True),
    ("import dill", True),
    ("def f():\n    import cloudpickle", True),
    ("import torch\ntorch.load(f)", True),
    ("import torch\ntorch.load(f, weights_only=False)", True),
    ("import torch\ntorch.load(f, weights_only=flag)", True),
    ("import torch\ntorch.load(f, **kwargs)", True),
    ("import torch as T\nT.load(f)", True),
    ("from torch import load\nload(f)", True),
    ("from torch import load as L\nL(f, map_location='cpu')", True),
    ("import torch\ntorch.serialization.load(f)", True),
    ("import numpy as np\nnp.load(f, allow_pickle=True)", True),
    ("import importlib\nimportlib.import_module('pickle')", True),
    ("import torch\ntorch.load(f, weights_only=True)", False),
    ("import torch\ntorch.load(f, map_location='cpu', weights_only=True)", False),
    ("import json\njson.load(f)", False),
    ("from safetensors.torch import load_file\nload_file(f)", False),
    ("state.load(f)", False),
    ("'''torch.load(f) and import pickle in a docstring'''\n# import pickle", False),
]


@pytest.mark.parametrize("source,flagged", UNSAFE_SNIPPETS, ids=[s.splitlines()[-1] for s, _ in UNSAFE_SNIPPETS])
def test_unsafe_deserialization_checker(source, flagged):
    assert bool(unsafe_deserialization(source)) == flagged


REMOTE_SNIPPETS = [  # (source, is flagged)
    ("import modeling_aft", True),
    ("from modeling_aft.configuration_aft import AFTConfig", True),
    ("import modeling_aft.aft_ops as ops", True),
    ("def f():\n    from modeling_aft import AFTModel", True),
    ("import numpy as np", True),
    ("from safetensors.torch import load_file", True),
    ("from ..other import x", True),
    ("from .missing_module import x", True),
    ("from . import missing_module", True),
    ("import importlib\nimportlib.import_module('modeling_aft.aft_ops')", True),
    ("from .configuration_aft import AFTConfig", False),
    ("from . import configuration_aft", False),
    ("import os, json, math\nfrom dataclasses import dataclass", False),
    ("import torch.nn.functional as F\nfrom transformers.utils import logging", False),
    ("'''>>> from modeling_aft import AFTModel'''", False),
]


@pytest.mark.parametrize("source,flagged", REMOTE_SNIPPETS, ids=[s.splitlines()[-1] for s, _ in REMOTE_SNIPPETS])
def test_remote_code_import_checker(source, flagged):
    assert bool(remote_code_import_problems(source, {"configuration_aft", "modeling_aft"})) == flagged


def test_no_unpickling_anywhere_in_package_or_scripts():
    files = checked_sources()
    assert PACKAGE / "modeling_aft.py" in files and PACKAGE / "configuration_aft.py" in files
    problems = {str(p.relative_to(ROOT)): unsafe_deserialization(p.read_text()) for p in files}
    assert not {k: v for k, v in problems.items() if v}


@pytest.mark.parametrize("path", package_files(), ids=lambda p: p.name)
def test_package_module_imports_only_stdlib_torch_transformers_and_siblings(path):
    siblings = {p.stem for p in package_files()}
    assert not remote_code_import_problems(path.read_text(), siblings)


def test_save_pretrained_writes_safetensors_only(tmp_path):
    config = AFTConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, intermediate_size=16, num_aft_heads=2,
                       window_size=3, aft_variant="conv")
    model = AFTForCausalLM(config)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
    with open(tmp_path / "model.safetensors", "rb") as f:  # a real safetensors file: 8-byte length + JSON header
        header_length = int.from_bytes(f.read(8), "little")
        assert f.read(1) == b"{" and 0 < header_length < (tmp_path / "model.safetensors").stat().st_size
    assert torch.equal(AFTForCausalLM.from_pretrained(tmp_path).lm_head.weight, model.lm_head.weight)
