"""Build the wheel with maturin, install it into a scratch directory and import the Triton kernels from the
installed copy (not from the source tree): proves kernels/ ships inside the package and nowhere else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import os, sys, torch
import dpo_fast, dpo_fast._native as native
import dpo_fast.kernels.logprob as k
site = sys.argv[1]
assert dpo_fast.__file__.startswith(site), dpo_fast.__file__
assert k.__file__.startswith(site), k.__file__
h, w = torch.randn(2, 3, 8), torch.randn(19, 8)
labels = torch.randint(0, 19, (2, 3))
a = dpo_fast.sequence_logprobs(h, w, labels, backend="triton")
b = dpo_fast.sequence_logprobs(h, w, labels, backend="torch")
assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)
print("OK", native.build_info())
"""


def test_wheel_ships_kernels(tmp_path):
    # never skipped: maturin comes with `pip install ".[test]"`, and cargo is needed to install dpo-fast at all
    for tool in ("maturin", "cargo"):
        assert shutil.which(tool), f'{tool} is not on PATH: building the wheel needs it (pip install ".[test]")'
    dist = tmp_path / "dist"
    build = subprocess.run(["maturin", "build", "--quiet", "-o", str(dist)], cwd=ROOT, capture_output=True,
                           text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("dpo_fast-*.whl")
    assert "abi3" in wheel.name, wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "dpo_fast/kernels/logprob.py" in names
    assert {"dpo_fast/py.typed", "dpo_fast/_native.pyi", "dpo_fast/demo/__init__.py",
            "dpo_fast/integrations/trl.py"} <= set(names)
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must not ship as a top-level package"
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    env = dict(os.environ, PYTHONPATH=str(site), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr
