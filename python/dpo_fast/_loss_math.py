"""Elementwise maths shared by the preference losses (private).

Everything here works on (P,) per-pair tensors that are already in the compute dtype (float32, or float64
when an input is float64). No host syncs, no in-place writes to inputs.

Numerics: every ``log σ(x)`` is ``F.logsigmoid`` (= −softplus(−x)), so |x| > 100 gives a finite value and a
finite gradient (σ(x) ∈ [0, 1] is its derivative). Products like ``σ(x)·e^{−x}`` are taken in log space
(``exp(logσ(x) − x)``) so that 0·∞ never appears.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
)
F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# loss types whose per-pair loss divides by the token counts |y|
NEEDS_LENGTHS = frozenset({"ipo", "sigmoid_norm"})
# loss types that sort over the batch: pair i's loss depends on other pairs
BATCH_COUPLED = frozenset({"aot", "aot_unpaired"})
# valid label_smoothing ranges, (low, low_inclusive, high, high_inclusive); others ignore ε
EPS_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "sigmoid": (0.0, True, 0.5, True),
    "aot": (0.0, True, 0.5, True),
    "aot_unpaired": (0.0, True, 0.5, True),
    "robust": (0.0, True, 0.5, False),
    "exo_pair": (0.0, False, 0.5, True),
}


# ---------------------------------------------------------------------------------------------- validation
def check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return value


def check_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_eps(name: str, eps: float, loss_type: str) -> None:
    lo, lo_inc, hi, hi_inc = EPS_RANGES[loss_type]
    ok_lo = eps >= lo if lo_inc else eps > lo
    ok_hi = eps <= hi if hi_inc else eps < hi
    if not (ok_lo and ok_hi):
        interval = f"{'[' if lo_inc else '('}{lo}, {hi}{']' if hi_inc else ')'}"
        hint = " (the EXO paper uses 1e-3)" if loss_type == "exo_pair" else ""
        raise ValueError(f"{name} must lie in {interval} for loss_type={loss_type!r}{hint}, got {eps}")


def as_vector(name: str, t: object, n: int | None = None, *, floating: bool = True) -> Tensor:
    """Check that ``t`` is a 1-D tensor (of length ``n`` if given); return it unchanged."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (P,), got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D with shape (P,), got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not floating and (t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer or float tensor of token counts, got dtype {t.dtype}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match policy_chosen_logps, got {tuple(t.shape)}")
    return t


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (bf16/fp16 inputs are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def normalize_loss_types(
    loss_type: str | Sequence[str], loss_weights: Sequence[float] | None
) -> tuple[list[str], list[float]]:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError(f"loss_type must be a name or a non-empty list of names from {list(LOSS_TYPES)}")
    for lt in types:
        if lt not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {lt!r}; valid loss types are {list(LOSS_TYPES)}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(weights)} entries but loss_type has {len(types)} ({types}); "
                "give one weight per loss type"
            )
        for w in weights:
            if not math.isfinite(w):
                raise ValueError(f"loss_weights must be finite, got {weights}")
    return types, weights


# ---------------------------------------------------------------------------------------------- scores
def f_score(r: Tensor, f_divergence_type: str, alpha: float) -> Tensor:
    """s(r) of LOSSES.md: reverse_kl r; forward_kl −e^{−r}; js log σ(r); alpha e^{(α−1)r}/(α−1) (α=1 → r)."""
    if f_divergence_type == "reverse_kl":
        return r
    if f_divergence_type == "forward_kl":
        return -torch.exp(-r)
    if f_divergence_type == "js_divergence":
        return F.logsigmoid(r)
    c = alpha - 1.0
    if c == 0.0:
        return r
    return torch.exp(c * r) / c


def f_delta(r_w: Tensor, r_l: Tensor, f_divergence_type: str, alpha: float) -> Tensor:
    """Δ = s(r_w) − s(r_l), without cancellation for the exponential scores.

    For s = e^{c r}/c: Δ = e^{c r_l} · expm1(c (r_w − r_l)) / c, which tends to r_w − r_l as c → 0 (α → 1)
    instead of subtracting two huge, nearly equal numbers.
    """
    if f_divergence_type == "reverse_kl":
        return r_w - r_l
    if f_divergence_type == "js_divergence":
        return F.logsigmoid(r_w) - F.logsigmoid(r_l)
    c = -1.0 if f_divergence_type == "forward_kl" else alpha - 1.0
    if c == 0.0:
        return r_w - r_l
    return torch.exp(c * r_l) * torch.expm1(c * (r_w - r_l)) / c


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
