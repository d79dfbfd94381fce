"""Run Python code in a fresh interpreter, optionally unable to `import modeling_aft`.

`run_isolated` is how the tests check that a checkpoint loads through transformers' remote code alone:
the package stays installed (editable) but a `sys.meta_path` finder placed first refuses the top-level
name `modeling_aft`, while the copies transformers imports as `transformers_modules.<...>.modeling_aft`
are unaffected.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

BLOCKER = '''\
import sys
class _BlockModelingAft:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "modeling_aft":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by tests/isolated.py)", name=name)
        return None
sys.meta_path.insert(0, _BlockModelingAft())
'''
# Caches that would otherwise escape the per-call HF_HOME, and proxies that would intercept 127.0.0.1.
_DROP = {"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_XET_CACHE", "HF_ASSETS_CACHE",
         "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH"}


def run_python(code: str, *, env: dict | None = None, timeout: float = 300, isolated: bool = True) -> str:
    """Run `code` with `sys.executable` in a temp cwd with fresh HF_HOME/HF_MODULES_CACHE; return its stdout."""
    with tempfile.TemporaryDirectory(prefix="aft-child-") as tmp:
        child_env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.lower().endswith("_proxy")}
        child_env.update(HF_HOME=os.path.join(tmp, "hf_home"), HF_MODULES_CACHE=os.path.join(tmp, "hf_modules"),
                         PYTHONUNBUFFERED="1", **(env or {}))
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as f:
            f.write((BLOCKER if isolated else "") + textwrap.dedent(code))
        try:
            proc = subprocess.run([sys.executable, script], cwd=tmp, env=child_env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
            raise AssertionError(f"child timed out after {timeout}s\n--- stderr ---\n{err[-8000:]}") from None
        if proc.returncode:
            raise AssertionError(f"child exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
                                 f"\n--- stderr ---\n{proc.stderr[-8000:]}")
        return proc.stdout


def run_isolated(code: str, *, env: dict | None = None, timeout: float = 300) -> str:
    """`run_python` in a child where `import modeling_aft` raises ModuleNotFoundError."""
    return run_python(code, env=env, timeout=timeout, isolated=True)
