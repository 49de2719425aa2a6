"""LD-DPO and WPO weights on per-token log-probs (the pairwise losses' length and sample weighting).

LD-DPO: Liu et al. 2024, *Length Desensitization in DPO* (arXiv:2409.06411). WPO: Zhou et al. 2024,
*WPO: Enhancing RLHF with Weighted Preference Optimization* (arXiv:2406.11827).
"""

from __future__ import annotations

import torch

from .inputs import check_finite, compute_dtype

Tensor = torch.Tensor

__all__ = ["ld_dpo_token_weights", "ld_dpo_logps", "wpo_logweights_from_logits"]


def ld_dpo_token_weights(
    chosen_mask: Tensor, rejected_mask: Tensor, ld_alpha: float, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    r"""Per-token weights of LD-DPO (Liu et al. 2024, *Length Desensitization in DPO*, arXiv:2409.06411).

    With shared = min(|y_w|, |y_l|) scored tokens per pair, the k-th scored token of a sequence (in order)
    gets weight 1 when k ≤ shared and α otherwise; unscored positions get 0. So
    :math:`\ell = \sum_{k\le shared}\log p_k + \alpha\sum_{k>shared}\log p_k`, for policy and reference alike.
    A fused engine can take these as per-token weights of its sequence sums.

    Args:
        chosen_mask: (P, T_w) bool/0-1, True at scored tokens of the chosen sequences.
        rejected_mask: (P, T_l) likewise for the rejected ones.
        ld_alpha: α ∈ [0, 1]; 1 is plain DPO, 0 drops the tokens beyond the shared length.
        dtype: dtype of the weights (float32).

    Returns:
        ``(w_chosen, w_rejected)`` of the masks' shapes.
    """
    a = check_finite("ld_alpha", ld_alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {a}")
    for name, m in (("chosen_mask", chosen_mask), ("rejected_mask", rejected_mask)):
        if not isinstance(m, Tensor) or m.dim() != 2:
            raise ValueError(f"{name} must be a (P, T) tensor, got {getattr(m, 'shape', type(m).__name__)}")
    if chosen_mask.shape[0] != rejected_mask.shape[0]:
        raise ValueError(
            f"chosen_mask and rejected_mask must have the same number of pairs P, got "
            f"{tuple(chosen_mask.shape)} and {tuple(rejected_mask.shape)}"
        )
    mc, mr = chosen_mask.bool(), rejected_mask.bool()
    shared = torch.minimum(mc.sum(-1), mr.sum(-1)).unsqueeze(-1)  # (P, 1)

    def weights(m: Tensor) -> Tensor:
        rank = m.long().cumsum(-1)  # (P, T): 1-based index of each scored token
        one = torch.ones((), dtype=dtype, device=m.device)
        w = torch.where(rank <= shared, one, one * a)  # built in `dtype`: α = 0.37 is not exact in float32
        return torch.where(m, w, 0.0)

    return weights(mc), weights(mr)


def ld_dpo_logps(
    token_logps_chosen: Tensor,
    token_logps_rejected: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    ld_alpha: float,
) -> tuple[Tensor, Tensor]:
    r"""LD-DPO sequence log-probs from per-token log-probs (see :func:`ld_dpo_token_weights`).

    Args:
        token_logps_chosen: (P, T_w) per-token log-probs (e.g. from ``token_logprobs``); values at unscored
            positions are ignored.
        token_logps_rejected: (P, T_l).
        chosen_mask, rejected_mask: (P, T_w), (P, T_l) scored-token masks.
        ld_alpha: α ∈ [0, 1].

    Returns:
        ``(chosen_logps, rejected_logps)``, each (P,), differentiable; feed them (and the reference's,
        computed with the same masks) to :func:`dpo_loss`.

    Example::

        >>> tc, tr = torch.randn(2, 5), torch.randn(2, 3)
        >>> mc, mr = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
        >>> lw, ll = ld_dpo_logps(tc, tr, mc, mr, ld_alpha=0.5)  # lw = Σ first 3 + 0.5 Σ last 2
    """
    for name, t, m in (("token_logps_chosen", token_logps_chosen, chosen_mask),
                       ("token_logps_rejected", token_logps_rejected, rejected_mask)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{name} must be a float (P, T) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if isinstance(m, Tensor) and tuple(m.shape) != tuple(t.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but its mask has shape {tuple(m.shape)}")
    dt = compute_dtype(token_logps_chosen, token_logps_rejected)
    wc, wr = ld_dpo_token_weights(chosen_mask, rejected_mask, ld_alpha, dtype=dt)
    # where() rather than a product so that −inf or NaN at unscored positions cannot leak into the sum
    lc = torch.where(wc > 0, token_logps_chosen.to(dt) * wc, 0.0).sum(-1)
    lr = torch.where(wr > 0, token_logps_rejected.to(dt) * wr, 0.0).sum(-1)
    return lc, lr


def wpo_logweights_from_logits(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    r"""WPO per-sequence log-weight from materialised logits (reference path; the engine fuses it).

    :math:`\log w = \mathrm{mean}_t[\log p_t(y_t) - \log\sum_v p_t(v)^2]` over scored tokens, where
    :math:`\log\sum_v p_v^2 = \mathrm{lse}(2z) - 2\,\mathrm{lse}(z)` (Zhou et al. 2024, *WPO*,
    arXiv:2406.11827). Rows without a scored token give 0. No gradient.

    Args:
        logits: (B, T, V), already aligned with ``labels`` (shifted).
        labels: (B, T) int, ``ignore_index`` at unscored positions.

    Returns:
        (B,) float32 (float64 for float64 logits).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, T, V) and labels (B, T), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    with torch.no_grad():
        dt = compute_dtype(logits)
        z = logits.to(dt)
        mask = labels != ignore_index
        lse = torch.logsumexp(z, -1)  # (B, T)
        lse2 = torch.logsumexp(2.0 * z, -1)
        tok = torch.gather(z, -1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1) - lse
        per_tok = torch.where(mask, tok - (lse2 - 2.0 * lse), 0.0)
        return per_tok.sum(-1) / mask.sum(-1).clamp_min(1).to(dt)
