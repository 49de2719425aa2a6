"""The fused log-prob engine: log-probs of label tokens from hidden states, never holding (B, T, V) logits.

Math (per scored token t, raw logits z_t = W h_t + b, tempered/capped zc_t, see ``_rowops``):

    log p_t = zc_t[y_t] - lse(zc_t)
    d/dz_t  = g_t * (onehot(y_t) - softmax(zc_t)) * dzc/dz        (g_t: upstream gradient of log p_t)
    dh_t    = sum_v (d/dz_tv) W_v,      dW = sum_t (d/dz_t) (x) h_t,      db = sum_t d/dz_t

Only *scored* tokens (labels != ignore_index) enter any GEMM: they are gathered first, so prompt and pad
positions cost nothing. Costs, with N scored tokens, H hidden, V vocab (2NHV FLOPs per GEMM):

* no-grad forward: 1 GEMM. Saved for backward: the per-token lse, float32 (4 bytes/token).
* forward + backward: 4 GEMMs (forward z; backward recomputes z, then dh and dW), 3 with a frozen
  weight (dW skipped entirely), 2 + the forward when only the weight needs a gradient.

Tiling (workspace budget from :mod:`dpo_fast._config`): the forward walks token chunks with the full
vocabulary (the lse needs whole rows); the backward walks *vocabulary slices* over all scored tokens, so
each dW slice is produced by one GEMM, written once, reduced in fp32 inside BLAS, with no atomics and a
deterministic result. Only when the scored tokens are so many that even a 1024-column slice over all of
them exceeds the budget does the backward also split tokens; dW is then accumulated in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _config
from ._rowops import acc_dtype, make_rows
from ._validate import (autocast_aware, check_cu_seqlens, check_engine_inputs, check_labels_range, check_same_device,
                        check_scalars, check_tensor)

# ----------------------------------------------------------------------------------------------------------
# preparation: which positions are scored, and to which sequence each belongs


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
        seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64).contiguous(), idx, right=True)
    return idx, labels_s, seq


def prepare(hidden, weight, labels, *, bias=None, cu_seqlens=None, ignore_index=-100, temperature=1.0,
            softcap=None) -> Scored:
    """Validate inputs and gather the scored positions (one host sync: their count)."""
    S, T = check_engine_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index, temperature, softcap)
    idx, labels_s, seq = scored_positions(labels, weight.shape[0], ignore_index, T, cu_seqlens)
    return Scored(hidden.reshape(-1, hidden.shape[-1]), idx, labels_s, seq, S)


# ----------------------------------------------------------------------------------------------------------
# tiles and GEMMs


def _linear_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """out (n, v) = h (n, H) @ w (v, H)^T (+ b (v,)), in the input dtype with fp32 accumulation."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _tile(buf: torch.Tensor, n: int, v: int) -> torch.Tensor:
    """A contiguous (n, v) view at the start of a flat workspace buffer."""
    return buf[: n * v].view(n, v)


#: per-token statistics a stats-enabled forward produces, in the order the row ops return them
STAT_KEYS = ("entropy", "hit", "zmean", "lse2")


_EPILOGUE_OK: dict[tuple, bool] = {}


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with 16-bit a, b.

    On CUDA, cuBLAS can add the fp32 product into ``acc`` in its epilogue (``addmm(..., out_dtype=float32)``),
    with no 16-bit temporary and no extra pass over (n, H). That overload is recent, so it is probed once per
    (device, dtype) against the plain route on a small problem, and used only if it exists and agrees.
    """
    key = (acc.device, a.dtype)
    ok = _EPILOGUE_OK.get(key)
    if ok is None:
        ok = _EPILOGUE_OK[key] = _probe_epilogue(acc.device, a.dtype)
    if ok:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b))  # 16-bit product, added into fp32 without an fp32 temporary


def _probe_epilogue(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda":
        return False  # the dtype overload is CUDA-only
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(96, 80, generator=g).to(device, dtype)
        b = torch.randn(80, 72, generator=g).to(device, dtype)
        c = torch.randn(96, 72, generator=g).to(device)
        expect = c + a.float() @ b.float()
        got = c.clone()
        torch.addmm(got, a, b, out_dtype=torch.float32, out=got)
        return bool(torch.allclose(got, expect, rtol=1e-3, atol=1e-2))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _per_elem_bytes(rows, dtype: torch.dtype) -> int:
    """Workspace bytes per logits-tile element: the tile itself plus the backend's temporaries."""
    return dtype.itemsize + rows.bytes_per_elem


def forward_tokens(hidden2, weight, bias, idx, labels_s, rows, budget: int, stats_out: dict | None = None):
    """No-grad forward over scored tokens: token chunks x full vocabulary.

    Returns (logp, lse): (N,) float32 each. With a ``stats_out`` dict, also fills it with per-token
    ``entropy``, ``hit`` (label is the arg-max), ``zmean`` (vocab-mean of the tempered/capped logits) and
    ``lse2`` (logsumexp of twice the logits, for WPO), (N,) float32 each, computed in the same pass, and
    ``lse`` (the returned one).
    """
    N = idx.numel()
    V = weight.shape[0]
    dev = hidden2.device
    acc = acc_dtype(hidden2.dtype)
    logp = torch.empty(N, dtype=acc, device=dev)
    lse = torch.empty(N, dtype=acc, device=dev)
    if N == 0:
        return logp, lse
    stats = stats_out is not None
    if stats:
        stats_out["entropy"] = torch.empty(N, dtype=acc, device=dev)
        stats_out["hit"] = torch.empty(N, dtype=acc, device=dev)
        stats_out["zmean"] = torch.empty(N, dtype=acc, device=dev)
        stats_out["lse2"] = torch.empty(N, dtype=acc, device=dev)
    chunk = max(1, min(N, budget // (V * _per_elem_bytes(rows, hidden2.dtype))))
    buf = torch.empty(chunk * V, dtype=hidden2.dtype, device=dev)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        hc = hidden2.index_select(0, idx[s:e])  # (n, H)
        z = _linear_into(_tile(buf, e - s, V), hc, weight, bias)  # (n, V)
        res = rows.fwd(z, labels_s[s:e], stats=stats)
        logp[s:e], lse[s:e] = res[0], res[1]
        if stats:
            for k, v in zip(STAT_KEYS, res[2:6]):
                stats_out[k][s:e] = v
    if stats:
        stats_out["lse"] = lse
    return logp, lse


def backward_tokens(g, hidden2, weight, bias, idx, labels_s, lse, rows, budget: int,
                    need_dh: bool, need_dw: bool, need_db: bool):
    """Gradients of sum_t g_t log p_t. g, lse: (N,) float32.

    Returns (dhidden2 (M, H) | None, dweight (V, H) | None, dbias (V,) | None) in the input dtypes.
    """
    N = idx.numel()
    V, H = weight.shape
    dt, dev = hidden2.dtype, hidden2.device
    dh_out = torch.zeros_like(hidden2, memory_format=torch.contiguous_format) if need_dh else None
    acc = acc_dtype(dt)
    db_acc = torch.zeros(V, dtype=acc, device=dev) if need_db else None
    per = _per_elem_bytes(rows, dt)
    min_cols = min(V, 1024)
    tok_chunk = min(N, max(1, budget // (min_cols * per)))
    # every dW row is written by exactly one GEMM when all tokens fit one chunk: no zero-fill needed
    if need_dw:
        dw_out = (torch.empty_like if 0 < N == tok_chunk else torch.zeros_like)(
            weight, memory_format=torch.contiguous_format)
    else:
        dw_out = None
    if N == 0 or not (need_dh or need_dw or need_db):
        return dh_out, dw_out, None if db_acc is None else db_acc.to(bias.dtype)
    cols = min(V, max(1, budget // (tok_chunk * per)))
    if cols < V and cols >= 256:
        cols -= cols % 128  # BLAS-friendly slice widths
    n_slices = -(-V // cols)
    split_tokens = tok_chunk < N
    # dW is written once per slice when all tokens are in one chunk; otherwise accumulate in fp32.
    dw_acc = None
    if need_dw and split_tokens:
        dw_acc = dw_out if dt == acc else torch.zeros(V, H, dtype=acc, device=dev)
    buf = torch.empty(tok_chunk * cols, dtype=dt, device=dev)
    g = g.to(acc).contiguous()
    for s in range(0, N, tok_chunk):
        e = min(N, s + tok_chunk)
        n = e - s
        rows_idx = idx[s:e]
        hc = hidden2.index_select(0, rows_idx)  # (n, H)
        lab, ls, gg = labels_s[s:e], lse[s:e], g[s:e]
        dh_acc = None
        if need_dh and n_slices > 1:
            dh_acc = torch.zeros(n, H, dtype=acc, device=dev)
        dh_chunk = None
        for v0 in range(0, V, cols):
            v1 = min(V, v0 + cols)
            w_s = weight[v0:v1]  # (vs, H)
            z = _linear_into(_tile(buf, n, v1 - v0), hc, w_s, None if bias is None else bias[v0:v1])
            dz = rows.bwd(z, z, lab, ls, gg, v0)  # (n, vs), in place, input dtype
            if need_dh:
                if dh_acc is None:
                    dh_chunk = torch.mm(dz, w_s)  # (n, H): the only slice
                elif dt == acc:
                    dh_acc.addmm_(dz, w_s)
                else:
                    _addmm_fp32_(dh_acc, dz, w_s)
            if need_dw:
                if dw_acc is None:
                    torch.mm(dz.t(), hc, out=dw_out[v0:v1])  # (vs, H), written once
                elif dw_acc.dtype == dt:
                    dw_acc[v0:v1].addmm_(dz.t(), hc)
                else:
                    _addmm_fp32_(dw_acc[v0:v1], dz.t(), hc)
            if need_db:
                db_acc[v0:v1] += dz.to(acc).sum(0)
        if need_dh:
            dh_out.index_copy_(0, rows_idx, dh_chunk if dh_acc is None else dh_acc.to(dt))
    if dw_acc is not None and dw_acc is not dw_out:
        dw_out.copy_(dw_acc)
    return dh_out, dw_out, None if db_acc is None else db_acc.to(bias.dtype)


class LinearLabelLogprobs(torch.autograd.Function):
    """(hidden2 (M, H), weight (V, H), bias (V,)|None) -> log p of the label at each scored position (N,) fp32."""

    @staticmethod
    def forward(ctx, hidden2, weight, bias, idx, labels_s, rows, budget, stats_out=None):
        logp, lse = forward_tokens(hidden2, weight, bias, idx, labels_s, rows, budget, stats_out)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden2, weight, bias, idx, labels_s, lse)
            ctx.rows, ctx.budget = rows, budget
        return logp

    @staticmethod
    def backward(ctx, g):
        hidden2, weight, bias, idx, labels_s, lse = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        dh, dw, db = backward_tokens(g, hidden2, weight, bias, idx, labels_s, lse, ctx.rows, ctx.budget,
                                     need_dh, need_dw, need_db)
        return dh, dw, db, None, None, None, None, None


def scored_logprobs(sc: Scored, weight, bias, *, temperature=1.0, softcap=None, backend="auto",
                    stats_out: dict | None = None) -> torch.Tensor:
    """(N,) float32 log-probs of the scored tokens of a prepared batch, differentiable.

    ``stats_out``: optional dict filled with the per-token stats of the forward (see :func:`forward_tokens`).
    """
    rows = make_rows(backend, sc.hidden2.device, sc.hidden2.dtype, temperature, softcap)
    budget = _config.get_workspace_bytes(sc.hidden2.device)
    return LinearLabelLogprobs.apply(sc.hidden2, weight, bias, sc.idx, sc.labels, rows, budget, stats_out)


# ----------------------------------------------------------------------------------------------------------
# public API


@torch.compiler.disable  # data-dependent tiling: run eagerly inside compiled graphs
@autocast_aware("hidden", "weight", "bias")
def sequence_logprobs(hidden, weight, labels, *, bias=None, cu_seqlens=None, ignore_index=-100,
                      temperature=1.0, softcap=None, average=False, backend="auto") -> torch.Tensor:
    r"""Per-sequence sum (or mean) of the log-probs of the label tokens, without materialising logits.

    For every scored position t (``labels[t] != ignore_index``), with z = (h_t W^T + b) / temperature and,
    if ``softcap`` is set, z <- softcap * tanh(z / softcap):  log p_t = z[labels[t]] - logsumexp(z).
    Sequence s gets  sum_{t in s} log p_t  (divided by its scored-token count if ``average``). A sequence
    with no scored token gives 0 and zero gradient.

    Args:
        hidden: last hidden states, (B, T, H) padded or (N, H) packed; float32, bfloat16 or float16.
            ``labels[t]`` is the token predicted from ``hidden[t]`` (already shifted).
        weight: lm_head weight (V, H), same dtype and device as ``hidden``.
        labels: (B, T) or (N,) integer token ids in [0, V), or ``ignore_index`` for unscored positions.
        bias: optional (V,) lm_head bias.
        cu_seqlens: (S+1,) int32/int64 boundaries of the packed sequences: 0 = cu[0] <= ... <= cu[S] = N.
        ignore_index: label value of positions that are not scored (default -100).
        temperature: logits are divided by it (> 0).
        softcap: optional Gemma-2 style cap (> 0).
        average: return the mean instead of the sum of each sequence's log-probs.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.

    Returns:
        (B,) or (S,) float32. Differentiable w.r.t. hidden, weight and bias (each only if it requires grad;
        a frozen weight skips the dW GEMM).

    Shape:
        B batch rows, T positions, H hidden size, V vocabulary, N packed tokens, S packed sequences.
        Memory beyond inputs and gradients: the workspace budget (:func:`dpo_fast.set_workspace_bytes`)
        plus O(N) float32 — never (B, T, V).

    NaN/inf in ``hidden`` propagate to the affected sequences' log-probs (and to gradients in backward);
    nothing crashes. Under ``torch.autocast``, hidden/weight/bias are cast to the autocast dtype first (as
    ``F.linear`` would), so bf16 activations with an fp32 master weight work; otherwise all three must share
    one dtype.

    Examples::

        >>> logps = dpo_fast.sequence_logprobs(hidden, model.lm_head.weight, labels)  # (B,)
    """
    if not isinstance(average, bool):
        raise TypeError(f"average: expected a bool, got {type(average).__name__}")
    sc = prepare(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ignore_index=ignore_index,
                 temperature=temperature, softcap=softcap)
    logp = scored_logprobs(sc, weight, bias, temperature=temperature, softcap=softcap, backend=backend)
    out = segment_sum(logp, sc.seq, sc.num_seqs)
    if average:
        out = out / sc.counts().to(logp.dtype).clamp_min(1.0)
    return out


@torch.compiler.disable  # data-dependent tiling: run eagerly inside compiled graphs
@autocast_aware("hidden", "weight", "bias")
def token_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                   backend="auto") -> torch.Tensor:
    r"""Per-token log-probs of the label tokens, without materialising logits.

    Same math and arguments as :func:`sequence_logprobs` (no packing boundaries are needed per token).

    Args:
        hidden: (B, T, H) or (N, H), float32/bfloat16/float16.
        weight: (V, H). labels: (B, T) or (N,) integers in [0, V) or ``ignore_index``. bias: optional (V,).

    Returns:
        float32 tensor shaped like ``labels``: log p_t at scored positions, 0 at ignored ones.
        Differentiable w.r.t. hidden, weight and bias.
    """
    check_tensor("hidden", hidden, dims=(2, 3), floating=True)
    check_tensor("labels", labels, floating=False)
    shape = tuple(labels.shape)
    if hidden.dim() == 2 and labels.dim() == 1:  # packed tokens: one row (no boundaries needed per token)
        hidden, labels = hidden.unsqueeze(0), labels.unsqueeze(0)
    sc = prepare(hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                 softcap=softcap)
    logp = scored_logprobs(sc, weight, bias, temperature=temperature, softcap=softcap, backend=backend)
    out = torch.zeros(sc.hidden2.shape[0], dtype=logp.dtype, device=logp.device).index_copy(0, sc.idx, logp)
    return out.view(shape)


# ----------------------------------------------------------------------------------------------------------
# logits you already hold


class LogitsLabelLogprobs(torch.autograd.Function):
    """(logits2 (M, V)) -> log p of the label at each scored position (N,) fp32."""

    @staticmethod
    def forward(ctx, logits2, idx, labels_s, rows, budget):
        N = idx.numel()
        M, V = logits2.shape
        acc = acc_dtype(logits2.dtype)
        logp = torch.empty(N, dtype=acc, device=logits2.device)
        lse = torch.empty(N, dtype=acc, device=logits2.device)
        chunk = max(1, min(max(N, 1), budget // (V * _per_elem_bytes(rows, logits2.dtype))))
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            z = logits2.index_select(0, idx[s:e])  # (n, V) contiguous copy of the scored rows
            logp[s:e], lse[s:e] = rows.fwd(z, labels_s[s:e])
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits2, idx, labels_s, lse)
            ctx.rows, ctx.chunk = rows, chunk
        return logp

    @staticmethod
    def backward(ctx, g):
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


_REDUCTIONS = ("sum", "mean", "none")


@torch.compiler.disable  # data-dependent tiling: run eagerly inside compiled graphs
@autocast_aware("logits")
def logprobs_from_logits(logits, labels, *, ignore_index=-100, temperature=1.0, cu_seqlens=None,
                         reduction="sum") -> torch.Tensor:
    r"""Log-probs of the label tokens from logits you already hold, in bounded extra memory.

    Args:
        logits: (B, T, V) padded, or (N, V) packed (with ``cu_seqlens`` for sum/mean); any float dtype.
        labels: (B, T) or (N,) integer ids in [0, V), or ``ignore_index``.
        ignore_index: label value of unscored positions.
        temperature: logits are divided by it (> 0).
        cu_seqlens: (S+1,) boundaries of packed sequences.
        reduction: ``"sum"`` -> (B,)/(S,) per-sequence sums; ``"mean"`` -> per-sequence means over scored
            tokens (0 for none); ``"none"`` -> float32 shaped like labels, 0 at ignored positions.

    Returns:
        float32 tensor; differentiable w.r.t. ``logits``. Never makes a float32 copy of all the logits:
        scored rows are processed in workspace-sized chunks.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    check_tensor("logits", logits, dims=(2, 3), floating=True)
    check_tensor("labels", labels, floating=False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_scalars(temperature, None)
    check_same_device(logits=logits, labels=labels, cu_seqlens=cu_seqlens)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:-1])} (logits' leading dims), got {tuple(labels.shape)}"
        )
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits: expected a non-empty vocabulary dimension, got V=0")
    if logits.shape[0] == 0 or (logits.dim() == 3 and logits.shape[1] == 0):
        raise ValueError(f"logits: empty batch, got shape {tuple(logits.shape)}")
    if cu_seqlens is not None:
        if logits.dim() != 2:
            raise ValueError(f"logits: expected a packed (N, V) tensor with cu_seqlens, got {tuple(logits.shape)}")
        S = check_cu_seqlens(cu_seqlens, logits.shape[0])
    elif logits.dim() == 2 and reduction != "none":
        raise ValueError("cu_seqlens: required with packed (N, V) logits when reduction is 'sum' or 'mean'")
    else:
        S = logits.shape[0]
    logits2 = logits.reshape(-1, V)  # (M, V)
    row_len = None if cu_seqlens is not None else (logits.shape[1] if logits.dim() == 3 else logits.shape[0])
    idx, labels_s, seq = scored_positions(labels, V, ignore_index, row_len, cu_seqlens)
    rows = make_rows("auto", logits.device, logits.dtype, temperature, None)
    budget = _config.get_workspace_bytes(logits.device)
    logp = LogitsLabelLogprobs.apply(logits2, idx, labels_s, rows, budget)
    if reduction == "none":
        out = torch.zeros(logits2.shape[0], dtype=logp.dtype, device=logp.device).index_copy(0, idx, logp)
        return out.view(labels.shape)
    out = segment_sum(logp, seq, S)
    if reduction == "mean":
        cnt = torch.bincount(seq, minlength=S)[:S].to(logp.dtype)
        out = out / cnt.clamp_min(1.0)
    return out
