"""Reference-free pair losses: CPO / SimPO / AlphaPO (:func:`cpo_loss`) and ORPO (:func:`orpo_loss`).

They share the pair inputs' validation with DPO (:func:`.inputs.pair_inputs`) but none of its options; the
CPO loss types come from the registry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .inputs import pair_inputs, scalar_or_vector
from .options import CPO_EPS_RANGE, CPOOptions, ORPOOptions, takes_options
from .outputs import DPOOutput, pair_metrics
from .terms import log1mexp

Tensor = torch.Tensor

__all__ = ["CPOOptions", "ORPOOptions", "cpo_loss", "orpo_loss", "derived_nll", "CPO_EPS_RANGE"]


def derived_nll(name: str, nll: Tensor | float | None, lw: Tensor, len_w: Tensor | None, P: int) -> Tensor:
    """Chosen NLL as a (P,) per-pair share whose mean is the batch token-mean NLL, or the given value."""
    if nll is not None:
        return scalar_or_vector(name, nll, P, lw).expand_as(lw)
    if len_w is None:
        raise ValueError(
            f"the NLL term needs {name} (token-mean NLL of the chosen completions), or chosen_lengths so that "
            "it is derived from policy_chosen_logps"
        )
    return -lw * (P / len_w.sum())


@takes_options(CPOOptions)
def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    options: CPOOptions | None = None,
    chosen_lengths: Tensor | Sequence[int] | None = None,
    rejected_lengths: Tensor | Sequence[int] | None = None,
    chosen_nll: Tensor | float | None = None,
    chosen_logits_mean: Tensor | float | None = None,
    rejected_logits_mean: Tensor | float | None = None,
    compute_metrics: bool = True,
    check_lengths: bool = True,
) -> DPOOutput:
    r"""CPO, SimPO and AlphaPO: reference-free preference losses with an optional NLL term.

    CPO: Xu et al. 2024, *Contrastive Preference Optimization* (arXiv:2401.08417). SimPO: Meng et al. 2024,
    *Simple Preference Optimization with a Reference-Free Reward* (arXiv:2405.14734). AlphaPO: Gupta et al.
    2025, *AlphaPO: Reward Shape Matters for LLM Alignment* (arXiv:2501.03884).

    With :math:`\bar\ell = \ell/|y|` for ``ipo``/``simpo`` (else :math:`\bar\ell = \ell`), rewards
    :math:`u = \bar\ell` (or AlphaPO's :math:`u = (1 - e^{-\alpha\bar\ell})/\alpha = (1 - p^{-\alpha})/\alpha`
    when α ≠ 0) and :math:`h = u_w - u_l`:

    - sigmoid: :math:`-(1-\varepsilon)\log\sigma(\beta h) - \varepsilon\log\sigma(-\beta h)`
    - hinge: :math:`\max(0, 1 - \beta h)`
    - ipo: :math:`(h - 1/(2\beta))^2`
    - simpo: :math:`-(1-\varepsilon)\log\sigma(\beta h - \gamma) - \varepsilon\log\sigma(\gamma - \beta h)`

    Total: :math:`\mathrm{mean}_i L_i + \text{cpo\_alpha}\cdot\mathrm{NLL}_{chosen}` (SimPO proper:
    ``cpo_alpha=0``).

    Args:
        policy_chosen_logps, policy_rejected_logps: (P,) *summed* log-probs of the completions.
        {OPTIONS}
        chosen_lengths, rejected_lengths: (P,) scored-token counts (finite whole numbers ≥ 0); required for
            ipo / simpo, and chosen_lengths for the NLL when ``chosen_nll`` is not given.
        chosen_nll: scalar or (P,) token-mean NLL of the chosen completions; default derived as
            :math:`-\sum\ell_w/\sum|y_w|`.
        chosen_logits_mean, rejected_logits_mean: optional, for the ``logits/*`` metrics (see dpo_loss).
        compute_metrics: fill ``metrics`` (one host sync).
        check_lengths: check the lengths' values (see :func:`dpo_loss`).

    Shape:
        inputs :math:`(P)`; ``loss`` :math:`()`; other tensors :math:`(P)`.

    Returns:
        :class:`DPOOutput` with ``losses[i] = L_i + cpo_alpha·nll_i`` (mean = loss), rewards β·u,
        ``chosen_logps``/``rejected_logps`` the summed inputs, and metrics ``rewards/*``, ``logps/*`` (of ℓ̄,
        length-averaged for ipo/simpo as TRL logs them), ``logits/*`` (if given) and ``nll_loss``.

    Examples::

        >>> pc, pr = torch.tensor([-20.0, -30.0], requires_grad=True), torch.tensor([-25.0, -28.0])
        >>> n = torch.tensor([10, 12])
        >>> out = cpo_loss(pc, pr, loss_type="simpo", beta=2.0, cpo_alpha=0.0,
        ...                chosen_lengths=n, rejected_lengths=n)
    """
    o = options
    entry, loss_type = o.entry, o.loss_type
    beta, eps, gamma, cpo_alpha, alpha = o.beta, o.label_smoothing, o.simpo_gamma, o.cpo_alpha, o.alpha
    x = pair_inputs(policy_chosen_logps, policy_rejected_logps, None, None, chosen_lengths, rejected_lengths,
                    check_lengths)
    P = x.lw.shape[0]
    if entry.length_averaged:
        if x.len_w is None or x.len_l is None:
            raise ValueError(
                f"loss_type {loss_type!r} length-averages the log-probs: pass chosen_lengths and rejected_lengths"
            )
        aw, al = x.lw / x.len_w, x.ll / x.len_l
    else:
        aw, al = x.lw, x.ll
    if alpha != 0.0:
        # (1 − p^{−α})/α with p = e^{ℓ̄}: −expm1(−α ℓ̄)/α keeps precision for small α·ℓ̄.
        uw, ul = -torch.expm1(-alpha * aw) / alpha, -torch.expm1(-alpha * al) / alpha
    else:
        uw, ul = aw, al
    losses = entry.fn(uw - ul, beta, eps, gamma)
    nll = None
    if cpo_alpha != 0.0:
        nll = derived_nll("chosen_nll", chosen_nll, x.lw, x.len_w, P)
        losses = losses + cpo_alpha * nll
    loss = losses.mean()
    chosen_rewards, rejected_rewards = (beta * uw).detach(), (beta * ul).detach()
    metrics: dict[str, float] = {}
    if compute_metrics:
        zero = torch.zeros((), dtype=x.lw.dtype, device=x.lw.device)
        extra = {"nll_loss": nll.detach().mean() if nll is not None else zero}
        # logps/* are the log-probs the loss sees (length-averaged for ipo/simpo), as TRL logs them
        metrics = pair_metrics(chosen_rewards, rejected_rewards, aw, al, chosen_logits_mean,
                                rejected_logits_mean, x.len_w, x.len_l, extra)
    return DPOOutput(loss, losses, chosen_rewards, rejected_rewards, x.lw, x.ll, metrics)


# ================================================================================================ ORPO
@takes_options(ORPOOptions)
def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    options: ORPOOptions | None = None,
    chosen_lengths: Tensor | Sequence[int],
    rejected_lengths: Tensor | Sequence[int],
    chosen_nll: Tensor | float | None = None,
    chosen_logits_mean: Tensor | float | None = None,
    rejected_logits_mean: Tensor | float | None = None,
    compute_metrics: bool = True,
    check_lengths: bool = True,
) -> DPOOutput:
    r"""ORPO: odds-ratio preference optimisation, reference-free, with the SFT term built in.

    Hong et al. 2024, *ORPO: Monolithic Preference Optimization without Reference Model* (arXiv:2403.07691).
    With length-averaged log-probs :math:`\bar\ell = \ell/|y|`:

    .. math::
        \log\mathrm{odds} = (\bar\ell_w - \bar\ell_l) - (\log(1-e^{\bar\ell_w}) - \log(1-e^{\bar\ell_l})),\quad
        L = \mathrm{NLL}_{chosen} - \beta\,\mathrm{mean}_i \log\sigma(\log\mathrm{odds}_i)

    log(1 − e^x) is evaluated as log1mexp (accurate for x near 0 and very negative); ℓ̄ is capped at
    −eps(dtype) so a sequence with probability 1 gives a finite value.

    Args:
        policy_chosen_logps, policy_rejected_logps: (P,) summed log-probs.
        {OPTIONS}
        chosen_lengths, rejected_lengths: (P,) scored-token counts, finite whole numbers ≥ 0 (required).
        chosen_nll: scalar or (P,) token-mean NLL of the chosen completions; default
            :math:`-\sum\ell_w/\sum|y_w|` (TRL's).
        chosen_logits_mean, rejected_logits_mean: optional, for ``logits/*`` metrics.
        compute_metrics: fill ``metrics`` (one host sync).
        check_lengths: check the lengths' values (see :func:`dpo_loss`).

    Shape:
        inputs :math:`(P)`; ``loss`` :math:`()`; other tensors :math:`(P)`.

    Returns:
        :class:`DPOOutput`: ``losses[i] = nll_i − β log σ(log_odds_i)``, rewards β·ℓ̄, metrics ``rewards/*``,
        ``logps/*`` (of ℓ̄, as TRL), ``logits/*`` (if given), ``nll_loss``,
        ``log_odds_ratio`` (mean log σ(log_odds)),
        ``log_odds_chosen`` (mean log_odds).

    Examples::

        >>> out = orpo_loss(torch.tensor([-5.0]), torch.tensor([-9.0]), chosen_lengths=[5],
        ...                 rejected_lengths=[6], beta=0.1)
    """
    beta = options.beta
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("orpo_loss length-averages the log-probs: pass chosen_lengths and rejected_lengths")
    x = pair_inputs(policy_chosen_logps, policy_rejected_logps, None, None, chosen_lengths, rejected_lengths,
                    check_lengths)
    P = x.lw.shape[0]
    cap = -torch.finfo(x.lw.dtype).eps
    aw = (x.lw / x.len_w).clamp(max=cap)
    al = (x.ll / x.len_l).clamp(max=cap)
    log_odds = (aw - al) - (log1mexp(aw) - log1mexp(al))
    ratio = F.logsigmoid(log_odds)
    nll = derived_nll("chosen_nll", chosen_nll, x.lw, x.len_w, P)
    losses = nll - beta * ratio
    loss = losses.mean()
    chosen_rewards, rejected_rewards = (beta * aw).detach(), (beta * al).detach()
    metrics: dict[str, float] = {}
    if compute_metrics:
        extra = {"nll_loss": nll.detach().mean(), "log_odds_ratio": ratio.detach().mean(),
                 "log_odds_chosen": log_odds.detach().mean()}
        metrics = pair_metrics(chosen_rewards, rejected_rewards, aw, al, chosen_logits_mean,
                                rejected_logits_mean, x.len_w, x.len_l, extra)
    return DPOOutput(loss, losses, chosen_rewards, rejected_rewards, x.lw, x.ll, metrics)
