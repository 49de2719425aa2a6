"""The loss registry: every loss-type name of dpo_fast, with its function, properties, formula and paper.

This is the one file that spells the loss-type names (and the option values of the GRPO family). Everything
else is derived from it: the valid-name lists and their validation, the ``dpo_loss`` docstring table, the
README's loss table (:func:`render_markdown_table`; ``python -m dpo_fast.losses README.md`` rewrites it, a
test checks that the README holds exactly that), the TRL integration's label-smoothing rule, and which losses the
fused modules may compute group by group.

Adding a pairwise loss type: add one :class:`PairwiseLossType` entry below with its function of a
:class:`~.terms.PairBatch` (a lambda here, or a function in :mod:`.terms`), add its float64 reference to
``tests/losses/test_losses.py``, and regenerate the README table (``python -m dpo_fast.losses README.md``). See
docs/LOSSES.md, "Adding a loss type".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import grpo_terms as G
from . import terms as T

Tensor = torch.Tensor

__all__ = [
    "PairwiseLossType", "PAIRWISE", "LOSS_TYPES", "DEFAULT_LOSS_TYPE", "NEEDS_LENGTHS", "BATCH_COUPLED",
    "EPS_RANGES", "TRL_SMOOTHED", "FDivergence", "F_DIVERGENCES", "F_DIVERGENCE_TYPES", "DEFAULT_F_DIVERGENCE",
    "CPOLossType", "CPO_LOSSES", "CPO_LOSS_TYPES", "DEFAULT_CPO_LOSS_TYPE", "KTOLossType", "KTO_LOSSES",
    "KTO_LOSS_TYPES", "DEFAULT_KTO_LOSS_TYPE", "TRL_KTO_LOSS_TYPES", "kto_entry", "GRPOLossType", "GRPO_LOSSES",
    "GRPO_LOSS_TYPES", "DEFAULT_GRPO_LOSS_TYPE", "TRL_DEFAULT_GRPO_LOSS_TYPE", "TRL_GRPO_LOSS_TYPES", "IS_LEVELS",
    "DEFAULT_IS_LEVEL",
    "SEQUENCE_IS_LEVEL", "VLLM_IS_MODES", "VLLM_IS_TRUNCATE_MODES", "VLLM_IS_SEQUENCE_MODES", "REDUCTIONS",
    "pairwise", "grpo_entry", "cpo_entry", "check_name", "render_markdown_table", "render_rst_table",
]

# ============================================================================================== pairwise
#: (low, low_inclusive, high, high_inclusive) for label_smoothing
EpsRange = tuple[float, bool, float, bool]
_HALF_CLOSED: EpsRange = (0.0, True, 0.5, True)


@dataclass(frozen=True)
class PairwiseLossType:
    """One pairwise loss type of :func:`dpo_fast.dpo_loss`.

    Attributes:
        name: the ``loss_type`` string (TRL's).
        fn: the per-pair loss L_i as a function of a :class:`~.terms.PairBatch`, shape (P,).
        method: the method's short name.
        formula: the per-pair loss in plain text (README) — ``rst_formula`` is the docstring's math.
        paper: citation.
        needs_lengths: divides by the token counts |y| (needs chosen_lengths / rejected_lengths).
        batch_coupled: pair i's loss depends on other pairs (sorts over the batch): not per-pair decomposable.
        eps_range: the valid ``label_smoothing`` interval, or ``None`` when the loss ignores it.
        trl_uses_label_smoothing: TRL 1.16's formula reads ``label_smoothing`` (its sigmoid does not).
        uses_f_divergence: the loss sees the f-divergence scores s(r); otherwise the plain log-ratios r.
        extra: extra options it reads, for the README's "needs" column.
        eps_hint: added to the label_smoothing range error.
        sft_term: the NLL term (reads ``sft_nll`` or derives it from the chosen log-probs and lengths).
    """

    name: str
    fn: Callable[[T.PairBatch], Tensor]
    method: str
    formula: str
    rst_formula: str
    paper: str
    needs_lengths: bool = False
    batch_coupled: bool = False
    eps_range: EpsRange | None = None
    trl_uses_label_smoothing: bool = False
    uses_f_divergence: bool = False
    extra: str = ""
    eps_hint: str = ""
    sft_term: bool = False

    @property
    def trl_accepts_f_divergence(self) -> bool:
        """TRL 1.16 allows a non-reverse-KL f_divergence_type with this loss type."""
        return self.uses_f_divergence or self.sft_term


PAIRWISE: tuple[PairwiseLossType, ...] = (
    PairwiseLossType(
        "sigmoid", T.pair_sigmoid, "DPO; cDPO with label_smoothing (TRL's sigmoid ignores ε)",
        "−(1−ε) log σ(βΔ) − ε log σ(−βΔ)",
        r":math:`-(1-\varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)`",
        "Rafailov et al. 2023, arXiv:2305.18290; cDPO: Mitchell 2023",
        eps_range=_HALF_CLOSED, uses_f_divergence=True),
    PairwiseLossType(
        "hinge", T.pair_hinge, "SLiC", "max(0, 1 − βΔ)", r":math:`\max(0, 1-\beta\Delta)`",
        "Zhao et al. 2023, arXiv:2305.10425", uses_f_divergence=True),
    PairwiseLossType(
        "ipo", T.pair_ipo, "IPO (length-normalised)", "(s_w/|y_w| − s_l/|y_l| − 1/(2β))²",
        r":math:`(s_w/|y_w| - s_l/|y_l| - 1/(2\beta))^2`", "Azar et al. 2023, arXiv:2310.12036",
        needs_lengths=True, uses_f_divergence=True),
    PairwiseLossType(
        "exo_pair", T.pair_exo, "EXO",
        "q_w (log q_w − log(1−ε)) + q_l (log q_l − log ε), q_w = σ(βΔ) = 1 − q_l",
        r":math:`q_w(\log q_w - \log(1-\varepsilon)) + q_l(\log q_l - \log\varepsilon)`, "
        r":math:`q_w = \sigma(\beta\Delta)`",
        "Ji et al. 2024, arXiv:2402.00856", eps_range=(0.0, False, 0.5, True), trl_uses_label_smoothing=True,
        uses_f_divergence=True, eps_hint=" (the EXO paper uses 1e-3)"),
    PairwiseLossType(
        "nca_pair", T.pair_nca, "NCA", "−log σ(β r_w) − ½ log σ(−β r_w) − ½ log σ(−β r_l)",
        r":math:`-\log\sigma(\beta r_w) - \tfrac12\log\sigma(-\beta r_w) - \tfrac12\log\sigma(-\beta r_l)`",
        "Chen et al. 2024, arXiv:2402.05369"),
    PairwiseLossType(
        "robust", T.pair_robust, "Robust DPO", "[−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)",
        r":math:`[-(1-\varepsilon)\log\sigma(\beta\Delta) + \varepsilon\log\sigma(-\beta\Delta)]/(1-2\varepsilon)`",
        "Chowdhury et al. 2024, arXiv:2403.00409", eps_range=(0.0, True, 0.5, False),
        trl_uses_label_smoothing=True, uses_f_divergence=True),
    PairwiseLossType(
        "bco_pair", T.pair_bco, "BCO (paired)", "−log σ(β r_w) − log σ(−β r_l)",
        r":math:`-\log\sigma(\beta r_w) - \log\sigma(-\beta r_l)`", "Jung et al. 2024, arXiv:2404.04656"),
    PairwiseLossType(
        "sppo_hard", T.pair_sppo_hard, "SPPO (hard labels)", "(r_w − 1/(2β))² + (r_l + 1/(2β))²",
        r":math:`(r_w - 1/(2\beta))^2 + (r_l + 1/(2\beta))^2`", "Wu et al. 2024, arXiv:2405.00675"),
    PairwiseLossType(
        "aot", T.pair_aot, "AOT (sorts over the batch)",
        "−(1−ε) log σ(βδ) − ε log σ(−βδ), δ = sort(ℓ_w − ℓ_l) − sort(ℓ^ref_w − ℓ^ref_l)",
        r"smoothed sigmoid of :math:`\beta\delta`, "
        r":math:`\delta = \mathrm{sort}(\ell_w-\ell_l) - \mathrm{sort}(\ell^{ref}_w-\ell^{ref}_l)`",
        "Melnyk et al. 2024, arXiv:2406.05882", batch_coupled=True, eps_range=_HALF_CLOSED,
        trl_uses_label_smoothing=True),
    PairwiseLossType(
        "aot_unpaired", T.pair_aot_unpaired, "AOT, unpaired (sorts over the batch)",
        "as aot with δ = sort(r_w) − sort(r_l)",
        r"as aot with :math:`\delta = \mathrm{sort}(r_w) - \mathrm{sort}(r_l)`",
        "Melnyk et al. 2024, arXiv:2406.05882", batch_coupled=True, eps_range=_HALF_CLOSED,
        trl_uses_label_smoothing=True),
    PairwiseLossType(
        "apo_zero", T.pair_apo_zero, "APO-zero", "1 − σ(β r_w) + σ(β r_l)",
        r":math:`1 - \sigma(\beta r_w) + \sigma(\beta r_l)`", "D'Oosterlinck et al. 2024, arXiv:2408.06266"),
    PairwiseLossType(
        "apo_down", T.pair_apo_down, "APO-down", "σ(β r_w) + 1 − σ(β (r_w − r_l))",
        r":math:`\sigma(\beta r_w) + 1 - \sigma(\beta(r_w - r_l))`", "D'Oosterlinck et al. 2024, arXiv:2408.06266"),
    PairwiseLossType(
        "discopop", T.pair_discopop, "DiscoPOP", "(1 − m)(−log σ z) + m e^{−z}, z = βΔ, m = σ(z/τ)",
        r":math:`(1-m)(-\log\sigma z) + m e^{-z}`, :math:`z = \beta\Delta`, :math:`m = \sigma(z/\tau)`",
        "Chris Lu et al. 2024, arXiv:2406.08414", uses_f_divergence=True, extra="`discopop_tau`"),
    PairwiseLossType(
        "sigmoid_norm", T.pair_sigmoid_norm, "length-normalised DPO", "−log σ(β (s_w/|y_w| − s_l/|y_l|))",
        r":math:`-\log\sigma(\beta(s_w/|y_w| - s_l/|y_l|))`", "TRL's length-normalised sigmoid",
        needs_lengths=True, uses_f_divergence=True),
    PairwiseLossType(
        "sft", T.pair_sft, "NLL of the chosen completion (RPO / MPO as a list entry)",
        "token-mean NLL of the chosen tokens, −Σℓ^u_w / Σ|y_w|",
        r"token-mean NLL of the chosen completions (unweighted log-probs under LD-DPO)",
        "RPO: Pang et al. 2024, arXiv:2404.19733; MPO: Wang et al. 2024, arXiv:2411.10442",
        extra="`sft_nll` or `chosen_lengths`", sft_term=True),
)

_PAIRWISE_BY_NAME = {e.name: e for e in PAIRWISE}
LOSS_TYPES: tuple[str, ...] = tuple(e.name for e in PAIRWISE)
DEFAULT_LOSS_TYPE = PAIRWISE[0].name
NEEDS_LENGTHS = frozenset(e.name for e in PAIRWISE if e.needs_lengths)
BATCH_COUPLED = frozenset(e.name for e in PAIRWISE if e.batch_coupled)
EPS_RANGES: dict[str, EpsRange] = {e.name: e.eps_range for e in PAIRWISE if e.eps_range is not None}
#: loss types whose TRL 1.16 formula uses label_smoothing (TRL's sigmoid ignores it; dpo_fast's is cDPO)
TRL_SMOOTHED = frozenset(e.name for e in PAIRWISE if e.trl_uses_label_smoothing)
REDUCTIONS = ("mean", "sum", "none")


def check_name(argname: str, value: object, valid: tuple[str, ...], what: str = "", noun: str = "values") -> str:
    """``value`` if it is one of ``valid``; else a ``TypeError`` (not a str) or ``ValueError`` naming the
    argument and listing the valid names."""
    if not isinstance(value, str):
        raise TypeError(f"{argname} must be a str{what}, one of {list(valid)}; got {value!r} "
                        f"({type(value).__name__})")
    if value not in valid:
        raise ValueError(f"unknown {argname} {value!r}{what}; valid {noun} are {list(valid)}")
    return value


def pairwise(name: str) -> PairwiseLossType:
    """The registry entry of a pairwise loss type (``ValueError`` naming ``loss_type`` if unknown)."""
    return _PAIRWISE_BY_NAME[check_name("loss_type", name, LOSS_TYPES, noun="loss types")]


# ============================================================================================== f-divergences
@dataclass(frozen=True)
class FDivergence:
    """An f-divergence: the score s(r) (0 at r = 0, TRL 1.16's form) and the stable margin Δ = s(r_w) − s(r_l)."""

    name: str
    score: Callable[[Tensor, float], Tensor]
    delta: Callable[[Tensor, Tensor, float], Tensor]
    formula: str


F_DIVERGENCES: tuple[FDivergence, ...] = (
    FDivergence("reverse_kl", T.score_reverse_kl, T.delta_reverse_kl, "s = r (standard DPO)"),
    FDivergence("forward_kl", T.score_forward_kl, T.delta_forward_kl, "s = 1 − e^{−r}"),
    FDivergence("js_divergence", T.score_js, T.delta_js, "s = log 2 + log σ(r)"),
    FDivergence("alpha_divergence", T.score_alpha, T.delta_alpha,
                "s = (e^{(α−1)r} − 1)/(α − 1), (α−1)r clamped at 80; |α − 1| < 1e-6 gives s = r"),
)
_F_BY_NAME = {f.name: f for f in F_DIVERGENCES}
F_DIVERGENCE_TYPES: tuple[str, ...] = tuple(f.name for f in F_DIVERGENCES)
DEFAULT_F_DIVERGENCE = F_DIVERGENCES[0].name


def f_divergence(name: str) -> FDivergence:
    return _F_BY_NAME[check_name("f_divergence_type", name, F_DIVERGENCE_TYPES)]


# ============================================================================================== CPO family
@dataclass(frozen=True)
class CPOLossType:
    """A loss type of :func:`dpo_fast.cpo_loss`: ``fn(h, beta, eps, gamma)`` on the reward margin h."""

    name: str
    fn: Callable[[Tensor, float, float, float], Tensor]
    length_averaged: bool
    uses_label_smoothing: bool
    formula: str
    paper: str


CPO_LOSSES: tuple[CPOLossType, ...] = (
    CPOLossType("sigmoid", T.cpo_sigmoid, False, True, "−(1−ε) log σ(βh) − ε log σ(−βh)",
                "CPO: Xu et al. 2024, arXiv:2401.08417"),
    CPOLossType("hinge", T.cpo_hinge, False, False, "max(0, 1 − βh)", "CPO: Xu et al. 2024, arXiv:2401.08417"),
    CPOLossType("ipo", T.cpo_ipo, True, False, "(h − 1/(2β))²", "CPO with IPO's loss"),
    CPOLossType("simpo", T.cpo_simpo, True, True, "−(1−ε) log σ(βh − γ) − ε log σ(γ − βh)",
                "SimPO: Meng et al. 2024, arXiv:2405.14734"),
)
_CPO_BY_NAME = {e.name: e for e in CPO_LOSSES}
CPO_LOSS_TYPES: tuple[str, ...] = tuple(e.name for e in CPO_LOSSES)
DEFAULT_CPO_LOSS_TYPE = CPO_LOSSES[0].name


def cpo_entry(name: str) -> CPOLossType:
    return _CPO_BY_NAME[check_name("loss_type", name, CPO_LOSS_TYPES, " for cpo_loss", "loss types")]


# ============================================================================================== KTO family
@dataclass(frozen=True)
class KTOLossType:
    """A loss type of :func:`dpo_fast.kto_loss` (TRL 1.16 ``KTOConfig.loss_type``): per-example losses of the
    log-ratio r and the reference point z for desirable and undesirable examples."""

    name: str
    desirable: Callable[[Tensor, Tensor, float], Tensor]
    undesirable: Callable[[Tensor, Tensor, float], Tensor]
    formula: str
    paper: str


KTO_LOSSES: tuple[KTOLossType, ...] = (
    KTOLossType("kto", T.kto_desirable, T.kto_undesirable, "λ_D(1 − σ(β(r − z))) / λ_U(1 − σ(β(z − r)))",
                "Ethayarajh et al. 2024, arXiv:2402.01306"),
    KTOLossType("apo_zero_unpaired", T.apo_zero_unpaired_desirable, T.apo_zero_unpaired_undesirable,
                "λ_D(1 − σ(βr)) / λ_U σ(βr) (no reference point)",
                "D'Oosterlinck et al. 2024, arXiv:2408.06266"),
)
_KTO_BY_NAME = {e.name: e for e in KTO_LOSSES}
KTO_LOSS_TYPES: tuple[str, ...] = tuple(e.name for e in KTO_LOSSES)
DEFAULT_KTO_LOSS_TYPE = KTO_LOSSES[0].name
#: TRL 1.16's ``KTOConfig.loss_type`` values (what the TRL trainer integration accepts).
TRL_KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")


def kto_entry(name: str) -> KTOLossType:
    return _KTO_BY_NAME[check_name("loss_type", name, KTO_LOSS_TYPES, " for kto_loss", "loss types")]


# ============================================================================================== GRPO family
@dataclass(frozen=True)
class GRPOLossType:
    """A loss type of :func:`dpo_fast.grpo_loss` (TRL 1.16 ``GRPOConfig.loss_type``).

    Attributes:
        term: the per-token policy term (:mod:`.grpo_terms`).
        aggregate: the per-token loss → scalar reduction.
        metrics: the clip statistics TRL logs for it.
        folds_is_ratio: the sampler IS ratio enters the term itself (VESPO) instead of multiplying the loss.
        token_normalised: the aggregation divides by ``num_items_in_batch`` (TRL's normaliser).
        local: the gradient at a token depends only on that token's log-prob (token-level IS) or its
            sequence's (sequence-level IS) plus batch constants, so a fused pass may form it group by group.
    """

    name: str
    term: Callable[[G.TokenTermInputs], G.PolicyTerm]
    aggregate: Callable[..., Tensor]
    metrics: Callable[[G.PolicyTerm, G.TokenTermInputs], dict[str, Tensor]]
    policy: str
    aggregation: str
    paper: str
    folds_is_ratio: bool = False
    token_normalised: bool = False
    local: bool = True


GRPO_LOSSES: tuple[GRPOLossType, ...] = (
    GRPOLossType("grpo", G.term_clipped, G.agg_sequence_mean, G.metrics_clipped,
                 "−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)", "mean over sequences of Σ_t l_t / |y|",
                 "Shao et al. 2024 (DeepSeekMath), arXiv:2402.03300"),
    GRPOLossType("bnpo", G.term_clipped, G.agg_local_tokens, G.metrics_clipped,
                 "as grpo", "Σ l / Σ|y| over the local batch", "TRL's batch-token normalisation"),
    GRPOLossType("dr_grpo", G.term_clipped, G.agg_constant, G.metrics_clipped,
                 "as grpo", "Σ l / (B · max_completion_length)", "Liu et al. 2025 (Dr. GRPO), arXiv:2503.20783"),
    GRPOLossType("dapo", G.term_clipped, G.agg_global_tokens, G.metrics_clipped,
                 "as grpo (clip-higher: ε_high > ε_low)", "Σ l / num_items_in_batch",
                 "Yu et al. 2025 (DAPO), arXiv:2503.14476", token_normalised=True),
    GRPOLossType("cispo", G.term_cispo, G.agg_global_tokens, G.metrics_cispo,
                 "−sg(min(ρ, ε_high)) · A · log π", "Σ l / num_items_in_batch",
                 "MiniMax 2025 (MiniMax-M1), arXiv:2506.13585; ε_max: ScaleRL, arXiv:2510.13786",
                 token_normalised=True),
    GRPOLossType("sapo", G.term_sapo, G.agg_sequence_mean, G.metrics_none,
                 "−(4/τ) σ(τ(ρ − 1)) A, τ = τ_pos if A > 0 else τ_neg", "as grpo",
                 "Soft Adaptive Policy Optimization, arXiv:2511.20347"),
    GRPOLossType("luspo", G.term_clipped, G.agg_sequence_sum, G.metrics_clipped,
                 "as grpo (meant for sequence-level ρ)", "mean over sequences of Σ_t l_t (length-weighted)",
                 "LUSPO, arXiv:2602.05261"),
    GRPOLossType("vespo", G.term_vespo, G.agg_global_tokens, G.metrics_vespo,
                 "−sg(φ(w)) · A · log π, φ(w) = e^{λ} w^{k} e^{−λw}, w the sequence ratio",
                 "Σ l / num_items_in_batch",
                 "VESPO, arXiv:2602.10693", folds_is_ratio=True, token_normalised=True),
)
_GRPO_BY_NAME = {e.name: e for e in GRPO_LOSSES}
GRPO_LOSS_TYPES: tuple[str, ...] = tuple(e.name for e in GRPO_LOSSES)
DEFAULT_GRPO_LOSS_TYPE = GRPO_LOSSES[0].name  # dpo_fast's default (kept from the first release)
TRL_DEFAULT_GRPO_LOSS_TYPE = "dapo"  # GRPOConfig's default in TRL 1.16
#: TRL 1.16's ``GRPOConfig.loss_type`` values (what the TRL trainer integration accepts; the fused route takes
#: those that are also in GRPO_LOSS_TYPES).
TRL_GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IS_LEVELS: tuple[str, ...] = ("token", "sequence")
DEFAULT_IS_LEVEL, SEQUENCE_IS_LEVEL = IS_LEVELS
VLLM_IS_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
VLLM_IS_TRUNCATE_MODES = frozenset({"token_truncate", "sequence_truncate"})
VLLM_IS_SEQUENCE_MODES = frozenset({"sequence_truncate", "sequence_mask"})


def grpo_entry(name: str) -> GRPOLossType:
    return _GRPO_BY_NAME[check_name("loss_type", name, GRPO_LOSS_TYPES, " for grpo_loss", "loss types")]


# ============================================================================================== rendering
def _eps_text(r: EpsRange) -> str:
    lo, lo_inc, hi, hi_inc = r
    return f"`label_smoothing` ∈ {'[' if lo_inc else '('}{lo:g}, {hi:g}{']' if hi_inc else ')'}"


def _needs(e: PairwiseLossType) -> str:
    parts = []
    if e.needs_lengths:
        parts.append("`chosen_lengths`, `rejected_lengths`")
    if e.eps_range is not None:
        parts.append(_eps_text(e.eps_range))
    if e.extra:
        parts.append(e.extra)
    return "; ".join(parts)


def render_markdown_table() -> str:
    """The README's loss table (one row per pairwise loss type), rendered from :data:`PAIRWISE`."""
    rows = ["| loss_type | method | per-pair loss | needs |", "|---|---|---|---|"]
    for e in PAIRWISE:
        flag = " (default)" if e.name == DEFAULT_LOSS_TYPE else ""
        cell = e.formula.replace("|", "\\|")
        rows.append(f"| `{e.name}`{flag} | {e.method} | {cell} | {_needs(e)} |")
    return "\n".join(rows) + "\n"


def render_rst_table(indent: str = "    ") -> str:
    """The ``dpo_loss`` docstring table (reStructuredText), rendered from :data:`PAIRWISE`."""
    w = max(len(e.name) for e in PAIRWISE) + 2
    bar = "=" * w + " " + "=" * 100
    lines = [bar, "loss_type".ljust(w) + " per-pair loss :math:`L_i`", bar]
    for e in PAIRWISE:
        lines.append(e.name.ljust(w) + " " + e.rst_formula)
        lines.append(" " * w + f" ({e.method}; {e.paper})")
    lines.append(bar)
    return "\n".join(indent + ln if ln else ln for ln in lines)
