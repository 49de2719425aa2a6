"""The fused modules' base: options, autocast and distributed wiring, and the choice of route.

:class:`FusedLossModule` validates the options every fused module shares, prepares a batch (one host sync),
runs the one-pass route (:mod:`.logits_pass`) or the two-pass route (the engine + autograd), and computes
no-grad reference log-probs. :func:`autocast_entry` decorates each module's ``forward``: heads resolved by
:func:`dpo_fast.distributed.distributed_head`, inputs cast under ``torch.autocast`` with an fp32 master weight
kept fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..distributed import distributed_head
from ..distributed.sequence_parallel import check_task as _sp_check_task, reduce_sums as _sp_reduce_sums, \
    seq_scored as _sp_seq_scored, seq_values as _sp_seq_values
from ..engine import (BACKENDS, Head, Scored, TokenStats, as_head, forward_tokens, get_workspace_bytes, make_rows,
                      per_elem_bytes, prepare, scored_logprobs, segment_sum)
from ..engine.autocast import autocast_aware, autocast_dtype
from ..engine.checks import check_ignore_index, check_scalars
from ..engine.passes import scored_logprobs_entropy
from .logits_pass import FusedLogitsPass, PassPlan
from .metrics import pend_token_sums as _pend_token_sums
from . import ops as _ops
from .plan import UnitTask, batch_values, plan_groups

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# autocast and distributed heads at the entry: an fp32 master weight stays fp32 so that dW accumulates in fp32


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t


def autocast_entry(*float_args: str):
    """:func:`dpo_fast.engine.autocast.autocast_aware` for a fused module's ``forward(self, hidden, weight, ...)``.

    Under autocast every named floating argument is cast to the autocast dtype, except ``weight``: an fp32
    weight reaches the route as the master of a :class:`dpo_fast.engine.Head` with the ``keep_master`` policy
    (its bias cast), the route casts a copy for the GEMMs and accumulates dW directly in fp32.
    """
    rest = tuple(a for a in float_args if a != "weight")
    cast_rest = autocast_aware(*rest)

    def deco(fn):
        inner = cast_rest(fn)

        @functools.wraps(fn)
        def wrapper(self, hidden, weight, *args, **kwargs):
            dtype = autocast_dtype(hidden)
            if dtype is not None:
                w = weight.weight if isinstance(weight, Head) else weight
                keep = isinstance(w, Tensor) and w.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)
                if keep or isinstance(weight, Head):  # the weight is never cast here; its bias is, as before
                    head = as_head(weight, kwargs.pop("bias", None))
                    weight = dataclasses.replace(head, bias=_cast(head.bias, dtype), keep_master=keep)
            return inner(self, hidden, weight, *args, **kwargs)

        # dpo_fast.distributed: DTensor / ZeRO-3 / vocabulary-parallel heads resolved before anything else
        heads = [("hidden", "weight", "bias")]
        if "ref_weight" in float_args:
            heads.append(("ref_hidden", "ref_weight", "ref_bias"))
        return distributed_head(*heads)(wrapper)

    return deco


def compilable_forward(fn):
    """A fused module's ``forward`` under ``torch.compile``: while Dynamo traces, one ``dpo_fast::fused_loss``
    custom op (:mod:`dpo_fast.fused.ops`) instead of the eager forward ``fn`` (kept as ``forward.eager``)."""

    @functools.wraps(fn)
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return _ops.compiled_forward(self, args, kwargs)
        return fn(self, *args, **kwargs)

    forward.eager = fn
    return forward


# ----------------------------------------------------------------------------------------------------------
# the module base: configuration, validation, and the route itself


def check_module_options(*, ignore_index, temperature, softcap, backend, workspace_bytes) -> None:
    """Construction-time validation of the options every fused module shares."""
    check_ignore_index(ignore_index)
    check_scalars(temperature, softcap)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes < 1024):
        raise ValueError(f"workspace_bytes: expected None or an int >= 1024, got {workspace_bytes!r}")


@dataclass
class Prepared:
    """A validated batch: scored positions, row ops, and the head the GEMMs use (compute dtype)."""

    sc: Scored
    rows: Any
    head: Head  # weight in the compute dtype (a differentiable cast of an autocast master weight), master, bias


class FusedLossModule(nn.Module):
    """Options and the route shared by the fused loss modules (subclasses build a :class:`UnitTask`).

    Args (keyword-only): ignore_index (int), temperature (finite > 0), softcap (None or finite > 0),
    backend (``auto`` | ``torch`` | ``triton``), fused (bool), workspace_bytes (None or int >= 1024),
    compute_metrics (bool), token_metrics (bool) — all validated here, at construction.
    """

    #: what the compiled path (:mod:`dpo_fast.fused.ops`) returns per unit: (kind, the output record's per-unit
    #: tensor fields); kind "pairs" (P), "examples" (S) or "tokens" (labels' shape). Each module sets its own.
    op_record: tuple[str, tuple[str, ...]] | None = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if type(self) is cls:  # the module flattened for the compiled path's custom op
                self._compile_spec = _ops.module_spec(self, args, kwargs)

        cls.__init__ = __init__

    def __init__(self, *, ignore_index: int, temperature: float, softcap: float | None, backend: str, fused: bool,
                 workspace_bytes: int | None, compute_metrics: bool, token_metrics: bool = False):
        super().__init__()
        check_module_options(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                             workspace_bytes=workspace_bytes)
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap
        self.backend, self.fused, self.workspace_bytes = backend, bool(fused), workspace_bytes
        self.compute_metrics, self.token_metrics = bool(compute_metrics), bool(token_metrics)

    def prepare(self, hidden, weight, labels, bias=None, cu_seqlens=None) -> Prepared:
        """Validate the batch and gather its scored positions (one host sync).

        ``weight``: the (V, H) tensor (with ``bias``) or the :class:`dpo_fast.engine.Head` the entry point
        resolved; under the autocast master policy the GEMMs get a 16-bit copy, dW goes to the fp32 master.
        """
        head = as_head(weight, bias).for_compute(hidden)
        sc = prepare(hidden, head, labels, cu_seqlens=cu_seqlens, ignore_index=self.ignore_index,
                     temperature=self.temperature, softcap=self.softcap)
        if head.seq is not None:  # hidden sharded over tokens: counts() are the global ones
            sc = _sp_seq_scored(sc, head.seq)
        rows = make_rows(self.backend, sc.hidden2.device, sc.hidden2.dtype, self.temperature, self.softcap)
        return Prepared(sc, rows, head)

    def reference_sums(self, hidden: Tensor, head: Head, sc: Scored, token_weights: Tensor | None = None) -> Tensor:
        """(S,) per-sequence sums of the no-grad log-probs of ``sc``'s scored tokens from ``hidden`` through
        ``head`` (1 GEMM; the module's temperature, softcap and backend): the reference log-probs (DPOLoss's
        ``ref_hidden``) and the policy's KL-pass log-probs (KTOLoss's ``kl_hidden``). ``token_weights`` (N,):
        LD-DPO weights. ``hidden`` must match ``sc``'s layout (the caller validated it)."""
        rows = make_rows(self.backend, hidden.device, hidden.dtype, self.temperature, self.softcap)
        with torch.no_grad():
            logp = forward_tokens(hidden.reshape(-1, hidden.shape[-1]), head.detach(), None, sc.idx, sc.labels, rows,
                                  get_workspace_bytes(hidden.device)).logp
            sums = segment_sum(logp if token_weights is None else logp * token_weights, sc.seq, sc.num_seqs)
            return _sp_reduce_sums(head.seq, sums)  # hidden sharded over tokens: one all-reduce

    def run(self, p: Prepared, task: UnitTask, hidden: Tensor):
        """The route: returns ``(output record, route, Values of all units)``."""
        sc, head = p.sc, p.head
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, head.grad_weight, head.bias))
        groups = None
        if head.seq is not None:  # hidden sharded over tokens: losses of per-sequence sums only
            _sp_check_task(task, self.token_metrics)
        # a head split across processes (dpo_fast.distributed) takes the two-pass route; so does a call on
        # hidden states sharded over tokens: dL/dsum needs the global sums (one all-reduce) before any dz
        if self.fused and task.decomposable and needs_grad and head.one_pass:
            budget = self.workspace_bytes or 8 * get_workspace_bytes(sc.idx.device)
            max_tokens = budget // (head.weight.shape[0] * per_elem_bytes(p.rows, sc.hidden2.dtype, grad=True))
            groups = plan_groups(sc.host_counts(), task.units, max_tokens, sc.idx.device, counts_dev=sc.counts(),
                                 units_host=getattr(task, "units_host", None))
        if groups is None:  # two-pass route: the generic engine + autograd through the loss
            st = {} if task.want_stats else None
            if getattr(task, "entropy_grad", False) and needs_grad:  # the loss differentiates the entropies too
                logp, ent = scored_logprobs_entropy(sc, head, temperature=self.temperature, softcap=self.softcap,
                                                    backend=self.backend, stats_out=st)
                st["entropy"] = ent
            else:
                logp = scored_logprobs(sc, head, temperature=self.temperature, softcap=self.softcap,
                                       backend=self.backend, stats_out=st)
            stats = None if st is None else TokenStats(*(st[k] for k in TokenStats._fields))
            lse = st["lse"] if st is not None else torch.zeros_like(logp.detach())
            values = batch_values(sc, task.units, logp, lse, stats)
            if head.seq is not None:  # per-sequence sums all-reduced over the sequence group (grad: identity)
                values = _sp_seq_values(values, head.seq)
                if self.token_metrics and stats is not None and not getattr(task, "reduces_token_sums", False):
                    _pend_token_sums(values)  # the token-metric sums ride in the first per-sequence all-reduce
            return task.batch_loss(values, self.compute_metrics), "two_pass", values
        use_master = head.master is not None
        plan = PassPlan(sc, p.rows, groups, task, head.weight.detach() if use_master else head.weight)
        carrier, logp, lse, *st = FusedLogitsPass.apply(sc.hidden2, head.grad_weight, head.bias, plan)
        values = batch_values(sc, task.units, logp, lse, TokenStats(*st) if st else None)
        with torch.no_grad():
            out = task.batch_loss(values, self.compute_metrics)
        out.loss = out.loss.detach() + carrier.to(out.loss.dtype)
        return out, "fused", values
