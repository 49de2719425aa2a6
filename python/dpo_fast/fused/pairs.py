"""Preference pairs as units of the fused route: layouts, LD-DPO token weights, the logits/* GEMV, and the
token metrics of pairs. Shared by :mod:`.dpo` and :mod:`.reference_free`."""

from __future__ import annotations

import torch

from ..engine.checks import check_tensor
from ..engine import Head, Scored, acc_dtype, segment_sum
from .metrics import token_metrics, token_sums
from .plan import Values

Tensor = torch.Tensor

#: slot names of a pair unit, in order: TRL's metric names use them (``logits/chosen`` ...)
PAIR_SLOTS = ("chosen", "rejected")


def pair_layout(pairs, S: int, device) -> tuple[Tensor, Tensor]:
    """(chosen_seq (P,), rejected_seq (P,)) int64 sequence indices.

    ``pairs=None``: TRL's layout [chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}] (S even); else a (P, 2)
    integer tensor of (chosen, rejected) sequence indices in [0, S), each sequence in at most one pair.
    """
    if pairs is None:
        if S % 2:
            raise ValueError(
                f"hidden: the default pair layout needs an even number of sequences [chosen..., rejected...], "
                f"got {S}; pass pairs=(P, 2) for another layout")
        P = S // 2
        ar = torch.arange(P, device=device)
        return ar, ar + P
    check_tensor("pairs", pairs, dims=(2,), floating=False)
    if pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise ValueError(f"pairs: expected shape (P, 2) with P >= 1 of (chosen, rejected) sequence indices, "
                         f"got {tuple(pairs.shape)}")
    p = pairs.to(device=device, dtype=torch.int64)
    bad = (p < 0) | (p >= S)
    if bool(bad.any()):
        i, j = (int(x) for x in torch.nonzero(bad)[0])  # the first offending entry, row-major
        raise ValueError(f"pairs: expected sequence indices in [0, {S}) (S = {S} sequences), got "
                         f"pairs[{i}, {j}] = {int(p[i, j])}, which is outside [0, {S})")
    flat = p.reshape(-1)
    if torch.unique(flat).numel() != flat.numel():
        first = {}
        for k, v in enumerate(flat.tolist()):
            if v in first:
                a, b = first[v]
                raise ValueError(f"pairs: expected each sequence in at most one pair, got sequence {v} at "
                                 f"pairs[{a}, {b}] and pairs[{k // 2}, {k % 2}]")
            first[v] = (k // 2, k % 2)
    return p[:, 0].contiguous(), p[:, 1].contiguous()


def pair_units_host(pairs, S: int) -> Tensor | None:
    """(P, 2) int64 host copy of the pair layout when it is known without a device-to-host copy (TRL's
    layout, or ``pairs`` given on the CPU), for the fused route's plan; else None (the route copies it)."""
    if pairs is None:
        ar = torch.arange(S // 2)
        return torch.stack([ar, ar + S // 2], 1)
    return pairs.to(torch.int64) if pairs.device.type == "cpu" else None


def check_ld_alpha(ld_alpha) -> None:
    if ld_alpha is not None and (isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float))
                                 or not 0.0 <= ld_alpha <= 1.0):
        raise ValueError(f"ld_alpha: expected None or a float in [0, 1], got {ld_alpha!r}")


def ld_token_weights(sc: Scored, counts: Tensor, c_seq: Tensor, r_seq: Tensor, alpha: float) -> Tensor:
    """(N,) LD-DPO token weights: 1 for a sequence's first min(|y_w|, |y_l|) scored tokens, α after.

    ``counts``: the (global) scored tokens per sequence. On a token shard (``sc`` a sequence-parallel
    :class:`dpo_fast.distributed.sequence_parallel.SeqScored`) a token's position in its sequence adds the
    scored tokens of that sequence on earlier ranks (``prior_counts``, from the all-gather behind the counts).
    """
    shared = torch.full((sc.num_seqs,), float("inf"), device=counts.device)
    m = torch.minimum(counts[c_seq], counts[r_seq])
    shared[c_seq], shared[r_seq] = m, m
    prior = getattr(sc, "prior_counts", None)
    local = counts if prior is None else sc.local_counts()
    start = torch.cumsum(local, 0) - local  # (S,) first scored token of each sequence here
    if prior is not None:  # sequence parallel: minus the sequence's scored tokens on earlier ranks
        start = start - prior()
    rank = torch.arange(sc.idx.numel(), device=counts.device, dtype=torch.float32) - start[sc.seq]
    w = torch.where(rank < shared[sc.seq], 1.0, float(alpha))
    return w.to(acc_dtype(sc.hidden2.dtype))


def logits_means(sc: Scored, head: Head, counts, c_seq, r_seq, temperature) -> tuple[Tensor, Tensor]:
    """(P,) mean over each sequence's scored tokens of the vocab-mean logit h·mean_v(W_v) + mean(b).

    No logits needed: mean_v z_tv = h_t · mean_v(W_v) + mean(b) (divided by the temperature): one GEMV.
    Softcap is not applied (it does not commute with the mean); with ``token_metrics`` the modules take
    ``logits/*`` from the pass's own (capped) logits instead.
    """
    acc = acc_dtype(sc.hidden2.dtype)  # float64 for float64 inputs
    weight, bias = head.weight, head.bias
    with torch.no_grad():
        if head.split is not None:  # a split head (dpo_fast.distributed): means over the whole vocabulary
            wbar, bbar = head.split.vocab_mean_row(head)
        else:
            wbar = weight.detach().to(acc).mean(0).to(weight.dtype)  # (H,)
            bbar = None if bias is None else bias.detach().to(acc).mean()
        m = torch.mv(sc.hidden2.detach(), wbar).index_select(0, sc.idx).to(acc)  # (N,): a GEMV, no copy of h
        if bias is not None:
            m = m + bbar.to(acc)
        m = m / temperature
        per_seq = segment_sum(m, sc.seq, sc.num_seqs)
        if head.seq is not None:  # hidden sharded over tokens: the global sums (dpo_fast.distributed)
            from ..distributed.sequence_parallel import reduce_sums
            per_seq = reduce_sums(head.seq, per_seq)
        per_seq = per_seq / counts.clamp_min(1.0)
    return per_seq[c_seq], per_seq[r_seq]


def add_pair_token_metrics(out, values: Values, compute_metrics: bool) -> dict[str, Tensor]:
    """TRL's DPO token metrics into ``out.metrics``; returns the sums behind them.

    entropy = mean over all scored tokens of the paired sequences; mean_token_accuracy = fraction of scored
    chosen tokens whose label is the arg-max; logits/chosen|rejected = mean over scored tokens of the
    vocab-mean (tempered, capped) logit. One host sync.
    """
    sums = token_sums(values, PAIR_SLOTS)
    if compute_metrics:
        out.metrics.update(token_metrics(sums, PAIR_SLOTS, accuracy=True, logits=True))
    return sums


def wpo_logweights(v: Values) -> Tensor:
    """(G, 2) WPO log-weights of the units in ``v``: per sequence mean_t[log p_t − (lse(2z_t) − 2 lse(z_t))]."""
    return v.unit_means((v.logp.detach() - (v.stats.lse2 - 2 * v.lse)).to(v.lse.dtype))
