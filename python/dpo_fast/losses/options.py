"""The options of every loss family, each declared once: a frozen dataclass per family.

- :class:`DPOOptions` — :func:`~dpo_fast.dpo_loss`, :func:`~dpo_fast.losses.pair_loss_and_grads`, ``DPOLoss``.
- :class:`CPOOptions` — :func:`~dpo_fast.cpo_loss`, ``CPOLoss``; :class:`ORPOOptions` — :func:`~dpo_fast.orpo_loss`,
  ``ORPOLoss``.
- :class:`KTOOptions` — :func:`~dpo_fast.kto_loss`, ``KTOLoss``.
- :class:`GRPOOptions` — :func:`~dpo_fast.grpo_loss`, :func:`~dpo_fast.losses.grpo_token_terms`, ``GRPOLoss``.

Each field carries its default, its type and its documentation (``field(metadata={"doc": ...})``); the
dataclass's ``__post_init__`` is the only place the family's options are validated (every error names the
option). Everything else derives from the dataclass:

- :func:`takes_options` turns a function (or a module's ``__init__``) written with one ``options`` parameter
  into one that also takes every option as a keyword argument (some positionally, for the modules), with
  ``inspect.signature`` listing them with their defaults and types; it builds the dataclass once per call
  (:func:`build_options`) and passes it on.
- :func:`options_doc` renders the field docs; :func:`document_options` puts them into a docstring at its
  ``{OPTIONS}`` line (the dataclass's own, the function's, the module's), so the text exists once.

Adding an option: one field here (default, type, doc, its check in ``__post_init__``), its formula where the
family computes the loss, its test (docs/DESIGN.md, "Adding an option").
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import registry as R
from .inputs import check_finite, check_positive, check_positive_int, check_range

__all__ = ["DPOOptions", "CPOOptions", "ORPOOptions", "KTOOptions", "GRPOOptions", "OPTION_CLASSES",
           "build_options", "takes_options", "options_doc", "document_options", "option_names",
           "normalize_loss_types", "PairwiseConfig"]

F = TypeVar("F", bound=Callable[..., Any])
MARKER = "{OPTIONS}"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def opt(default: Any, doc: str) -> Any:
    """A documented option field: ``name: type = opt(default, "what it means")``."""
    return field(default=default, metadata={"doc": doc})


# ---------------------------------------------------------------------------------------------- machinery
def option_names(cls: type) -> tuple[str, ...]:
    """The option names of an options dataclass, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def build_options(cls: type, options: Any = None, *, who: str | None = None, **kwargs: Any) -> Any:
    """The validated ``cls`` instance for a call: ``options`` as given, or ``cls(**kwargs)``.

    Raises ``TypeError`` naming an unknown option, an ``options`` that is not a ``cls``, or ``options`` given
    together with option keywords; the dataclass's ``__post_init__`` raises for an invalid value.
    """
    who = who or cls.__name__
    names = option_names(cls)
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise TypeError(f"{who}: unknown option {unknown[0]!r}; the options of {cls.__name__} are {list(names)}")
    if options is None:
        return cls(**kwargs)
    if not isinstance(options, cls):
        raise TypeError(f"{who}: options must be a {cls.__name__}, got {type(options).__name__}")
    if kwargs:
        raise TypeError(f"{who}: pass options={cls.__name__}(...) or the option keywords {sorted(kwargs)}, "
                        "not both")
    return options


def _type_text(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def options_doc(cls: type, indent: str = "", width: int = 112) -> str:
    """The options' documentation, one ``name (type, default ...): doc`` entry per field (Google style)."""
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        head = f"{f.name} ({_type_text(f)}, default ``{f.default!r}``): "
        text = " ".join(f.metadata.get("doc", "").split())
        lines.extend(textwrap.wrap(head + text, width=width, initial_indent=indent,
                                   subsequent_indent=indent + "    ", break_on_hyphens=False,
                                   break_long_words=False))
    return "\n".join(lines)


def _fill(doc: str | None, cls: type, with_options_arg: bool) -> str | None:
    if not doc or MARKER not in doc:
        return doc
    out = []
    for line in doc.splitlines():
        if line.strip() == MARKER:
            indent = line[: len(line) - len(line.lstrip())]
            out.append(options_doc(cls, indent))
            if with_options_arg:
                out.extend(textwrap.wrap(
                    f"options ({cls.__name__} | None, default ``None``): all of the options above as one "
                    f":class:`~dpo_fast.losses.{cls.__name__}` (built once, e.g. by a trainer), instead of the "
                    "keywords; passing both is a ``TypeError``.", width=112, initial_indent=indent,
                    subsequent_indent=indent + "    ", break_on_hyphens=False))
        else:
            out.append(line)
    return "\n".join(out)


def document_options(cls: type, *, with_options_arg: bool = True) -> Callable[[F], F]:
    """Decorator: replace the ``{OPTIONS}`` line of the decorated object's docstring by :func:`options_doc`
    of ``cls`` (at that line's indentation), plus the ``options=`` entry unless ``with_options_arg=False``."""
    def deco(obj: F) -> F:
        obj.__doc__ = _fill(obj.__doc__, cls, with_options_arg)
        return obj
    return deco


def takes_options(cls: type, *, positional: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorator for a function (or ``__init__``) whose body reads one keyword-only ``options`` parameter.

    The decorated callable also accepts every option of ``cls`` as a keyword argument — and the names in
    ``positional``, in that order, positionally after its own positional parameters (a module's
    ``__init__(self, beta, ...)``). It builds ``cls`` once per call with :func:`build_options` and calls the
    function with ``options=`` that instance. ``inspect.signature`` shows the function's positional
    parameters, the positional options, the keyword options (defaults and types from the dataclass), then
    the function's own keyword-only parameters (``options`` first among them). Unknown keywords, missing or
    surplus positional arguments raise the ``TypeError`` Python raises for the function itself.
    """
    names = option_names(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    bad = [p for p in positional if p not in fields]
    if bad:
        raise TypeError(f"takes_options: {bad} are not options of {cls.__name__}")

    def deco(fn: F) -> F:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if "options" not in sig.parameters or sig.parameters["options"].kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"takes_options: {fn.__qualname__} needs a keyword-only 'options' parameter")
        clash = [p.name for p in params if p.name in fields]
        if clash:
            raise TypeError(f"takes_options: {fn.__qualname__} declares options {clash} itself")
        own_pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        own_kw = [p for p in params if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        n_own = len(own_pos)
        opt_pos = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=fields[n].default,
                                     annotation=fields[n].type) for n in positional]
        opt_kw = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=fields[n].default,
                                    annotation=fields[n].type) for n in names if n not in positional]
        own_kw.sort(key=lambda p: p.name != "options")  # options= right after the option keywords
        public = sig.replace(parameters=own_pos + opt_pos + opt_kw + own_kw)
        name_set = frozenset(names)
        qualname = fn.__qualname__
        who = qualname[: -len(".__init__")] if qualname.endswith(".__init__") else qualname

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given: dict[str, Any] = {}
            if positional and len(args) > n_own:
                extra = args[n_own:]
                if len(extra) > len(positional):
                    raise TypeError(f"{qualname}() takes from {n_own} to {n_own + len(positional)} positional "
                                    f"arguments but {len(args)} were given")
                given = dict(zip(positional, extra))
                args = args[:n_own]
            if kwargs:
                for k in [k for k in kwargs if k in name_set]:
                    if k in given:
                        raise TypeError(f"{qualname}() got multiple values for argument '{k}'")
                    given[k] = kwargs.pop(k)
            kwargs["options"] = build_options(cls, kwargs.pop("options", None), who=who, **given)
            return fn(*args, **kwargs)

        wrapper.__signature__ = public  # type: ignore[attr-defined]
        wrapper.__doc__ = _fill(fn.__doc__, cls, True)
        wrapper.__options_class__ = cls  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return deco


def _warn(message: str) -> None:
    """A ``UserWarning`` attributed to the first caller outside dpo_fast (and dataclass-generated code)."""
    frame, level = sys._getframe(1), 2  # level 1 is this function, 2 its caller
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or frame.f_code.co_filename == "<string>"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _set(obj: Any, **values: Any) -> None:
    for k, v in values.items():
        object.__setattr__(obj, k, v)


def _opt_finite(name: str, v: float | None) -> float | None:
    return None if v is None else check_finite(name, v)


# ---------------------------------------------------------------------------------------------- pairwise (DPO)
def normalize_loss_types(
    loss_type: str | Sequence[str], loss_weights: Sequence[float] | None
) -> tuple[list[str], list[float]]:
    """``(types, weights)``: one validated registry name per entry, one finite weight each (default 1)."""
    if isinstance(loss_type, str):
        types = [loss_type]
    elif isinstance(loss_type, Sequence):
        types = list(loss_type)
    else:
        raise TypeError(f"loss_type must be a str or a list of str from {list(R.LOSS_TYPES)}; got {loss_type!r} "
                        f"({type(loss_type).__name__})")
    if not types:
        raise ValueError(f"loss_type must be a name or a non-empty list of names from {list(R.LOSS_TYPES)}")
    for lt in types:
        R.pairwise(lt)
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(weights)} entries but loss_type has {len(types)} ({types}); "
                "give one weight per loss type"
            )
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"loss_weights must be finite, got {weights}")
    return types, weights


@dataclass(frozen=True)
class PairwiseConfig:
    """The pairwise options as the maths reads them (one name, weight and ε per term of the loss list);
    derived from :class:`DPOOptions` (``DPOOptions.config(reduction)``)."""

    types: tuple[str, ...]
    weights: tuple[float, ...]
    beta: float
    eps: tuple[float, ...]  # label_smoothing of each loss type of the list
    f_div: str
    alpha: float
    tau: float
    reduction: str
    use_weighting: bool

    @property
    def decomposable(self) -> bool:
        """Whether the total loss is a sum of per-pair terms (see :func:`is_pair_decomposable`)."""
        return not any(R.pairwise(lt).batch_coupled for lt in self.types)

    @property
    def needs_lengths(self) -> list[str]:
        return [lt for lt in self.types if R.pairwise(lt).needs_lengths]


def _tuple_if_seq(v: Any) -> Any:
    return tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v


@dataclass(frozen=True)
class DPOOptions:
    """Validated options of the pairwise DPO family (:func:`~dpo_fast.dpo_loss`, ``DPOLoss``).

    Lists (``loss_type``, ``loss_weights``, per-type ``label_smoothing``) are kept as tuples. Warns when
    ``label_smoothing`` or ``f_divergence_type`` is set for a loss type that does not read it.

    Attributes:
        {OPTIONS}
    """

    beta: float = opt(0.1, "β > 0 (for ipo: the τ of the IPO paper).")
    loss_type: str | Sequence[str] = opt(
        R.DEFAULT_LOSS_TYPE,
        "a name from :data:`~dpo_fast.LOSS_TYPES`, or a list of names combined with ``loss_weights`` (MPO).")
    loss_weights: Sequence[float] | None = opt(
        None, "one finite weight per entry of ``loss_type`` (default all 1).")
    label_smoothing: float | Sequence[float] = opt(
        0.0,
        "ε, in the range the registry gives each loss type: sigmoid / aot / aot_unpaired [0, 0.5]; robust "
        "[0, 0.5); exo_pair (0, 0.5] (1e-3 typical). Other loss types ignore it (with a warning). A list gives "
        "one ε per entry of ``loss_type`` (TRL's trainer path passes 0 for sigmoid, whose TRL formula has no ε, "
        "and the config's ε for the others).")
    f_divergence_type: str = opt(
        R.DEFAULT_F_DIVERGENCE,
        "``reverse_kl`` (s = r), ``forward_kl`` (s = 1 − e^{−r}), ``js_divergence`` (s = log 2 + log σ(r)) or "
        "``alpha_divergence`` (s = (e^{(α−1)r} − 1)/(α−1), (α−1)r clamped at 80 before the exponential as in "
        "TRL). Only the loss types whose formula is written with s or Δ use it; nca_pair, bco_pair, sppo_hard, "
        "apo_*, aot* use the plain log-ratios r (as TRL's code does; TRL rejects those combinations, dpo_fast "
        "warns).")
    f_alpha_divergence_coef: float = opt(
        0.5, "α for ``alpha_divergence``; |α − 1| < 1e-6 is reverse-KL.")
    discopop_tau: float = opt(0.05, "τ > 0 of DiscoPOP.")
    use_weighting: bool = opt(
        False,
        "WPO (Zhou et al. 2024): multiply pair i's loss by the detached W_i = exp(chosen_wpo_logweights_i + "
        "rejected_wpo_logweights_i) (``dpo_loss`` then needs both; ``DPOLoss`` computes them in its pass).")

    def __post_init__(self) -> None:
        types, weights = normalize_loss_types(self.loss_type, self.loss_weights)
        beta = check_positive("beta", self.beta)
        label_smoothing = self.label_smoothing
        per_type = isinstance(label_smoothing, Sequence) and not isinstance(label_smoothing, str)
        if per_type:
            eps_list = [check_finite("label_smoothing", e) for e in label_smoothing]
            if len(eps_list) != len(types):
                raise ValueError(f"label_smoothing has {len(eps_list)} entries but loss_type has {len(types)} "
                                 f"({types}); give one value per loss type, or one float for all")
        else:
            eps_list = [check_finite("label_smoothing", label_smoothing)] * len(types)
        for lt, eps in zip(types, eps_list):
            entry = R.pairwise(lt)
            if entry.eps_range is not None:
                check_range("label_smoothing", eps, *entry.eps_range, hint=f" for loss_type={lt!r}{entry.eps_hint}")
        ignored = [lt for lt, eps in zip(types, eps_list) if eps != 0.0 and R.pairwise(lt).eps_range is None]
        if ignored and (per_type or all(R.pairwise(lt).eps_range is None for lt in types)):
            _warn(f"label_smoothing is ignored by loss_type {ignored}; it applies to {sorted(R.EPS_RANGES)}")
        f_div = self.f_divergence_type
        if f_div != R.DEFAULT_F_DIVERGENCE:
            plain = [lt for lt in types if not R.pairwise(lt).trl_accepts_f_divergence]
            if plain:
                _warn(f"f_divergence_type={f_div!r} is ignored by loss_type {plain}: they use the plain "
                      "log-ratios (TRL 1.16 rejects these combinations; the f-divergence reward only cancels in "
                      "the chosen-rejected difference of "
                      f"{sorted(e.name for e in R.PAIRWISE if e.uses_f_divergence)})")
        R.f_divergence(f_div)
        alpha = check_finite("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        tau = check_positive("discopop_tau", self.discopop_tau)
        _set(self, loss_type=_tuple_if_seq(self.loss_type), loss_weights=_tuple_if_seq(self.loss_weights),
             label_smoothing=_tuple_if_seq(label_smoothing), use_weighting=bool(self.use_weighting))
        object.__setattr__(self, "_config", PairwiseConfig(tuple(types), tuple(weights), beta, tuple(eps_list),
                                                           f_div, alpha, tau, "mean", bool(self.use_weighting)))

    def config(self, reduction: str = "mean") -> PairwiseConfig:
        """The normalised :class:`PairwiseConfig` with ``reduction`` (``mean`` | ``sum`` | ``none``)."""
        cfg: PairwiseConfig = self._config  # type: ignore[attr-defined]
        if reduction == cfg.reduction:
            return cfg
        if reduction not in R.REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(R.REDUCTIONS)}, got {reduction!r}")
        return dataclasses.replace(cfg, reduction=reduction)

    @property
    def decomposable(self) -> bool:
        """Whether the loss is a sum of per-pair terms (no batch-sorting ``aot`` type in the list)."""
        return self._config.decomposable  # type: ignore[attr-defined]

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments (of :func:`~dpo_fast.dpo_loss`, ``DPOLoss``)."""
        return {n: getattr(self, n) for n in option_names(type(self))}


# ---------------------------------------------------------------------------------------------- CPO / ORPO
#: label_smoothing range of the smoothed CPO losses (sigmoid, simpo)
CPO_EPS_RANGE = (0.0, True, 0.5, True)


@dataclass(frozen=True)
class CPOOptions:
    """Validated options of CPO / SimPO / AlphaPO (:func:`~dpo_fast.cpo_loss`, ``CPOLoss``).

    Attributes:
        {OPTIONS}
    """

    beta: float = opt(0.1, "β > 0.")
    loss_type: str = opt(R.DEFAULT_CPO_LOSS_TYPE, "``sigmoid`` | ``hinge`` | ``ipo`` | ``simpo``.")
    label_smoothing: float = opt(0.0, "ε ∈ [0, 0.5] for sigmoid / simpo (finite; the other types ignore it).")
    simpo_gamma: float = opt(0.5, "γ, SimPO's target margin.")
    cpo_alpha: float = opt(1.0, "weight of the chosen NLL (1.0 as in CPO; 0 disables it: SimPO proper).")
    alpha: float = opt(0.0, "AlphaPO reward-shape α (0 = log-prob reward).")

    def __post_init__(self) -> None:
        entry = R.cpo_entry(self.loss_type)
        beta = check_positive("beta", self.beta)
        eps = check_finite("label_smoothing", self.label_smoothing)
        if entry.uses_label_smoothing:
            check_range("label_smoothing", eps, *CPO_EPS_RANGE, hint=f" for loss_type={self.loss_type!r}")
        _set(self, beta=beta, label_smoothing=eps, simpo_gamma=check_finite("simpo_gamma", self.simpo_gamma),
             cpo_alpha=check_finite("cpo_alpha", self.cpo_alpha), alpha=check_finite("alpha", self.alpha))

    @property
    def entry(self) -> R.CPOLossType:
        """The registry entry of ``loss_type``."""
        return R.cpo_entry(self.loss_type)

    def as_kwargs(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in option_names(type(self))}


@dataclass(frozen=True)
class ORPOOptions:
    """Validated options of ORPO (:func:`~dpo_fast.orpo_loss`, ``ORPOLoss``).

    Attributes:
        {OPTIONS}
    """

    beta: float = opt(0.1, "β > 0 (ORPO's λ).")

    def __post_init__(self) -> None:
        _set(self, beta=check_positive("beta", self.beta))

    def as_kwargs(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in option_names(type(self))}


# ---------------------------------------------------------------------------------------------- KTO
@dataclass(frozen=True)
class KTOOptions:
    """Validated options of KTO (:func:`~dpo_fast.kto_loss`, ``KTOLoss``).

    Attributes:
        {OPTIONS}
    """

    beta: float = opt(0.1, "β > 0.")
    desirable_weight: float = opt(1.0, "λ_D ≥ 0, the weight of desirable examples.")
    undesirable_weight: float = opt(1.0, "λ_U ≥ 0, the weight of undesirable examples.")
    loss_type: str = opt(R.DEFAULT_KTO_LOSS_TYPE,
                         "``kto`` or ``apo_zero_unpaired`` (TRL 1.16's ``KTOConfig.loss_type``).")

    def __post_init__(self) -> None:
        R.kto_entry(self.loss_type)
        beta = check_positive("beta", self.beta)
        for name in ("desirable_weight", "undesirable_weight"):
            w = getattr(self, name)
            if check_finite(name, w) < 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
            object.__setattr__(self, name, float(w))
        _set(self, beta=beta)

    @property
    def entry(self) -> R.KTOLossType:
        """The registry entry of ``loss_type``."""
        return R.kto_entry(self.loss_type)

    def as_kwargs(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in option_names(type(self))}


# ---------------------------------------------------------------------------------------------- GRPO
@dataclass(frozen=True)
class GRPOOptions:
    """Validated options of the GRPO family (:func:`~dpo_fast.grpo_loss`, ``GRPOLoss``; names and meanings
    as in TRL 1.16's ``GRPOConfig``). ``epsilon_high`` is stored filled in (``epsilon_low`` when None).

    Attributes:
        {OPTIONS}
    """

    loss_type: str = opt(
        R.DEFAULT_GRPO_LOSS_TYPE,
        "one of :data:`~dpo_fast.losses.GRPO_LOSS_TYPES` (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo). "
        "dpo_fast's default is ``grpo``; TRL's is ``dapo``.")
    beta: float = opt(0.0, "KL coefficient β ≥ 0 (β ≠ 0 needs the reference log-probs).")
    epsilon_low: float = opt(0.2, "ε_low ∈ [0, 1): the clip range is (1 − ε_low, 1 + ε_high) (TRL's ``epsilon``).")
    epsilon_high: float | None = opt(
        None, "ε_high ≥ 0, default ``epsilon_low`` (TRL's ``epsilon_high``). For cispo ε_high is the cap on ρ itself.")
    delta: float | None = opt(
        None, "two-sided clipping (INTELLECT-2): ρ is also capped at δ > 0 in the unclipped branch; ``None`` = off.")
    importance_sampling_level: str = opt(
        R.DEFAULT_IS_LEVEL,
        "``token`` (ρ per token) or ``sequence`` (GSPO: exp of the masked mean log-ratio, one ρ per sequence).")
    max_completion_length: int | None = opt(
        None, "dr_grpo's constant (default T of the inputs; in ``GRPOLoss`` the row length or the longest packed "
              "sequence).")
    sapo_temperature_pos: float = opt(1.0, "SAPO's τ > 0 for A > 0.")
    sapo_temperature_neg: float = opt(1.05, "SAPO's τ > 0 for A ≤ 0.")
    vespo_k_pos: float = opt(2.0, "VESPO's Gamma-weight shape k for A ≥ 0.")
    vespo_lambda_pos: float = opt(3.0, "VESPO's Gamma-weight rate λ for A ≥ 0.")
    vespo_k_neg: float = opt(3.0, "VESPO's Gamma-weight shape k for A < 0.")
    vespo_lambda_neg: float = opt(2.0, "VESPO's Gamma-weight rate λ for A < 0.")
    top_entropy_quantile: float = opt(
        1.0,
        "ρ ∈ [0, 1] of *Beyond the 80/20 rule*: keep the policy term only on the tokens whose entropy is ≥ the "
        "(1 − ρ) quantile of the batch's completion-token entropies (1 = all; < 1 needs the entropies, and "
        "``GRPOLoss`` then takes the two-pass route).")
    entropy_coef: float = opt(
        0.0,
        "entropy bonus: loss − coef · mean entropy over the kept tokens (TRL's static coefficient; the adaptive "
        "controller is trainer state: ``GRPOLoss.forward(..., entropy_coef=)`` takes a per-step value). Needs "
        "differentiable entropies; ``GRPOLoss`` differentiates them in its one pass (fused route).")
    use_bias_correction_kl: bool = opt(
        False,
        "multiply the per-token KL by ρ (DeepSeek-V3.2). TRL's default is ``True``; dpo_fast's is ``False`` (its "
        "first release's behaviour) — the TRL trainer path passes TRL's value.")
    off_policy_mask_threshold: float | None = opt(
        None,
        "DeepSeek-V3.2's off-policy sequence mask: drop sequences with A < 0 whose mean KL(π_sampler ‖ π) over "
        "the completion exceeds this; ``None`` = off.")
    vllm_importance_sampling_mode: str | None = opt(
        None,
        "compute the sampler IS ratio from ``sampling_logps``: ``token_truncate``, ``token_mask``, "
        "``sequence_truncate`` or ``sequence_mask``; ``None`` = no correction unless an "
        "``importance_sampling_ratio`` is passed.")
    vllm_importance_sampling_clip_min: float | None = opt(
        None, "the sampler ratio's lower bound C_min (``None`` = unbounded; TRL's default).")
    vllm_importance_sampling_clip_max: float | None = opt(
        3.0, "the sampler ratio's upper bound C_max (``None`` = unbounded; TRL's default 3.0).")

    def __post_init__(self) -> None:
        entry = R.grpo_entry(self.loss_type)
        R.check_name("importance_sampling_level", self.importance_sampling_level, R.IS_LEVELS)
        beta = check_finite("beta", self.beta)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        e_lo = check_finite("epsilon_low", self.epsilon_low)
        e_hi = e_lo if self.epsilon_high is None else check_finite("epsilon_high", self.epsilon_high)
        if not 0.0 <= e_lo < 1.0:
            raise ValueError(f"epsilon_low must lie in [0, 1), got {e_lo}")
        if e_hi < 0.0:
            raise ValueError(f"epsilon_high must be >= 0, got {e_hi}")
        if self.delta is not None:
            check_positive("delta", self.delta)
        if self.max_completion_length is not None:
            check_positive_int("max_completion_length", self.max_completion_length)
        check_positive("sapo_temperature_pos", self.sapo_temperature_pos)
        check_positive("sapo_temperature_neg", self.sapo_temperature_neg)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef"):
            check_finite(name, getattr(self, name))
        q = check_finite("top_entropy_quantile", self.top_entropy_quantile)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {q}")
        _opt_finite("off_policy_mask_threshold", self.off_policy_mask_threshold)
        lo = _opt_finite("vllm_importance_sampling_clip_min", self.vllm_importance_sampling_clip_min)
        hi = _opt_finite("vllm_importance_sampling_clip_max", self.vllm_importance_sampling_clip_max)
        mode = self.vllm_importance_sampling_mode
        if mode is not None:
            R.check_name("vllm_importance_sampling_mode", mode, R.VLLM_IS_MODES)
            if lo is not None and hi is not None and lo >= hi:
                raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) must be less than "
                                 f"vllm_importance_sampling_clip_max ({hi})")
            if mode in R.VLLM_IS_TRUNCATE_MODES and lo is None and hi is None:
                raise ValueError("vllm_importance_sampling_mode: a *_truncate mode needs "
                                 "vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max")
            if entry.folds_is_ratio and mode in R.VLLM_IS_SEQUENCE_MODES:
                raise ValueError(f"loss_type {self.loss_type!r} needs a token-level vllm_importance_sampling_mode "
                                 f"({sorted(set(R.VLLM_IS_MODES) - R.VLLM_IS_SEQUENCE_MODES)}), got {mode!r}")
        _set(self, beta=beta, epsilon_low=e_lo, epsilon_high=e_hi,
             use_bias_correction_kl=bool(self.use_bias_correction_kl))

    @property
    def entry(self) -> R.GRPOLossType:
        """The registry entry of ``loss_type``."""
        return R.grpo_entry(self.loss_type)

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments (of :func:`~dpo_fast.grpo_loss`, ``GRPOLoss``)."""
        return {n: getattr(self, n) for n in option_names(type(self))}


#: every family's options dataclass
OPTION_CLASSES = (DPOOptions, CPOOptions, ORPOOptions, KTOOptions, GRPOOptions)
for _cls in OPTION_CLASSES:
    document_options(_cls, with_options_arg=False)(_cls)
del _cls
