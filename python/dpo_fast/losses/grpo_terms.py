"""Per-token terms of the GRPO family: the functions the GRPO entries of the loss registry point at.

A policy term maps the importance ratios and advantages to a per-token policy loss; an aggregation maps the
masked per-token loss to the scalar; a metrics function gives the clip statistics TRL logs for that loss type.
The formulas follow TRL 1.16's ``GRPOTrainer._compute_loss`` (its code is the test oracle); docs/LOSSES.md
gives them with their papers. No loss-type names here (they live in :mod:`.registry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

Tensor = torch.Tensor

#: VESPO clamps: log-ratios at ±20, the sequence log-weight at [log 1e-8, 20] (TRL's values).
VESPO_LOG_RATIO_CLAMP = 20.0
VESPO_LOG_W_MIN = math.log(1e-8)


@dataclass
class TokenTermInputs:
    """What a policy term sees.

    ``coef``: ρ = exp(log-weight), (B, T) token-level or (B, 1) sequence-level; ``advantages``: (B, 1) or (B, T);
    ``logps``: (B, T) policy log-probs (differentiable); ``log_ratio``: (B, T) log π − log π_old, 0 off the mask;
    ``mask``: (B, T) float; ``is_ratio``: the sampler importance-sampling ratio (B, T) / (B, 1) or ``None``;
    ``options``: the validated :class:`~dpo_fast.losses.GRPOOptions`.
    """

    coef: Tensor
    advantages: Tensor
    logps: Tensor
    log_ratio: Tensor
    mask: Tensor
    is_ratio: Tensor | None
    options: Any


@dataclass
class PolicyTerm:
    """A policy term's result: ``loss`` (per token, broadcastable to (B, T)), ``coef`` the ratio as the clip
    metrics see it (after the δ cap), ``phi`` VESPO's sequence weight (else ``None``)."""

    loss: Tensor
    coef: Tensor
    phi: Tensor | None = None


# ---------------------------------------------------------------------------------------------- policy terms
def term_clipped(x: TokenTermInputs) -> PolicyTerm:
    """PPO-style clip: −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), ρ first capped at δ when ``delta`` is set."""
    o = x.options
    coef2 = x.coef.clamp(1.0 - o.epsilon_low, 1.0 + o.epsilon_high)
    coef1 = x.coef if o.delta is None else x.coef.clamp(max=o.delta)
    return PolicyTerm(-torch.minimum(coef1 * x.advantages, coef2 * x.advantages), coef1)


def term_cispo(x: TokenTermInputs) -> PolicyTerm:
    """CISPO: −sg(min(ρ, ε_high))·A·log π (the clipped weight is a constant)."""
    w = x.coef.clamp(max=x.options.epsilon_high).detach()
    return PolicyTerm(-w * x.advantages * x.logps, x.coef)


def term_sapo(x: TokenTermInputs) -> PolicyTerm:
    """SAPO: −(4/τ)·σ(τ(ρ − 1))·A, τ = τ_pos where A > 0 else τ_neg (a soft gate, not a hard clip)."""
    o = x.options
    tau = torch.where(x.advantages > 0, o.sapo_temperature_pos, o.sapo_temperature_neg).to(x.coef.dtype)
    return PolicyTerm(-(torch.sigmoid(tau * (x.coef - 1.0)) * 4.0 / tau) * x.advantages, x.coef)


@torch.no_grad()
def vespo_phi(x: TokenTermInputs) -> Tensor:
    """VESPO's detached Gamma weight φ(w) = e^{λ} w^{k} e^{−λw} of the sequence ratio w, (B, 1) (or (B, T)
    for per-token advantages); non-finite values become 0, as in TRL."""
    o = x.options
    lr = x.log_ratio.clamp(-VESPO_LOG_RATIO_CLAMP, VESPO_LOG_RATIO_CLAMP)
    seq = (lr * x.mask).sum(-1, keepdim=True)
    if x.is_ratio is not None:
        seq = seq + torch.log(x.is_ratio).clamp(VESPO_LOG_W_MIN, VESPO_LOG_RATIO_CLAMP).sum(-1, keepdim=True)
    log_w = seq.clamp(VESPO_LOG_W_MIN, VESPO_LOG_RATIO_CLAMP)
    pos = x.advantages >= 0
    k = torch.where(pos, o.vespo_k_pos, o.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(pos, o.vespo_lambda_pos, o.vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def term_vespo(x: TokenTermInputs) -> PolicyTerm:
    """VESPO: −φ(w)·A·log π with the detached sequence weight φ (the sampler ratio folds into w)."""
    phi = vespo_phi(x)
    return PolicyTerm(-phi * x.advantages * x.logps, x.coef, phi)


# ---------------------------------------------------------------------------------------------- aggregations
# Each takes the masked (B, T) per-token loss, the (B, T) float mask, the options and the normaliser for
# token-count aggregations (``num_items_in_batch``, already defaulted), and returns the scalar loss.
def agg_sequence_mean(per_token: Tensor, mask: Tensor, o: Any, n_items: Tensor | float) -> Tensor:
    """mean over sequences of Σ_t l_t m_t / Σ_t m_t."""
    return (per_token.sum(-1) / mask.sum(-1).clamp_min(1.0)).mean()


def agg_local_tokens(per_token: Tensor, mask: Tensor, o: Any, n_items: Tensor | float) -> Tensor:
    """Σ l m / Σ m over this batch."""
    return per_token.sum() / mask.sum().clamp_min(1.0)


def agg_constant(per_token: Tensor, mask: Tensor, o: Any, n_items: Tensor | float) -> Tensor:
    """Σ l m / (B · max_completion_length)."""
    L = per_token.shape[1] if o.max_completion_length is None else o.max_completion_length
    return per_token.sum() / (per_token.shape[0] * L)


def agg_global_tokens(per_token: Tensor, mask: Tensor, o: Any, n_items: Tensor | float) -> Tensor:
    """Σ l m / num_items_in_batch (the whole accumulated batch's completion tokens)."""
    return per_token.sum() / n_items


def agg_sequence_sum(per_token: Tensor, mask: Tensor, o: Any, n_items: Tensor | float) -> Tensor:
    """mean over sequences of Σ_t l_t m_t (each sequence weighted by its length)."""
    return per_token.sum(-1).mean()


# ---------------------------------------------------------------------------------------------- metrics
# Each loss type's statistics are defined once, unreduced (:class:`MetricParts`): the registry entry's
# ``metrics`` reduces them on one process (``grpo_loss``'s ``metrics``); a trainer running on several processes
# takes the same parts (``metrics.parts``) and reduces them across processes the same way (TRL's reductions).
def global_mean(x: Tensor, mask: Tensor) -> Tensor:
    """TRL's global_masked_mean on one process: (B, 1) values average over sequences, (B, T) over the mask."""
    if x.shape[-1] == 1:
        return x.sum() / max(x.shape[0], 1)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    """TRL's masked_seq_mean: one value per sequence (NaN for a sequence without tokens)."""
    if x.shape[-1] == 1:
        return x.squeeze(-1)
    return (x * mask).sum(-1) / mask.sum(-1)


def _nan_extreme(x: Tensor, largest: bool) -> Tensor:
    """TRL's nanmin / nanmax without a host sync: NaN when every value is NaN."""
    ok = ~torch.isnan(x)
    fill = -math.inf if largest else math.inf
    vals = torch.where(ok, x, fill)
    ext = vals.amax() if largest else vals.amin()
    return torch.where(ok.any(), ext, torch.full_like(ext, math.nan))


@dataclass(frozen=True)
class MetricParts:
    """One statistic before its reduction: ``values`` (B, T) per token or (B, 1) per sequence, and ``reduce``:
    ``"mean"`` (TRL's global_masked_mean over the mask; over sequences for (B, 1)), ``"min"`` / ``"max"``
    (NaN-skipping extreme of the per-sequence means, :func:`seq_mean`)."""

    values: Tensor
    reduce: str

    def local(self, mask: Tensor) -> Tensor:
        """The statistic of this process's batch."""
        if self.reduce == "mean":
            return global_mean(self.values, mask)
        return _nan_extreme(seq_mean(self.values, mask), largest=self.reduce == "max")


class LossMetrics:
    """A registry entry's ``metrics``: called with ``(term, inputs)``, this process's statistics (0-d tensors,
    TRL's names); :meth:`parts` gives them unreduced."""

    def __init__(self, parts: Callable[[PolicyTerm, TokenTermInputs], dict[str, MetricParts]]):
        self.parts = parts
        self.__doc__ = parts.__doc__

    def __call__(self, t: PolicyTerm, x: TokenTermInputs) -> dict[str, Tensor]:
        return {name: p.local(x.mask) for name, p in self.parts(t, x).items()}


def _parts_clipped(t: PolicyTerm, x: TokenTermInputs) -> dict[str, MetricParts]:
    """clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max} (TRL's names and reductions)."""
    o = x.options
    A = x.advantages
    low = ((t.coef < 1.0 - o.epsilon_low) & (A < 0)).to(x.mask.dtype)
    high = ((t.coef > 1.0 + o.epsilon_high) & (A > 0)).to(x.mask.dtype)
    region = ((low + high) > 0).to(x.mask.dtype)
    return {
        "clip_ratio/low_mean": MetricParts(low, "mean"),
        "clip_ratio/high_mean": MetricParts(high, "mean"),
        "clip_ratio/region_mean": MetricParts(region, "mean"),
        "clip_ratio/low_min": MetricParts(low, "min"),
        "clip_ratio/high_max": MetricParts(high, "max"),
    }


def _parts_cispo(t: PolicyTerm, x: TokenTermInputs) -> dict[str, MetricParts]:
    """cispo_clip_ratio: the share of tokens whose weight min(ρ, ε_high) is clipped (A > 0)."""
    clipped = ((t.coef > x.options.epsilon_high) & (x.advantages > 0)).to(x.mask.dtype)
    return {"cispo_clip_ratio": MetricParts(clipped, "mean")}


def _parts_vespo(t: PolicyTerm, x: TokenTermInputs) -> dict[str, MetricParts]:
    """vespo/phi_seq_mean: the mean of VESPO's sequence weight φ."""
    return {"vespo/phi_seq_mean": MetricParts(t.phi, "mean")}


def _parts_none(t: PolicyTerm, x: TokenTermInputs) -> dict[str, MetricParts]:
    """No clip statistics."""
    return {}


metrics_clipped = LossMetrics(_parts_clipped)
metrics_cispo = LossMetrics(_parts_cispo)
metrics_vespo = LossMetrics(_parts_vespo)
metrics_none = LossMetrics(_parts_none)
