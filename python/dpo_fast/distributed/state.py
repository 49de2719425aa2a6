"""The vocabulary shard a call is running on: a light record and the per-call context the engine reads.

This module imports nothing from the engine, so the engine's primitives can ask it, at no cost when no
vocabulary-parallel call is active, whether the weight they were handed is one rank's slice of the head:

* :func:`active_shard` ``(weight)`` -> the :class:`VocabShard` or None;
* :func:`vocab_size` ``(weight)`` -> the *global* vocabulary size (``weight.shape[0]`` outside a shard).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any

import torch


class DistributedHeadError(ValueError):
    """The head's distributed layout is inconsistent or unsupported (named argument, expected layout)."""


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows ``[start, start + local_size)`` of a ``(vocab_size, H)`` output head.

    Attributes:
        group: the process group over which the vocabulary is split (the TP group).
        start: first global vocabulary row held here. local_size: rows held here (may be 0 for uneven
            DTensor shards). vocab_size: the global V (sum of all ranks' local sizes).
        rank, world: this rank's index in ``group`` and the group's size.
    """

    group: Any
    start: int
    local_size: int
    vocab_size: int
    rank: int
    world: int

    def owns(self, weight: torch.Tensor) -> bool:
        return weight.dim() == 2 and weight.shape[0] == self.local_size


_ACTIVE: contextvars.ContextVar[VocabShard | None] = contextvars.ContextVar("dpo_fast_vocab_shard", default=None)


def active_shard(weight: torch.Tensor | None) -> VocabShard | None:
    """The vocabulary shard ``weight`` is a slice of, during a vocabulary-parallel call; else None."""
    shard = _ACTIVE.get()
    if shard is None or weight is None or not shard.owns(weight):
        return None
    return shard


def vocab_size(weight: torch.Tensor) -> int:
    """Global vocabulary size of a head weight (its ``shape[0]`` unless it is an active vocabulary shard)."""
    shard = active_shard(weight)
    return weight.shape[0] if shard is None else shard.vocab_size


@contextlib.contextmanager
def shard_scope(shard: VocabShard | None):
    """Run the body with ``shard`` active (None: leave whatever is active unchanged)."""
    if shard is None:
        yield
        return
    token = _ACTIVE.set(shard)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
