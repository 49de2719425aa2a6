"""The public entry points under ``torch.compile``: traceable bodies around the ``dpo_fast::`` custom ops.

:func:`compile_path` decorates an entry point: in eager mode the call is unchanged (validation, one host
sync, the engine); while Dynamo traces (``torch.compiler.is_compiling()``) it runs the traceable body given
here instead. These bodies read no tensor data: they check shapes and dtypes only, flatten the head into op
arguments and call the ops of :mod:`dpo_fast.engine.ops`, whose outputs are shaped like the inputs (per
position, 0 at ``ignore_index``); per-sequence sums are plain tensor code over those (M,) values. The labels'
range is checked inside the op when it runs (a ``ValueError`` naming ``labels``), and so are ``cu_seqlens``'
values (``dpo_fast::checked_cu_seqlens``: starts at 0, non-decreasing, ends at the token count).

Distributed heads (DTensor, ZeRO-3, vocabulary-parallel) are not supported inside a compiled region: they
raise :class:`CompileUnsupported` (a ``NotImplementedError``) naming the way out.
"""

from __future__ import annotations

import functools

import torch

from .engine.autocast import autocast_dtype
from .engine.head import Head
from .engine.ops import linear_logprobs, logits_logprobs
from .engine.segments import segment_sum

Tensor = torch.Tensor


class CompileUnsupported(NotImplementedError):
    """An input that the compiled path of a dpo_fast entry point does not take."""


def compile_path(traced):
    """Decorator: run ``traced`` (same signature) instead of the decorated entry point while Dynamo traces."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if torch.compiler.is_compiling():
                return traced(*args, **kwargs)
            return fn(*args, **kwargs)

        wrapper.eager = fn
        return wrapper

    return deco


def refuse_distributed(what: str, *tensors) -> None:
    """Raise :class:`CompileUnsupported` for a head split across processes (or to be gathered) under compile."""
    from .distributed.head import _needs_work  # noqa: PLC0415 (distributed sits above the engine)

    if any(isinstance(t, Head) for t in tensors) or _needs_work(*tensors):
        raise CompileUnsupported(
            f"{what}: a distributed output head (vocabulary-parallel, ZeRO-3 or DTensor weight) is not supported "
            "inside torch.compile; call it outside the compiled region (e.g. wrap the loss call in "
            "torch.compiler.disable) or pass the full local weight")


def _check(what: str, hidden, weight, bias, labels) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: {name}: expected a tensor, got {type(t).__name__}")
    if hidden.dim() not in (2, 3) or not hidden.is_floating_point():
        raise ValueError(f"hidden: expected a floating (B, T, H) or (N, H) tensor, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError("labels: expected an integer tensor")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _autocast(*tensors):
    """(autocast dtype or None, the floating tensors cast to it as F.linear would see them)."""
    dtype = autocast_dtype(tensors[0])
    if dtype is None:
        return None, tensors
    return dtype, tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                        else t for t in tensors)


def _per_token(what, hidden, weight, bias, labels, ignore_index, temperature, softcap, backend) -> Tensor:
    refuse_distributed(what, hidden, weight, bias)
    _check(what, hidden, weight, bias, labels)
    dtype, (hidden, weight, bias) = _autocast(hidden, weight, bias)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if dtype is None:
        return linear_logprobs(h2, weight, bias, labels.reshape(-1), ignore_index=ignore_index,
                               temperature=temperature, softcap=softcap, backend=backend)
    with torch.autocast(hidden.device.type, enabled=False):
        return linear_logprobs(h2, weight, bias, labels.reshape(-1), ignore_index=ignore_index,
                               temperature=temperature, softcap=softcap, backend=backend)


def _segments(values: Tensor, labels: Tensor, ignore_index: int, cu_seqlens, average: bool) -> Tensor:
    """Per-sequence sums (or means over scored tokens) of per-position ``values`` (M,)."""
    scored = (labels.reshape(-1) != ignore_index).to(values.dtype)
    if cu_seqlens is None:
        if labels.dim() != 2:
            raise ValueError("cu_seqlens: required with packed (N, H) input")
        B = labels.shape[0]
        out, cnt = values.view(B, -1).sum(1), scored.view(B, -1).sum(1)
    else:
        cu = torch.as_tensor(cu_seqlens, device=values.device)
        cu = torch.ops.dpo_fast.checked_cu_seqlens(cu, values.shape[0])  # values checked when the op runs
        M, S = values.shape[0], cu.shape[0] - 1
        seq = torch.searchsorted(cu[1:].contiguous(), torch.arange(M, device=values.device), right=True)
        seq = seq.clamp_max(S - 1)
        out = segment_sum(values, seq, S)  # the engine's deterministic sums (no atomics), as in eager mode
        cnt = segment_sum(scored, seq, S)
    return out / cnt.clamp_min(1.0) if average else out


def sequence_logprobs(hidden, weight, labels, *, bias=None, cu_seqlens=None, ignore_index=-100, temperature=1.0,
                      softcap=None, average=False, backend="auto") -> Tensor:
    """:func:`dpo_fast.sequence_logprobs` while tracing: ``dpo_fast::linear_logprobs_fwd`` + per-sequence sums."""
    if not isinstance(average, bool):
        raise TypeError(f"average: expected a bool, got {type(average).__name__}")
    logp = _per_token("sequence_logprobs", hidden, weight, bias, labels, ignore_index, temperature, softcap, backend)
    return _segments(logp, labels, ignore_index, cu_seqlens, average)


def token_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                   backend="auto") -> Tensor:
    """:func:`dpo_fast.token_logprobs` while tracing: ``dpo_fast::linear_logprobs_fwd``, shaped like labels."""
    logp = _per_token("token_logprobs", hidden, weight, bias, labels, ignore_index, temperature, softcap, backend)
    return logp.view(labels.shape)


_REDUCTIONS = ("sum", "mean", "none")


def logprobs_from_logits(logits, labels, *, ignore_index=-100, temperature=1.0, cu_seqlens=None,
                         reduction="sum") -> Tensor:
    """:func:`dpo_fast.logprobs_from_logits` while tracing: ``dpo_fast::logits_logprobs_fwd``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if logits.dim() not in (2, 3) or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:-1])} (logits' leading dims), "
                         f"got {tuple(labels.shape)}")
    _, (logits,) = _autocast(logits)
    V = logits.shape[-1]
    with torch.autocast(logits.device.type, enabled=False):
        logp = logits_logprobs(logits.reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index,
                               temperature=temperature)
    if reduction == "none":
        return logp.view(labels.shape)
    return _segments(logp, labels, ignore_index, cu_seqlens, reduction == "mean")
