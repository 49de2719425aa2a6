"""Distributed heads on 2 CPU processes (gloo), each scenario vs the single-process run of the global batch.

The workers live in tests/dist/; each launch (``torch.distributed.run --nproc-per-node 2``) runs several
scenarios and prints one ``DPO_FAST_RESULT`` line per scenario. The bar everywhere: fp32, 1e-5 relative
(max |a - b| / max(1, |b|)) on the loss, every parameter's gradient, and the parameters after an SGD step;
for DDP/FSDP2 also no drift between the ranks.
"""

from __future__ import annotations

import importlib.util

import pytest

from support.launch import check, launch

MAIN = ["ddp", "fsdp_root", "fsdp_head_unit", "fsdp_noreshard_tied", "fsdp_direct", "fsdp_peft", "tp_dtensor", "tp_explicit",
        "tp_modules", "bad_input"]
ZERO3 = ["z3_fused", "z3_two_pass", "z3_tied", "z3_direct"]


@pytest.fixture(scope="module")
def main_results():
    return launch("worker.py", MAIN)


@pytest.fixture(scope="module")
def zero3_results():
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (a test dependency: pip install deepspeed)")
    return launch("zero3_worker.py", ZERO3, {"DS_ACCELERATOR": "cpu"})


@pytest.mark.parametrize("name", MAIN)
def test_ddp_fsdp2_tp(main_results, name):
    check(main_results, name)


@pytest.mark.parametrize("name", ZERO3)
def test_deepspeed_zero3(zero3_results, name):
    check(zero3_results, name)


def test_tp_x_dp_four_processes():
    """TP x DP on a (dp=2, tp=2) mesh: vocabulary-parallel head per TP pair, pairs split over DP."""
    results = launch("worker.py", ["tp_dp"], nproc=4)
    check(results, "tp_dp")
