"""Input checks and normalisation shared by every loss family (independent of any family's options).

Each check raises ``TypeError`` / ``ValueError`` naming the argument and the expected shape, dtype or range.
Nothing here modifies what the caller passed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- scalars
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


def check_range(name: str, value: float, lo: float, lo_inc: bool, hi: float, hi_inc: bool, hint: str = "") -> float:
    ok_lo = value >= lo if lo_inc else value > lo
    ok_hi = value <= hi if hi_inc else value < hi
    if not (ok_lo and ok_hi):
        interval = f"{'[' if lo_inc else '('}{lo}, {hi}{']' if hi_inc else ')'}"
        raise ValueError(f"{name} must lie in {interval}{hint}, got {value}")
    return value


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- tensors
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


def token_counts(name: str, x: Tensor | Sequence[int] | None, n: int, like: Tensor,
                 check_values: bool = True) -> Tensor | None:
    """Validated (n,) token counts |y| in ``like``'s dtype and device, clamped at 1; ``None`` passes through.

    Counts must be finite, ≥ 0 and whole numbers (ints, or floats holding whole numbers). Checking the values
    costs one host sync on an accelerator; ``check_values=False`` skips it for counts known to be valid (e.g.
    computed from a mask). A completion with no scored token has ℓ = ℓ^ref = 0; max(|y|, 1) keeps s/|y| at 0.
    """
    if x is None:
        return None
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a (P,) tensor or sequence of token counts, got {type(x).__name__}") from e
    as_vector(name, x, n, floating=False)
    if not check_values:
        return x.to(device=like.device, dtype=like.dtype).clamp_min(1.0)
    if x.is_floating_point():
        bad = ~torch.isfinite(x) | (x < 0) | (x != torch.floor(x))
    else:
        bad = x < 0
    if x.numel() and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must hold token counts (finite whole numbers >= 0), got {x[i].item()!r} at "
                         f"index {i}")
    return x.to(device=like.device, dtype=like.dtype).clamp_min(1.0)


def scalar_or_vector(name: str, v: Tensor | float, n: int, like: Tensor) -> Tensor:
    """A float scalar or an (n,) float tensor, in ``like``'s dtype/device (autograd-connected)."""
    if not isinstance(v, Tensor):
        v = torch.tensor(check_finite(name, v), dtype=torch.float64)
    if not v.is_floating_point() or not (v.dim() == 0 or tuple(v.shape) == (n,)):
        raise ValueError(f"{name} must be a float scalar or a ({n},) float tensor, got {v.dtype} {tuple(v.shape)}")
    return v.to(device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------- pairs
@dataclass
class PairInputs:
    """Validated per-pair inputs in the compute dtype (float32, float64 when an input is float64).

    ``lw_ref``/``ll_ref`` are zeros when reference-free; ``len_w``/``len_l`` are clamped ≥ 1, or ``None``.
    """

    lw: Tensor
    ll: Tensor
    lw_ref: Tensor
    ll_ref: Tensor
    len_w: Tensor | None
    len_l: Tensor | None

    @property
    def num_pairs(self) -> int:
        return self.lw.shape[0]


def pair_inputs(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | Sequence[int] | None = None,
    rejected_lengths: Tensor | Sequence[int] | None = None,
    check_lengths: bool = True,
) -> PairInputs:
    """Check and normalise the (P,) inputs every pair loss takes."""
    as_vector("policy_chosen_logps", policy_chosen_logps)
    P = policy_chosen_logps.shape[0]
    if P == 0:
        raise ValueError("policy_chosen_logps is empty: need at least one pair (P >= 1)")
    as_vector("policy_rejected_logps", policy_rejected_logps)
    if policy_rejected_logps.shape[0] != P:
        raise ValueError(
            f"policy_chosen_logps and policy_rejected_logps must both have shape (P,), got "
            f"{tuple(policy_chosen_logps.shape)} and {tuple(policy_rejected_logps.shape)}"
        )
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            "pass both ref_chosen_logps and ref_rejected_logps, or neither (reference-free: both treated as 0)"
        )
    if ref_chosen_logps is not None:
        as_vector("ref_chosen_logps", ref_chosen_logps, P)
        as_vector("ref_rejected_logps", ref_rejected_logps, P)
    dt = compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    lw = policy_chosen_logps.to(dt)
    ll = policy_rejected_logps.to(dt)
    if ref_chosen_logps is None:
        lw_ref, ll_ref = torch.zeros_like(lw), torch.zeros_like(ll)
    else:
        lw_ref = ref_chosen_logps.to(device=lw.device, dtype=dt)
        ll_ref = ref_rejected_logps.to(device=lw.device, dtype=dt)
    len_w = token_counts("chosen_lengths", chosen_lengths, P, lw, check_lengths)
    len_l = token_counts("rejected_lengths", rejected_lengths, P, lw, check_lengths)
    return PairInputs(lw, ll, lw_ref, ll_ref, len_w, len_l)
