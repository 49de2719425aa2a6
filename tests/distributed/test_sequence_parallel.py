"""Hidden states sharded over tokens (sequence / context parallelism) on 2 and 4 CPU processes (gloo).

Workers in tests/dist/sp_worker.py: one launch per process count runs every scenario. The bar: fp32, 1e-5
relative against the single-process run of the whole batch — per-sequence values (and GRPOLoss's loss and
every metric) on every rank, per-token values and d hidden on this rank's slice, dW / db summed over the
sequence group; two runs bit for bit equal; bad input a clear exception on every rank.
"""

from __future__ import annotations

import pytest

from support.launch import check, launch

TWO = ["sp_cases", "sp_grpo", "sp_uneven", "sp_repeat", "sp_bad_input"]
FOUR = ["sp_cases", "sp_grpo", "sp_uneven", "sp_x_vocab", "sp_repeat", "sp_bad_input"]


@pytest.fixture(scope="module")
def two():
    return launch("sp_worker.py", TWO, nproc=2)


@pytest.fixture(scope="module")
def four():
    return launch("sp_worker.py", FOUR, nproc=4)


@pytest.mark.parametrize("name", TWO)
def test_two_processes(two, name):
    check(two, name)


@pytest.mark.parametrize("name", FOUR)
def test_four_processes(four, name):
    check(four, name)
