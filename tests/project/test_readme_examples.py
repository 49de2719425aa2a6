"""The README's runnable examples live in docs/examples/*.py; each must run to completion."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "docs" / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, tmp_path):
    # never skipped: what the examples need comes with `pip install ".[test]"` (a missing extra fails here
    # with the example's one-line message)
    env = dict(os.environ, TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "loss" in p.stdout


def test_examples_present():
    assert {p.name for p in EXAMPLES} >= {"use_with_trl.py", "own_loop.py", "kernels_directly.py"}
