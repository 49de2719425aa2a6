"""Log-probs and token statistics from a head split over the vocabulary, never gathering the weight.

Rank r of a tensor-parallel group holds rows [s_r, s_r + V_r) of the (V, H) head (and of its bias), and
the same hidden states as every other rank. Per scored token t it forms its logits slice z_r = W_r h_t + b_r
(tempered/capped exactly as the engine's row ops do) and reduces it to

    m_r = max z_r,  S_r = sum exp(z_r - m_r),  y_r = z[y_t] if the label is in the slice else 0,
    and, for the token statistics, E_r = sum exp(z_r - m_r) z_r,  Z_r = sum z_r,  Q_r = sum exp(2 (z_r - m_r)).

Communication per scored token, forward: one all-reduce MAX of m (1 float), then one all-reduce SUM of
[S_r exp(m_r - m), y_r] (2 floats), or of 5 floats with the statistics [+ E_r exp(m_r - m), Z_r,
Q_r exp(2 (m_r - m))]. Then lse = m + log S, log p = y - lse, entropy = lse - E / S, mean logit = Z / V,
lse(2z) = 2 m + log Q, top-1 hit = (y >= m): the same formulas as the single-process row pass.

Backward: each rank recomputes its slice, forms d z_r = g (onehot - softmax) with the *global* lse, and
produces its dW_r / db_r slice locally; the hidden-state gradient is the sum of the ranks' d z_r W_r: one
all-reduce SUM of (N, H). Nothing in either direction is of size V. Collectives run in a fixed order
over a fixed group, so results are deterministic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..engine import (Head, RowResult, Scored, TokenStats, TorchRows, VocabShard, acc_dtype, backward_tokens,
                      linear_into, make_rows, per_elem_bytes, tile, workspace)

__all__ = ["VOCAB_PARALLEL", "VocabParallel", "VocabParallelLogprobs", "forward_tokens_vp", "scored_logprobs_vp",
           "vocab_mean_row"]


def _local_partials(hidden2, weight, bias, idx, labels_s, shard: VocabShard, rows: TorchRows, budget: int,
                    stats: bool):
    """Per-token partial reductions of this rank's vocabulary slice.

    Returns (m_raw (N,), packed (N, k)): the slice's raw maximum and the sums [S, y(, E, Z, Q)] relative to
    the slice's (finite-guarded) maximum, all in the accumulation dtype.
    """
    N, Vl = idx.numel(), weight.shape[0]
    dev, acc = hidden2.device, acc_dtype(hidden2.dtype)
    k = 5 if stats else 2
    m_raw = torch.full((N,), float("-inf"), dtype=acc, device=dev)
    packed = torch.zeros(N, k, dtype=acc, device=dev)
    if N == 0 or Vl == 0:
        return m_raw, packed
    chunk = max(1, min(N, budget // (Vl * per_elem_bytes(rows, hidden2.dtype))))
    buf = torch.empty(chunk * Vl, dtype=hidden2.dtype, device=dev)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        hc = hidden2.index_select(0, idx[s:e])  # (n, H)
        zc = rows.tempered(linear_into(tile(buf, e - s, Vl), hc, weight, bias), in_place=True)  # (n, Vl)
        local = labels_s[s:e] - shard.start
        own = (local >= 0) & (local < Vl)
        zy = zc.gather(1, local.clamp(0, Vl - 1)[:, None]).squeeze(1)
        packed[s:e, 1] = torch.where(own, zy, torch.zeros_like(zy))
        mr = zc.amax(dim=1)
        m_raw[s:e] = mr
        m = torch.where(torch.isfinite(mr), mr, torch.zeros_like(mr))
        if stats:
            packed[s:e, 3] = zc.sum(dim=1)
            ex = torch.exp(zc - m[:, None])
            packed[s:e, 0] = ex.sum(dim=1)
            packed[s:e, 2] = (ex * zc).sum(dim=1)
            packed[s:e, 4] = ex.square_().sum(dim=1)
        else:
            packed[s:e, 0] = zc.sub_(m[:, None]).exp_().sum(dim=1)
    return m_raw, packed


def _combine(m_raw, packed, shard: VocabShard):
    """The two all-reduces; returns the global (lse, y, m_raw, sums) per token."""
    m_glob = m_raw.clone()
    dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=shard.group)  # 1 float per token
    m_loc = torch.where(torch.isfinite(m_raw), m_raw, torch.zeros_like(m_raw))
    m = torch.where(torch.isfinite(m_glob), m_glob, torch.zeros_like(m_glob))
    # exp(m_r - m) <= 1 whenever the slice's maximum is finite; a slice of -inf logits adds nothing
    scale = torch.where(torch.isfinite(m_raw), torch.exp(m_loc - m), torch.zeros_like(m))
    packed = packed.clone()
    packed[:, 0] *= scale
    if packed.shape[1] == 5:
        packed[:, 2] *= scale
        packed[:, 4] *= scale.square()
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shard.group)  # 2 (or 5) floats per token
    return m, m_glob, packed


def forward_tokens_vp(hidden2, weight, bias, idx, labels_s, rows, budget: int, stats: bool = False,
                      shard: VocabShard | None = None) -> RowResult:
    """:func:`dpo_fast.engine.forward_tokens` on a vocabulary shard: same (N,) results on every rank.

    Args:
        hidden2 (M, H), weight (V_r, H), bias (V_r,) | None: this rank's slice; labels_s (N,) global ids.
        rows: the call's row ops (only their temperature/softcap are used). shard: the layout.
    """
    trows = rows if isinstance(rows, TorchRows) else TorchRows(rows.temperature, rows.softcap)
    m_raw, packed = _local_partials(hidden2, weight, bias, idx, labels_s, shard, trows, budget, stats)
    m, m_glob, sums = _combine(m_raw, packed, shard)
    lse = m + torch.log(sums[:, 0])
    y = sums[:, 1]
    st = None
    if stats:
        ent = lse - sums[:, 2] / sums[:, 0]
        st = TokenStats(ent, (y >= m_glob).to(lse.dtype), sums[:, 3] / shard.vocab_size,
                        2 * m + torch.log(sums[:, 4]))
    return RowResult(y - lse, lse, st)


class VocabParallelLogprobs(torch.autograd.Function):
    """(hidden2 (M, H), weight (V_r, H), bias (V_r,)|None) -> (N,) log p of the labels, over a vocab shard."""

    @staticmethod
    def forward(ctx, hidden2, weight, bias, idx, labels_s, shard, rows, budget, stats_out=None):
        res = forward_tokens_vp(hidden2, weight, bias, idx, labels_s, rows, budget, stats_out is not None, shard)
        if stats_out is not None:
            stats_out.update(res.stats._asdict(), lse=res.lse)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden2, weight, bias, idx, labels_s, res.lse)
            ctx.shard, ctx.rows, ctx.budget = shard, rows, budget
        return res.logp

    @staticmethod
    def backward(ctx, g):
        hidden2, weight, bias, idx, labels_s, lse = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        shard = ctx.shard
        if weight.shape[0] == 0:  # an empty slice of an uneven DTensor split: nothing local to differentiate
            dh = torch.zeros_like(hidden2) if need_dh else None
            dw = torch.zeros_like(weight) if need_dw else None
            db = torch.zeros_like(bias) if need_db else None
        else:
            # labels relative to this slice: the row ops add the one-hot term only where 0 <= label < V_r
            dh, dw, db = backward_tokens(g, hidden2, weight, bias, idx, labels_s - shard.start, lse, ctx.rows,
                                         ctx.budget, need_dh, need_dw, need_db)
        if need_dh:
            rows_dh = dh.index_select(0, idx)  # (N, H): only scored rows are non-zero
            dist.all_reduce(rows_dh, op=dist.ReduceOp.SUM, group=shard.group)  # the one dh all-reduce
            dh.index_copy_(0, idx, rows_dh)
        return dh, dw, db, None, None, None, None, None, None


def scored_logprobs_vp(sc: Scored, weight, bias, *, temperature=1.0, softcap=None, backend="auto",
                       stats_out: dict | None = None, shard: VocabShard | None = None) -> torch.Tensor:
    """:func:`dpo_fast.engine.scored_logprobs` on a vocabulary shard ((N,) float32, differentiable).

    The local tiles run on the torch row ops (the Triton forward kernel needs whole rows); ``backend`` is
    accepted for signature parity.
    """
    rows = make_rows("torch", sc.hidden2.device, sc.hidden2.dtype, temperature, softcap)
    budget = workspace.get_workspace_bytes(sc.hidden2.device)
    return VocabParallelLogprobs.apply(sc.hidden2, weight, bias, sc.idx, sc.labels, shard, rows, budget,
                                       stats_out)


def vocab_mean_row(weight: torch.Tensor, bias: torch.Tensor | None, shard: VocabShard):
    """(mean of the head's rows (H,), mean of its bias or None) over the whole vocabulary: one all-reduce."""
    H = weight.shape[1]
    acc = acc_dtype(weight.dtype)
    part = torch.zeros(H + 1, dtype=acc, device=weight.device)
    part[:H] = weight.detach().to(acc).sum(0)
    if bias is not None:
        part[H] = bias.detach().to(acc).sum()
    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=shard.group)
    part /= shard.vocab_size
    return part[:H].to(weight.dtype), None if bias is None else part[H].to(bias.dtype)


class VocabParallel:
    """The engine's passes on a head split over the vocabulary (:class:`dpo_fast.engine.SplitHead`).

    :func:`dpo_fast.distributed.distributed_head` puts :data:`VOCAB_PARALLEL` in the ``split`` of every
    vocabulary-parallel :class:`dpo_fast.engine.Head`; the engine calls it through that protocol.
    """

    #: the fused one-pass route needs whole logits rows: a split head takes the two-pass route
    one_pass = False

    def forward_tokens(self, head: Head, hidden2, idx, labels_s, rows, budget: int, stats: bool) -> RowResult:
        return forward_tokens_vp(hidden2, head.weight, head.bias, idx, labels_s, rows, budget, stats, head.shard)

    def scored_logprobs(self, head: Head, sc: Scored, *, temperature, softcap, stats_out):
        return scored_logprobs_vp(sc, head.weight, head.bias, temperature=temperature, softcap=softcap,
                                  stats_out=stats_out, shard=head.shard)

    def vocab_mean_row(self, head: Head):
        return vocab_mean_row(head.weight, head.bias, head.shard)


#: the one (stateless) instance
VOCAB_PARALLEL = VocabParallel()
