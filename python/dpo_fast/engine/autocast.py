"""Entry points under ``torch.autocast``: inputs cast once, then the engine runs with autocast off.

The engine manages its own precision (tile dtypes, fp32 accumulation), so autocast must not reach its GEMMs;
what autocast should change is only the dtype the inputs arrive in, as ``F.linear`` would see them.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .head import Head

__all__ = ["autocast_aware", "autocast_dtype"]


def autocast_dtype(t) -> torch.dtype | None:
    """The autocast dtype in force for ``t``'s device, or None (not a tensor, autocast off, other device)."""
    if not isinstance(t, torch.Tensor):
        return None
    kind = t.device.type
    if kind not in ("cpu", "cuda", "xpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def autocast_aware(*float_args: str):
    """Make an entry point behave like ``F.linear`` under ``torch.autocast``.

    If autocast is on for the device of the first named argument, the named floating tensors (e.g. bf16
    hidden states and the fp32 master weight) are cast to the autocast dtype — gradients flow back through
    the cast to the original dtypes — and the engine runs with autocast off, since it manages its own
    precision (fp32 accumulation). Without autocast the call is untouched. A :class:`~.head.Head` argument
    has its weight and bias cast.
    """

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            ba = sig.bind(*args, **kwargs)
            lead = ba.arguments.get(float_args[0])
            dtype = autocast_dtype(lead)
            if dtype is None:
                return fn(*args, **kwargs)
            for name in float_args:
                t = ba.arguments.get(name)
                if isinstance(t, Head):  # a head resolved by dpo_fast.distributed: its weight and bias
                    ba.arguments[name] = t.cast(dtype)
                elif isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    ba.arguments[name] = t.to(dtype)
            with torch.autocast(lead.device.type, enabled=False):
                return fn(*ba.args, **ba.kwargs)

        return wrapper

    return deco
