"""Units and groups of the fused route: what a module's task supplies and how units are grouped.

A *unit* is the set of sequences whose loss terms depend on each other (a preference pair, one KTO example, one
GRPO completion). :func:`plan_groups` packs consecutive whole units into groups whose logits fit the
workspace; a task (:class:`UnitTask`) sees its units' per-token values as :class:`Values`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..engine import Scored, TokenStats, segment_counts, segment_sum

Tensor = torch.Tensor


@dataclass(frozen=True)
class Group:
    """One group of whole units whose logits fit the workspace.

    tok: (n,) int64 indices into the scored arrays (``Scored.idx`` / ``labels`` / ``seq``), in scored order.
    seg: (n,) int64 position of each token's sequence in the group's segment list (non-decreasing).
    slots: (G, k) int64 segment of each unit's j-th sequence (units' sequences in order: [u0s0, u0s1, ...]).
    units: (G,) int64 unit ids (rows of the task's ``units``).
    """

    tok: Tensor
    seg: Tensor
    slots: Tensor
    units: Tensor


@dataclass
class Values:
    """Per-token values of some units, as a task's ``group_loss`` / ``batch_loss`` receives them.

    logp: (n,) token log-probs (inside ``group_loss``: an autograd leaf; on the two-pass route: the engine's
        differentiable output). lse: (n,) logsumexp of each token's (tempered, capped) logits, no grad.
    stats: :class:`dpo_fast.engine.TokenStats` of the tokens when the task asked for them.
    tok: (n,) indices into the scored arrays. seg, num_segs: each token's segment (sequence) in [0, num_segs).
    slots: (G, k) segment of each unit's sequences. units: (G,) unit ids.
    """

    logp: Tensor
    lse: Tensor
    stats: TokenStats | None
    tok: Tensor
    seg: Tensor
    num_segs: int
    slots: Tensor
    units: Tensor

    def unit_sums(self, per_token: Tensor | None = None, token_weights: Tensor | None = None) -> Tensor:
        """(G, k) per-sequence sums of ``per_token`` (n,) (default: logp), times ``token_weights`` (N,) if given."""
        v = self.logp if per_token is None else per_token
        if token_weights is not None:
            v = v * token_weights.index_select(0, self.tok)
        return segment_sum(v, self.seg, self.num_segs)[self.slots]

    def unit_means(self, per_token: Tensor) -> Tensor:
        """(G, k) per-sequence means of ``per_token`` (n,) over the sequence's scored tokens (0 for none)."""
        cnt = segment_counts(self.seg, self.num_segs).to(per_token.dtype)  # no bincount: no host sync
        return (segment_sum(per_token, self.seg, self.num_segs) / cnt.clamp_min(1.0))[self.slots]


def batch_values(sc: Scored, units: Tensor, logp: Tensor, lse: Tensor, stats: TokenStats | None) -> Values:
    """:class:`Values` of every unit of the batch (segments = the batch's sequences)."""
    dev = sc.idx.device
    return Values(logp, lse, stats, torch.arange(sc.idx.numel(), device=dev), sc.seq, sc.num_seqs, units,
                  torch.arange(units.shape[0], device=dev))


def group_values(group: Group, logp: Tensor, lse: Tensor, stats: TokenStats | None) -> Values:
    return Values(logp, lse, stats, group.tok, group.seg, group.slots.numel(), group.slots, group.units)


class UnitTask(Protocol):
    """What a fused module supplies for one forward (built from the batch; holds its batch constants).

    Attributes:
        units: (U, k) int64 sequence indices of each unit (pairs: k = 2, (chosen, rejected)).
        decomposable: whether ``group_loss`` summed over groups is the total loss (else: two-pass route).
        want_stats: the row pass must compute :class:`dpo_fast.engine.TokenStats`.
        entropy_grad: optional (default False; needs ``want_stats``): the loss is differentiated through the
            entropies too (``v.stats.entropy`` is differentiable in ``group_loss`` and on the two-pass route).
    """

    units: Tensor
    decomposable: bool
    want_stats: bool

    def group_loss(self, v: Values) -> Tensor:
        """The group's units' share of the total loss (a scalar), differentiable in ``v.logp``."""
        ...

    def batch_loss(self, v: Values, compute_metrics: bool) -> Any:
        """The total loss of all units (``v`` from :func:`batch_values`): a loss function's output record."""
        ...


def plan_groups(counts: Tensor, units: Tensor, max_tokens: int, device, *, counts_dev: Tensor | None = None,
                units_host: Tensor | None = None) -> list[Group] | None:
    """Greedy groups of consecutive units whose scored tokens number at most ``max_tokens``.

    The plan is made on the host from host counts; each group's index tensors are then built on ``device``
    from host-known sizes (``repeat_interleave`` with ``output_size``): no copy and no sync per group.

    Args:
        counts: (S,) scored tokens per sequence, on the host (``Scored.host_counts``; a device tensor costs a
            copy). units: (U, k) int64 sequence indices on ``device``. counts_dev: ``counts`` on ``device``
            (``Scored.counts``; else one copy). units_host: a host copy of ``units`` when the caller knows it
            without a copy (else one copy).
    Returns:
        None if one unit alone exceeds ``max_tokens``; else the :class:`Group` list (units with no scored
        token are in some group too).
    """
    cnt = counts.to("cpu", torch.int64)
    units_cpu = (units if units_host is None else units_host).to("cpu", torch.int64)
    per_unit = cnt[units_cpu].sum(1).tolist()
    if per_unit and max(per_unit) > max_tokens:
        return None
    spans, u0, cur_tok = [], 0, 0  # (first unit, end unit, tokens)
    for i, t in enumerate(per_unit):
        if i > u0 and cur_tok + t > max_tokens:
            spans.append((u0, i, cur_tok))
            u0, cur_tok = i, 0
        cur_tok += t
    if per_unit:
        spans.append((u0, len(per_unit), cur_tok))
    cnt_d = (counts if counts_dev is None else counts_dev).to(device=device, dtype=torch.int64)
    start_d = torch.cumsum(cnt_d, 0) - cnt_d
    units_d = units.to(device=device, dtype=torch.int64)
    k = units.shape[1]
    out = []
    for a, b, n in spans:
        seqs = units_d[a:b].reshape(-1)  # (G*k,) unit-major
        m = seqs.numel()
        lens = cnt_d.index_select(0, seqs)
        seg = torch.repeat_interleave(torch.arange(m, device=device), lens, output_size=n)  # (n,)
        offs = torch.cumsum(lens, 0) - lens
        tok = start_d.index_select(0, seqs)[seg] + (torch.arange(n, device=device) - offs[seg])  # (n,)
        out.append(Group(tok, seg, torch.arange(m, device=device).view(-1, k), torch.arange(a, b, device=device)))
    return out
