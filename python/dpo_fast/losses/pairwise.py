"""Pairwise DPO losses: :func:`dpo_loss` (every loss type of the registry, lists with weights, f-divergences,
cDPO smoothing, WPO weights, TRL metrics) and, for the fused modules, :func:`make_pairwise_config`,
:func:`pair_loss_and_grads` and :func:`is_pair_decomposable`.

Formulas and papers: docs/LOSSES.md and :mod:`.registry` (names match TRL's ``loss_type`` strings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import registry as R
from .inputs import PairInputs, as_vector, check_positive_int, compute_dtype, pair_inputs, scalar_or_vector
from .options import DPOOptions, PairwiseConfig, normalize_loss_types, takes_options
from .outputs import DPOOutput, pair_metrics
from .terms import PairBatch

Tensor = torch.Tensor

__all__ = ["DPOOptions", "PairwiseConfig", "make_pairwise_config", "normalize_loss_types", "dpo_loss",
           "pair_loss_and_grads",
           "is_pair_decomposable"]


# ---------------------------------------------------------------------------------------------- options
# the options live in .options (DPOOptions, PairwiseConfig, normalize_loss_types): declared and validated once
def make_pairwise_config(
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = R.DEFAULT_LOSS_TYPE,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float | Sequence[float] = 0.0,
    f_divergence_type: str = R.DEFAULT_F_DIVERGENCE,
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    reduction: str = "mean",
    use_weighting: bool = False,
    stacklevel: int = 2,
) -> PairwiseConfig:
    """The :class:`PairwiseConfig` of these options and ``reduction``: ``DPOOptions(...).config(reduction)``.

    Raises ``ValueError`` / ``TypeError`` naming the option, exactly as :func:`dpo_loss` would, and warns
    when ``label_smoothing`` or ``f_divergence_type`` is set for a loss type that does not read it (the warning
    points at the first caller outside dpo_fast; ``stacklevel`` is accepted for compatibility and unused).
    """
    return DPOOptions(beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
                      f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                      discopop_tau=discopop_tau, use_weighting=use_weighting).config(reduction)


def is_pair_decomposable(loss_type: str | Sequence[str]) -> bool:
    """Whether the total loss is a sum of per-pair terms, each depending only on its own pair.

    True means dLoss/dℓ_{w,i} and dLoss/dℓ_{l,i} depend on pair i's inputs only (plus batch constants known
    before the pass: the pair count P and, for derived ``sft``, the batch's chosen-token count), so a fused
    kernel may compute them group by group with :func:`pair_loss_and_grads`. False for the batch-coupled
    loss types of the registry (aot, aot_unpaired: they sort over the batch), alone or inside a list.

    Raises:
        ValueError: for an unknown loss type.
    """
    types, _ = normalize_loss_types(loss_type, None)
    return not any(R.pairwise(lt).batch_coupled for lt in types)


# ---------------------------------------------------------------------------------------------- the maths
@dataclass
class _Extras:
    wpo: Tensor | None  # (P,) detached W_i
    sft_logps: Tensor  # (P,) chosen log-probs of the derived sft term
    sft_nll: Tensor | None  # () or (P,) external NLL


def _extras(
    cfg: PairwiseConfig,
    x: PairInputs,
    chosen_lengths: object,
    rejected_lengths: object,
    chosen_wpo_logweights: Tensor | None,
    rejected_wpo_logweights: Tensor | None,
    sft_nll: Tensor | float | None,
    sft_chosen_logps: Tensor | None,
) -> _Extras:
    P = x.num_pairs
    need_len = cfg.needs_lengths
    if need_len and (x.len_w is None or x.len_l is None):
        raise ValueError(
            f"loss_type {need_len} normalises by completion length: pass chosen_lengths and rejected_lengths "
            "(number of scored tokens per sequence, shape (P,))"
        )
    sft_types = [lt for lt in cfg.types if R.pairwise(lt).sft_term]
    has_sft = bool(sft_types)
    if has_sft and sft_nll is None and x.len_w is None:
        raise ValueError(
            f"loss_type {sft_types[0]!r} needs the chosen NLL: pass sft_nll (scalar or (P,) token-mean NLL of the "
            "chosen completion), or chosen_lengths so that it is derived from policy_chosen_logps"
        )
    wpo = None
    if cfg.use_weighting:
        if chosen_wpo_logweights is None or rejected_wpo_logweights is None:
            raise ValueError(
                "use_weighting=True needs chosen_wpo_logweights and rejected_wpo_logweights, shape (P,): "
                "mean over scored tokens of log p_t − (lse(2 z_t) − 2 lse(z_t))"
            )
        as_vector("chosen_wpo_logweights", chosen_wpo_logweights, P)
        as_vector("rejected_wpo_logweights", rejected_wpo_logweights, P)
        # W_i = w_chosen · w_rejected, treated as a constant (no gradient), as in WPO.
        wpo = torch.exp(chosen_wpo_logweights.detach().to(device=x.lw.device, dtype=x.lw.dtype)
                        + rejected_wpo_logweights.detach().to(device=x.lw.device, dtype=x.lw.dtype))
    sft_lp = x.lw
    if sft_chosen_logps is not None:
        as_vector("sft_chosen_logps", sft_chosen_logps, P)
        sft_lp = sft_chosen_logps.to(device=x.lw.device, dtype=x.lw.dtype)
    nll = None
    if has_sft and sft_nll is not None:
        nll = scalar_or_vector("sft_nll", sft_nll, P, x.lw)
    return _Extras(wpo, sft_lp, nll)


def _combined_losses(cfg: PairwiseConfig, x: PairInputs, e: _Extras, num_pairs: int | None = None,
                     num_chosen_tokens: Tensor | float | None = None) -> Tensor:
    """Σ_k w_k · L_k,i · W_i, shape (P,)."""
    r_w, r_l = x.lw - x.lw_ref, x.ll - x.ll_ref
    fd = R.f_divergence(cfg.f_div)
    batch = PairBatch(
        beta=cfg.beta, eps=cfg.eps[0], tau=cfg.tau, lw=x.lw, ll=x.ll, lw_ref=x.lw_ref, ll_ref=x.ll_ref, r_w=r_w,
        r_l=r_l, s_w=fd.score(r_w, cfg.alpha), s_l=fd.score(r_l, cfg.alpha), delta=fd.delta(r_w, r_l, cfg.alpha),
        len_w=x.len_w, len_l=x.len_l, sft_logps=e.sft_logps, sft_nll=e.sft_nll,
        num_pairs=x.num_pairs if num_pairs is None else num_pairs, num_chosen_tokens=num_chosen_tokens)
    total = None
    for lt, w, eps in zip(cfg.types, cfg.weights, cfg.eps):
        if eps != batch.eps:
            batch = dataclasses.replace(batch, eps=eps)
        term = R.pairwise(lt).fn(batch)
        term = term * w if w != 1.0 else term
        total = term if total is None else total + term
    return total if e.wpo is None else total * e.wpo


def _reduce(losses: Tensor, reduction: str, num_pairs: int | None = None) -> Tensor:
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    return losses.mean() if num_pairs is None else losses.sum() / num_pairs


# ---------------------------------------------------------------------------------------------- dpo_loss
@takes_options(DPOOptions)
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    options: DPOOptions | None = None,
    chosen_lengths: Tensor | Sequence[int] | None = None,
    rejected_lengths: Tensor | Sequence[int] | None = None,
    chosen_wpo_logweights: Tensor | None = None,
    rejected_wpo_logweights: Tensor | None = None,
    sft_nll: Tensor | float | None = None,
    sft_chosen_logps: Tensor | None = None,
    chosen_logits_mean: Tensor | float | None = None,
    rejected_logits_mean: Tensor | float | None = None,
    reduction: str = "mean",
    compute_metrics: bool = True,
    check_lengths: bool = True,
) -> DPOOutput:
    r"""Direct Preference Optimization loss and its pairwise variants, on per-sequence log-probs.

    DPO: Rafailov et al. 2023, *Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model* (arXiv:2305.18290). Per pair i, with log-ratios :math:`r = \ell - \ell^{ref}`, f-divergence
    scores :math:`s(r)` (0 at r = 0) and :math:`\Delta = s_w - s_l`:

{LOSS_TABLE}

    Total: :math:`L = \sum_k w_k \cdot \mathrm{mean}_i(L_{k,i} W_i)`, with ``loss_weights`` :math:`w_k`
    (default 1 each) and WPO weights :math:`W_i` (1 unless ``use_weighting``). The formulas are TRL 1.16's
    (docs/LOSSES.md), except that ``sigmoid`` applies ``label_smoothing`` (cDPO) where TRL ignores it.

    Args:
        policy_chosen_logps: (P,) summed log-probs ℓ_w of the chosen completions under the policy.
        policy_rejected_logps: (P,) ℓ_l, same for the rejected completions.
        ref_chosen_logps, ref_rejected_logps: (P,) the same under the reference model; ``None`` for both means
            reference-free (zeros). Gradients flow into them if they require grad.
        {OPTIONS}
        chosen_lengths, rejected_lengths: (P,) number of scored completion tokens |y| per sequence: finite
            whole numbers ≥ 0 (ints, or floats holding whole numbers; anything else is a ``ValueError``).
            Required by ipo and sigmoid_norm, by sft when ``sft_nll`` is not given, and used to token-weight
            ``logits/*`` metrics. |y| = 0 counts as 1.
        chosen_wpo_logweights, rejected_wpo_logweights: (P,) per-sequence
            mean_t[log p_t − (lse(2 z_t) − 2 lse(z_t))], computed by the engine (or
            :func:`wpo_logweights_from_logits`). Required when ``use_weighting``.
        sft_nll: for loss_type ``sft``: scalar or (P,) token-mean NLL of the chosen completion, used as is.
            When ``None``, it is derived as TRL's batch token-mean :math:`-\sum_i \ell^u_{w,i} / \sum_i |y_{w,i}|`
            split over pairs as :math:`L_i = -\ell^u_{w,i} P / \sum_j |y_{w,j}|` (same mean, per-pair gradients),
            where :math:`\ell^u_w` is ``sft_chosen_logps``.
        sft_chosen_logps: (P,) *unweighted* summed log-probs of the chosen completions for the derived sft
            term; default ``policy_chosen_logps``. Under LD-DPO pass the plain sums here: TRL's SFT term uses
            the unweighted token log-probs while the preference terms use the LD-weighted ones.
        chosen_logits_mean, rejected_logits_mean: optional, for ``logits/chosen`` / ``logits/rejected``:
            a scalar (already the batch mean), or (P,) per-sequence mean over scored tokens of the
            vocab-mean logit (averaged token-weighted when lengths are given).
        reduction: ``"mean"`` (default), ``"sum"`` over pairs, or ``"none"`` (``loss`` is then (P,)).
        compute_metrics: fill ``metrics`` (one host sync); ``False`` leaves it empty.
        check_lengths: check the values of the lengths (one host sync on an accelerator); ``False`` for counts
            known to be valid, e.g. computed from a mask by a fused module.

    Shape:
        - all per-pair inputs: :math:`(P)`, P ≥ 1 pairs, float (bf16/fp16/fp32/fp64).
        - output: ``loss`` :math:`()`, the other tensors :math:`(P)`, float32 (float64 for float64 input).

    Returns:
        :class:`DPOOutput`. Metrics (TRL names): ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` and, when the logit
        means are given, ``logits/chosen``, ``logits/rejected``.

    Examples::

        >>> pc, pr = torch.tensor([-10.0, -12.0], requires_grad=True), torch.tensor([-11.0, -11.0])
        >>> out = dpo_loss(pc, pr, torch.tensor([-10.5, -12.0]), torch.tensor([-10.5, -11.5]), beta=0.1)
        >>> out.loss.backward()
        >>> sorted(out.metrics)[:2]
        ['logps/chosen', 'logps/rejected']
        >>> dpo_loss(pc, pr, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2],
        ...          chosen_lengths=torch.tensor([7, 9])).loss.shape
        torch.Size([])
    """
    cfg = options.config(reduction)
    x = pair_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    chosen_lengths, rejected_lengths, check_lengths)
    e = _extras(cfg, x, chosen_lengths, rejected_lengths, chosen_wpo_logweights, rejected_wpo_logweights, sft_nll,
                sft_chosen_logps)
    losses = _combined_losses(cfg, x, e)
    loss = _reduce(losses, cfg.reduction)
    chosen_rewards = (cfg.beta * (x.lw - x.lw_ref)).detach()
    rejected_rewards = (cfg.beta * (x.ll - x.ll_ref)).detach()
    metrics: dict[str, float] = {}
    if compute_metrics:
        metrics = pair_metrics(chosen_rewards, rejected_rewards, x.lw, x.ll, chosen_logits_mean,
                               rejected_logits_mean, x.len_w, x.len_l)
    return DPOOutput(loss, losses, chosen_rewards, rejected_rewards, x.lw, x.ll, metrics)


dpo_loss.__doc__ = dpo_loss.__doc__.replace("{LOSS_TABLE}", R.render_rst_table())


# ---------------------------------------------------------------------------------------------- fused helper
@takes_options(DPOOptions)
def pair_loss_and_grads(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    options: DPOOptions | None = None,
    num_pairs: int | None = None,
    num_chosen_tokens: int | float | Tensor | None = None,
    chosen_lengths: Tensor | Sequence[int] | None = None,
    rejected_lengths: Tensor | Sequence[int] | None = None,
    chosen_wpo_logweights: Tensor | None = None,
    rejected_wpo_logweights: Tensor | None = None,
    sft_nll: Tensor | float | None = None,
    sft_chosen_logps: Tensor | None = None,
    reduction: str = "mean",
    check_lengths: bool = True,
) -> tuple[Tensor, ...]:
    r"""Per-pair losses and dL/dℓ of the total loss, for a fused kernel that forms gradients in its forward.

    Same options (a :class:`DPOOptions` or its keywords) and validation as :func:`dpo_loss`. Works under
    ``torch.no_grad()`` and never builds a graph into its inputs (everything is detached); the derivatives come
    from autograd on (P,) vectors.

    Args:
        num_pairs: P of the *whole* batch when this call sees one group of pairs: the mean divides by it
            (default: the length of the inputs). Ignored for ``reduction="sum"``.
        num_chosen_tokens: Σ|y_w| of the whole batch, for the derived ``sft`` term (default:
            ``chosen_lengths.sum()`` of this call).
        sft_chosen_logps: (P,) unweighted chosen sums for the derived sft term (see :func:`dpo_loss`); when
            given, its derivative is returned separately (4-tuple).
        reduction: ``"mean"`` or ``"sum"`` — the reduction of the total loss being differentiated.
        check_lengths: as in :func:`dpo_loss` (``False`` skips a host sync per call on an accelerator).

    Returns:
        ``(losses, d_chosen, d_rejected)``, each (P,) in the compute dtype, detached:
        ``losses[i]`` = Σ_k w_k L_k,i W_i (so the batch loss is ``Σ losses / num_pairs`` for mean);
        ``d_chosen[i]`` = ∂L_total/∂ℓ_{w,i}, ``d_rejected[i]`` = ∂L_total/∂ℓ_{l,i}, with the mean reduction,
        loss weights and WPO weights included. Multiply by the upstream gradient of the loss in backward.
        With ``sft_chosen_logps``: ``(losses, d_chosen, d_rejected, d_sft_chosen)``, the last one
        ∂L_total/∂ℓ^u_{w,i} (apply it to the *unweighted* token log-probs). An externally given ``sft_nll`` is
        a constant here (its gradient is not returned).

    Valid group by group only when :func:`is_pair_decomposable`; for aot call it on the whole batch.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for pair_loss_and_grads, got {reduction!r}")
    cfg = options.config(reduction)
    det = [None if t is None else t.detach() for t in (ref_chosen_logps, ref_rejected_logps)]
    as_vector("policy_chosen_logps", policy_chosen_logps)
    as_vector("policy_rejected_logps", policy_rejected_logps)
    if num_pairs is not None:
        check_positive_int("num_pairs (pairs in the whole batch)", num_pairs)
    dt = compute_dtype(policy_chosen_logps, policy_rejected_logps, *det)
    with torch.enable_grad():
        lw = policy_chosen_logps.detach().to(dt).requires_grad_(True)
        ll = policy_rejected_logps.detach().to(dt).requires_grad_(True)
        leaves = [lw, ll]
        lu = None
        if sft_chosen_logps is not None:
            as_vector("sft_chosen_logps", sft_chosen_logps, lw.shape[0])
            lu = sft_chosen_logps.detach().to(device=lw.device, dtype=dt).requires_grad_(True)
            leaves.append(lu)
        sft = sft_nll.detach() if isinstance(sft_nll, Tensor) else sft_nll
        x = pair_inputs(lw, ll, det[0], det[1], chosen_lengths, rejected_lengths, check_lengths)
        e = _extras(cfg, x, chosen_lengths, rejected_lengths, chosen_wpo_logweights, rejected_wpo_logweights, sft,
                    lu)
        n_tok = num_chosen_tokens
        if isinstance(n_tok, Tensor):
            n_tok = n_tok.detach().to(device=lw.device, dtype=dt)
        losses = _combined_losses(cfg, x, e, num_pairs, n_tok)
        total = _reduce(losses, cfg.reduction, num_pairs)
        grads = (torch.autograd.grad(total, leaves, allow_unused=True) if total.requires_grad
                 else [None] * len(leaves))
    grads = [torch.zeros_like(v) if g is None else g.detach() for g, v in zip(grads, leaves)]
    return (losses.detach(), *grads)
