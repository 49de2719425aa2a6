"""Unpaired losses on thumbs-up / thumbs-down examples: KTO (:func:`kto_loss`) and BCO (:func:`bco_loss`,
with :class:`BCORunningMean`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import as_vector, check_positive, compute_dtype
from .options import KTOOptions, takes_options
from .outputs import UnpairedOutput

Tensor = torch.Tensor

__all__ = ["KTOOptions", "kto_loss", "bco_loss", "BCORunningMean", "unpaired_inputs", "unpaired_metrics"]


def unpaired_inputs(
    policy_logps: Tensor, ref_logps: Tensor | None, desirable: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    as_vector("policy_logps", policy_logps)
    N = policy_logps.shape[0]
    if N == 0:
        raise ValueError("policy_logps is empty: need at least one example")
    if ref_logps is not None:
        as_vector("ref_logps", ref_logps, N)
    if not isinstance(desirable, Tensor) or desirable.dtype != torch.bool or tuple(desirable.shape) != (N,):
        raise ValueError(
            f"desirable must be a bool tensor of shape ({N},) (True = thumbs-up example), got "
            f"{getattr(desirable, 'dtype', type(desirable).__name__)} {tuple(getattr(desirable, 'shape', ()))}"
        )
    dt = compute_dtype(policy_logps, ref_logps)
    lp = policy_logps.to(dt)
    lr = torch.zeros_like(lp) if ref_logps is None else ref_logps.to(device=lp.device, dtype=dt)
    return lp, lr, desirable.to(lp.device)


def unpaired_metrics(rewards: Tensor, lp: Tensor, des: Tensor, baseline: Tensor, base_name: str) -> dict[str, float]:
    d = des.to(rewards.dtype)
    u = 1.0 - d
    vals = torch.stack([
        (rewards * d).sum(), (rewards * u).sum(), (lp.detach() * d).sum(), (lp.detach() * u).sum(),
        d.sum(), u.sum(), baseline.to(rewards.dtype).reshape(()),
    ]).to(torch.float64).cpu().tolist()
    rc, rr, lc, lr, nc, nr, b = vals
    out: dict[str, float] = {base_name: b, "count/chosen": nc, "count/rejected": nr}
    if nc > 0:
        out["rewards/chosen"] = rc / nc
        out["logps/chosen"] = lc / nc
    if nr > 0:
        out["rewards/rejected"] = rr / nr
        out["logps/rejected"] = lr / nr
    if nc > 0 and nr > 0:
        out["rewards/margins"] = rc / nc - rr / nr
    return out


@takes_options(KTOOptions)
def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    desirable: Tensor,
    policy_kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None,
    *,
    options: KTOOptions | None = None,
    kl: Tensor | float | None = None,
    compute_metrics: bool = True,
) -> UnpairedOutput:
    r"""KTO: Kahneman–Tversky optimisation on unpaired thumbs-up / thumbs-down examples.

    Ethayarajh et al. 2024, *KTO: Model Alignment as Prospect Theoretic Optimization* (arXiv:2402.01306).
    With :math:`r = \ell - \ell^{ref}` and the reference point
    :math:`z = \max(0, \mathrm{mean}_j(\ell_{KL,j} - \ell^{ref}_{KL,j}))` (detached), where the KL terms are
    log-probs of each prompt paired with a *mismatched* completion from the batch:

    .. math::
        L_i = \lambda_D (1 - \sigma(\beta(r_i - z)))\ \text{(desirable)},\qquad
        L_i = \lambda_U (1 - \sigma(\beta(z - r_i)))\ \text{(undesirable)},\qquad L = \mathrm{mean}_i L_i

    ``loss_type="apo_zero_unpaired"`` (APO-zero, unpaired; D'Oosterlinck et al. 2024, arXiv:2408.06266) uses
    :math:`\lambda_D(1 - \sigma(\beta r_i))` and :math:`\lambda_U\sigma(\beta r_i)` instead (z is still reported).

    Args:
        policy_logps: (N,) summed completion log-probs under the policy.
        ref_logps: (N,) under the reference, or ``None`` (zeros).
        desirable: (N,) bool, True for desirable (chosen) examples.
        policy_kl_logps, ref_kl_logps: (M,) log-probs of the mismatched (prompt, completion) pairs; give both
            to estimate z, or neither (z = 0 unless ``kl`` is given).
        {OPTIONS}
        kl: the reference point z given directly (e.g. already all-reduced across processes); it is
            clamped at 0 and detached. Overrides the KL log-probs.
        compute_metrics: fill ``metrics`` (one host sync).

    Shape:
        :math:`(N)` inputs; ``loss`` :math:`()`; ``losses``, ``rewards`` :math:`(N)`.

    Returns:
        :class:`UnpairedOutput` with ``baseline`` = z; metrics ``kl``, ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``count/chosen``,
        ``count/rejected`` (per-class means only when that class is present).

    Examples::

        >>> lp = torch.tensor([-10.0, -12.0, -9.0], requires_grad=True)
        >>> out = kto_loss(lp, torch.tensor([-10.5, -11.0, -9.0]), torch.tensor([True, False, True]),
        ...                torch.tensor([-14.0, -13.0, -15.0]), torch.tensor([-14.5, -13.0, -15.5]))
        >>> out.loss.backward()
    """
    o = options
    entry, beta, desirable_weight, undesirable_weight = o.entry, o.beta, o.desirable_weight, o.undesirable_weight
    lp, lr, des = unpaired_inputs(policy_logps, ref_logps, desirable)
    if kl is not None:
        z = kl if isinstance(kl, Tensor) else torch.tensor(float(kl), dtype=torch.float64)
        z = z.detach().to(device=lp.device, dtype=lp.dtype)
        if z.numel() != 1:
            raise ValueError(f"kl must be a scalar, got shape {tuple(z.shape)}")
        z = z.reshape(()).clamp_min(0.0)
    elif (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("pass both policy_kl_logps and ref_kl_logps, or neither")
    elif policy_kl_logps is not None:
        as_vector("policy_kl_logps", policy_kl_logps)
        as_vector("ref_kl_logps", ref_kl_logps, policy_kl_logps.shape[0])
        if policy_kl_logps.shape[0] == 0:
            raise ValueError("policy_kl_logps is empty")
        z = policy_kl_logps.detach().to(device=lp.device, dtype=lp.dtype) - ref_kl_logps.detach().to(
            device=lp.device, dtype=lp.dtype
        )
        z = z.mean().clamp_min(0.0)
    else:
        z = torch.zeros((), dtype=lp.dtype, device=lp.device)
    r = lp - lr
    loss_des = desirable_weight * entry.desirable(r, z, beta)
    loss_und = undesirable_weight * entry.undesirable(r, z, beta)
    losses = torch.where(des, loss_des, loss_und)
    loss = losses.mean()
    rewards = (beta * r).detach()
    metrics = unpaired_metrics(rewards, lp, des, z, "kl") if compute_metrics else {}
    return UnpairedOutput(loss, losses, rewards, z, metrics)


class BCORunningMean:
    """Running mean δ of BCO rewards, kept on the device (no host sync).

    Each :meth:`update` adds one observation, the batch mean of the rewards (as TRL's BCO trainer does);
    ``per_element=True`` weights each batch by its number of rewards instead. The mean is a float64 scalar
    tensor; ``state_dict`` / ``load_state_dict`` let a trainer checkpoint it.

    Example::

        >>> rm = BCORunningMean()
        >>> _ = rm.update(torch.tensor([0.2, 0.4]))  # δ = 0.3
        >>> _ = rm.update(torch.tensor([0.5]))       # δ = (0.3 + 0.5) / 2
        >>> round(float(rm.mean), 6)
        0.4
    """

    def __init__(self, per_element: bool = False) -> None:
        self.per_element = per_element
        self.mean: Tensor | None = None
        self.count = 0.0

    def update(self, rewards: Tensor) -> Tensor:
        """Fold ``rewards`` (any shape, detached) into the mean; returns the new mean (scalar tensor)."""
        rewards = rewards.detach()
        if rewards.numel() == 0:
            raise ValueError("BCORunningMean.update needs at least one reward")
        n = float(rewards.numel()) if self.per_element else 1.0
        batch_mean = rewards.to(torch.float64).mean()
        if self.mean is None:
            self.mean = batch_mean
        else:
            total = self.count + n
            self.mean = self.mean.to(batch_mean.device) + (batch_mean - self.mean.to(batch_mean.device)) * (n / total)
        self.count += n
        return self.mean

    def state_dict(self) -> dict[str, object]:
        return {"mean": None if self.mean is None else self.mean.clone(), "count": self.count,
                "per_element": self.per_element}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.mean = state["mean"]  # type: ignore[assignment]
        self.count = float(state["count"])  # type: ignore[arg-type]
        self.per_element = bool(state.get("per_element", False))


def bco_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    desirable: Tensor,
    *,
    beta: float = 0.1,
    delta: Tensor | float | None = None,
    running_mean: BCORunningMean | None = None,
    compute_metrics: bool = True,
) -> UnpairedOutput:
    r"""BCO: binary classifier optimisation on unpaired desirable / undesirable examples.

    Jung et al. 2024, *Binary Classifier Optimization for Large Language Model Alignment* (arXiv:2404.04656).
    With rewards :math:`\rho = \beta(\ell - \ell^{ref})` and the reward shift δ (a running mean of rewards):

    .. math::
        L_i = -\log\sigma(\rho_i - \delta)\ \text{(desirable)},\qquad
        L_i = -\log\sigma(-(\rho_i - \delta))\ \text{(undesirable)},\qquad L = \mathrm{mean}_i L_i

    Args:
        policy_logps: (N,) summed completion log-probs under the policy.
        ref_logps: (N,) under the reference, or ``None`` (zeros).
        desirable: (N,) bool.
        beta: β > 0.
        delta: δ given directly (scalar, detached). Exclusive with ``running_mean``.
        running_mean: a :class:`BCORunningMean`; it is first updated with this batch's rewards (TRL order),
            then δ = its mean. With neither, δ = 0.
        compute_metrics: fill ``metrics`` (one host sync).

    Shape:
        :math:`(N)` inputs; ``loss`` :math:`()`; ``losses``, ``rewards`` :math:`(N)`.

    Returns:
        :class:`UnpairedOutput` with ``baseline`` = δ; metrics ``delta``, ``rewards/*``, ``logps/*``,
        ``count/*``.

    Examples::

        >>> rm = BCORunningMean()
        >>> out = bco_loss(torch.tensor([-3.0, -5.0]), torch.tensor([-3.5, -4.0]),
        ...                torch.tensor([True, False]), running_mean=rm)
    """
    beta = check_positive("beta", beta)
    if delta is not None and running_mean is not None:
        raise ValueError("pass either delta or running_mean, not both")
    lp, lr, des = unpaired_inputs(policy_logps, ref_logps, desirable)
    rho = beta * (lp - lr)
    if running_mean is not None:
        d = running_mean.update(rho.detach())
    elif delta is not None:
        d = delta if isinstance(delta, Tensor) else torch.tensor(float(delta), dtype=torch.float64)
        if d.numel() != 1:
            raise ValueError(f"delta must be a scalar, got shape {tuple(d.shape)}")
    else:
        d = torch.zeros(())
    d = d.detach().to(device=lp.device, dtype=lp.dtype).reshape(())
    x = rho - d
    losses = torch.where(des, -F.logsigmoid(x), -F.logsigmoid(-x))
    loss = losses.mean()
    rewards = rho.detach()
    metrics = unpaired_metrics(rewards, lp, des, d, "delta") if compute_metrics else {}
    return UnpairedOutput(loss, losses, rewards, d, metrics)
