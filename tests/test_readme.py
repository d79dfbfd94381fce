"""The README's Python examples run as written (in order, as one script, from a scratch folder)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 4, "the README lost its usage examples"
    work = tmp_path / "work"
    work.mkdir()
    if SHARED.exists():  # the examples refer to ../shared exactly as a user beside the repository would
        (tmp_path / "shared").symlink_to(SHARED)
    script = work / "readme_examples.py"
    script.write_text("\n".join(blocks))
    result = subprocess.run([sys.executable, str(script)], cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (work / "outputs" / "readme-lm" / "model.safetensors").exists()
