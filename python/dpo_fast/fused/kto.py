"""``KTOLoss``: KTO on unpaired desirable / undesirable completions, from hidden states on the fused route.

KTO's per-example loss depends on the example's own log-ratio and on the reference point z, a detached batch
constant estimated *before* the loss from mismatched (prompt, completion) pairs (the KL pass, a no-grad
forward: 1 GEMM). Given z, the unit is one sequence: the group loss is :func:`dpo_fast.kto_loss` on the
group's sequences, summed and divided by the batch's S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import losses as L
from ..losses import KTOOptions
from ..engine.checks import check_tensor
from ..engine import prepare
from .metrics import token_metrics, token_sums
from .module import FusedLossModule, autocast_entry, compilable_forward
from .plan import Values
from .records import with_route

Tensor = torch.Tensor

SLOTS = ("completion",)


@dataclass
class KTOTask:
    """One KTOLoss forward as a :class:`dpo_fast.fused.plan.UnitTask`: units = sequences."""

    units: Tensor  # (S, 1)
    options: KTOOptions  # validated once, at the module's construction
    ref: Tensor | None  # (S,) detached reference log-probs
    desirable: Tensor  # (S,) bool
    kl: Tensor | float | None  # the reference point z (detached), or None (z = 0)
    want_stats: bool = False
    decomposable: bool = True
    units_host: Tensor | None = None  # host copy of units (the route's plan)

    def _loss(self, v: Values, compute_metrics: bool):
        ids = v.units
        return L.kto_loss(v.unit_sums()[:, 0], None if self.ref is None else self.ref[ids], self.desirable[ids],
                          options=self.options, kl=self.kl, compute_metrics=compute_metrics)

    def group_loss(self, v: Values) -> Tensor:
        return self._loss(v, False).losses.sum() / self.units.shape[0]

    def batch_loss(self, v: Values, compute_metrics: bool):
        return self._loss(v, compute_metrics)


@L.document_options(KTOOptions)
class KTOLoss(FusedLossModule):
    r"""KTO (Ethayarajh et al. 2024) from last hidden states and the lm_head weight; see :func:`dpo_fast.kto_loss`.

    Args:
        {OPTIONS}
        ignore_index, temperature, softcap, backend, fused, workspace_bytes, compute_metrics: as in
            :class:`dpo_fast.DPOLoss` (the fused workspace holds whole sequences; validated at construction).
        token_metrics: also log ``entropy`` (mean over all scored tokens) from the same pass; the sums are
            in ``out.token_sums`` (entropy_sum, tokens, completion_tokens/_hits/_logits_sum).

    Forward:
        hidden: (B, T, H) or packed (N, H) with ``cu_seqlens``; weight (V, H); labels (B, T) / (N,);
        desirable: (S,) bool, one per sequence; ref_logps: (S,) reference log-probs or None;
        the reference point z: ``kl`` (a scalar, e.g. already all-reduced across processes), or
        ``kl_hidden`` / ``kl_labels`` (/ ``kl_cu_seqlens``) of the mismatched pairs, whose policy log-probs
        this module computes with the no-grad forward, together with ``ref_kl_logps``; or none (z = 0).

    Returns:
        :class:`dpo_fast.fused.FusedUnpairedOutput` — an :class:`dpo_fast.losses.UnpairedOutput` whose
        ``loss`` is differentiable w.r.t. hidden, weight, bias, plus ``route`` and ``token_sums``.

    Examples::

        >>> out = dpo_fast.KTOLoss(beta=0.1)(hidden, W, labels, desirable, ref_logps, kl=z)
        >>> out.loss.backward()
    """

    op_record = ("examples", ("losses", "rewards", "baseline"))

    @L.takes_options(KTOOptions, positional=("beta", "desirable_weight", "undesirable_weight"))
    def __init__(self, *, options: KTOOptions | None = None, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", fused: bool = True, workspace_bytes: int | None = None,
                 compute_metrics: bool = True, token_metrics: bool = False):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics,
                         token_metrics=token_metrics)
        #: the loss options, validated once (by takes_options, before this body)
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.as_kwargs().items()) + f", fused={self.fused}"

    @compilable_forward  # under torch.compile: the dpo_fast::fused_loss custom op
    @autocast_entry("hidden", "weight", "bias", "kl_hidden")
    def forward(self, hidden, weight, labels, desirable, ref_logps=None, *, bias=None, cu_seqlens=None, kl=None,
                kl_hidden=None, kl_labels=None, kl_cu_seqlens=None, ref_kl_logps=None):
        p = self.prepare(hidden, weight, labels, bias, cu_seqlens)
        S, dev = p.sc.num_seqs, p.sc.idx.device
        check_tensor("desirable", desirable, dims=(1,))
        if desirable.shape[0] != S:
            raise ValueError(f"desirable: expected shape ({S},) (one per sequence), got {tuple(desirable.shape)}")
        if ref_logps is not None:
            check_tensor("ref_logps", ref_logps, dims=(1,), floating=True)
            if ref_logps.shape[0] != S:
                raise ValueError(f"ref_logps: expected shape ({S},), got {tuple(ref_logps.shape)}")
        # the reference point z (detached), before the loss pass
        if kl_hidden is not None:
            if kl is not None:
                raise ValueError("kl_hidden: pass either kl or kl_hidden (+ ref_kl_logps), not both")
            if kl_labels is None or ref_kl_logps is None:
                raise ValueError("kl_hidden: needs kl_labels and ref_kl_logps too")
            # the KL pass: validated and gathered like any batch, then the no-grad forward (1 GEMM)
            sc_kl = prepare(kl_hidden.detach(), p.head, kl_labels, cu_seqlens=kl_cu_seqlens,
                            ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap)
            pol_kl = self.reference_sums(kl_hidden.detach(), p.head, sc_kl)
            if tuple(ref_kl_logps.shape) != tuple(pol_kl.shape):
                raise ValueError(f"ref_kl_logps: expected shape {tuple(pol_kl.shape)} (one per KL sequence), "
                                 f"got {tuple(ref_kl_logps.shape)}")
            kl = (pol_kl - ref_kl_logps.detach().to(pol_kl.dtype)).mean().clamp_min(0.0)
        elif ref_kl_logps is not None:
            raise ValueError("ref_kl_logps: also pass kl_hidden and kl_labels (the mismatched pairs)")
        if kl is not None and not isinstance(kl, Tensor):  # a device scalar once, not a host copy per group
            kl = torch.full((), float(kl), dtype=torch.float64, device=dev)
        task = KTOTask(torch.arange(S, device=dev)[:, None], self.options,
                       None if ref_logps is None else ref_logps.detach(), desirable.to(dev), kl,
                       want_stats=self.token_metrics, units_host=torch.arange(S)[:, None])
        out, route, values = self.run(p, task, hidden)
        sums = None
        if self.token_metrics:
            sums = token_sums(values, SLOTS)
            if self.compute_metrics:
                out.metrics.update(token_metrics(sums, SLOTS, accuracy=False, logits=False))
        return with_route(out, route, sums)
