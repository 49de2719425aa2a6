"""Scored positions: which positions of a batch enter the GEMMs, and to which sequence each belongs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import as_cu_seqlens, check_engine_inputs, check_labels_range
from ..distributed.state import vocab_size


@dataclass
class Scored:
    """Scored positions of a batch, flattened.

    hidden2: (M, H) hidden states, M = B*T or N (a view of the caller's tensor when possible).
    idx: (N,) int64 sorted flat positions whose label != ignore_index.
    labels: (N,) int64 labels at those positions, validated to lie in [0, V).
    seq: (N,) int64 sequence index of each scored position, non-decreasing.
    num_seqs: S, the number of sequences (B, or len(cu_seqlens) - 1).
    """

    hidden2: torch.Tensor
    idx: torch.Tensor
    labels: torch.Tensor
    seq: torch.Tensor
    num_seqs: int

    def counts(self) -> torch.Tensor:
        """(S,) float32 number of scored tokens per sequence."""
        return torch.bincount(self.seq, minlength=self.num_seqs)[: self.num_seqs].to(torch.float32)


def scored_positions(labels, vocab: int, ignore_index: int, row_len: int | None, cu_seqlens=None):
    """The scored positions of (already validated) labels: one host sync, their count.

    Args:
        labels: (B, T) or (N,) integer labels. row_len: T for padded rows, None with ``cu_seqlens`` (S+1,).
    Returns:
        (idx (N,) sorted flat positions, labels there (N,) int64 checked to lie in [0, vocab),
        seq (N,) non-decreasing sequence index of each).
    """
    labels1 = labels.reshape(-1)  # (M,)
    idx = torch.nonzero(labels1 != ignore_index).squeeze(1)  # (N,) sorted
    labels_s = labels1.index_select(0, idx).to(torch.int64)
    check_labels_range(labels_s, vocab, ignore_index)
    if row_len is not None:
        seq = torch.div(idx, row_len, rounding_mode="floor")
    else:
        cu = as_cu_seqlens(cu_seqlens, labels.device)  # a list / numpy array of ints is accepted
        seq = torch.searchsorted(cu[1:].to(torch.int64).contiguous(), idx, right=True)
    return idx, labels_s, seq


def prepare(hidden, weight, labels, *, bias=None, cu_seqlens=None, ignore_index=-100, temperature=1.0,
            softcap=None) -> Scored:
    """Validate the engine's inputs (see :func:`dpo_fast.sequence_logprobs`) and gather the scored positions.

    One host sync: the scored count. Returns a :class:`Scored`.
    """
    S, T = check_engine_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index, temperature, softcap)
    V = vocab_size(weight)  # dpo_fast.distributed: the global V when weight is a vocabulary shard
    idx, labels_s, seq = scored_positions(labels, V, ignore_index, T, cu_seqlens)
    return Scored(hidden.reshape(-1, hidden.shape[-1]), idx, labels_s, seq, S)
