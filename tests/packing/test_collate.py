"""Tests of PairCollator and TokenBudgetBatchSampler (dpo_fast.packing.collate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dpo_fast import PairCollator, TokenBudgetBatchSampler
from dpo_fast.packing import pair_costs


def make_examples(n, seed=0, old_keys=True, ref=False):
    rng = np.random.default_rng(seed)
    names = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids") if old_keys else (
        "prompt_ids", "chosen_ids", "rejected_ids")
    out = []
    for i in range(n):
        ex = {
            names[0]: rng.integers(0, 1000, rng.integers(1, 40)).tolist(),
            names[1]: rng.integers(0, 1000, rng.integers(1, 60)).tolist(),
            names[2]: rng.integers(0, 1000, rng.integers(1, 60)).tolist(),
        }
        if ref:
            ex["ref_chosen_logps"] = -float(i)
            ex["ref_rejected_logps"] = -float(i) - 0.5
        out.append(ex)
    return out


def test_packed_collate_shapes_and_keys():
    ex = make_examples(7)
    out = PairCollator(max_tokens=128)(ex)
    N = out["input_ids"].shape[1]
    assert out["input_ids"].shape == (1, N) and out["labels"].shape == (1, N) and out["position_ids"].shape == (1, N)
    assert "attention_mask" not in out  # would hide the packed boundaries from HF models
    assert out["input_ids"].dtype == torch.int64 and out["cu_seqlens"].dtype == torch.int32
    assert out["cu_seqlens"][-1].item() == N and out["pairs"].shape == (7, 2)
    # Hugging Face derives the boundaries from position_ids == 0: they equal cu_seqlens
    starts = (out["position_ids"].view(-1) == 0).nonzero().view(-1).to(torch.int32)
    assert torch.equal(torch.cat([starts, torch.tensor([N], dtype=torch.int32)]), out["cu_seqlens"])
    assert out["max_seqlen"] == int(out["cu_seqlens"].diff().max())
    # the newer TRL key names give the same batch
    new = PairCollator(max_tokens=128)(make_examples(7, old_keys=False))
    for k in ("input_ids", "labels", "cu_seqlens", "pairs"):
        assert torch.equal(out[k], new[k])


def test_padded_collate_is_trl_layout():
    ex = make_examples(5)
    out = PairCollator(max_tokens=512, mode="padded", pad_token_id=3)(ex)
    assert out["input_ids"].shape[0] == 10 and out["attention_mask"].shape == out["input_ids"].shape
    assert out["pairs"].tolist() == [[i, 5 + i] for i in range(5)]
    row0 = ex[0]["prompt_input_ids"] + ex[0]["chosen_input_ids"]
    assert out["input_ids"][0, : len(row0)].tolist() == row0
    assert out["attention_mask"][0].sum().item() == len(row0)


def test_ref_logps_follow_pair_order():
    ex = make_examples(9, ref=True)
    out = PairCollator(max_tokens=100)(ex)
    idx = out["example_index"]
    assert torch.equal(out["ref_chosen_logps"], -idx.float())
    assert torch.equal(out["ref_rejected_logps"], -idx.float() - 0.5)


def test_collator_errors():
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        PairCollator(max_tokens=1)
    with pytest.raises(KeyError, match="TRL's keys"):
        PairCollator(max_tokens=10)([{"prompt": [1], "chosen": [2], "rejected": [3]}])
    out = PairCollator(max_tokens=10, keys=("prompt", "chosen", "rejected"))([{"prompt": [1], "chosen": [2], "rejected": [3]}])
    assert out["input_ids"].tolist() == [[1, 2, 1, 3]]


def test_sampler_dataloader_end_to_end():
    ex = make_examples(300, seed=1)
    budget = 256
    sampler = TokenBudgetBatchSampler.from_examples(ex, budget, seed=5)
    loader = DataLoader(ex, batch_sampler=sampler, collate_fn=PairCollator(max_tokens=budget))
    costs = pair_costs(ex, max_tokens=budget)
    seen = []
    for indices, batch in zip(sampler, loader):
        assert costs[indices].sum() <= budget
        seen.extend(indices)
        # one micro-batch = one packed row of <= budget real tokens
        assert batch["input_ids"].shape[1] <= budget and batch["seq_lens"].sum().item() == costs[indices].sum()
    assert sorted(seen) == list(range(300))
    assert len(sampler) == len(loader)
    assert sampler.efficiency() > 0.95


def test_sampler_epochs_and_determinism():
    lengths = np.random.default_rng(0).integers(2, 300, 500)
    a = TokenBudgetBatchSampler(lengths, 1024, seed=3)
    b = TokenBudgetBatchSampler(lengths, 1024, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert sorted(i for batch in a for i in batch) == list(range(500))
    w = TokenBudgetBatchSampler(lengths, 1024, window=64)
    assert sorted(i for batch in w for i in batch) == list(range(500))
    assert all(lengths[batch].sum() <= 1024 for batch in w)
    fixed = TokenBudgetBatchSampler(lengths, 1024, shuffle=False)
    assert list(fixed) == list(TokenBudgetBatchSampler(lengths, 1024, shuffle=False))
    # a long pair is counted at the budget (the collator truncates it)
    big = TokenBudgetBatchSampler([5000, 3], 1024, shuffle=False)
    assert list(big) == [[0], [1]]
    dropped = TokenBudgetBatchSampler(lengths, 1024, drop_last=True)
    assert len(dropped) == len(TokenBudgetBatchSampler(lengths, 1024)) - 1
    assert len(TokenBudgetBatchSampler([], 64)) == 0


def test_sampler_errors():
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        TokenBudgetBatchSampler([3], 1)
    with pytest.raises(TypeError, match="lengths must be"):
        TokenBudgetBatchSampler([1.5], 10)
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        TokenBudgetBatchSampler([3], 10.0)
