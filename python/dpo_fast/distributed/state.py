"""The vocabulary shard record and the questions public code may ask about a head.

The layout of a head is no longer ambient state: :func:`dpo_fast.distributed.distributed_head` resolves it
once per call into a :class:`dpo_fast.engine.Head` and hands that down. :class:`VocabShard` (defined with
the Head in :mod:`dpo_fast.engine.head`) is re-exported here under its public name.

* :func:`active_shard` ``(weight)`` -> the :class:`VocabShard` of a resolved vocabulary-parallel Head, else None;
* :func:`vocab_size` ``(weight)`` -> the *global* vocabulary size (``weight.shape[0]`` for a plain tensor).
"""

from __future__ import annotations

import torch

from ..engine.head import Head, VocabShard

__all__ = ["DistributedHeadError", "VocabShard", "active_shard", "vocab_size"]


class DistributedHeadError(ValueError):
    """The head's distributed layout is inconsistent or unsupported (named argument, expected layout)."""


def active_shard(weight: torch.Tensor | Head | None) -> VocabShard | None:
    """The vocabulary shard ``weight`` is a slice of (a :class:`dpo_fast.engine.Head` resolved by
    :func:`dpo_fast.distributed.distributed_head` for a vocabulary-parallel call); else None."""
    return weight.shard if isinstance(weight, Head) else None


def vocab_size(weight: torch.Tensor | Head) -> int:
    """Global vocabulary size of a head weight (its ``shape[0]`` unless it is a vocabulary-parallel Head)."""
    return weight.vocab_size if isinstance(weight, Head) else weight.shape[0]
