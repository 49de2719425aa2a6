"""Result records of the loss functions and the metric helpers they share (TRL's metric names)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .inputs import as_vector

Tensor = torch.Tensor


@dataclass
class DPOOutput:
    """Result of :func:`dpo_loss`, :func:`cpo_loss`, :func:`orpo_loss` (and the fused ``DPOLoss``).

    Attributes:
        loss: scalar total loss (shape (P,) when ``reduction="none"``); differentiable.
        losses: (P,) per-pair loss Σ_k w_k · L_k,i · W_i, so ``loss == losses.mean()`` for ``reduction="mean"``.
            For aot / aot_unpaired, entry i belongs to the i-th smallest sorted margin, not to pair i.
        chosen_rewards, rejected_rewards: (P,) detached β·(ℓ − ℓ^ref) (the plain log-ratio, also under
            f-divergences).
        chosen_logps, rejected_logps: (P,) policy log-probs in the compute dtype (autograd-connected).
        metrics: TRL-named python floats (``rewards/chosen`` …); empty when ``compute_metrics=False``.
    """

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class UnpairedOutput:
    """Result of :func:`kto_loss` and :func:`bco_loss` (one entry per example, not per pair).

    Attributes:
        loss: scalar mean loss (differentiable).
        losses: (N,) per-example loss, desirable/undesirable weights applied.
        rewards: (N,) detached β·(ℓ − ℓ^ref).
        baseline: scalar detached baseline: KTO's KL estimate z, or BCO's δ.
        metrics: TRL-named python floats.
    """

    loss: Tensor
    losses: Tensor
    rewards: Tensor
    baseline: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class GRPOOutput:
    """Result of :func:`grpo_loss`.

    Attributes:
        loss: scalar aggregated loss (differentiable), entropy bonus included.
        per_token_loss: (B, T) per-token loss (policy term, masks, sampler IS ratio and β·KL applied), 0 where
            ``mask`` is 0.
        metrics: TRL's names: ``kl`` (β ≠ 0), ``entropy`` (when entropies are given), the loss type's clip
            statistics (``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
            ``clip_ratio/low_min``, ``clip_ratio/high_max``; ``cispo_clip_ratio``; ``vespo/phi_seq_mean``) and
            ``policy_loss`` (with an entropy bonus). Empty when ``compute_metrics=False``.
    """

    loss: Tensor
    per_token_loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def sync_metrics(names: list[str], values: list[Tensor]) -> dict[str, float]:
    """One host sync for all metrics: stack the scalars, then ``tolist``."""
    if not names:
        return {}
    flat = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values]).cpu().tolist()
    return dict(zip(names, flat))


def logits_metric(m: Tensor | float, lengths: Tensor | None, name: str, P: int) -> Tensor:
    """Batch mean of a per-sequence logit mean (token-weighted when lengths are given), or a given scalar."""
    if not isinstance(m, Tensor):
        return torch.tensor(float(m), dtype=torch.float64)
    if m.dim() == 0:
        return m.detach()
    as_vector(name, m, P)
    m = m.detach().to(torch.float64)
    if lengths is None:
        return m.mean()
    w = lengths.detach().to(device=m.device, dtype=torch.float64)
    return (m * w).sum() / w.sum()


def pair_metrics(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    lw: Tensor,
    ll: Tensor,
    chosen_logits_mean: Tensor | float | None,
    rejected_logits_mean: Tensor | float | None,
    len_w: Tensor | None,
    len_l: Tensor | None,
    extra: dict[str, Tensor] | None = None,
) -> dict[str, float]:
    """TRL's DPO metrics (rewards/*, logps/*, logits/* when given, plus ``extra``) in one host sync."""
    P = lw.shape[0]
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected"]
    values = [
        chosen_rewards.mean(),
        rejected_rewards.mean(),
        (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        (chosen_rewards - rejected_rewards).mean(),
        lw.detach().mean(),
        ll.detach().mean(),
    ]
    if chosen_logits_mean is not None:
        names.append("logits/chosen")
        values.append(logits_metric(chosen_logits_mean, len_w, "chosen_logits_mean", P).to(lw.device))
    if rejected_logits_mean is not None:
        names.append("logits/rejected")
        values.append(logits_metric(rejected_logits_mean, len_l, "rejected_logits_mean", P).to(lw.device))
    for k, v in (extra or {}).items():
        names.append(k)
        values.append(v.to(lw.device))
    return sync_metrics(names, values)
