"""Deterministic per-sequence sums of per-token values, each sequence summed on its own.

The sum of a segment never involves another segment's values: a NaN, an inf or a huge value in one
sequence cannot reach any other (a global prefix sum differenced at the segment ends would carry it to
every later sequence). No atomics and no host sync: the values are laid out in a dense zero-padded
(pieces, 256) float64 matrix, one segment's run of up to 256 values per row, and the rows are summed (a
fixed reduction order, so bit-identical from run to run); a segment longer than 256 values has several
rows, whose sums are reduced again the same way. Two levels cover 65536 values per segment, three 16.7M.
"""

from __future__ import annotations

import torch

#: values per row of the dense layout
PIECE = 256


def _sum_sorted(v: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(num_segments,) float64 sums of v (n,) float64 by non-decreasing ``seg`` (n,) in [0, num_segments].

    The id ``num_segments`` marks padding entries whose value is exactly 0 (dropped).
    """
    S = num_segments
    dev = v.device
    bound = v.numel()  # an upper bound on any segment's count, known on the host
    while True:
        start = segment_starts(seg, S + 1)  # (S+2,): no bincount, whose CUDA kernel reads min/max to the host
        counts = start[1:] - start[:-1]
        start = start[:-1]
        r = torch.arange(v.numel(), device=dev) - start[seg]  # position of each value in its segment
        valid = seg < S
        if bound <= PIECE:  # every segment fits one row: row s holds segment s
            dense = torch.zeros(S + 1, max(bound, 1), dtype=v.dtype, device=dev)
            dense[seg, torch.where(valid, r, 0)] = v  # padding entries (all 0) share one slot of the last row
            return dense[:S].sum(1)
        pieces = (counts[:S] + PIECE - 1) // PIECE  # rows per segment
        pend = torch.cumsum(pieces, 0)
        P = v.numel() // PIECE + S  # >= sum(pieces): no sync for the exact count
        row = torch.where(valid, (pend - pieces)[seg.clamp(max=S - 1)] + torch.div(r, PIECE, rounding_mode="floor"), P)
        dense = torch.zeros(P + 1, PIECE, dtype=v.dtype, device=dev)
        dense[row, torch.where(valid, r % PIECE, 0)] = v
        v = dense[:P].sum(1)  # (P,) row sums; rows past sum(pieces) are 0
        seg = torch.searchsorted(pend, torch.arange(P, device=dev), right=True)  # their segment; S for unused rows
        bound = -(-bound // PIECE)


def segment_starts(seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(num_segments + 1,) int64 index of the first entry of each segment in the non-decreasing ``seg``, then
    ``seg.numel()``: a binary search on the device, no host sync (``bincount`` on CUDA reads its input's
    min and max to the host)."""
    return torch.searchsorted(seg, torch.arange(num_segments + 1, device=seg.device, dtype=seg.dtype))


def segment_counts(seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(num_segments,) int64 number of entries of each segment in the non-decreasing ``seg``; no host sync."""
    start = segment_starts(seg, num_segments)
    return start[1:] - start[:-1]


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, seg, num_segments):
        ctx.save_for_backward(seg)
        out = _sum_sorted(values.detach().to(torch.float64), seg, num_segments) if num_segments else \
            values.new_zeros(0, dtype=torch.float64)
        return out.to(values.dtype)

    @staticmethod
    def backward(ctx, grad):
        (seg,) = ctx.saved_tensors
        return grad.index_select(0, seg), None, None


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Deterministic per-segment sums of ``values`` (n,) whose segment ids ``seg`` (n,) are non-decreasing.

    Each segment is summed in float64 from its own values only, so a non-finite value stays in its segment
    (IEEE sum semantics there: NaN, or +-inf). Bit-identical from run to run, no atomics (``index_add`` on
    CUDA adds in a run-dependent order), no host sync, differentiable (d out[s] / d values[i] = [seg[i] == s]).

    Args:
        values: (n,) floating. seg: (n,) int64 in [0, num_segments), non-decreasing. num_segments: S >= 0.
    Returns:
        (S,) in ``values``' dtype; empty segments give 0.
    """
    return _SegmentSum.apply(values, seg.to(torch.int64), int(num_segments))
