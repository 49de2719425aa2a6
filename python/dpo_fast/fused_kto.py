"""``KTOLoss``: KTO on unpaired desirable / undesirable completions, from hidden states in one pass.

KTO's per-example loss depends on the example's own log-ratio and on the reference point z, a detached
batch constant estimated *before* the loss from mismatched (prompt, completion) pairs (the KL pass, a no-grad
forward: 1 GEMM). Given z, each sequence's dL/dℓ is a scalar known as soon as its log-prob is, so groups of
whole sequences take the one-pass fused route of :mod:`dpo_fast._fused` (3 GEMMs over scored tokens).
"""

from __future__ import annotations

import torch

from . import losses as L
from ._fused import FusedLossModule, grads_at
from ._validate import autocast_aware, check_tensor
from .engine import acc_dtype, scored_logprobs, segment_sum
from .logprobs import sequence_logprobs


class KTOLoss(FusedLossModule):
    r"""KTO (Ethayarajh et al. 2024) from last hidden states and the lm_head weight; see :func:`dpo_fast.kto_loss`.

    Args:
        beta, desirable_weight, undesirable_weight: as in :func:`dpo_fast.kto_loss`.
        ignore_index, temperature, softcap, backend, fused, workspace_bytes, compute_metrics: as in
            :class:`dpo_fast.DPOLoss` (the fused workspace holds whole sequences).

    Forward:
        hidden: (B, T, H) or packed (N, H) with ``cu_seqlens``; weight (V, H); labels (B, T) / (N,);
        desirable: (S,) bool, one per sequence; ref_logps: (S,) reference log-probs or None;
        the reference point z: ``kl`` (a scalar, e.g. already all-reduced across processes), or
        ``kl_hidden`` / ``kl_labels`` (/ ``kl_cu_seqlens``) of the mismatched pairs, whose policy log-probs
        this module computes with the no-grad forward, together with ``ref_kl_logps``; or none (z = 0).

    Returns:
        :class:`dpo_fast.losses.UnpairedOutput` — ``loss`` differentiable w.r.t. hidden, weight, bias.

    Examples::

        >>> out = dpo_fast.KTOLoss(beta=0.1)(hidden, W, labels, desirable, ref_logps, kl=z)
        >>> out.loss.backward()
    """

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, *,
                 ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                 backend: str = "auto", fused: bool = True, workspace_bytes: int | None = None,
                 compute_metrics: bool = True):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics)
        self.options = dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        L.kto_loss(torch.tensor([-1.0]), None, torch.tensor([True]), **self.options, compute_metrics=False)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + f", fused={self.fused}"

    @torch.compiler.disable  # data-dependent grouping: run eagerly inside compiled graphs
    @autocast_aware("hidden", "weight", "bias", "kl_hidden")
    def forward(self, hidden, weight, labels, desirable, ref_logps=None, *, bias=None, cu_seqlens=None, kl=None,
                kl_hidden=None, kl_labels=None, kl_cu_seqlens=None, ref_kl_logps=None) -> L.UnpairedOutput:
        sc, rows = self._prepare(hidden, weight, labels, bias, cu_seqlens)
        S, dev = sc.num_seqs, sc.idx.device
        check_tensor("desirable", desirable, dims=(1,))
        if desirable.shape[0] != S:
            raise ValueError(f"desirable: expected shape ({S},) (one per sequence), got {tuple(desirable.shape)}")
        if ref_logps is not None:
            check_tensor("ref_logps", ref_logps, dims=(1,), floating=True)
            if ref_logps.shape[0] != S:
                raise ValueError(f"ref_logps: expected shape ({S},), got {tuple(ref_logps.shape)}")
        # the reference point z (detached), before the loss pass
        pol_kl = None
        if kl_hidden is not None:
            if kl is not None:
                raise ValueError("kl_hidden: pass either kl or kl_hidden (+ ref_kl_logps), not both")
            if kl_labels is None or ref_kl_logps is None:
                raise ValueError("kl_hidden: needs kl_labels and ref_kl_logps too")
            with torch.no_grad():  # the KL pass: 1 GEMM
                pol_kl = sequence_logprobs(kl_hidden.detach(), weight.detach(), kl_labels,
                                           bias=None if bias is None else bias.detach(), cu_seqlens=kl_cu_seqlens,
                                           ignore_index=self.ignore_index, temperature=self.temperature,
                                           softcap=self.softcap, backend=self.backend)
            if tuple(ref_kl_logps.shape) != tuple(pol_kl.shape):
                raise ValueError(f"ref_kl_logps: expected shape {tuple(pol_kl.shape)} (one per KL sequence), "
                                 f"got {tuple(ref_kl_logps.shape)}")
            kl = (pol_kl - ref_kl_logps.detach().to(pol_kl.dtype)).mean().clamp_min(0.0)
        elif ref_kl_logps is not None:
            raise ValueError("ref_kl_logps: also pass kl_hidden and kl_labels (the mismatched pairs)")

        def loss(lp, compute_metrics):
            return L.kto_loss(lp, ref_logps, desirable, **self.options, kl=kl, compute_metrics=compute_metrics)

        groups = self._plan(sc, rows, weight, torch.arange(S, device=dev)[:, None], sc.counts(),
                            (hidden, weight, bias))
        if groups is None:  # two-pass route
            logp = scored_logprobs(sc, weight, bias, temperature=self.temperature, softcap=self.softcap,
                                   backend=self.backend)
            return loss(segment_sum(logp, sc.seq, S), self.compute_metrics)
        acc = acc_dtype(sc.hidden2.dtype)
        # placeholders: log-ratio 0 (they do not enter the group's derivatives)
        base = torch.zeros(S, dtype=acc, device=dev) if ref_logps is None else ref_logps.detach().to(acc)
        final = torch.zeros(S, dtype=acc, device=dev)

        def group_grad(g, res):
            seqs = g["units"]  # (G,) sequence ids, in the group's local order
            lp = segment_sum(res.logp.to(acc), g["local"], seqs.numel())
            final[seqs] = lp
            return grads_at(lambda x: loss(x, False).loss, base, seqs, lp).index_select(0, g["local"])

        carrier = self._fused_pass(sc, weight, bias, groups, rows, group_grad, False, {})
        with torch.no_grad():
            out = loss(final, self.compute_metrics)
        return self._with_gradient(out, carrier)
