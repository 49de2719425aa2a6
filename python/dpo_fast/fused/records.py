"""Output records of the fused modules: a loss function's record plus where the numbers came from.

Each fused record subclasses its loss function's record (``dpo_loss`` -> :class:`dpo_fast.DPOOutput`, ...) and
adds ``route`` and ``token_sums`` (and whatever its module returns besides). It registers itself with
:func:`fused_record`; :func:`with_route` finds the fused record of any registered loss record, so a new loss
family adds its record here (or in its own module) with the decorator, and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .. import losses as L

Tensor = torch.Tensor

#: where a fused module's numbers came from (``out.route``)
ROUTES = ("fused", "two_pass")

#: loss function's record class -> its fused record class (filled by :func:`fused_record`)
_FUSED_RECORDS: dict[type, type] = {}


def fused_record(cls: type) -> type:
    """Class decorator: register ``cls`` as the fused record of its (first) base, a loss function's record."""
    base = cls.__bases__[0]
    if base in _FUSED_RECORDS:
        raise TypeError(f"{cls.__name__}: {base.__name__} already has a fused record, {_FUSED_RECORDS[base].__name__}")
    _FUSED_RECORDS[base] = cls
    return cls


@fused_record
@dataclass
class FusedDPOOutput(L.DPOOutput):
    """:class:`dpo_fast.DPOOutput` of a fused module, plus ``route`` ("fused" | "two_pass") and ``token_sums``
    (with ``token_metrics``: the 0-d tensor sums behind the token metrics, for cross-process aggregation)."""

    route: str = "two_pass"
    token_sums: dict[str, Tensor] | None = None


@fused_record
@dataclass
class FusedUnpairedOutput(L.UnpairedOutput):
    """:class:`dpo_fast.losses.UnpairedOutput` plus ``route`` and ``token_sums`` (see :class:`FusedDPOOutput`)."""

    route: str = "two_pass"
    token_sums: dict[str, Tensor] | None = None


@fused_record
@dataclass
class FusedGRPOOutput(L.GRPOOutput):
    """:class:`dpo_fast.losses.GRPOOutput` plus ``route``, ``token_sums`` and ``token_logps``: the detached
    per-token policy log-probs shaped like ``labels`` (0 at unscored positions), e.g. for ratio metrics."""

    route: str = "two_pass"
    token_sums: dict[str, Tensor] | None = None
    token_logps: Tensor | None = None




def with_route(out, route: str, token_sums, **extra):
    """The fused record of ``out`` (a loss function's output) with ``route``, ``token_sums`` and ``extra``."""
    cls = _FUSED_RECORDS[type(out)]
    return cls(**{f.name: getattr(out, f.name) for f in fields(out)}, route=route, token_sums=token_sums, **extra)
