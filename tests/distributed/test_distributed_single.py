"""dpo_fast.distributed in one process: plain heads pass straight through, misuse raises clearly."""

from __future__ import annotations

import pytest
import torch

import dpo_fast
from dpo_fast.distributed import DistributedHeadError, active_shard, head_layout, resolve_head, vocab_parallel, vocab_size


def test_plain_head_untouched():
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g), torch.randn(11, generator=g)
    assert head_layout(w) == "plain" and head_layout(None) == "plain"
    h2, w2, b2, shard = resolve_head(h, w, b)
    assert h2 is h and w2 is w and b2 is b and shard is None
    assert active_shard(w) is None and vocab_size(w) == 11
    labels = torch.randint(0, 11, (2, 5), generator=g)
    got = dpo_fast.sequence_logprobs(h, w, labels, bias=b)
    z = torch.log_softmax(h @ w.T + b, -1).gather(-1, labels[..., None]).squeeze(-1).sum(1)
    torch.testing.assert_close(got, z, rtol=1e-5, atol=1e-5)


def test_vocab_parallel_needs_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(DistributedHeadError, match="torch.distributed is not initialised"):
        vocab_parallel(torch.randn(4, 3))
