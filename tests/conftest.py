"""Test setup. TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here,
before any test module imports dpo_fast's kernels; on CPU the Triton kernels then run in the interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import dpo_fast  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_workspace():
    yield
    dpo_fast.set_workspace_bytes(None)


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234
