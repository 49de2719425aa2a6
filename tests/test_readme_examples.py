"""The README's runnable examples live in docs/examples/*.py; each must run to completion."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "docs" / "examples").glob("*.py"))
NEEDS = {"use_with_trl.py": ("trl", "datasets", "tokenizers"), "own_loop.py": ("transformers",)}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, tmp_path):
    for mod in NEEDS.get(path.name, ()):
        pytest.importorskip(mod)
    env = dict(os.environ, TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "loss" in p.stdout


def test_examples_present():
    assert {p.name for p in EXAMPLES} >= {"use_with_trl.py", "own_loop.py", "kernels_directly.py"}
