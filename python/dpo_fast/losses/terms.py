"""Elementwise loss terms: the functions the loss registry points at, and the stable primitives under them.

Everything here works on tensors already in the compute dtype (float32, or float64 when an input is float64).
No host syncs, no in-place writes to inputs, no loss-type names (those live in :mod:`.registry` only).

Numerics: every ``log σ(x)`` is ``F.logsigmoid`` (= −softplus(−x)), so |x| > 100 gives a finite value and a
finite gradient. Products like ``σ(x)·e^{−x}`` are taken in log space (``exp(logσ(x) − x)``) so that 0·∞
never appears. f-divergence margins Δ = s_w − s_l of the exponential scores are formed as
``e^{t_l}·expm1(t_w − t_l)/c`` rather than as a difference of two large numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: TRL clamps (α−1)·r at this value before the exponential of the α-divergence score (fp32/bf16 in TRL).
ALPHA_EXP_CLAMP = 80.0
#: |α − 1| below this is the reverse-KL limit (TRL's threshold).
ALPHA_ONE_TOL = 1e-6


# ---------------------------------------------------------------------------------------------- primitives
def smoothed_sigmoid_loss(z: Tensor, eps: float) -> Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z) (cDPO); ε = 0 is plain DPO."""
    loss = -F.logsigmoid(z)
    if eps != 0.0:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x < 0, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def discopop(z: Tensor, tau: float) -> Tensor:
    """(1 − m)(−log σ z) + m e^{−z}, m = σ(z/τ); m·e^{−z} = exp(log σ(z/τ) − z) never forms 0·∞."""
    m = torch.sigmoid(z / tau)
    return (1.0 - m) * (-F.logsigmoid(z)) + torch.exp(F.logsigmoid(z / tau) - z)


def exo_pair(z: Tensor, eps: float) -> Tensor:
    """KL(q ‖ p) for q = (σ(z), σ(−z)) and p = (1−ε, ε)."""
    lq_w, lq_l = F.logsigmoid(z), F.logsigmoid(-z)
    return torch.exp(lq_w) * (lq_w - math.log1p(-eps)) + torch.exp(lq_l) * (lq_l - math.log(eps))


# ---------------------------------------------------------------------------------------------- f-divergences
def _alpha_c(alpha: float) -> float | None:
    c = alpha - 1.0
    return None if abs(c) < ALPHA_ONE_TOL else c


def score_reverse_kl(r: Tensor, alpha: float) -> Tensor:
    return r


def score_forward_kl(r: Tensor, alpha: float) -> Tensor:
    return -torch.expm1(-r)  # 1 − e^{−r}


def score_js(r: Tensor, alpha: float) -> Tensor:
    return math.log(2.0) + F.logsigmoid(r)


def score_alpha(r: Tensor, alpha: float) -> Tensor:
    c = _alpha_c(alpha)
    if c is None:
        return r
    return torch.expm1((c * r).clamp(max=ALPHA_EXP_CLAMP)) / c  # (e^{(α−1)r} − 1)/(α − 1)


def delta_reverse_kl(r_w: Tensor, r_l: Tensor, alpha: float) -> Tensor:
    return r_w - r_l


def delta_forward_kl(r_w: Tensor, r_l: Tensor, alpha: float) -> Tensor:
    return torch.exp(-r_l) * -torch.expm1(-(r_w - r_l))  # e^{−r_l} − e^{−r_w}


def delta_js(r_w: Tensor, r_l: Tensor, alpha: float) -> Tensor:
    return F.logsigmoid(r_w) - F.logsigmoid(r_l)


def delta_alpha(r_w: Tensor, r_l: Tensor, alpha: float) -> Tensor:
    c = _alpha_c(alpha)
    if c is None:
        return r_w - r_l
    t_w, t_l = (c * r_w).clamp(max=ALPHA_EXP_CLAMP), (c * r_l).clamp(max=ALPHA_EXP_CLAMP)
    return torch.exp(t_l) * torch.expm1(t_w - t_l) / c


# ---------------------------------------------------------------------------------------------- pairwise
@dataclass
class PairBatch:
    """What a pairwise loss term sees; every tensor is (P,) in the compute dtype.

    ``r_*`` are the plain log-ratios ℓ − ℓ^ref, ``s_*`` the f-divergence scores s(r) (0 at r = 0), ``delta``
    their difference Δ = s_w − s_l. ``len_*`` are |y| clamped at 1 (``None`` when not given). ``sft_logps`` are
    the chosen log-probs the derived sft term uses (the unweighted sums under LD-DPO).
    """

    beta: float
    eps: float
    tau: float
    lw: Tensor
    ll: Tensor
    lw_ref: Tensor
    ll_ref: Tensor
    r_w: Tensor
    r_l: Tensor
    s_w: Tensor
    s_l: Tensor
    delta: Tensor
    len_w: Tensor | None
    len_l: Tensor | None
    sft_logps: Tensor
    sft_nll: Tensor | None
    num_pairs: int
    num_chosen_tokens: Tensor | float | None


def pair_sigmoid(x: PairBatch) -> Tensor:
    return smoothed_sigmoid_loss(x.beta * x.delta, x.eps)


def pair_hinge(x: PairBatch) -> Tensor:
    return torch.relu(1.0 - x.beta * x.delta)


def _length_normalised_margin(x: PairBatch) -> Tensor:
    return x.s_w / x.len_w - x.s_l / x.len_l


def pair_ipo(x: PairBatch) -> Tensor:
    return (_length_normalised_margin(x) - 1.0 / (2.0 * x.beta)) ** 2


def pair_exo(x: PairBatch) -> Tensor:
    return exo_pair(x.beta * x.delta, x.eps)


def pair_nca(x: PairBatch) -> Tensor:
    zw, zl = x.beta * x.r_w, x.beta * x.r_l
    return -F.logsigmoid(zw) - 0.5 * F.logsigmoid(-zw) - 0.5 * F.logsigmoid(-zl)


def pair_robust(x: PairBatch) -> Tensor:
    z, eps = x.beta * x.delta, x.eps
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def pair_bco(x: PairBatch) -> Tensor:
    return -F.logsigmoid(x.beta * x.r_w) - F.logsigmoid(-x.beta * x.r_l)


def pair_sppo_hard(x: PairBatch) -> Tensor:
    return (x.r_w - 0.5 / x.beta) ** 2 + (x.r_l + 0.5 / x.beta) ** 2


def pair_aot(x: PairBatch) -> Tensor:
    d = torch.sort(x.lw - x.ll).values - torch.sort(x.lw_ref - x.ll_ref).values
    return smoothed_sigmoid_loss(x.beta * d, x.eps)


def pair_aot_unpaired(x: PairBatch) -> Tensor:
    return smoothed_sigmoid_loss(x.beta * (torch.sort(x.r_w).values - torch.sort(x.r_l).values), x.eps)


def pair_apo_zero(x: PairBatch) -> Tensor:
    return 1.0 - torch.sigmoid(x.beta * x.r_w) + torch.sigmoid(x.beta * x.r_l)


def pair_apo_down(x: PairBatch) -> Tensor:
    return torch.sigmoid(x.beta * x.r_w) + 1.0 - torch.sigmoid(x.beta * (x.r_w - x.r_l))


def pair_discopop(x: PairBatch) -> Tensor:
    return discopop(x.beta * x.delta, x.tau)


def pair_sigmoid_norm(x: PairBatch) -> Tensor:
    return -F.logsigmoid(x.beta * _length_normalised_margin(x))


def pair_sft(x: PairBatch) -> Tensor:
    if x.sft_nll is not None:
        return x.sft_nll.expand_as(x.lw)
    # Token-mean NLL of all chosen tokens of the batch (TRL's), split over pairs so that the mean over pairs is
    # exactly −Σℓ_w / Σ|y_w| and every pair's share depends on its own ℓ_w only.
    n_tok = x.len_w.sum() if x.num_chosen_tokens is None else x.num_chosen_tokens
    return -x.sft_logps * (x.num_pairs / n_tok)


# ---------------------------------------------------------------------------------------------- CPO family
def cpo_sigmoid(h: Tensor, beta: float, eps: float, gamma: float) -> Tensor:
    return smoothed_sigmoid_loss(beta * h, eps)


def cpo_hinge(h: Tensor, beta: float, eps: float, gamma: float) -> Tensor:
    return torch.relu(1.0 - beta * h)


def cpo_ipo(h: Tensor, beta: float, eps: float, gamma: float) -> Tensor:
    return (h - 1.0 / (2.0 * beta)) ** 2


def cpo_simpo(h: Tensor, beta: float, eps: float, gamma: float) -> Tensor:
    return smoothed_sigmoid_loss(beta * h - gamma, eps)


# ---------------------------------------------------------------------------------------------- KTO family
# (desirable, undesirable) per-example losses of r = ℓ − ℓ^ref and the reference point z; 1 − σ(x) = σ(−x)
def kto_desirable(r: Tensor, z: Tensor, beta: float) -> Tensor:
    return torch.sigmoid(-beta * (r - z))


def kto_undesirable(r: Tensor, z: Tensor, beta: float) -> Tensor:
    return torch.sigmoid(-beta * (z - r))


def apo_zero_unpaired_desirable(r: Tensor, z: Tensor, beta: float) -> Tensor:
    return torch.sigmoid(-beta * r)


def apo_zero_unpaired_undesirable(r: Tensor, z: Tensor, beta: float) -> Tensor:
    return torch.sigmoid(beta * r)

