"""DeepSpeed ZeRO-3: the head's partitioned parameters, gathered for the fused call and for its backward.

Under ZeRO-3 every parameter is a 0-element partition except while the module that owns it runs. The
fused path never calls ``lm_head``, so ZeRO never gathers its weight. For one entry-point call:

* forward: :func:`gathered_copy` gathers the parameter (``deepspeed.zero.GatheredParameters``), copies the
  full tensor and re-partitions at once; a parameter that is already available (a tied embedding inside
  the model's forward may be) is not gathered, only read. The engine works on the copy, which is freed
  when the call returns unless a backward needs it;
* backward: a route that recomputes the logits in backward (the two-pass engine) saves the copy; a
  saved-tensor hook keeps only a reference to the parameter instead, and the backward gathers a fresh copy
  then (freed when that backward is done). The one-pass fused routes produce the gradients in forward and
  gather nothing in backward;
* gradients: the copy's gradient (V, H) is handed to the partitioned parameter as a fresh tensor; autograd
  accumulates it and ZeRO's own post-accumulate hook on that parameter reduce-scatters it into ZeRO's
  partitioned gradients, as for a parameter used inside its module's forward.

Peak head memory: one gathered copy (plus one more in a recomputing backward), never held between calls.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["is_zero3_param", "gathered_copy", "saved_copies_regathered"]

_SOURCE = "_dpo_fast_zero3_source"


def is_zero3_param(t) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter (it carries ``ds_id`` / ``ds_status``)."""
    return t is not None and hasattr(t, "ds_id") and hasattr(t, "ds_status")


def _available(p) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return p.ds_status != ZeroParamStatus.NOT_AVAILABLE


def _full_copy(p) -> torch.Tensor:
    if _available(p):
        return p.detach().clone()
    import deepspeed
    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.detach().clone()


_REGATHERED = "_dpo_fast_zero3_regathered"
_HOOKED = "_dpo_fast_zero3_hooked"


def _repartition_after_accumulate(p) -> None:
    """Post-accumulate hook (after ZeRO's own, which took the gradient): release a parameter we gathered."""
    if getattr(p, _REGATHERED, False):
        setattr(p, _REGATHERED, False)
        # a module that uses it too (a tied embedding) may hold it now: ZeRO releases it after that module
        if _available(p) and not getattr(p, "ds_active_sub_modules", None):
            p.partition()


class _GatheredCopy(torch.autograd.Function):
    """ZeRO-3 parameter (gathered while applied) -> a full copy whose gradient goes to the parameter.

    Autograd writes a gradient into ``p.grad`` only if ``p`` has its full shape at that moment, so the
    backward gathers ``p`` again (when it is partitioned); ZeRO's post-accumulate hook then reduce-scatters
    the gradient, and ours re-partitions ``p``.
    """

    @staticmethod
    def forward(ctx, p):
        ctx.param = p
        full = p.detach().clone()
        setattr(full, _SOURCE, p)
        return full

    @staticmethod
    def backward(ctx, g):
        p = ctx.param
        if not _available(p):
            p.all_gather()
            setattr(p, _REGATHERED, True)
        if not getattr(p, _HOOKED, False):
            p.register_post_accumulate_grad_hook(_repartition_after_accumulate)
            setattr(p, _HOOKED, True)
        return g.contiguous()


def gathered_copy(p):
    """A full copy of ZeRO-3 parameter ``p`` (differentiable back to ``p``); other inputs are returned as is."""
    if not is_zero3_param(p):
        return p
    if not (torch.is_grad_enabled() and p.requires_grad):
        full = _full_copy(p)
    elif _available(p):
        full = _GatheredCopy.apply(p)
    else:
        import deepspeed
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            full = _GatheredCopy.apply(p)
    setattr(full, _SOURCE, p)
    return full


class _Ref:
    """What the saved-tensor hook keeps instead of a gathered copy."""

    __slots__ = ("param", "dtype")

    def __init__(self, param, dtype):
        self.param, self.dtype = param, dtype


def _pack(t):
    src = getattr(t, _SOURCE, None)
    return t if src is None else _Ref(src, t.dtype)


def _unpack(x):
    if not isinstance(x, _Ref):
        return x
    return _full_copy(x.param).to(x.dtype)


@contextlib.contextmanager
def saved_copies_regathered():
    """Within the body, saving a gathered copy for backward keeps only a reference; backward re-gathers."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
