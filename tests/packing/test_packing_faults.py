"""Faults and the one packing config: no abort crosses the FFI boundary, allocation failure is a MemoryError,
options are validated once (PackOptions), wide ids/lengths are reported as they are, TRL's layout rules."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dpo_fast import _native
from dpo_fast.packing import (PackOptions, TokenBudgetBatchSampler, pack_pairs, resolve_pair_keys,
                              shifted_labels)
from dpo_fast.packing import options as options_mod
from dpo_fast.packing._reference import pack_reference


def _run(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: an abort (SIGABRT) or OOM kill shows as a failed return code."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_huge_pad_multiple_is_a_value_error_not_an_abort():
    # The case from the issue: it used to abort the interpreter ("memory allocation of 8589934588 bytes failed").
    r = _run("""
        import dpo_fast
        try:
            dpo_fast.pack_pairs([[1]], [[2]], [[3]], max_tokens=16, pad_to_multiple_of=2**31 - 1)
        except ValueError as e:
            print("ValueError:", e)
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "ValueError: pad_to_multiple_of must be in [1, max(max_tokens, 65536)]" in r.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS / /proc are Linux facilities")
def test_allocation_failure_is_a_memory_error_with_the_size():
    # Cap the address space 1 GiB above what the interpreter uses, then ask for one 2**30-slot row (13 GiB).
    r = _run("""
        import resource, dpo_fast
        dpo_fast.pack_pairs([[1]], [[2]], [[3]], max_tokens=16)  # load everything first
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
        for backend in ("rust",):
            try:
                dpo_fast.pack_pairs([[1]], [[2]], [[3]], max_tokens=2**30, pad_to_multiple_of=2**30, backend=backend)
            except MemoryError as e:
                print("MemoryError:", e)
        b = dpo_fast.pack_pairs([[1]], [[2]], [[3]], max_tokens=16)  # the interpreter is still fine
        print("after:", b.input_ids.tolist())
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "MemoryError: could not allocate 4294967296 bytes (4.00 GiB) for the packed batch's input_ids" in r.stdout
    assert "after: [[1, 2, 1, 3]]" in r.stdout


def test_native_constants_match_the_python_options():
    assert _native.ID_LIMIT == options_mod.ID_LIMIT
    assert _native.PAD_MULTIPLE_FLOOR == options_mod.PAD_MULTIPLE_FLOOR


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(max_tokens=2**31), ValueError, r"max_tokens must be < 2\*\*31"),
    (dict(max_tokens=2**63), ValueError, r"max_tokens must be < 2\*\*31"),
    (dict(max_tokens=None), TypeError, "max_tokens must be an int, got NoneType"),
    (dict(max_tokens=8, mode=3), TypeError, "mode must be a str"),
    (dict(max_tokens=8, truncation="left"), ValueError, "truncation must be one of 'keep_start', 'keep_end', 'error'"),
    (dict(max_tokens=8, pad_to_multiple_of=65537), ValueError, r"\[1, 65536\]"),
    (dict(max_tokens=8, pad_to_multiple_of=1.5), TypeError, "pad_to_multiple_of must be an int or None"),
    (dict(max_tokens=8, vocab_size=2**31 + 1), ValueError, "vocab_size must be in"),
])
def test_pack_options_validate_once(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PackOptions(**kwargs)
    for backend in ("rust", "python"):  # the same check, reached through pack_pairs
        with pytest.raises(exc, match=match):
            pack_pairs([[1]], [[2]], [[3]], backend=backend, **kwargs)


def test_pack_options_object_is_the_one_config():
    opts = PackOptions(max_tokens=np.int64(20), mode="padded", pad_to_multiple_of=np.int32(8))
    assert type(opts.max_tokens) is int and type(opts.pad_to_multiple_of) is int  # normalised to plain ints
    a = pack_pairs([[1, 2]], [[3]], [[4, 5]], options=opts)
    b = pack_pairs([[1, 2]], [[3]], [[4, 5]], max_tokens=20, mode="padded", pad_to_multiple_of=8)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert a.input_ids.shape == (2, 8) and a.mode == "padded"
    # the pure-Python twin takes the same object and re-checks nothing
    ref = pack_reference([[1, 2]], [[3]], [[4, 5]], opts)
    np.testing.assert_array_equal(ref["labels"], a.labels)
    with pytest.raises(TypeError, match="either options= or the separate options"):
        pack_pairs([[1]], [[2]], [[3]], options=opts, max_tokens=8)
    with pytest.raises(TypeError, match="options must be a dpo_fast.packing.PackOptions"):
        pack_pairs([[1]], [[2]], [[3]], options={"max_tokens": 8})
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        opts.replace(max_tokens=1)
    with pytest.raises(dataclasses_frozen_error()):
        opts.max_tokens = 3  # type: ignore[misc]


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("backend", ["rust", "python"])
def test_wide_uint64_id_is_reported_as_itself(backend):
    big = 2**63 + 5
    chosen = [np.array([2, 3], np.uint64), np.array([4, big], np.uint64)]
    with pytest.raises(ValueError, match=rf"chosen_ids\[1\]\[1\] = {big} is out of range"):
        pack_pairs([[1], [1]], chosen, [[3], [3]], max_tokens=16, backend=backend)
    flat = (np.array([9, 2, 3, 4, big], np.uint64), np.array([1, 3, 5], np.int64))  # sliced: values[0] unused
    with pytest.raises(ValueError, match=rf"chosen_ids\[1\]\[1\] = {big} is out of range"):
        pack_pairs([[1], [1]], flat, [[3], [3]], max_tokens=16, backend=backend)
    # an out-of-range value outside every sequence is not an error
    ok = (np.array([big, 2, 3], np.uint64), np.array([1, 2, 3], np.int64))
    b = pack_pairs([[1], [1]], ok, [[3], [3]], max_tokens=16, backend=backend)
    assert sorted(b.input_ids[b.attention_mask == 1].tolist()) == [1, 1, 1, 1, 2, 3, 3, 3]


# ------------------------------------------------------------------------------------------------ sampler


def test_sampler_budget_window_and_lengths_are_validated_at_construction():
    with pytest.raises(ValueError, match=r"max_tokens must be < 2\*\*31"):
        TokenBudgetBatchSampler([4, 5], max_tokens=2**63)
    with pytest.raises(TypeError, match="window must be an int >= 1 or None, got float"):
        TokenBudgetBatchSampler([4, 5], max_tokens=16, window=1.5)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        TokenBudgetBatchSampler([4, 5], max_tokens=16, window=0)
    with pytest.raises(ValueError, match=r"lengths\[1\] = -3 is negative"):
        TokenBudgetBatchSampler([4, -3], max_tokens=16)
    with pytest.raises(TypeError, match="lengths must be a 1-D sequence of ints"):
        TokenBudgetBatchSampler([4.0, 3.0], max_tokens=16)
    with pytest.raises(TypeError, match="seed must be an int"):
        TokenBudgetBatchSampler([4, 3], max_tokens=16, seed=0.5)


def test_sampler_wide_uint64_lengths_do_not_wrap():
    lengths = np.array([2**64 - 1, 3, 2**63 + 1, 5], dtype=np.uint64)
    s = TokenBudgetBatchSampler(lengths, max_tokens=16, shuffle=False)
    assert s.lengths.tolist() == [16, 3, 16, 5]  # capped at the budget, never a negative wrap
    batches = list(s)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert all(int(s.lengths[b].sum()) <= 16 for b in batches)


# ------------------------------------------------------------------------------------------------ TRL layout


def test_shifted_labels_match_trl_rule():
    """TRL scores token t+1 of input_ids.masked_fill(completion_mask == 0, -100) from position t."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (6, 9), generator=g)
    cm = (torch.rand(6, 9, generator=g) > 0.4).long()
    trl_targets = ids.masked_fill(cm == 0, -100)[:, 1:]  # what TRL's fused head scores at positions 0..T-2
    lab = shifted_labels(ids, cm)
    assert lab.dtype == torch.int64 and lab.shape == ids.shape
    assert torch.equal(lab[:, :-1], trl_targets) and (lab[:, -1] == -100).all()


def test_shifted_labels_never_cross_a_packed_boundary():
    ids = torch.tensor([[5, 6, 7, 8, 9, 4]])
    cm = torch.tensor([[1, 1, 1, 1, 1, 1]])  # two sequences with empty prompts
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert shifted_labels(ids, cm, position_ids=pos).tolist() == [[6, 7, -100, 9, 4, -100]]
    with pytest.raises(ValueError, match="position_ids: expected shape"):
        shifted_labels(ids, cm, position_ids=pos[:, :3])


def test_pair_keys_resolution_and_missing_prompt():
    assert resolve_pair_keys({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}) == (
        "prompt_ids", "chosen_ids", "rejected_ids")
    assert resolve_pair_keys({"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]})[0] == (
        "prompt_input_ids")
    with pytest.raises(KeyError, match="no prompt"):
        resolve_pair_keys({"chosen_ids": [2], "rejected_ids": [3]})
    with pytest.raises(KeyError, match="example has no key"):
        resolve_pair_keys({"a": [1]}, keys=("a", "b", "c"))
