"""Scored positions: which positions of a batch enter the GEMMs, and to which sequence each belongs.

One host sync per batch: the per-sequence scored counts (which size the tiles and the fused route's
groups), a flag for out-of-range labels and, for packed input, the ``cu_seqlens`` boundaries travel to the
host together in one small copy. Everything else — the flat indices (``nonzero_static`` with the count
already known), the sequence of each token, validation messages — is derived from it without another sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checks import as_cu_seqlens, check_cu_seqlens, check_engine_inputs, check_labels_range
from .head import Head, as_head
from .segments import segment_counts


@dataclass
class Scored:
    """Scored positions of a batch, flattened.

    hidden2: (M, H) hidden states, M = B*T or N (a view of the caller's tensor when possible).
    idx: (N,) int64 sorted flat positions whose label != ignore_index.
    labels: (N,) int64 labels at those positions, validated to lie in [0, V).
    seq: (N,) int64 sequence index of each scored position, non-decreasing.
    num_seqs: S, the number of sequences (B, or len(cu_seqlens) - 1).
    counts_host: (S,) int64 CPU tensor, scored tokens per sequence (from the one readback), or None.
    cu_host: (S+1,) int64 CPU copy of ``cu_seqlens`` (packed input), or None.
    """

    hidden2: torch.Tensor
    idx: torch.Tensor
    labels: torch.Tensor
    seq: torch.Tensor
    num_seqs: int
    counts_host: torch.Tensor | None = None
    cu_host: torch.Tensor | None = None
    _counts: torch.Tensor | None = field(default=None, repr=False)

    def counts(self) -> torch.Tensor:
        """(S,) float32 number of scored tokens per sequence, on the device (computed once, no host sync)."""
        if self._counts is None:
            self._counts = segment_counts(self.seq, self.num_seqs).to(torch.float32)
        return self._counts

    def host_counts(self) -> torch.Tensor:
        """(S,) int64 scored tokens per sequence on the host (the readback's, else one copy)."""
        if self.counts_host is None:
            self.counts_host = segment_counts(self.seq, self.num_seqs).cpu()
        return self.counts_host


def _readback(labels1, mask, vocab: int, row_len: int | None, cu):
    """The one host sync: (per-sequence scored counts (S,), cu (S+1,) or None, any label out of range)."""
    bad = (mask & ((labels1 < 0) | (labels1 >= vocab))).any().view(1)
    if row_len is not None:
        parts = [mask.view(-1, row_len).sum(1), bad]
    else:
        M = labels1.numel()
        cu64 = cu.detach().to(torch.int64)
        csum = torch.cat([mask.new_zeros(1, dtype=torch.int64), mask.cumsum(0)])  # (M+1,)
        ends = csum.index_select(0, cu64.clamp(0, M))  # clamped: garbage for invalid cu, rejected below
        parts = [ends[1:] - ends[:-1], cu64, bad]
    host = torch.cat([p.to(torch.int64) for p in parts]).cpu()
    S = parts[0].numel()
    return host[:S], (host[S:-1] if row_len is None else None), bool(host[-1])


def gather_scored(labels, vocab: int, ignore_index: int, row_len: int | None, cu_seqlens=None):
    """Scored positions of labels whose shape and dtype are already validated: one host sync.

    ``cu_seqlens`` (packed, ``row_len`` None) is validated here, on the host copy that the readback brings.
    Returns (idx (N,), labels there (N,) int64 checked to lie in [0, vocab), seq (N,), counts_host (S,),
    cu_host (S+1,) or None).
    """
    labels1 = labels.reshape(-1)  # (M,)
    mask = labels1 != ignore_index
    cu = None if row_len is not None else as_cu_seqlens(cu_seqlens, labels.device)
    counts_host, cu_host, bad = _readback(labels1, mask, vocab, row_len, cu)
    if cu_host is not None:
        check_cu_seqlens(cu, labels1.numel(), host=cu_host)
    if bad:  # error path: find the value (further syncs are fine here)
        check_labels_range(labels1[mask].to(torch.int64), vocab, ignore_index)
    N = int(counts_host.sum())
    idx = torch.nonzero_static(mask, size=N).squeeze(1)  # (N,) sorted; no sync, the count is known
    labels_s = labels1.index_select(0, idx).to(torch.int64)
    if row_len is not None:
        seq = torch.div(idx, row_len, rounding_mode="floor")
    else:
        seq = torch.searchsorted(cu[1:].to(torch.int64).contiguous(), idx, right=True)
    return idx, labels_s, seq, counts_host, cu_host


def scored_positions(labels, vocab: int, ignore_index: int, row_len: int | None, cu_seqlens=None):
    """The scored positions of (already validated) labels: one host sync (see :func:`gather_scored`).

    Args:
        labels: (B, T) or (N,) integer labels. row_len: T for padded rows, None with ``cu_seqlens`` (S+1,).
    Returns:
        (idx (N,) sorted flat positions, labels there (N,) int64 checked to lie in [0, vocab),
        seq (N,) non-decreasing sequence index of each).
    """
    return gather_scored(labels, vocab, ignore_index, row_len, cu_seqlens)[:3]


def prepare(hidden, weight: torch.Tensor | Head, labels, *, bias=None, cu_seqlens=None, ignore_index=-100,
            temperature=1.0, softcap=None) -> Scored:
    """Validate the engine's inputs (see :func:`dpo_fast.sequence_logprobs`) and gather the scored positions.

    ``weight``: the (V, H) weight (with ``bias``), or a :class:`~.head.Head` (``bias`` None), whose global
    vocabulary size bounds the labels.

    One host sync: the per-sequence scored counts, with the label-range flag and packed boundaries (their
    values are validated on that host copy). Returns a :class:`Scored`.
    """
    head = as_head(weight, bias)
    S, T = check_engine_inputs(hidden, head.weight, labels, head.bias, cu_seqlens, ignore_index, temperature,
                               softcap, cu_values=False)
    V = head.vocab_size  # the global V when the head is split over the vocabulary
    idx, labels_s, seq, counts_host, cu_host = gather_scored(labels, V, ignore_index, T, cu_seqlens)
    return Scored(hidden.reshape(-1, hidden.shape[-1]), idx, labels_s, seq, S, counts_host, cu_host)
