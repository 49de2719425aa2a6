"""Distributed heads on 2 CPU processes (gloo), each scenario vs the single-process run of the global batch.

The workers live in tests/dist/; each launch (``torch.distributed.run --nproc-per-node 2``) runs several
scenarios and prints one ``DPO_FAST_RESULT`` line per scenario. The bar everywhere: fp32, 1e-5 relative
(max |a - b| / max(1, |b|)) on the loss, every parameter's gradient, and the parameters after an SGD step;
for DDP/FSDP2 also no drift between the ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAIN = ["ddp", "fsdp_root", "fsdp_head_unit", "fsdp_noreshard_tied", "fsdp_direct", "fsdp_peft", "tp_dtensor", "tp_explicit",
        "tp_modules", "bad_input"]
ZERO3 = ["z3_fused", "z3_two_pass", "z3_tied", "z3_direct"]


def _launch(worker: str, names: list[str], extra_env: dict | None = None, timeout: int = 300, nproc: int = 2) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", **(extra_env or {}))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           os.path.join(HERE, "dist", worker), ",".join(names)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("DPO_FAST_RESULT "):
            rec = json.loads(line[len("DPO_FAST_RESULT "):])
            results[rec["name"]] = rec
    if not results:
        raise AssertionError(f"no results from {worker} (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return results


@pytest.fixture(scope="module")
def main_results():
    return _launch("worker.py", MAIN)


@pytest.fixture(scope="module")
def zero3_results():
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (a test dependency: pip install deepspeed)")
    return _launch("zero3_worker.py", ZERO3, {"DS_ACCELERATOR": "cpu"})


def _check(results: dict, name: str) -> None:
    assert name in results, f"{name}: no result (the worker stopped before it)"
    rec = results[name]
    assert rec["ok"], f"{name}: worst error {rec['err']:.3g}: {rec['detail'][:4000]}"


@pytest.mark.parametrize("name", MAIN)
def test_ddp_fsdp2_tp(main_results, name):
    _check(main_results, name)


@pytest.mark.parametrize("name", ZERO3)
def test_deepspeed_zero3(zero3_results, name):
    _check(zero3_results, name)


def test_tp_x_dp_four_processes():
    """TP x DP on a (dp=2, tp=2) mesh: vocabulary-parallel head per TP pair, pairs split over DP."""
    results = _launch("worker.py", ["tp_dp"], nproc=4)
    _check(results, "tp_dp")
