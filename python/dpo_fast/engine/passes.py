"""The engine's passes over scored tokens, and the autograd Functions that wrap them.

Math (per scored token t, raw logits z_t = W h_t + b, tempered/capped zc_t, see :mod:`.rows`):

    log p_t = zc_t[y_t] - lse(zc_t)
    d/dz_t  = g_t * (onehot(y_t) - softmax(zc_t)) * dzc/dz        (g_t: upstream gradient of log p_t)
    dh_t    = sum_v (d/dz_tv) W_v,      dW = sum_t (d/dz_t) (x) h_t,      db = sum_t d/dz_t

With entropies H_t = lse_t - sum_v p_tv zc_tv as outputs too (:class:`LinearLabelLogprobsEntropy`), an upstream
g^H_t adds  -g^H_t p_tv (zc_tv - lse_t + H_t) dzc/dz  to d/dz_tv (zc - sum_u p_u zc_u = zc - lse + H).

Costs, with N scored tokens, H hidden, V vocab (2NHV FLOPs per GEMM): a no-grad forward is 1 GEMM and
saves the per-token lse (float32, 4 bytes/token) for backward; forward + backward is 4 GEMMs (forward z;
backward recomputes z, then dh and dW), 3 with a frozen weight (dW skipped entirely).

Tiling (workspace budget from :mod:`.workspace`): the forward walks token chunks with the full vocabulary
(the lse needs whole rows); the backward walks *vocabulary slices* over all scored tokens, so each dW slice
is produced by one GEMM, written once, reduced in fp32 inside BLAS, with no atomics and a deterministic
result. Only when the scored tokens are so many that even a 1024-column slice over all of them exceeds the
budget does the backward also split tokens; dW is then accumulated in float32.
"""

from __future__ import annotations

import torch

from . import workspace
from .head import Head, as_head
from .rows import RowOps, RowResult, TokenStats, acc_dtype, make_rows
from .scored import Scored
from .tiles import addmm_fp32_, linear_into, matmul, per_elem_bytes, tile, tile_dtype, tile_rows


def forward_tokens(hidden2, weight: torch.Tensor | Head, bias, idx, labels_s, rows: RowOps, budget: int,
                   stats: bool = False, tile_dt: torch.dtype | None = None) -> RowResult:
    """No-grad forward over scored tokens: token chunks x full vocabulary.

    Args:
        hidden2: (M, H); weight: (V, H), or a :class:`~.head.Head` (``bias`` None); bias: (V,) or None;
        idx: (N,) rows of hidden2 to score;
        labels_s: (N,) int64 labels; rows: the backend's row ops; budget: workspace bytes.
        stats: also compute :class:`TokenStats` in the same pass.
        tile_dt: dtype of the logits tiles (default :func:`.tiles.tile_dtype` of the inputs).
    Returns:
        :class:`RowResult` of (N,) tensors in the accumulation dtype (float32 for 16/32-bit inputs).
    """
    head = as_head(weight, bias)
    if head.split is not None:  # a head split across processes runs its own passes
        return head.split.forward_tokens(head, hidden2, idx, labels_s, rows, budget, stats)
    weight, bias = head.weight, head.bias
    N = idx.numel()
    V = weight.shape[0]
    dev = hidden2.device
    acc = acc_dtype(hidden2.dtype)
    logp = torch.empty(N, dtype=acc, device=dev)
    lse = torch.empty(N, dtype=acc, device=dev)
    st = TokenStats(*(torch.empty(N, dtype=acc, device=dev) for _ in TokenStats._fields)) if stats else None
    if N == 0:
        return RowResult(logp, lse, st)
    tile_dt = tile_dtype(hidden2.dtype) if tile_dt is None else tile_dt
    chunk = tile_rows(budget // (V * per_elem_bytes(rows, hidden2.dtype, tile_dt=tile_dt)), N)
    buf = torch.empty(chunk * V, dtype=tile_dt, device=dev)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        hc = hidden2.index_select(0, idx[s:e])  # (n, H)
        z = linear_into(tile(buf, e - s, V), hc, weight, bias)  # (n, V)
        res = rows.fwd(z, labels_s[s:e], stats=stats)
        logp[s:e], lse[s:e] = res.logp, res.lse
        if stats:
            for dst, src in zip(st, res.stats):
                dst[s:e] = src
    return RowResult(logp, lse, st)


def backward_tokens(g, hidden2, weight, bias, idx, labels_s, lse, rows: RowOps, budget: int,
                    need_dh: bool, need_dw: bool, need_db: bool, tile_dt: torch.dtype | None = None,
                    g_ent=None, ent=None):
    """Gradients of sum_t g_t log p_t (+ g_ent_t H_t). g, lse: (N,) float32 (the lse from :func:`forward_tokens`).

    ``g_ent``, ``ent``: (N,) upstream gradient of each token's entropy and the entropy itself (the forward's
    stats), both or neither; the row ops add the entropy term to dz (see :meth:`.rows.RowOps.bwd`).

    Logits tiles are in ``tile_dt`` (default :func:`.tiles.tile_dtype`); when that is wider than the inputs,
    the row pass writes the logits gradient into an input-dtype tile that the dh/dW GEMMs read.

    Returns (dhidden2 (M, H) | None, dweight (V, H) | None, dbias (V,) | None) in the input dtypes.
    """
    N = idx.numel()
    V, H = weight.shape
    dt, dev = hidden2.dtype, hidden2.device
    dh_out = torch.zeros_like(hidden2, memory_format=torch.contiguous_format) if need_dh else None
    acc = acc_dtype(dt)
    db_acc = torch.zeros(V, dtype=acc, device=dev) if need_db else None
    tile_dt = tile_dtype(dt) if tile_dt is None else tile_dt
    per = per_elem_bytes(rows, dt, grad=True, tile_dt=tile_dt)  # the forward's tile dtype, not today's knob
    if g_ent is not None:
        per += rows.entropy_bytes_per_elem
    min_cols = min(V, 1024)
    tok_chunk = tile_rows(budget // (min_cols * per), N)
    # dW with 16-bit weights and split tokens: each slice accumulates over the token chunks in an fp32
    # (cols, H) buffer that the budget counts (4H bytes per column), never an fp32 V x H one
    dw_slice_fp32 = need_dw and tok_chunk < N and dt != acc
    col_extra = H * 4 if dw_slice_fp32 else 0
    if dw_slice_fp32:
        tok_chunk = tile_rows(max(1, (budget // min_cols - col_extra) // per), N)
    dw_out = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else None
    if need_dw and N == 0:
        dw_out.zero_()
    if N == 0 or not (need_dh or need_dw or need_db):
        return dh_out, dw_out, None if db_acc is None else db_acc.to(bias.dtype)
    cols = min(V, max(1, budget // (tok_chunk * per + col_extra)))
    if cols < V and cols >= 256:
        cols -= cols % 128  # BLAS-friendly slice widths
    n_slices = -(-V // cols)
    hs = hidden2.index_select(0, idx)  # (N, H) the scored rows, gathered once
    # dh: written by the one slice directly, else accumulated over the slices in fp32 (N, H)
    dh_acc = torch.zeros(N, H, dtype=acc, device=dev) if need_dh and n_slices > 1 else None
    dw_acc = torch.empty(cols, H, dtype=acc, device=dev) if dw_slice_fp32 else None
    buf = torch.empty(tok_chunk * cols, dtype=tile_dt, device=dev)
    gbuf = None if tile_dt == dt else torch.empty(tok_chunk * cols, dtype=dt, device=dev)  # dz for the GEMMs
    g = g.to(acc).contiguous()
    if g_ent is not None:
        g_ent, ent = g_ent.to(acc).contiguous(), ent.to(acc).contiguous()
    for v0 in range(0, V, cols):  # vocabulary slices outside, token chunks inside
        v1 = min(V, v0 + cols)
        w_s = weight[v0:v1]  # (vs, H)
        b_s = None if bias is None else bias[v0:v1]
        dw_s = None if dw_acc is None else dw_acc[: v1 - v0]
        for s in range(0, N, tok_chunk):
            e = min(N, s + tok_chunk)
            n = e - s
            hc = hs[s:e]  # (n, H)
            z = linear_into(tile(buf, n, v1 - v0), hc, w_s, b_s)
            ge = None if g_ent is None else (g_ent[s:e], ent[s:e])
            dz = rows.bwd(z, z if gbuf is None else tile(gbuf, n, v1 - v0), labels_s[s:e], lse[s:e], g[s:e], v0,
                          *(ge or ()))
            if need_dh:
                if dh_acc is None:
                    dh_out.index_copy_(0, idx[s:e], matmul(dz, w_s))  # (n, H): the only slice
                elif dt == acc:
                    dh_acc[s:e].addmm_(dz, w_s)
                else:
                    addmm_fp32_(dh_acc[s:e], dz, w_s)
            if need_dw:
                if dw_s is not None:  # 16-bit, split tokens: fp32 slice accumulator
                    if s == 0:
                        dw_s.zero_()
                    addmm_fp32_(dw_s, dz.t(), hc)
                elif s == 0:
                    matmul(dz.t(), hc, out=dw_out[v0:v1])  # (vs, H): the first (often the only) chunk writes
                else:
                    dw_out[v0:v1].addmm_(dz.t(), hc)  # fp32 weight: accumulates in place in fp32
            if need_db:
                db_acc[v0:v1] += dz.to(acc).sum(0)
        if dw_s is not None:
            dw_out[v0:v1].copy_(dw_s)  # one rounding per dW element
    del buf, gbuf, hs
    if dh_acc is not None:
        for s in range(0, N, tok_chunk):  # rounded chunk by chunk: no (N, H) temporary
            e = min(N, s + tok_chunk)
            dh_out.index_copy_(0, idx[s:e], dh_acc[s:e].to(dt))
    return dh_out, dw_out, None if db_acc is None else db_acc.to(bias.dtype)


def forbid_double_backward(what: str) -> None:
    """Raise a clear RuntimeError when a backward runs with ``create_graph=True`` (grad mode on inside backward).

    The engine's gradients come from hand-written passes (in-place tiles, ``out=`` GEMMs), not from
    differentiable ops, so a second derivative (a gradient penalty, Hessian-vector products) cannot be
    formed through them; without this check it is either an obscure ``mm(): functions with out=...`` error or,
    on the fused route, a gradient that silently does not require grad (a penalty on it is silently 0).
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what}: double backward (torch.autograd.grad(..., create_graph=True), e.g. for a gradient penalty) "
            "through dpo_fast's log-prob engine is not supported: its gradients are computed by hand-written "
            "passes, not differentiable ops, on both routes (fused=False does not help). For higher-order "
            "derivatives compute the log-probs with plain PyTorch (logits = hidden @ weight.T, then "
            "torch.log_softmax(logits, -1).gather(...)) and use the loss functions (dpo_fast.dpo_loss, "
            "dpo_fast.kto_loss, dpo_fast.grpo_loss, ...), which are ordinary autograd code")


class LinearLabelLogprobs(torch.autograd.Function):
    """(hidden2 (M, H), weight (V, H), bias (V,)|None) -> log p of the label at each scored position (N,) fp32.

    ``stats_out``: optional dict, filled with the forward's :class:`TokenStats` fields and ``lse`` ((N,) each).
    """

    @staticmethod
    def forward(ctx, hidden2, weight, bias, idx, labels_s, rows, budget, stats_out=None):
        tile_dt = tile_dtype(hidden2.dtype)  # fixed here: the backward recomputes the same tiles
        res = forward_tokens(hidden2, weight, bias, idx, labels_s, rows, budget, stats=stats_out is not None,
                             tile_dt=tile_dt)
        if stats_out is not None:
            stats_out.update(res.stats._asdict(), lse=res.lse)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden2, weight, bias, idx, labels_s, res.lse)
            ctx.rows, ctx.budget, ctx.tile_dt = rows, budget, tile_dt
        return res.logp

    @staticmethod
    def backward(ctx, g):
        forbid_double_backward("sequence_logprobs / token_logprobs (and the two-pass route of the fused losses)")
        hidden2, weight, bias, idx, labels_s, lse = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        dh, dw, db = backward_tokens(g, hidden2, weight, bias, idx, labels_s, lse, ctx.rows, ctx.budget,
                                     need_dh, need_dw, need_db, ctx.tile_dt)
        return dh, dw, db, None, None, None, None, None


def scored_logprobs(sc: Scored, weight: torch.Tensor | Head, bias=None, *, temperature=1.0, softcap=None,
                    backend="auto", stats_out: dict | None = None) -> torch.Tensor:
    """(N,) float32 log-probs of the scored tokens of a prepared batch, differentiable.

    ``weight``: the (V, H) weight (with ``bias``), or a :class:`~.head.Head` (``bias`` None); differentiable
    w.r.t. its ``weight`` and ``bias``.

    ``stats_out``: optional dict filled with the forward's per-token stats, keys :data:`.rows.STAT_KEYS`
    and ``"lse"``, (N,) each (no gradient).
    """
    head = as_head(weight, bias)
    if head.split is not None:  # a head split across processes runs its own passes
        return head.split.scored_logprobs(head, sc, temperature=temperature, softcap=softcap, stats_out=stats_out)
    weight, bias = head.weight, head.bias
    rows = make_rows(backend, sc.hidden2.device, sc.hidden2.dtype, temperature, softcap)
    budget = workspace.get_workspace_bytes(sc.hidden2.device)
    return LinearLabelLogprobs.apply(sc.hidden2, weight, bias, sc.idx, sc.labels, rows, budget, stats_out)


class LinearLabelLogprobsEntropy(torch.autograd.Function):
    """(hidden2 (M, H), weight (V, H), bias (V,)|None) -> (log p, entropy H) at each scored position, (N,) each,
    both differentiable.

    Per token, H = lse - sum_v p_v zc_v and dH/dz_v = -p_v (zc_v - sum_u p_u zc_u) dzc/dz_v, where
    zc_v - sum_u p_u zc_u = (zc_v - lse) + H: the backward needs only the saved lse and H, no extra pass.
    ``stats_out``: optional dict, filled with the forward's :class:`TokenStats` fields and ``lse`` (detached).
    """

    @staticmethod
    def forward(ctx, hidden2, weight, bias, idx, labels_s, rows, budget, stats_out=None):
        tile_dt = tile_dtype(hidden2.dtype)
        res = forward_tokens(hidden2, weight, bias, idx, labels_s, rows, budget, stats=True, tile_dt=tile_dt)
        if stats_out is not None:
            stats_out.update(res.stats._asdict(), lse=res.lse)
        ent = res.stats.entropy
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden2, weight, bias, idx, labels_s, res.lse, ent)
            ctx.rows, ctx.budget, ctx.tile_dt = rows, budget, tile_dt
        return res.logp, ent.clone() if stats_out is not None else ent

    @staticmethod
    def backward(ctx, g, g_ent):
        forbid_double_backward("token_logprobs_and_entropy / scored_logprobs_entropy")
        hidden2, weight, bias, idx, labels_s, lse, ent = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        dh, dw, db = backward_tokens(g, hidden2, weight, bias, idx, labels_s, lse, ctx.rows, ctx.budget,
                                     need_dh, need_dw, need_db, ctx.tile_dt, g_ent=g_ent, ent=ent)
        return dh, dw, db, None, None, None, None, None


def scored_logprobs_entropy(sc: Scored, weight: torch.Tensor | Head, bias=None, *, temperature=1.0, softcap=None,
                            backend="auto", stats_out: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies), (N,) each, of the scored tokens of a prepared batch, both differentiable
    (:class:`LinearLabelLogprobsEntropy`); otherwise as :func:`scored_logprobs`. A head split across
    processes (vocabulary-parallel) is not supported here."""
    head = as_head(weight, bias)
    if head.split is not None:
        raise NotImplementedError("entropies with a gradient are not implemented for a head split across processes "
                                  "(vocabulary-parallel); use an unsplit head")
    weight, bias = head.weight, head.bias
    rows = make_rows(backend, sc.hidden2.device, sc.hidden2.dtype, temperature, softcap)
    budget = workspace.get_workspace_bytes(sc.hidden2.device)
    return LinearLabelLogprobsEntropy.apply(sc.hidden2, weight, bias, sc.idx, sc.labels, rows, budget, stats_out)


class LogitsLabelLogprobs(torch.autograd.Function):
    """(logits2 (M, V)) -> log p of the label at each scored position (N,) fp32, in workspace-sized chunks."""

    @staticmethod
    def forward(ctx, logits2, idx, labels_s, rows, budget):
        N = idx.numel()
        M, V = logits2.shape
        acc = acc_dtype(logits2.dtype)
        logp = torch.empty(N, dtype=acc, device=logits2.device)
        lse = torch.empty(N, dtype=acc, device=logits2.device)
        per = logits2.dtype.itemsize + rows.bytes_per_elem  # tiles are copies of the caller's logits rows
        chunk = max(1, min(max(N, 1), budget // (V * per)))
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            z = logits2.index_select(0, idx[s:e])  # (n, V) contiguous copy of the scored rows
            res = rows.fwd(z, labels_s[s:e])
            logp[s:e], lse[s:e] = res.logp, res.lse
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits2, idx, labels_s, lse)
            ctx.rows, ctx.chunk = rows, chunk
        return logp

    @staticmethod
    def backward(ctx, g):
        forbid_double_backward("logprobs_from_logits")
        logits2, idx, labels_s, lse = ctx.saved_tensors
        g = g.to(lse.dtype).contiguous()
        dlogits = torch.zeros_like(logits2, memory_format=torch.contiguous_format)  # (M, V)
        N = idx.numel()
        for s in range(0, N, ctx.chunk):
            e = min(N, s + ctx.chunk)
            z = logits2.index_select(0, idx[s:e])
            ctx.rows.bwd(z, z, labels_s[s:e], lse[s:e], g[s:e], 0)
            dlogits.index_copy_(0, idx[s:e], z)
        return dlogits, None, None, None, None
