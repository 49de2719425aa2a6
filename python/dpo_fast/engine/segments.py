"""Deterministic per-sequence sums of per-token values."""

from __future__ import annotations

import torch


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Deterministic per-segment sums of ``values`` (n,) whose segment ids ``seg`` (n,) are non-decreasing.

    A float64 prefix sum differenced at the segment ends: no atomics (``index_add`` on CUDA adds in a
    run-dependent order), bit-identical from run to run, exact to ~1e-16 relative of the running total, and
    differentiable. Returns (num_segments,) in ``values``' dtype; empty segments give 0.
    """
    counts = torch.bincount(seg, minlength=num_segments)[:num_segments]  # integer: order-independent
    ends = torch.cumsum(counts, 0)
    prefix = torch.cat([values.new_zeros(1, dtype=torch.float64), torch.cumsum(values.to(torch.float64), 0)])
    return (prefix[ends] - prefix[ends - counts]).to(values.dtype)
