"""The engine as ``torch.library`` custom ops (``dpo_fast::``), so that ``torch.compile`` traces through it.

Dynamo cannot trace the engine itself: the scored-token count N sizes the tiles, and reading it is a host
sync. So the engine runs *inside* opaque custom ops whose outputs are shaped like their inputs, and the
scored count stays inside the op:

    dpo_fast::linear_logprobs_fwd(hidden2 (M, H), weight (V, H), bias (V,)?, labels (M,), ...)
        -> (logp (M,), lse (M,))           accumulation dtype (float32; float64 for float64 inputs),
                                           0 at positions whose label is ``ignore_index``
    dpo_fast::linear_logprobs_bwd(grad (M,), hidden2, weight, bias?, labels, lse (M,), ..., need_dh, need_dw,
                                  need_db) -> (dhidden2 (M, H) | (0,), dweight (V, H) | (0,), dbias (V,) | (0,))
    dpo_fast::logits_logprobs_fwd(logits2 (M, V), labels (M,), ...) -> (logp (M,), lse (M,))
    dpo_fast::logits_logprobs_bwd(grad (M,), logits2, labels, lse, ...) -> dlogits2 (M, V)

Each op's fake implementation allocates those shapes from the input shapes alone (no data read, no host
sync while tracing); the real implementation finds the scored positions (its one readback), validates the
labels there (a ``ValueError`` naming ``labels``) and runs the engine's passes. The forward ops are
differentiable through ``register_autograd``; their backward is the matching ``*_bwd`` op. A gradient that is
not needed comes back as an empty (0,) tensor (custom ops cannot return None) and is dropped in the autograd
formula. The head is flattened: weight, bias, temperature, softcap (``None`` = no cap), backend, the workspace
budget (bytes) and the tile dtype (``"float32"`` ...) are op arguments, fixed when the call is traced.
Heads split across processes are not ops (see :func:`dpo_fast.logprobs`' compile path).
"""

from __future__ import annotations

import torch

from . import workspace
from .checks import check_cu_seqlens
from .passes import backward_tokens, forward_tokens
from .rows import acc_dtype, make_rows
from .scored import gather_scored
from .tiles import tile_dtype

Tensor = torch.Tensor

__all__ = ["linear_logprobs", "logits_logprobs", "dtype_name"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"tile_dtype: expected a torch dtype name, got {name!r}")
    return dt


def _scored(labels: Tensor, ignore_index: int, vocab: int):
    """(idx (N,), labels there (N,) int64), validated: the op's one host sync (the count N and the range flag
    come back in one readback, :func:`~dpo_fast.engine.scored.gather_scored`)."""
    labels = labels.reshape(-1)
    idx, labels_s, _, _, _ = gather_scored(labels, vocab, ignore_index, row_len=labels.numel())
    return idx, labels_s


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ----------------------------------------------------------------------------------------------------------
# hidden states + head -> log-probs


@torch.library.custom_op("dpo_fast::checked_cu_seqlens", mutates_args=())
def checked_cu_seqlens(cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    """(S+1,) int64 copy of ``cu_seqlens`` after checking its values (starts at 0, non-decreasing, ends at
    ``n_tokens``); a ``ValueError`` naming ``cu_seqlens`` otherwise. Its one host sync happens when the op runs,
    never while tracing; downstream code reads the returned copy, so the check cannot be dropped from a graph."""
    check_cu_seqlens(cu_seqlens, n_tokens)
    return cu_seqlens.to(torch.int64, copy=True)


@checked_cu_seqlens.register_fake
def _(cu_seqlens, n_tokens):
    return cu_seqlens.new_empty(cu_seqlens.shape, dtype=torch.int64)


@torch.library.custom_op("dpo_fast::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden2: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                        temperature: float, softcap: float | None, backend: str, budget: int,
                        tile_dtype: str) -> tuple[Tensor, Tensor]:
    M = hidden2.shape[0]
    acc = acc_dtype(hidden2.dtype)
    logp = torch.zeros(M, dtype=acc, device=hidden2.device)
    lse = torch.zeros(M, dtype=acc, device=hidden2.device)
    idx, labels_s = _scored(labels, ignore_index, weight.shape[0])
    if idx.numel():
        rows = make_rows(backend, hidden2.device, hidden2.dtype, temperature, softcap)
        res = forward_tokens(hidden2, weight, bias, idx, labels_s, rows, budget, tile_dt=_dtype(tile_dtype))
        logp.index_copy_(0, idx, res.logp)
        lse.index_copy_(0, idx, res.lse)
    return logp, lse


@linear_logprobs_fwd.register_fake
def _(hidden2, weight, bias, labels, ignore_index, temperature, softcap, backend, budget, tile_dtype):
    M = hidden2.shape[0]
    acc = acc_dtype(hidden2.dtype)
    return hidden2.new_empty((M,), dtype=acc), hidden2.new_empty((M,), dtype=acc)


@torch.library.custom_op("dpo_fast::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(grad: Tensor, hidden2: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                        lse: Tensor, ignore_index: int, temperature: float, softcap: float | None, backend: str,
                        budget: int, tile_dtype: str, need_dh: bool, need_dw: bool,
                        need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    need_db = need_db and bias is not None
    idx, labels_s = _scored(labels, ignore_index, weight.shape[0])
    rows = make_rows(backend, hidden2.device, hidden2.dtype, temperature, softcap)
    g = grad.reshape(-1).index_select(0, idx)
    lse_s = lse.index_select(0, idx)
    dh, dw, db = backward_tokens(g, hidden2, weight, bias, idx, labels_s, lse_s, rows, budget, need_dh, need_dw,
                                 need_db, _dtype(tile_dtype))
    return (_empty(hidden2) if dh is None else dh, _empty(weight) if dw is None else dw,
            _empty(weight) if db is None else db)


@linear_logprobs_bwd.register_fake
def _(grad, hidden2, weight, bias, labels, lse, ignore_index, temperature, softcap, backend, budget, tile_dtype,
      need_dh, need_dw, need_db):
    dh = torch.empty_like(hidden2, memory_format=torch.contiguous_format) if need_dh else _empty(hidden2)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else _empty(weight)
    db = torch.empty_like(bias) if need_db and bias is not None else _empty(weight)
    return dh, dw, db


def _linear_setup(ctx, inputs, output):
    hidden2, weight, bias, labels, ignore_index, temperature, softcap, backend, budget, tdt = inputs
    ctx.save_for_backward(hidden2, weight, bias, labels, output[1])
    ctx.args = (ignore_index, temperature, softcap, backend, budget, tdt)


def _linear_backward(ctx, grad_logp, grad_lse):
    hidden2, weight, bias, labels, lse = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    if grad_logp is None or not (need_dh or need_dw or need_db):
        return (None,) * 10
    dh, dw, db = linear_logprobs_bwd(grad_logp, hidden2, weight, bias, labels, lse, *ctx.args, need_dh, need_dw,
                                     bool(need_db and bias is not None))
    return (dh if need_dh else None, dw if need_dw else None, db if need_db and bias is not None else None,
            None, None, None, None, None, None, None)


linear_logprobs_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_logprobs(hidden2: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, *, ignore_index: int,
                    temperature: float, softcap: float | None, backend: str) -> Tensor:
    """(M,) log-probs of ``labels`` (M,) from ``hidden2`` (M, H) through ``weight``/``bias``, 0 at ignored
    positions, through :func:`linear_logprobs_fwd` (budget and tile dtype read from the knobs now)."""
    budget = workspace.get_workspace_bytes(hidden2.device)
    tdt = dtype_name(tile_dtype(hidden2.dtype))
    return linear_logprobs_fwd(hidden2, weight, bias, labels, int(ignore_index), float(temperature),
                               None if softcap is None else float(softcap), backend, int(budget), tdt)[0]


# ----------------------------------------------------------------------------------------------------------
# logits you hold -> log-probs


def _logits_fwd_impl(logits2, idx, labels_s, rows, budget):
    N = idx.numel()
    V = logits2.shape[1]
    acc = acc_dtype(logits2.dtype)
    logp = torch.empty(N, dtype=acc, device=logits2.device)
    lse = torch.empty(N, dtype=acc, device=logits2.device)
    per = logits2.dtype.itemsize + rows.bytes_per_elem
    chunk = max(1, min(max(N, 1), budget // (V * per)))
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        res = rows.fwd(logits2.index_select(0, idx[s:e]), labels_s[s:e])
        logp[s:e], lse[s:e] = res.logp, res.lse
    return logp, lse, chunk


@torch.library.custom_op("dpo_fast::logits_logprobs_fwd", mutates_args=())
def logits_logprobs_fwd(logits2: Tensor, labels: Tensor, ignore_index: int, temperature: float, backend: str,
                        budget: int) -> tuple[Tensor, Tensor]:
    M, V = logits2.shape
    acc = acc_dtype(logits2.dtype)
    logp = torch.zeros(M, dtype=acc, device=logits2.device)
    lse = torch.zeros(M, dtype=acc, device=logits2.device)
    idx, labels_s = _scored(labels, ignore_index, V)
    if idx.numel():
        rows = make_rows(backend, logits2.device, logits2.dtype, temperature, None)
        lp, ls, _ = _logits_fwd_impl(logits2, idx, labels_s, rows, budget)
        logp.index_copy_(0, idx, lp)
        lse.index_copy_(0, idx, ls)
    return logp, lse


@logits_logprobs_fwd.register_fake
def _(logits2, labels, ignore_index, temperature, backend, budget):
    acc = acc_dtype(logits2.dtype)
    M = logits2.shape[0]
    return logits2.new_empty((M,), dtype=acc), logits2.new_empty((M,), dtype=acc)


@torch.library.custom_op("dpo_fast::logits_logprobs_bwd", mutates_args=())
def logits_logprobs_bwd(grad: Tensor, logits2: Tensor, labels: Tensor, lse: Tensor, ignore_index: int,
                        temperature: float, backend: str, budget: int) -> Tensor:
    M, V = logits2.shape
    idx, labels_s = _scored(labels, ignore_index, V)
    dlogits = torch.zeros_like(logits2, memory_format=torch.contiguous_format)
    N = idx.numel()
    if N == 0:
        return dlogits
    rows = make_rows(backend, logits2.device, logits2.dtype, temperature, None)
    per = logits2.dtype.itemsize + rows.bytes_per_elem
    chunk = max(1, min(N, budget // (V * per)))
    g = grad.reshape(-1).index_select(0, idx).to(lse.dtype).contiguous()
    lse_s = lse.index_select(0, idx)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        z = logits2.index_select(0, idx[s:e])
        rows.bwd(z, z, labels_s[s:e], lse_s[s:e], g[s:e], 0)
        dlogits.index_copy_(0, idx[s:e], z)
    return dlogits


@logits_logprobs_bwd.register_fake
def _(grad, logits2, labels, lse, ignore_index, temperature, backend, budget):
    return torch.empty_like(logits2, memory_format=torch.contiguous_format)


def _logits_setup(ctx, inputs, output):
    logits2, labels, ignore_index, temperature, backend, budget = inputs
    ctx.save_for_backward(logits2, labels, output[1])
    ctx.args = (ignore_index, temperature, backend, budget)


def _logits_backward(ctx, grad_logp, grad_lse):
    logits2, labels, lse = ctx.saved_tensors
    if grad_logp is None or not ctx.needs_input_grad[0]:
        return (None,) * 6
    return logits_logprobs_bwd(grad_logp, logits2, labels, lse, *ctx.args), None, None, None, None, None


logits_logprobs_fwd.register_autograd(_logits_backward, setup_context=_logits_setup)


def logits_logprobs(logits2: Tensor, labels: Tensor, *, ignore_index: int, temperature: float) -> Tensor:
    """(M,) log-probs of ``labels`` (M,) from ``logits2`` (M, V), 0 at ignored positions (custom op)."""
    budget = workspace.get_workspace_bytes(logits2.device)
    return logits_logprobs_fwd(logits2, labels, int(ignore_index), float(temperature), "auto", int(budget))[0]
