"""``CPOLoss`` (CPO / SimPO / AlphaPO) and ``ORPOLoss``: reference-free pairwise losses on the fused route.

Both are a mean over pairs plus a chosen-token NLL whose denominator Σ|y_w| is a batch constant, so they
decompose per pair: the group loss is the loss function on the group's pairs with the NLL given explicitly
as each pair's share −ℓ_w P / Σ|y_w| (the value the function derives for the whole batch), summed and
divided by the batch's P.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import losses as L
from ..losses import CPOOptions, ORPOOptions
from .pairs import add_pair_token_metrics, logits_means, pair_layout, pair_units_host
from .module import FusedLossModule, autocast_entry, compilable_forward
from .plan import Values
from .records import with_route

Tensor = torch.Tensor


@dataclass
class ReferenceFreeTask:
    """One CPO/ORPO forward as a :class:`dpo_fast.fused.plan.UnitTask`: units = pairs."""

    units: Tensor  # (P, 2)
    loss_fn: Callable  # (lw, ll, len_w, len_l, chosen_nll, logit_c, logit_r, compute_metrics) -> DPOOutput
    len_w: Tensor  # (P,)
    len_l: Tensor
    n_chosen_tokens: Tensor  # () Σ max(|y_w|, 1): the NLL's batch denominator
    logits_mean: tuple[Tensor, Tensor] | None
    decomposable: bool = True
    want_stats: bool = False
    units_host: Tensor | None = None  # host copy of units, when known without a copy (the route's plan)

    def group_loss(self, v: Values) -> Tensor:
        ids, P = v.units, self.len_w.shape[0]
        sums = v.unit_sums()  # (G, 2)
        # each pair's share of the batch token-mean NLL
        nll = -sums[:, 0] * (P / self.n_chosen_tokens.to(sums.dtype))
        out = self.loss_fn(sums[:, 0], sums[:, 1], self.len_w[ids], self.len_l[ids], nll, None, None, False)
        return out.losses.sum() / P

    def batch_loss(self, v: Values, compute_metrics: bool):
        sums = v.unit_sums()
        lc, lr = self.logits_mean or (None, None)
        return self.loss_fn(sums[:, 0], sums[:, 1], self.len_w, self.len_l, None, lc, lr, compute_metrics)


class _ReferenceFreePairLoss(FusedLossModule):
    """Shared forward of :class:`CPOLoss` and :class:`ORPOLoss` (subclasses define ``_loss``)."""

    op_record = ("pairs", ("losses", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"))

    def _loss(self, lw, ll, len_w, len_l, chosen_nll, logit_c, logit_r, compute_metrics) -> L.DPOOutput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.as_kwargs().items()) + f", fused={self.fused}"

    @compilable_forward  # under torch.compile: the dpo_fast::fused_loss custom op
    @autocast_entry("hidden", "weight", "bias")
    def forward(self, hidden, weight, labels, *, bias=None, cu_seqlens=None, pairs=None):
        """Same layouts as :meth:`dpo_fast.DPOLoss.forward` (no reference model).

        Returns:
            :class:`dpo_fast.fused.FusedDPOOutput` (``route``, ``token_sums`` as in DPOLoss).
        """
        p = self.prepare(hidden, weight, labels, bias, cu_seqlens)
        sc = p.sc
        c_seq, r_seq = pair_layout(pairs, sc.num_seqs, sc.idx.device)
        counts = sc.counts()
        lm = logits_means(sc, p.head, counts, c_seq, r_seq, self.temperature) \
            if self.compute_metrics and not self.token_metrics else None
        len_w = counts[c_seq]
        task = ReferenceFreeTask(torch.stack([c_seq, r_seq], 1), self._loss, len_w, counts[r_seq],
                                 len_w.clamp_min(1.0).sum().double(), lm, want_stats=self.token_metrics,
                                 units_host=pair_units_host(pairs, sc.num_seqs))
        out, route, values = self.run(p, task, hidden)
        sums = add_pair_token_metrics(out, values, self.compute_metrics) if self.token_metrics else None
        return with_route(out, route, sums)


@L.document_options(CPOOptions)
class CPOLoss(_ReferenceFreePairLoss):
    r"""CPO / SimPO / AlphaPO straight from hidden states: :func:`dpo_fast.cpo_loss`, logits never materialised.

    The loss is a mean over pairs plus ``cpo_alpha`` x the chosen token-mean NLL: it decomposes per pair, so
    the same one-pass fused route as :class:`dpo_fast.DPOLoss` applies (3 GEMMs over scored tokens).

    Args:
        {OPTIONS}
        ignore_index, temperature, softcap, backend, fused, workspace_bytes, compute_metrics, token_metrics:
            as in :class:`dpo_fast.DPOLoss` (validated at construction).

    Forward:
        ``(hidden, weight, labels, *, bias=None, cu_seqlens=None, pairs=None)`` with DPOLoss's layouts;
        sequence lengths (for the length-averaged ``simpo``/``ipo`` and the NLL) are the scored-token counts.

    Returns:
        :class:`dpo_fast.fused.FusedDPOOutput`.

    Examples::

        >>> out = dpo_fast.CPOLoss(beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0)(h, W, labels)
        >>> out.loss.backward()
    """

    @L.takes_options(CPOOptions, positional=("beta", "loss_type"))
    def __init__(self, *, options: CPOOptions | None = None, ignore_index: int = -100,
                 temperature: float = 1.0, softcap: float | None = None, backend: str = "auto", fused: bool = True,
                 workspace_bytes: int | None = None, compute_metrics: bool = True, token_metrics: bool = False):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics,
                         token_metrics=token_metrics)
        #: the loss options, validated once (by takes_options, before this body)
        self.options = options

    def _loss(self, lw, ll, len_w, len_l, chosen_nll, logit_c, logit_r, compute_metrics):
        return L.cpo_loss(lw, ll, options=self.options, chosen_lengths=len_w, rejected_lengths=len_l,
                          check_lengths=False,  # scored-token counts: valid, no sync to check them
                          chosen_nll=chosen_nll if self.options.cpo_alpha != 0.0 else None,
                          chosen_logits_mean=logit_c, rejected_logits_mean=logit_r, compute_metrics=compute_metrics)


@L.document_options(ORPOOptions)
class ORPOLoss(_ReferenceFreePairLoss):
    r"""ORPO straight from hidden states: :func:`dpo_fast.orpo_loss`, logits never materialised.

    ``NLL(chosen) − β · mean log σ(log odds)`` decomposes per pair (the NLL is a token mean over the batch, a
    constant denominator), so the one-pass fused route of :class:`dpo_fast.DPOLoss` applies.

    Args:
        {OPTIONS}
        ignore_index, temperature, softcap, backend, fused, workspace_bytes, compute_metrics, token_metrics:
            as in :class:`dpo_fast.DPOLoss` (validated at construction).

    Returns:
        :class:`dpo_fast.fused.FusedDPOOutput`.

    Examples::

        >>> out = dpo_fast.ORPOLoss(beta=0.1)(h, W, labels)
        >>> out.loss.backward()
    """

    @L.takes_options(ORPOOptions, positional=("beta",))
    def __init__(self, *, options: ORPOOptions | None = None, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", fused: bool = True,
                 workspace_bytes: int | None = None, compute_metrics: bool = True, token_metrics: bool = False):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics,
                         token_metrics=token_metrics)
        #: the loss options, validated once (by takes_options, before this body)
        self.options = options

    def _loss(self, lw, ll, len_w, len_l, chosen_nll, logit_c, logit_r, compute_metrics):
        return L.orpo_loss(lw, ll, chosen_lengths=len_w, rejected_lengths=len_l, options=self.options,
                           check_lengths=False,  # scored-token counts: valid, no sync to check them
                           chosen_nll=chosen_nll, chosen_logits_mean=logit_c, rejected_logits_mean=logit_r,
                           compute_metrics=compute_metrics)
