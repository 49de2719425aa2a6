"""GRPO-family policy-gradient losses on per-token log-probs: every TRL 1.16 ``GRPOConfig.loss_type``.

- :class:`GRPOOptions` (declared in :mod:`.options`) — the validated options (build once, e.g. at a module's
  construction).
- :func:`grpo_token_terms` — the per-token core: ratios, policy term, masks, sampler IS correction, KL.
  The fused ``GRPOLoss`` and the GRPO trainer call it on their own (B, T) log-probs.
- :func:`grpo_loss` — the whole loss: the core, the loss type's aggregation, the entropy bonus and TRL's
  metrics under TRL's names.
- :func:`vllm_importance_sampling` — TRL's sampler/trainer importance-sampling ratio (truncated or masked,
  token or sequence level) and its ``sampling/*`` metrics.

Formulas: docs/LOSSES.md (TRL 1.16's ``GRPOTrainer._compute_loss`` is the test oracle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import registry as R
from .grpo_terms import PolicyTerm, TokenTermInputs
from .inputs import compute_dtype
from .options import GRPOOptions, takes_options
from .outputs import GRPOOutput, sync_metrics

Tensor = torch.Tensor

__all__ = ["GRPOOptions", "GRPOTerms", "grpo_token_terms", "grpo_loss", "vllm_importance_sampling",
           "high_entropy_mask", "entropy_bonus"]


# ---------------------------------------------------------------------------------------------- helpers
def entropy_bonus(entropies: Tensor, effective_mask: Tensor, coef: float, denom: Tensor | None = None) -> Tensor:
    """TRL's entropy bonus term, coef · Σ H · eff / Σ eff (the mean entropy over the tokens it acts on), to be
    subtracted from the loss; differentiable in ``entropies``. ``denom``: Σ eff when ``effective_mask`` is only a
    part of the batch (a fused group: its share of the batch's bonus), default ``effective_mask.sum()``; clamped
    at 1 (TRL's ``clamp(min=1.0)``)."""
    eff = effective_mask
    d = eff.sum() if denom is None else denom
    return coef * (torch.where(eff > 0, entropies, 0.0) * eff).sum() / d.clamp_min(1.0)


def high_entropy_mask(entropies: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """(B, T) bool: completion tokens whose entropy is ≥ the ``quantile`` quantile of the completion-token
    entropies (TRL's ``get_high_entropy_mask`` on one process; all False when no token is scored)."""
    m = mask.bool()
    local = entropies.detach()[m].float()
    if local.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(local, quantile)
    return ((entropies.detach() * m.to(entropies.dtype)) >= threshold) & m


def vllm_importance_sampling(
    old_logps: Tensor, sampling_logps: Tensor, mask: Tensor, mode: str, clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The sampler importance-sampling ratio π_old/π_sampler TRL 1.16 applies under vLLM, and its metrics.

    Per token d_t = (log π_old − log π_sampler)·m_t (NaN → 0, i.e. ratio 1 where the sampler gave no value);
    token modes use e^{d_t}, sequence modes e^{Σ_t d_t} (shape (B, 1)). ``*_truncate`` clamps to
    [clip_min, clip_max]; ``*_mask`` sets ratios outside it to 0.

    Args:
        old_logps, sampling_logps: (B, T) per-token log-probs under the trainer's old policy and the sampler.
        mask: (B, T) completion mask.
        mode: ``token_truncate`` | ``token_mask`` | ``sequence_truncate`` | ``sequence_mask``.
        clip_min, clip_max: the bounds (``None`` = unbounded on that side).

    Returns:
        ``(ratio, metrics)``: ratio (B, T) or (B, 1), detached; metrics (0-d tensors, TRL's names)
        ``sampling/sampling_logp_difference/{mean,max}`` and ``sampling/importance_sampling_ratio/{min,mean,max}``.
    """
    R.check_name("mode", mode, R.VLLM_IS_MODES)
    with torch.no_grad():
        m = mask.to(old_logps.dtype)
        diff = torch.nan_to_num((old_logps - sampling_logps) * m, nan=0.0)
        seq = mode in R.VLLM_IS_SEQUENCE_MODES
        ratio = torch.exp(diff.sum(-1, keepdim=True) if seq else diff)
        if mode in R.VLLM_IS_TRUNCATE_MODES:
            ratio = ratio.clamp(min=clip_min, max=clip_max)
        else:
            lo = -math.inf if clip_min is None else clip_min
            hi = math.inf if clip_max is None else clip_max
            ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
        bm = mask.bool()
        d = (old_logps - sampling_logps).abs()
        d = d[bm & ~torch.isnan(d)]
        flat = ratio.flatten() if seq else ratio[bm]
        zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
        metrics = {
            "sampling/sampling_logp_difference/mean": d.mean() if d.numel() else zero,
            "sampling/sampling_logp_difference/max": d.max() if d.numel() else zero,
            "sampling/importance_sampling_ratio/min": flat.min() if flat.numel() else zero,
            "sampling/importance_sampling_ratio/mean": flat.mean() if flat.numel() else zero,
            "sampling/importance_sampling_ratio/max": flat.max() if flat.numel() else zero,
        }
    return ratio, metrics


def _check_2d(name: str, t: object, B: int, T: int) -> None:
    if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (B, T)):
        raise ValueError(f"{name} must have shape ({B}, {T}) like logps, got {tuple(getattr(t, 'shape', ()))}")


# ---------------------------------------------------------------------------------------------- the core
@dataclass
class GRPOTerms:
    """Per-token pieces of the GRPO loss (see :func:`grpo_token_terms`).

    Attributes:
        per_token_loss: (B, T), 0 off the mask: policy term × off-policy mask × entropy mask × sampler IS
            ratio, plus β·KL.
        policy: the policy term (its ``coef`` is the ratio as the clip metrics see it; ``phi`` for VESPO).
        inputs: what the policy term saw (ratios, advantages (B, 1) or (B, T), mask, ...).
        kl: (B, T) per-token KL (bias-corrected when asked), or ``None`` when β = 0.
        entropy_mask: (B, T) bool of the kept high-entropy tokens, or ``None``.
        effective_mask: (B, T) float: mask × entropy mask (the tokens the entropy bonus acts on).
        sampling_metrics: ``sampling/*`` 0-d tensors when the IS ratio was computed here, else empty.
    """

    per_token_loss: Tensor
    policy: PolicyTerm
    inputs: TokenTermInputs
    kl: Tensor | None
    entropy_mask: Tensor | None
    effective_mask: Tensor
    sampling_metrics: dict[str, Tensor]


def grpo_token_terms(
    logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    *,
    options: GRPOOptions,
    entropies: Tensor | None = None,
    sampling_logps: Tensor | None = None,
    importance_sampling_ratio: Tensor | None = None,
) -> GRPOTerms:
    r"""The per-token GRPO loss before aggregation (validated inputs; see :func:`grpo_loss` for the args).

    Differentiable in ``logps`` (and ``entropies`` only through the entropy bonus, which is not here).
    The per-token loss at token t depends on log π_t only (token-level ρ), or on its sequence's log-probs
    (sequence-level ρ), plus detached batch quantities (entropy quantile, masks, IS ratio): a fused pass can
    differentiate it group by group of whole sequences.
    """
    o = options
    if not isinstance(logps, Tensor) or not logps.is_floating_point() or logps.dim() != 2:
        raise ValueError(f"logps must be a float (B, T) tensor, got {getattr(logps, 'shape', type(logps).__name__)}")
    B, T = logps.shape
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape ({B}, {T}) like logps, got {tuple(getattr(mask, 'shape', ()))}")
    if not isinstance(advantages, Tensor) or tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) (or ({B}, {T}) per token), got "
                         f"{tuple(getattr(advantages, 'shape', ()))}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("entropies", entropies),
                    ("sampling_logps", sampling_logps)):
        _check_2d(name, t, B, T)
    if importance_sampling_ratio is not None and (
            not isinstance(importance_sampling_ratio, Tensor)
            or tuple(importance_sampling_ratio.shape) not in ((B, T), (B, 1))):
        raise ValueError(f"importance_sampling_ratio must have shape ({B}, {T}) or ({B}, 1), got "
                         f"{tuple(getattr(importance_sampling_ratio, 'shape', ()))}")
    if o.beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 adds the KL term: pass ref_logps (B, T)")
    if (o.top_entropy_quantile < 1.0 or o.entropy_coef != 0.0) and entropies is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need the per-token entropies: pass "
                         "entropies (B, T)")
    if o.vllm_importance_sampling_mode is not None:
        if sampling_logps is None:
            raise ValueError("vllm_importance_sampling_mode needs sampling_logps (B, T), the sampler's log-probs")
        if importance_sampling_ratio is not None:
            raise ValueError("pass importance_sampling_ratio or vllm_importance_sampling_mode with sampling_logps, "
                             "not both")
    entry = o.entry

    dt = compute_dtype(logps, old_logps, ref_logps, advantages, entropies)
    lp = logps.to(dt)
    m = mask.to(device=lp.device, dtype=dt)
    on = m > 0
    old = lp.detach() if old_logps is None else old_logps.detach().to(device=lp.device, dtype=dt)
    A = advantages.detach().to(device=lp.device, dtype=dt)
    A = A.unsqueeze(-1) if A.dim() == 1 else A  # (B, 1) or (B, T)
    lp_on = torch.where(on, lp, 0.0)  # unscored positions contribute nothing (NaN there cannot leak)
    log_ratio = torch.where(on, lp - old, 0.0)
    if o.importance_sampling_level == R.SEQUENCE_IS_LEVEL:
        log_w = (log_ratio.sum(-1) / m.sum(-1).clamp_min(1.0)).unsqueeze(-1)  # (B, 1)
    else:
        log_w = log_ratio
    coef = torch.exp(log_w)

    sampling_metrics: dict[str, Tensor] = {}
    is_ratio = importance_sampling_ratio
    if o.vllm_importance_sampling_mode is not None:
        is_ratio, sampling_metrics = vllm_importance_sampling(
            old, sampling_logps.detach().to(device=lp.device, dtype=dt), m, o.vllm_importance_sampling_mode,
            o.vllm_importance_sampling_clip_min, o.vllm_importance_sampling_clip_max)
    if is_ratio is not None:
        is_ratio = is_ratio.detach().to(device=lp.device, dtype=dt)

    kl = None
    if o.beta != 0.0:
        d = torch.where(on, ref_logps.detach().to(device=lp.device, dtype=dt) - lp, 0.0)
        kl = torch.exp(d) - d - 1.0
        if o.use_bias_correction_kl:
            kl = kl * coef

    x = TokenTermInputs(coef, A, lp_on, log_ratio, m, is_ratio, o)
    term = entry.term(x)
    per_token = term.loss
    if o.off_policy_mask_threshold is not None:
        samp = old if sampling_logps is None else sampling_logps.detach().to(device=lp.device, dtype=dt)
        kl_div = torch.nan_to_num(torch.where(on, samp - lp.detach(), 0.0), nan=0.0)
        avg = kl_div.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)
        per_token = per_token * ((A >= 0) | (avg <= o.off_policy_mask_threshold)).to(dt)
    ent_mask = None
    if o.top_entropy_quantile < 1.0:
        ent_mask = high_entropy_mask(entropies.to(device=lp.device, dtype=dt), m, 1.0 - o.top_entropy_quantile)
        per_token = per_token * ent_mask.to(dt)
    if is_ratio is not None and not entry.folds_is_ratio:
        per_token = per_token * is_ratio
    if kl is not None:
        per_token = per_token + o.beta * kl
    per_token = torch.where(on, torch.broadcast_to(per_token, (B, T)) * m, 0.0)
    eff = m if ent_mask is None else m * ent_mask.to(dt)
    return GRPOTerms(per_token, term, x, kl, ent_mask, eff, sampling_metrics)


# ---------------------------------------------------------------------------------------------- grpo_loss
@takes_options(GRPOOptions)
def grpo_loss(
    logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    *,
    options: GRPOOptions | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    entropies: Tensor | None = None,
    sampling_logps: Tensor | None = None,
    importance_sampling_ratio: Tensor | None = None,
    compute_metrics: bool = True,
) -> GRPOOutput:
    r"""GRPO-family clipped / soft policy-gradient loss on per-token log-probs (every TRL 1.16 loss_type).

    GRPO: Shao et al. 2024, *DeepSeekMath* (arXiv:2402.03300). Ratio
    :math:`\rho_t = \exp(\log\pi_t - \log\pi_{old,t})` (``importance_sampling_level="token"``) or
    :math:`\rho = \exp(\mathrm{mean}_{t\in y}(\log\pi_t - \log\pi_{old,t}))` per sequence (``"sequence"``,
    GSPO, Zheng et al. 2025, arXiv:2507.18071). Per-token policy term by ``loss_type``:

    - grpo, bnpo, dr_grpo, dapo, luspo: :math:`-\min(\rho A, \mathrm{clip}(\rho, 1-\varepsilon_{low},
      1+\varepsilon_{high})A)`, with ρ capped at δ in the first branch when ``delta`` is set (INTELLECT-2).
    - cispo (MiniMax-M1, arXiv:2506.13585): :math:`-\mathrm{sg}(\min(\rho, \varepsilon_{high}))\,A\log\pi_t`.
    - sapo (arXiv:2511.20347): :math:`-\tfrac{4}{\tau}\sigma(\tau(\rho - 1))\,A`, τ by the sign of A.
    - vespo (arXiv:2602.10693): :math:`-\mathrm{sg}(\varphi(w))\,A\log\pi_t`,
      :math:`\varphi(w) = e^{\lambda} w^{k} e^{-\lambda w}` of the sequence ratio w.

    Then ×(off-policy mask) ×(entropy mask) ×(sampler IS ratio, except vespo where it folds into w), plus
    :math:`\beta(e^{\log\pi^{ref}_t - \log\pi_t} - (\log\pi^{ref}_t - \log\pi_t) - 1)` (×ρ with
    ``use_bias_correction_kl``). Aggregation (m = mask): grpo, sapo: mean over sequences of
    :math:`\sum_t l_t m_t / \sum_t m_t`; bnpo: :math:`\sum l m / \sum m`; dr_grpo:
    :math:`\sum l m / (B \cdot \text{max\_completion\_length})`; dapo, cispo, vespo:
    :math:`\sum l m / \text{num\_items\_in\_batch}`; luspo: mean over sequences of :math:`\sum_t l_t m_t`.
    Finally ``loss −= entropy_coef · mean entropy`` over the kept tokens. docs/LOSSES.md has every formula.

    Args:
        logps: (B, T) per-token log-probs of the sampled completions under the current policy.
        advantages: (B,) per-sequence advantages A (or (B, T) per token).
        mask: (B, T) bool/0-1, 1 at completion tokens.
        old_logps: (B, T) log-probs under the sampling-time policy; ``None`` = ``logps.detach()`` (one update
            per generation: ρ = 1 in value, gradient A·∇log π).
        ref_logps: (B, T) reference log-probs; required when β ≠ 0.
        {OPTIONS}
        num_items_in_batch: for dapo / cispo / vespo: completion tokens across the whole (accumulated,
            all-process) batch; default ``mask.sum()``.
        entropies: (B, T) per-token entropies of the policy; needed by ``top_entropy_quantile`` < 1 and
            ``entropy_coef`` ≠ 0, and reported as ``entropy``. Gradients flow into it through the bonus.
        sampling_logps: (B, T) the sampler's (e.g. vLLM's) log-probs; needed by
            ``vllm_importance_sampling_mode``, and used by the off-policy mask (default ``old_logps``).
        importance_sampling_ratio: a precomputed sampler IS ratio, (B, T) or (B, 1) (e.g. from
            :func:`vllm_importance_sampling`); exclusive with ``vllm_importance_sampling_mode``.
        compute_metrics: fill ``metrics`` (one host sync).

    Shape:
        ``logps``, ``mask``, ``old_logps``, ``ref_logps``, ``entropies``, ``sampling_logps``: :math:`(B, T)`;
        ``advantages``: :math:`(B)`. Float inputs of any dtype; maths in float32 (float64 for float64 input).

    Returns:
        :class:`GRPOOutput` (``loss`` scalar, ``per_token_loss`` (B, T), metrics under TRL's names: ``kl``
        (β ≠ 0), ``entropy`` (entropies given), the loss type's clip statistics — ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_max``
        (clipped types), ``cispo_clip_ratio``, ``vespo/phi_seq_mean`` — ``policy_loss`` (entropy bonus on)
        and ``sampling/*`` (IS ratio computed here)). Sequence-level ratios give per-sequence statistics, as
        TRL's. A large positive log π − log π_old overflows ρ to inf: that is the maths.

    Examples::

        >>> lp = torch.randn(2, 4).clamp(max=0).requires_grad_()
        >>> out = grpo_loss(lp, torch.tensor([1.0, -1.0]), torch.ones(2, 4), loss_type="dapo")
        >>> out.loss.backward()
    """
    o = options
    t = grpo_token_terms(logps, advantages, mask, old_logps, ref_logps, options=o, entropies=entropies,
                         sampling_logps=sampling_logps, importance_sampling_ratio=importance_sampling_ratio)
    m = t.inputs.mask
    entry = o.entry
    n_items: Tensor | float = m.sum().clamp_min(1.0)
    if entry.token_normalised and num_items_in_batch is not None:
        n_items = num_items_in_batch
        if not isinstance(n_items, Tensor) and not (float(n_items) > 0):
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")
    loss = entry.aggregate(t.per_token_loss, m, o, n_items)
    policy_loss = loss
    ent = None if entropies is None else entropies.to(device=m.device, dtype=m.dtype)
    if o.entropy_coef != 0.0:
        loss = loss - entropy_bonus(ent, t.effective_mask, o.entropy_coef)

    metrics: dict[str, float] = {}
    if compute_metrics:
        with torch.no_grad():
            vals: dict[str, Tensor] = {}
            denom = m.sum().clamp_min(1.0)
            if t.kl is not None:
                vals["kl"] = (t.kl * m).sum() / denom
            if ent is not None:
                vals["entropy"] = (torch.where(m > 0, ent, 0.0) * m).sum() / denom
            vals.update(entry.metrics(t.policy, t.inputs))
            if o.entropy_coef != 0.0:
                vals["policy_loss"] = policy_loss
            vals.update(t.sampling_metrics)
            metrics = sync_metrics(list(vals), list(vals.values()))
    return GRPOOutput(loss, t.per_token_loss, metrics)
