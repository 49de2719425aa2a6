"""Preference losses on per-sequence (or per-token) log-probs: DPO and its family, through autograd.

Formulas: ../shared/LOSSES.md (names match TRL's ``loss_type`` strings). Every function here takes log-probs
that the engine (:func:`dpo_fast.sequence_logprobs` / :func:`dpo_fast.token_logprobs`) or any other code
produced; nothing here touches logits, so this module never imports the engine or the native extension.

- :func:`dpo_loss` — the 15 pairwise losses, lists of them with weights, f-divergences, cDPO smoothing, WPO
  weights, TRL metrics. :func:`pair_loss_and_grads` / :func:`is_pair_decomposable` give the fused
  ``DPOLoss`` the per-pair loss and dLoss/dℓ so that it can form gradients in its forward pass.
- :func:`ld_dpo_logps` / :func:`ld_dpo_token_weights` — LD-DPO's down-weighting of the verbose tail, on
  per-token log-probs. :func:`wpo_logweights_from_logits` — WPO's per-sequence log-weight (reference path).
- :func:`cpo_loss` (CPO / SimPO / AlphaPO), :func:`orpo_loss`, :func:`kto_loss`, :func:`bco_loss` (with
  :class:`BCORunningMean`), :func:`grpo_loss`.

Dtypes: inputs may be bf16/fp16/fp32/fp64; maths runs in float32 (float64 when an input is float64) and the
outputs have that dtype. Inputs are never modified. Metrics cost one host sync (``compute_metrics=False``
skips it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dpo_fast import _loss_math as M
from dpo_fast._loss_math import F_DIVERGENCE_TYPES, LOSS_TYPES

Tensor = torch.Tensor

__all__ = [
    "LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "DPOOutput",
    "UnpairedOutput",
    "GRPOOutput",
    "dpo_loss",
    "PairwiseConfig",
    "make_pairwise_config",
    "pair_loss_and_grads",
    "is_pair_decomposable",
    "ld_dpo_token_weights",
    "ld_dpo_logps",
    "wpo_logweights_from_logits",
    "cpo_loss",
    "orpo_loss",
    "kto_loss",
    "bco_loss",
    "BCORunningMean",
    "grpo_loss",
]

_REDUCTIONS = ("mean", "sum", "none")


# ================================================================================================ outputs
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
        loss: scalar aggregated loss (differentiable).
        per_token_loss: (B, T) per-token loss, 0 where ``mask`` is 0.
        metrics: ``kl`` (when β ≠ 0), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
            ``clip_ratio/region_mean`` (TRL names).
    """

    loss: Tensor
    per_token_loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _sync_metrics(names: list[str], values: list[Tensor]) -> dict[str, float]:
    """One host sync for all metrics: stack the scalars, then ``tolist``."""
    if not names:
        return {}
    flat = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values]).cpu().tolist()
    return dict(zip(names, flat))


# ================================================================================================ dpo_loss
@dataclass
class _DPOSpec:
    types: list[str]
    weights: list[float]
    beta: float
    eps: float
    f_div: str
    alpha: float
    tau: float
    reduction: str
    use_weighting: bool


def _make_spec(
    beta: float,
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None,
    label_smoothing: float,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
    discopop_tau: float,
    reduction: str,
    use_weighting: bool,
) -> _DPOSpec:
    types, weights = M.normalize_loss_types(loss_type, loss_weights)
    beta = M.check_positive("beta", beta)
    eps = M.check_finite("label_smoothing", label_smoothing)
    uses_eps = [lt for lt in types if lt in M.EPS_RANGES]
    for lt in uses_eps:
        M.check_eps("label_smoothing", eps, lt)
    if eps != 0.0 and not uses_eps:
        warnings.warn(
            f"label_smoothing={eps} is ignored by loss_type {types}; it applies to sigmoid, robust, exo_pair, "
            "aot and aot_unpaired",
            stacklevel=3,
        )
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}; valid values are {list(F_DIVERGENCE_TYPES)}"
        )
    alpha = M.check_finite("f_alpha_divergence_coef", f_alpha_divergence_coef)
    tau = M.check_positive("discopop_tau", discopop_tau)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    return _DPOSpec(types, weights, beta, eps, f_divergence_type, alpha, tau, reduction, bool(use_weighting))


PairwiseConfig = _DPOSpec


def make_pairwise_config(
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    reduction: str = "mean",
    use_weighting: bool = False,
) -> PairwiseConfig:
    """Validate the pairwise-loss options of :func:`dpo_loss` once; raises as dpo_loss would."""
    return _make_spec(beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
                      discopop_tau, reduction, use_weighting)


@dataclass
class _DPOInputs:
    lw: Tensor  # (P,) policy chosen, compute dtype
    ll: Tensor
    lw_ref: Tensor  # (P,) detached-or-not reference; zeros when reference-free
    ll_ref: Tensor
    len_w: Tensor | None  # (P,) float, clamped ≥ 1
    len_l: Tensor | None
    wpo: Tensor | None  # (P,) detached W_i
    sft: Tensor | None  # (P,) or () external NLL


def _prepare_inputs(
    spec: _DPOSpec,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor | Sequence[int] | None,
    rejected_lengths: Tensor | Sequence[int] | None,
    chosen_wpo_logweights: Tensor | None,
    rejected_wpo_logweights: Tensor | None,
    sft_nll: Tensor | float | None,
) -> _DPOInputs:
    M.as_vector("policy_chosen_logps", policy_chosen_logps)
    P = policy_chosen_logps.shape[0]
    if P == 0:
        raise ValueError("policy_chosen_logps is empty: need at least one pair (P >= 1)")
    M.as_vector("policy_rejected_logps", policy_rejected_logps)
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
        M.as_vector("ref_chosen_logps", ref_chosen_logps, P)
        M.as_vector("ref_rejected_logps", ref_rejected_logps, P)
    dt = M.compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    lw = policy_chosen_logps.to(dt)
    ll = policy_rejected_logps.to(dt)
    if ref_chosen_logps is None:
        lw_ref = torch.zeros_like(lw)
        ll_ref = torch.zeros_like(ll)
    else:
        lw_ref = ref_chosen_logps.to(device=lw.device, dtype=dt)
        ll_ref = ref_rejected_logps.to(device=lw.device, dtype=dt)

    def lengths(name: str, x: Tensor | Sequence[int] | None) -> Tensor | None:
        if x is None:
            return None
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        M.as_vector(name, x, P, floating=False)
        # A completion with no scored token has ℓ = ℓ^ref = 0; max(|y|, 1) keeps s/|y| at 0 instead of 0/0.
        return x.to(device=lw.device, dtype=dt).clamp_min(1.0)

    need_len = [lt for lt in spec.types if lt in M.NEEDS_LENGTHS]
    sft_derived = "sft" in spec.types and sft_nll is None
    if need_len and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss_type {need_len} normalises by completion length: pass chosen_lengths and rejected_lengths "
            "(number of scored tokens per sequence, shape (P,))"
        )
    if sft_derived and chosen_lengths is None:
        raise ValueError(
            "loss_type 'sft' needs the chosen NLL: pass sft_nll (scalar or (P,) token-mean NLL of the chosen "
            "completion), or chosen_lengths so that it is derived from policy_chosen_logps"
        )
    len_w = lengths("chosen_lengths", chosen_lengths)
    len_l = lengths("rejected_lengths", rejected_lengths)

    wpo = None
    if spec.use_weighting:
        if chosen_wpo_logweights is None or rejected_wpo_logweights is None:
            raise ValueError(
                "use_weighting=True needs chosen_wpo_logweights and rejected_wpo_logweights, shape (P,): "
                "mean over scored tokens of log p_t − (lse(2 z_t) − 2 lse(z_t))"
            )
        M.as_vector("chosen_wpo_logweights", chosen_wpo_logweights, P)
        M.as_vector("rejected_wpo_logweights", rejected_wpo_logweights, P)
        # W_i = w_chosen · w_rejected, treated as a constant (no gradient), as in WPO.
        wpo = torch.exp(
            chosen_wpo_logweights.detach().to(device=lw.device, dtype=dt)
            + rejected_wpo_logweights.detach().to(device=lw.device, dtype=dt)
        )

    sft = None
    if "sft" in spec.types and sft_nll is not None:
        if not isinstance(sft_nll, Tensor):
            sft_nll = torch.tensor(float(sft_nll), dtype=torch.float64)
        if not sft_nll.is_floating_point() or not (sft_nll.dim() == 0 or tuple(sft_nll.shape) == (P,)):
            raise ValueError(
                f"sft_nll must be a float scalar or a (P,) = ({P},) float tensor, got "
                f"{sft_nll.dtype} {tuple(sft_nll.shape)}"
            )
        sft = sft_nll.to(device=lw.device, dtype=dt)
    return _DPOInputs(lw, ll, lw_ref, ll_ref, len_w, len_l, wpo, sft)


def _pair_loss(
    lt: str,
    spec: _DPOSpec,
    x: _DPOInputs,
    r_w: Tensor,
    r_l: Tensor,
    num_pairs: int,
    num_chosen_tokens: Tensor | float | None,
) -> Tensor:
    """The per-pair loss L_{lt,i} of LOSSES.md, shape (P,)."""
    beta, eps = spec.beta, spec.eps
    if lt == "aot":
        d = torch.sort(x.lw - x.ll).values - torch.sort(x.lw_ref - x.ll_ref).values
        return M.smoothed_sigmoid_loss(beta * d, eps)
    if lt == "aot_unpaired":
        return M.smoothed_sigmoid_loss(beta * (torch.sort(r_w).values - torch.sort(r_l).values), eps)
    if lt == "apo_zero":
        return 1.0 - torch.sigmoid(beta * r_w) + torch.sigmoid(beta * r_l)
    if lt == "sft":
        if x.sft is not None:
            return x.sft.expand_as(x.lw)
        # Token-mean NLL of all chosen tokens of the batch (TRL's), split over pairs so that the mean over
        # pairs is exactly −Σℓ_w / Σ|y_w| and every pair's share depends on its own ℓ_w only.
        n_tok = x.len_w.sum() if num_chosen_tokens is None else num_chosen_tokens
        return -x.lw * (num_pairs / n_tok)
    if lt in ("ipo", "sigmoid_norm"):
        s_w = M.f_score(r_w, spec.f_div, spec.alpha)
        s_l = M.f_score(r_l, spec.f_div, spec.alpha)
        h = s_w / x.len_w - s_l / x.len_l
        if lt == "ipo":
            return (h - 1.0 / (2.0 * beta)) ** 2
        return -F.logsigmoid(beta * h)
    if lt in ("nca_pair", "bco_pair", "sppo_hard"):
        s_w = M.f_score(r_w, spec.f_div, spec.alpha)
        s_l = M.f_score(r_l, spec.f_div, spec.alpha)
        if lt == "nca_pair":
            return -F.logsigmoid(beta * s_w) - 0.5 * F.logsigmoid(-beta * s_w) - 0.5 * F.logsigmoid(-beta * s_l)
        if lt == "bco_pair":
            return -F.logsigmoid(beta * s_w) - F.logsigmoid(-beta * s_l)
        return (s_w - 0.5 / beta) ** 2 + (s_l + 0.5 / beta) ** 2
    z = beta * M.f_delta(r_w, r_l, spec.f_div, spec.alpha)  # βΔ, (P,)
    if lt == "sigmoid":
        return M.smoothed_sigmoid_loss(z, eps)
    if lt == "hinge":
        return torch.relu(1.0 - z)
    if lt == "exo_pair":
        return M.exo_pair(z, eps)
    if lt == "robust":
        return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    if lt == "apo_down":
        return torch.sigmoid(beta * r_w) + 1.0 - torch.sigmoid(z)
    if lt == "discopop":
        return M.discopop(z, spec.tau)
    raise AssertionError(lt)  # unreachable: names validated in _make_spec


def _combined_losses(
    spec: _DPOSpec, x: _DPOInputs, num_pairs: int | None = None, num_chosen_tokens: Tensor | float | None = None
) -> Tensor:
    """Σ_k w_k · L_k,i · W_i, shape (P,)."""
    r_w = x.lw - x.lw_ref
    r_l = x.ll - x.ll_ref
    P = x.lw.shape[0] if num_pairs is None else num_pairs
    total = None
    for lt, w in zip(spec.types, spec.weights):
        term = _pair_loss(lt, spec, x, r_w, r_l, P, num_chosen_tokens)
        term = term * w if w != 1.0 else term
        total = term if total is None else total + term
    if x.wpo is not None:
        total = total * x.wpo
    return total


def _reduce(losses: Tensor, reduction: str, num_pairs: int | None = None) -> Tensor:
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    if num_pairs is None:
        return losses.mean()
    return losses.sum() / num_pairs


def _logits_metric(m: Tensor | float, lengths: Tensor | None, name: str, P: int) -> Tensor:
    if not isinstance(m, Tensor):
        return torch.tensor(float(m), dtype=torch.float64)
    if m.dim() == 0:
        return m.detach()
    M.as_vector(name, m, P)
    m = m.detach().to(torch.float64)
    if lengths is None:
        return m.mean()
    w = lengths.detach().to(device=m.device, dtype=torch.float64)
    return (m * w).sum() / w.sum()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | Sequence[int] | None = None,
    rejected_lengths: Tensor | Sequence[int] | None = None,
    use_weighting: bool = False,
    chosen_wpo_logweights: Tensor | None = None,
    rejected_wpo_logweights: Tensor | None = None,
    sft_nll: Tensor | float | None = None,
    chosen_logits_mean: Tensor | float | None = None,
    rejected_logits_mean: Tensor | float | None = None,
    reduction: str = "mean",
    compute_metrics: bool = True,
) -> DPOOutput:
    r"""Direct Preference Optimization loss and its pairwise variants, on per-sequence log-probs.

    DPO: Rafailov et al. 2023, *Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model* (arXiv:2305.18290). Per pair i, with log-ratios :math:`r = \ell - \ell^{ref}`, f-divergence
    scores :math:`s(r)` and :math:`\Delta = s_w - s_l`:

    ============== =====================================================================================
    loss_type      per-pair loss :math:`L_i`
    ============== =====================================================================================
    sigmoid        :math:`-(1-\varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)`
                   (DPO; cDPO for ε > 0, Mitchell 2023)
    hinge          :math:`\max(0, 1-\beta\Delta)` (SLiC, Zhao et al. 2023)
    ipo            :math:`(s_w/|y_w| - s_l/|y_l| - 1/(2\beta))^2` (IPO, Azar et al. 2023)
    exo_pair       :math:`q_w(\log q_w - \log(1-\varepsilon)) + q_l(\log q_l - \log\varepsilon)`,
                   :math:`q_w = \sigma(\beta\Delta)` (EXO, Ji et al. 2024); needs ε > 0
    nca_pair       :math:`-\log\sigma(\beta s_w) - \tfrac12\log\sigma(-\beta s_w) - \tfrac12\log\sigma(-\beta s_l)`
                   (NCA, Chen et al. 2024)
    robust         :math:`[-(1-\varepsilon)\log\sigma(\beta\Delta) + \varepsilon\log\sigma(-\beta\Delta)]/(1-2\varepsilon)`
                   (rDPO, Chowdhury et al. 2024)
    bco_pair       :math:`-\log\sigma(\beta s_w) - \log\sigma(-\beta s_l)` (BCO, Jung et al. 2024)
    sppo_hard      :math:`(s_w - 1/(2\beta))^2 + (s_l + 1/(2\beta))^2` (SPPO, Wu et al. 2024)
    aot            :math:`\delta = \mathrm{sort}(\ell_w-\ell_l) - \mathrm{sort}(\ell^{ref}_w-\ell^{ref}_l)`, smoothed
                   sigmoid of βδ (AOT, Melnyk et al. 2024); couples the batch
    aot_unpaired   as aot with :math:`\delta = \mathrm{sort}(r_w) - \mathrm{sort}(r_l)`
    apo_zero       :math:`1 - \sigma(\beta r_w) + \sigma(\beta r_l)` (APO, D'Oosterlinck et al. 2024)
    apo_down       :math:`\sigma(\beta r_w) + 1 - \sigma(\beta\Delta)`
    discopop       :math:`(1-m)(-\log\sigma z) + m e^{-z}`, :math:`z = \beta\Delta`, :math:`m = \sigma(z/\tau)`
                   (DiscoPOP, Chris Lu et al. 2024)
    sigmoid_norm   :math:`-\log\sigma(\beta(s_w/|y_w| - s_l/|y_l|))`
    sft            token-mean NLL of the chosen completions (RPO = a list with ``"sft"`` and a weight)
    ============== =====================================================================================

    Total: :math:`L = \sum_k w_k \cdot \mathrm{mean}_i(L_{k,i} W_i)`, with ``loss_weights`` :math:`w_k`
    (default 1 each) and WPO weights :math:`W_i` (1 unless ``use_weighting``).

    Args:
        policy_chosen_logps: summed log-probs ℓ_w of the chosen completions under the policy.
        policy_rejected_logps: ℓ_l, same for the rejected completions.
        ref_chosen_logps, ref_rejected_logps: the same under the reference model; ``None`` for both means
            reference-free (zeros). Gradients flow into them if they require grad.
        beta: β > 0 (for ipo: the τ of the IPO paper).
        loss_type: a name from :data:`LOSS_TYPES`, or a list of names combined with ``loss_weights`` (MPO).
        loss_weights: one finite weight per entry of ``loss_type`` (default all 1).
        label_smoothing: ε. sigmoid / aot / aot_unpaired: 0 ≤ ε ≤ 0.5; robust: 0 ≤ ε < 0.5;
            exo_pair: 0 < ε ≤ 0.5 (1e-3 typical). Other loss types ignore it (with a warning).
        f_divergence_type: ``reverse_kl`` (s = r), ``forward_kl`` (s = −e^{−r}), ``js_divergence``
            (s = log σ(r)) or ``alpha_divergence`` (s = e^{(α−1)r}/(α−1)). Affects Δ and the s-based losses;
            apo_*, aot* use the plain log-ratios r.
        f_alpha_divergence_coef: α for ``alpha_divergence`` (default 0.5); α = 1 is the reverse-KL limit.
            Δ is computed as e^{c r_l}·expm1(c(r_w − r_l))/c, c = α − 1, so α → 1 is smooth.
        discopop_tau: τ > 0 of DiscoPOP (0.05).
        chosen_lengths, rejected_lengths: number of scored completion tokens |y| per sequence, shape (P,)
            (ints or floats). Required by ipo and sigmoid_norm (``ValueError`` otherwise), by sft when
            ``sft_nll`` is not given, and used to token-weight ``logits/*`` metrics. |y| = 0 counts as 1.
        use_weighting: WPO (Zhou et al. 2024): multiply pair i's loss by the detached
            :math:`W_i = \exp(\text{chosen\_wpo\_logweights}_i + \text{rejected\_wpo\_logweights}_i)`.
        chosen_wpo_logweights, rejected_wpo_logweights: (P,) per-sequence
            mean_t[log p_t − (lse(2 z_t) − 2 lse(z_t))], computed by the engine (or
            :func:`wpo_logweights_from_logits`). Required when ``use_weighting``.
        sft_nll: for loss_type ``sft``: scalar or (P,) token-mean NLL of the chosen completion. When
            ``None``, it is derived from ``policy_chosen_logps`` and ``chosen_lengths`` as TRL's batch
            token-mean :math:`-\sum_i \ell_{w,i} / \sum_i |y_{w,i}|`, split over pairs as
            :math:`L_i = -\ell_{w,i} P / \sum_j |y_{w,j}|` (same mean, per-pair gradients). Pass it
            explicitly when ℓ_w is not a plain sum (e.g. LD-DPO).
        chosen_logits_mean, rejected_logits_mean: optional, for ``logits/chosen`` / ``logits/rejected``:
            a scalar (already the batch mean), or (P,) per-sequence mean over scored tokens of the
            vocab-mean logit (averaged token-weighted when lengths are given).
        reduction: ``"mean"`` (default), ``"sum"`` over pairs, or ``"none"`` (``loss`` is then (P,)).
        compute_metrics: fill ``metrics`` (one host sync); ``False`` leaves it empty.

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
    spec = _make_spec(
        beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
        discopop_tau, reduction, use_weighting,
    )
    x = _prepare_inputs(
        spec, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths, rejected_lengths, chosen_wpo_logweights, rejected_wpo_logweights, sft_nll,
    )
    losses = _combined_losses(spec, x)
    loss = _reduce(losses, spec.reduction)
    chosen_rewards = (spec.beta * (x.lw - x.lw_ref)).detach()
    rejected_rewards = (spec.beta * (x.ll - x.ll_ref)).detach()
    metrics: dict[str, float] = {}
    if compute_metrics:
        metrics = _pair_metrics(
            chosen_rewards, rejected_rewards, x.lw, x.ll, chosen_logits_mean, rejected_logits_mean, x.len_w, x.len_l
        )
    return DPOOutput(loss, losses, chosen_rewards, rejected_rewards, x.lw, x.ll, metrics)


def _pair_metrics(
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
        values.append(_logits_metric(chosen_logits_mean, len_w, "chosen_logits_mean", P).to(lw.device))
    if rejected_logits_mean is not None:
        names.append("logits/rejected")
        values.append(_logits_metric(rejected_logits_mean, len_l, "rejected_logits_mean", P).to(lw.device))
    for k, v in (extra or {}).items():
        names.append(k)
        values.append(v.to(lw.device))
    return _sync_metrics(names, values)


# ================================================================================================ fused helpers
def is_pair_decomposable(loss_type: str | Sequence[str]) -> bool:
    """Whether the total loss is a sum of per-pair terms, each depending only on its own pair.

    True means dLoss/dℓ_{w,i} and dLoss/dℓ_{l,i} depend on pair i's inputs only (plus batch constants known
    before the pass: the pair count P and, for derived ``sft``, the batch's chosen-token count), so a fused
    kernel may compute them group by group with :func:`pair_loss_and_grads`. False for ``aot`` and
    ``aot_unpaired`` (they sort over the batch), alone or inside a list.

    Raises:
        ValueError: for an unknown loss type.
    """
    types, _ = M.normalize_loss_types(loss_type, None)
    return not any(lt in M.BATCH_COUPLED for lt in types)


def pair_loss_and_grads(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    num_pairs: int | None = None,
    num_chosen_tokens: int | float | Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | Sequence[int] | None = None,
    rejected_lengths: Tensor | Sequence[int] | None = None,
    use_weighting: bool = False,
    chosen_wpo_logweights: Tensor | None = None,
    rejected_wpo_logweights: Tensor | None = None,
    sft_nll: Tensor | float | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-pair losses and dL/dℓ of the total loss, for a fused kernel that forms gradients in its forward.

    Same options and validation as :func:`dpo_loss`. Works under ``torch.no_grad()`` and never builds a
    graph into its inputs (everything is detached); the derivatives come from autograd on (P,) vectors.

    Args:
        num_pairs: P of the *whole* batch when this call sees one group of pairs: the mean divides by it
            (default: the length of the inputs). Ignored for ``reduction="sum"``.
        num_chosen_tokens: Σ|y_w| of the whole batch, for the derived ``sft`` term (default:
            ``chosen_lengths.sum()`` of this call).
        reduction: ``"mean"`` or ``"sum"`` — the reduction of the total loss being differentiated.

    Returns:
        ``(losses, d_chosen, d_rejected)``, each (P,) in the compute dtype, detached:
        ``losses[i]`` = Σ_k w_k L_k,i W_i (so the batch loss is ``Σ losses / num_pairs`` for mean);
        ``d_chosen[i]`` = ∂L_total/∂ℓ_{w,i}, ``d_rejected[i]`` = ∂L_total/∂ℓ_{l,i}, with the mean reduction,
        loss weights and WPO weights included. Multiply by the upstream gradient of the loss in backward.
        An externally given ``sft_nll`` is a constant here (its gradient is not in d_chosen).

    Valid group by group only when :func:`is_pair_decomposable`; for aot call it on the whole batch.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for pair_loss_and_grads, got {reduction!r}")
    spec = _make_spec(
        beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
        discopop_tau, reduction, use_weighting,
    )
    det = [None if t is None else t.detach() for t in (ref_chosen_logps, ref_rejected_logps)]
    M.as_vector("policy_chosen_logps", policy_chosen_logps)
    M.as_vector("policy_rejected_logps", policy_rejected_logps)
    if num_pairs is not None and (isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1):
        raise ValueError(f"num_pairs must be a positive int (pairs in the whole batch), got {num_pairs!r}")
    dt = M.compute_dtype(policy_chosen_logps, policy_rejected_logps, *det)
    with torch.enable_grad():
        lw = policy_chosen_logps.detach().to(dt).requires_grad_(True)
        ll = policy_rejected_logps.detach().to(dt).requires_grad_(True)
        sft = sft_nll.detach() if isinstance(sft_nll, Tensor) else sft_nll
        x = _prepare_inputs(
            spec, lw, ll, det[0], det[1], chosen_lengths, rejected_lengths, chosen_wpo_logweights,
            rejected_wpo_logweights, sft,
        )
        n_tok = num_chosen_tokens
        if isinstance(n_tok, Tensor):
            n_tok = n_tok.detach().to(device=lw.device, dtype=dt)
        losses = _combined_losses(spec, x, num_pairs, n_tok)
        total = _reduce(losses, spec.reduction, num_pairs)
        if total.requires_grad:
            d_chosen, d_rejected = torch.autograd.grad(total, (lw, ll), allow_unused=True)
        else:
            d_chosen = d_rejected = None
    d_chosen = torch.zeros_like(lw) if d_chosen is None else d_chosen
    d_rejected = torch.zeros_like(ll) if d_rejected is None else d_rejected
    return losses.detach(), d_chosen.detach(), d_rejected.detach()


# ================================================================================================ LD-DPO, WPO
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
    a = M.check_finite("ld_alpha", ld_alpha)
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
    dt = M.compute_dtype(token_logps_chosen, token_logps_rejected)
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
        dt = M.compute_dtype(logits)
        z = logits.to(dt)
        mask = labels != ignore_index
        lse = torch.logsumexp(z, -1)  # (B, T)
        lse2 = torch.logsumexp(2.0 * z, -1)
        tok = torch.gather(z, -1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1) - lse
        per_tok = torch.where(mask, tok - (lse2 - 2.0 * lse), 0.0)
        return per_tok.sum(-1) / mask.sum(-1).clamp_min(1).to(dt)


# ================================================================================= CPO / SimPO / AlphaPO
def _derived_nll(name: str, nll: Tensor | float | None, lw: Tensor, len_w: Tensor | None, P: int) -> Tensor:
    """Chosen NLL as a (P,) per-pair share whose mean is the batch token-mean NLL, or the given value."""
    if nll is not None:
        if not isinstance(nll, Tensor):
            nll = torch.tensor(float(nll), dtype=torch.float64)
        if not nll.is_floating_point() or not (nll.dim() == 0 or tuple(nll.shape) == (P,)):
            raise ValueError(f"{name} must be a float scalar or a ({P},) tensor, got {nll.dtype} {tuple(nll.shape)}")
        return nll.to(device=lw.device, dtype=lw.dtype).expand_as(lw)
    if len_w is None:
        raise ValueError(
            f"the NLL term needs {name} (token-mean NLL of the chosen completions), or chosen_lengths so that "
            "it is derived from policy_chosen_logps"
        )
    return -lw * (P / len_w.sum())


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    alpha: float = 0.0,
    chosen_lengths: Tensor | Sequence[int] | None = None,
    rejected_lengths: Tensor | Sequence[int] | None = None,
    chosen_nll: Tensor | float | None = None,
    chosen_logits_mean: Tensor | float | None = None,
    rejected_logits_mean: Tensor | float | None = None,
    compute_metrics: bool = True,
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
        beta: β > 0.
        loss_type: ``sigmoid`` | ``hinge`` | ``ipo`` | ``simpo``.
        label_smoothing: ε ∈ [0, 0.5] for sigmoid / simpo.
        simpo_gamma: γ, SimPO's target margin (0.5).
        cpo_alpha: weight of the chosen NLL (1.0 as in CPO; 0 disables it).
        alpha: AlphaPO reward-shape α (0 = log-prob reward).
        chosen_lengths, rejected_lengths: (P,) scored-token counts; required for ipo / simpo, and
            chosen_lengths for the NLL when ``chosen_nll`` is not given.
        chosen_nll: scalar or (P,) token-mean NLL of the chosen completions; default derived as
            :math:`-\sum\ell_w/\sum|y_w|`.
        chosen_logits_mean, rejected_logits_mean: optional, for the ``logits/*`` metrics (see dpo_loss).
        compute_metrics: fill ``metrics`` (one host sync).

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
    valid = ("sigmoid", "hinge", "ipo", "simpo")
    if loss_type not in valid:
        raise ValueError(f"unknown loss_type {loss_type!r} for cpo_loss; valid loss types are {list(valid)}")
    beta = M.check_positive("beta", beta)
    eps = M.check_finite("label_smoothing", label_smoothing)
    if loss_type in ("sigmoid", "simpo"):
        M.check_eps("label_smoothing", eps, "sigmoid")
    gamma = M.check_finite("simpo_gamma", simpo_gamma)
    cpo_alpha = M.check_finite("cpo_alpha", cpo_alpha)
    alpha = M.check_finite("alpha", alpha)
    spec = _make_spec(beta, "sigmoid", None, 0.0, "reverse_kl", 0.5, 0.05, "mean", False)
    x = _prepare_inputs(spec, policy_chosen_logps, policy_rejected_logps, None, None,
                        chosen_lengths, rejected_lengths, None, None, None)
    P = x.lw.shape[0]
    if loss_type in ("ipo", "simpo"):
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
    h = uw - ul
    if loss_type == "sigmoid":
        losses = M.smoothed_sigmoid_loss(beta * h, eps)
    elif loss_type == "simpo":
        losses = M.smoothed_sigmoid_loss(beta * h - gamma, eps)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    nll = None
    if cpo_alpha != 0.0:
        nll = _derived_nll("chosen_nll", chosen_nll, x.lw, x.len_w, P)
        losses = losses + cpo_alpha * nll
    loss = losses.mean()
    chosen_rewards, rejected_rewards = (beta * uw).detach(), (beta * ul).detach()
    metrics: dict[str, float] = {}
    if compute_metrics:
        zero = torch.zeros((), dtype=x.lw.dtype, device=x.lw.device)
        extra = {"nll_loss": nll.detach().mean() if nll is not None else zero}
        # logps/* are the log-probs the loss sees (length-averaged for ipo/simpo), as TRL logs them
        metrics = _pair_metrics(chosen_rewards, rejected_rewards, aw, al, chosen_logits_mean,
                                rejected_logits_mean, x.len_w, x.len_l, extra)
    return DPOOutput(loss, losses, chosen_rewards, rejected_rewards, x.lw, x.ll, metrics)


# ================================================================================================ ORPO
def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor | Sequence[int],
    rejected_lengths: Tensor | Sequence[int],
    beta: float = 0.1,
    chosen_nll: Tensor | float | None = None,
    chosen_logits_mean: Tensor | float | None = None,
    rejected_logits_mean: Tensor | float | None = None,
    compute_metrics: bool = True,
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
        chosen_lengths, rejected_lengths: (P,) scored-token counts (required).
        beta: β > 0 (ORPO's λ).
        chosen_nll: scalar or (P,) token-mean NLL of the chosen completions; default
            :math:`-\sum\ell_w/\sum|y_w|` (TRL's).
        chosen_logits_mean, rejected_logits_mean: optional, for ``logits/*`` metrics.
        compute_metrics: fill ``metrics`` (one host sync).

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
    beta = M.check_positive("beta", beta)
    spec = _make_spec(beta, "sigmoid", None, 0.0, "reverse_kl", 0.5, 0.05, "mean", False)
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("orpo_loss length-averages the log-probs: pass chosen_lengths and rejected_lengths")
    x = _prepare_inputs(spec, policy_chosen_logps, policy_rejected_logps, None, None,
                        chosen_lengths, rejected_lengths, None, None, None)
    P = x.lw.shape[0]
    cap = -torch.finfo(x.lw.dtype).eps
    aw = (x.lw / x.len_w).clamp(max=cap)
    al = (x.ll / x.len_l).clamp(max=cap)
    log_odds = (aw - al) - (M.log1mexp(aw) - M.log1mexp(al))
    ratio = F.logsigmoid(log_odds)
    nll = _derived_nll("chosen_nll", chosen_nll, x.lw, x.len_w, P)
    losses = nll - beta * ratio
    loss = losses.mean()
    chosen_rewards, rejected_rewards = (beta * aw).detach(), (beta * al).detach()
    metrics: dict[str, float] = {}
    if compute_metrics:
        extra = {"nll_loss": nll.detach().mean(), "log_odds_ratio": ratio.detach().mean(),
                 "log_odds_chosen": log_odds.detach().mean()}
        metrics = _pair_metrics(chosen_rewards, rejected_rewards, aw, al, chosen_logits_mean,
                                rejected_logits_mean, x.len_w, x.len_l, extra)
    return DPOOutput(loss, losses, chosen_rewards, rejected_rewards, x.lw, x.ll, metrics)


# ================================================================================================ KTO / BCO
def _unpaired_inputs(
    policy_logps: Tensor, ref_logps: Tensor | None, desirable: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    M.as_vector("policy_logps", policy_logps)
    N = policy_logps.shape[0]
    if N == 0:
        raise ValueError("policy_logps is empty: need at least one example")
    if ref_logps is not None:
        M.as_vector("ref_logps", ref_logps, N)
    if not isinstance(desirable, Tensor) or desirable.dtype != torch.bool or tuple(desirable.shape) != (N,):
        raise ValueError(
            f"desirable must be a bool tensor of shape ({N},) (True = thumbs-up example), got "
            f"{getattr(desirable, 'dtype', type(desirable).__name__)} {tuple(getattr(desirable, 'shape', ()))}"
        )
    dt = M.compute_dtype(policy_logps, ref_logps)
    lp = policy_logps.to(dt)
    lr = torch.zeros_like(lp) if ref_logps is None else ref_logps.to(device=lp.device, dtype=dt)
    return lp, lr, desirable.to(lp.device)


def _unpaired_metrics(rewards: Tensor, lp: Tensor, des: Tensor, baseline: Tensor, base_name: str) -> dict[str, float]:
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


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    desirable: Tensor,
    policy_kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
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

    Args:
        policy_logps: (N,) summed completion log-probs under the policy.
        ref_logps: (N,) under the reference, or ``None`` (zeros).
        desirable: (N,) bool, True for desirable (chosen) examples.
        policy_kl_logps, ref_kl_logps: (M,) log-probs of the mismatched (prompt, completion) pairs; give both
            to estimate z, or neither (z = 0 unless ``kl`` is given).
        beta: β > 0.
        desirable_weight, undesirable_weight: λ_D, λ_U ≥ 0.
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
    beta = M.check_positive("beta", beta)
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if M.check_finite(name, w) < 0:
            raise ValueError(f"{name} must be >= 0, got {w}")
    lp, lr, des = _unpaired_inputs(policy_logps, ref_logps, desirable)
    if kl is not None:
        z = kl if isinstance(kl, Tensor) else torch.tensor(float(kl), dtype=torch.float64)
        z = z.detach().to(device=lp.device, dtype=lp.dtype)
        if z.numel() != 1:
            raise ValueError(f"kl must be a scalar, got shape {tuple(z.shape)}")
        z = z.reshape(()).clamp_min(0.0)
    elif (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("pass both policy_kl_logps and ref_kl_logps, or neither")
    elif policy_kl_logps is not None:
        M.as_vector("policy_kl_logps", policy_kl_logps)
        M.as_vector("ref_kl_logps", ref_kl_logps, policy_kl_logps.shape[0])
        if policy_kl_logps.shape[0] == 0:
            raise ValueError("policy_kl_logps is empty")
        z = policy_kl_logps.detach().to(device=lp.device, dtype=lp.dtype) - ref_kl_logps.detach().to(
            device=lp.device, dtype=lp.dtype
        )
        z = z.mean().clamp_min(0.0)
    else:
        z = torch.zeros((), dtype=lp.dtype, device=lp.device)
    r = lp - lr
    # 1 − σ(x) = σ(−x): no cancellation when σ(x) ≈ 1
    loss_des = desirable_weight * torch.sigmoid(-beta * (r - z))
    loss_und = undesirable_weight * torch.sigmoid(-beta * (z - r))
    losses = torch.where(des, loss_des, loss_und)
    loss = losses.mean()
    rewards = (beta * r).detach()
    metrics = _unpaired_metrics(rewards, lp, des, z, "kl") if compute_metrics else {}
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
    beta = M.check_positive("beta", beta)
    if delta is not None and running_mean is not None:
        raise ValueError("pass either delta or running_mean, not both")
    lp, lr, des = _unpaired_inputs(policy_logps, ref_logps, desirable)
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
    metrics = _unpaired_metrics(rewards, lp, des, d, "delta") if compute_metrics else {}
    return UnpairedOutput(loss, losses, rewards, d, metrics)


# ================================================================================================ GRPO
_GRPO_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def grpo_loss(
    logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    compute_metrics: bool = True,
) -> GRPOOutput:
    r"""GRPO-family clipped policy-gradient loss on per-token log-probs.

    GRPO: Shao et al. 2024, *DeepSeekMath* (arXiv:2402.03300); DAPO (clip-higher, token-level sum):
    Yu et al. 2025 (arXiv:2503.14476); Dr. GRPO: Liu et al. 2025 (arXiv:2503.20783); GSPO (sequence-level
    ratio): Zheng et al. 2025 (arXiv:2507.18071).

    Ratio :math:`\rho_t = \exp(\log\pi_t - \log\pi_{old,t})` (``importance_sampling_level="token"``) or
    :math:`\rho = \exp(\mathrm{mean}_{t\in y}(\log\pi_t - \log\pi_{old,t}))` per sequence (``"sequence"``).
    Per token:

    .. math::
        l_t = -\min(\rho_t A,\ \mathrm{clip}(\rho_t, 1-\varepsilon_{low}, 1+\varepsilon_{high}) A)
              + \beta\,(e^{\log\pi^{ref}_t - \log\pi_t} - (\log\pi^{ref}_t - \log\pi_t) - 1)

    Aggregation (m = mask): ``grpo`` mean over sequences of :math:`\sum_t l_t m_t / \sum_t m_t`;
    ``bnpo`` :math:`\sum l m / \sum m`; ``dr_grpo`` :math:`\sum l m / (B \cdot \text{max\_completion\_length})`;
    ``dapo`` :math:`\sum l m / \text{num\_items\_in\_batch}`.

    Args:
        logps: (B, T) per-token log-probs of the sampled completions under the current policy.
        advantages: (B,) per-sequence advantages A.
        mask: (B, T) bool/0-1, 1 at completion tokens.
        old_logps: (B, T) log-probs under the sampling policy; ``None`` = ``logps.detach()`` (one update per
            generation: ρ = 1 in value, gradient A·∇log π).
        ref_logps: (B, T) reference log-probs; required when β ≠ 0.
        beta: KL coefficient β ≥ 0 (0 = no KL term).
        epsilon_low, epsilon_high: clip range (1 − ε_low, 1 + ε_high); ``epsilon_high`` defaults to
            ``epsilon_low``.
        importance_sampling_level: ``"token"`` or ``"sequence"``.
        loss_type: ``grpo`` | ``bnpo`` | ``dr_grpo`` | ``dapo``.
        max_completion_length: for dr_grpo (default T).
        num_items_in_batch: for dapo: completion tokens across the whole (accumulated, all-process) batch;
            default ``mask.sum()``.
        compute_metrics: fill ``metrics`` (one host sync).

    Shape:
        ``logps``, ``mask``, ``old_logps``, ``ref_logps``: :math:`(B, T)`; ``advantages``: :math:`(B)`.

    Returns:
        :class:`GRPOOutput` (``loss`` scalar, ``per_token_loss`` (B, T), metrics ``kl`` (if β ≠ 0),
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` over completion tokens).
        A large positive log π − log π_old overflows ρ to inf: that is the maths; keep updates on-policy enough.

    Examples::

        >>> lp = torch.randn(2, 4).clamp(max=0).requires_grad_()
        >>> out = grpo_loss(lp, torch.tensor([1.0, -1.0]), torch.ones(2, 4), loss_type="dapo")
        >>> out.loss.backward()
    """
    if loss_type not in _GRPO_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r} for grpo_loss; valid loss types are {list(_GRPO_TYPES)}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}"
        )
    if not isinstance(logps, Tensor) or not logps.is_floating_point() or logps.dim() != 2:
        raise ValueError(f"logps must be a float (B, T) tensor, got {getattr(logps, 'shape', type(logps).__name__)}")
    B, T = logps.shape
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape ({B}, {T}) like logps, got {tuple(getattr(mask, 'shape', ()))}")
    if not isinstance(advantages, Tensor) or tuple(advantages.shape) != (B,):
        raise ValueError(f"advantages must have shape ({B},), got {tuple(getattr(advantages, 'shape', ()))}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (B, T)):
            raise ValueError(f"{name} must have shape ({B}, {T}) like logps, got {tuple(getattr(t, 'shape', ()))}")
    beta = M.check_finite("beta", beta)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 adds the KL term: pass ref_logps (B, T)")
    e_lo = M.check_finite("epsilon_low", epsilon_low)
    e_hi = e_lo if epsilon_high is None else M.check_finite("epsilon_high", epsilon_high)
    if not 0.0 <= e_lo < 1.0:
        raise ValueError(f"epsilon_low must lie in [0, 1), got {e_lo}")
    if e_hi < 0.0:
        raise ValueError(f"epsilon_high must be >= 0, got {e_hi}")

    dt = M.compute_dtype(logps, old_logps, ref_logps, advantages)
    lp = logps.to(dt)
    m = mask.to(device=lp.device, dtype=dt)
    old = lp.detach() if old_logps is None else old_logps.detach().to(device=lp.device, dtype=dt)
    A = advantages.detach().to(device=lp.device, dtype=dt).unsqueeze(-1)  # (B, 1)
    log_ratio = torch.where(m > 0, lp - old, 0.0)  # (B, T); unscored positions contribute nothing
    n_tok = m.sum(-1)  # (B,)
    if importance_sampling_level == "sequence":
        log_w = ((log_ratio * m).sum(-1) / n_tok.clamp_min(1.0)).unsqueeze(-1)  # (B, 1)
    else:
        log_w = log_ratio
    ratio = torch.exp(log_w)
    clipped = ratio.clamp(1.0 - e_lo, 1.0 + e_hi)
    per_token = -torch.minimum(ratio * A, clipped * A)
    kl = None
    if beta != 0.0:
        d = torch.where(m > 0, ref_logps.detach().to(device=lp.device, dtype=dt) - lp, 0.0)
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + beta * kl
    per_token = per_token * m  # (B, T)

    total = per_token.sum()
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / n_tok.clamp_min(1.0)).mean()
    elif loss_type == "bnpo":
        loss = total / m.sum().clamp_min(1.0)
    elif loss_type == "dr_grpo":
        L = T if max_completion_length is None else max_completion_length
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
        loss = total / (B * L)
    else:
        n = m.sum().clamp_min(1.0) if num_items_in_batch is None else num_items_in_batch
        if not isinstance(n, Tensor) and not (float(n) > 0):
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")
        loss = total / n

    metrics: dict[str, float] = {}
    if compute_metrics:
        with torch.no_grad():
            r = ratio.expand(B, T)
            denom = m.sum().clamp_min(1.0)
            low = ((r < 1.0 - e_lo) & (A < 0)).to(dt) * m
            high = ((r > 1.0 + e_hi) & (A > 0)).to(dt) * m
            names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
            vals = [low.sum() / denom, high.sum() / denom, (low + high).sum() / denom]
            if kl is not None:
                names.insert(0, "kl")
                vals.insert(0, (kl * m).sum() / denom)
            metrics = _sync_metrics(names, vals)
    return GRPOOutput(loss, per_token, metrics)
