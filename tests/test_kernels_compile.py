"""The Triton kernels compile for real GPUs (sm_80, sm_90, sm_100), proven without one.

``dpo_fast.kernels.compile_check`` compiles every variant in the launchers' table (dtypes x constexpr flags x
block sizes) to cubins with Triton's bundled compiler. It runs in a subprocess with TRITON_INTERPRET unset:
this test session sets it (conftest), and the interpreter replaces jit functions when they are defined.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

ARCHS = ("80", "90", "100")


def test_every_variant_compiles_for_sm80_sm90_sm100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh cache: every variant is really compiled
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = ("import sys; from dpo_fast.kernels import compile_check as c; "
            "print('variants', len(c.variants())); sys.exit(c.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "--arch", *ARCHS, "--jobs", "2"], env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    n = int(out.split("variants ", 1)[1].split()[0])
    assert n >= 22 and f"compiled {n * len(ARCHS)}/{n * len(ARCHS)} variants" in out, out[-2000:]
    assert "BAD" not in out


def test_launches_are_checked_against_the_table():
    from dpo_fast.kernels import logprob as k

    meta = k.launch_meta("bwd", 300, (torch.float32, torch.float16), HAS_SOFTCAP=True)
    assert meta["HAS_SOFTCAP"] is True and meta["BLOCK_V"] >= 16
    with pytest.raises(AssertionError):  # a dtype pair the table does not list
        k.launch_meta("bwd", 300, (torch.float16, torch.float32), HAS_SOFTCAP=True)
    with pytest.raises(AssertionError):  # a flag the table does not list
        k.launch_meta("fwd", 300, (torch.float32,), HAS_SOFTCAP=True, WITH_STATS=False, NEW_FLAG=1)
    with pytest.raises(AssertionError):  # a flag left out
        k.launch_meta("fwd", 300, (torch.float32,), HAS_SOFTCAP=True)
