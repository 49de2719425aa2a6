"""One adapter between a TRL trainer and dpo_fast's fused losses: what every ``Fast*Trainer`` shares.

A trainer integration is a mixin subclassing :class:`TrainerAdapter`, mixed into TRL's trainer class
(``class FastKTOTrainer(_FastKTOMixin, KTOTrainer)``) or into an existing instance's class by
:func:`patch_instance`. The adapter owns construction (version gate, the trainer's own keywords), the options
table (:class:`Option` rows: error, two-pass route or TRL's own loss), the loss module built once, the
fused-forward install, the reference context, routes and metric logging. A trainer supplies its table, its loss
module, the TRL hooks that map its batch to the module's inputs, and its metric names. docs/DESIGN.md, section 7
("The trainer adapter", "Adding a trainer"), has the details. Imports TRL only inside functions.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..hf import call_with_hidden_states, call_without_padding, install_fused_forward, output_head
from ._trainer_common import check_trl_version

__all__ = ["TrainerAdapter", "Option", "Kwarg", "patch_instance", "moe_aux_option",
           "SOFTCAP_OPTION", "ENCODER_DECODER_OPTION", "VLM_HEAD_OPTION", "options_from_trainer", "sequence_sharding",
           "check_sequence_sharding", "SEQUENCE_PARALLEL_RECIPE", "CONTEXT_PARALLEL_REASON", "PADDING_FREE_KWARGS"]

ACTIONS = ("error", "two_pass", "trl")
#: what each fallback route does, for the warning
ROUTE_NOTES = {"two_pass": "dpo_fast's log-probs, then TRL's loss formula", "trl": "TRL's head and loss"}


@dataclass(frozen=True)
class Option:
    """One row of a trainer's TRL-options table.

    Attributes:
        name: the TRL option (documentation).
        when: predicate on the built trainer (its config, attributes, model): True when the row applies.
        action: ``"error"`` (raise ``error(message)``), ``"two_pass"`` (dpo_fast's log-probs, TRL's loss) or
            ``"trl"`` (TRL's own head and loss) -- the last two are recorded and logged, never silent.
        message: the error text, or the fallback reason; ``str.format`` fields ``{who}`` (the trainer's class
            name), ``{stock}`` (the stock TRL trainer) and ``{t}`` (the trainer).
        error: the exception class of an ``"error"`` row.
    """

    name: str
    when: Callable[[Any], bool]
    action: str
    message: str
    error: type[Exception] = NotImplementedError

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"Option {self.name!r}: action must be one of {ACTIONS}, got {self.action!r}")


@dataclass(frozen=True)
class Kwarg:
    """A constructor keyword a trainer adds to TRL's (e.g. FastDPOTrainer's ``token_metrics``)."""

    name: str
    default: Any
    annotation: str


#: The padding-free keywords of the trainers whose TRL config has no ``padding_free`` field (GRPO, RLOO, KTO, CPO,
#: ORPO): the decoder runs on the batch's real tokens packed into rows (:func:`dpo_fast.hf.call_without_padding`).
PADDING_FREE_KWARGS = (Kwarg("padding_free", False, "bool"), Kwarg("packed_row_tokens", None, "int | str | None"))


# ------------------------------------------------------------------------------------------------ shared rows
def moe_aux_option(setting: str = "router_aux_loss_coef=0.0") -> Option:
    """Error row: the MoE router aux loss (TRL's ``aux_loss_enabled``); ``setting`` turns it off."""
    return Option("router_aux_loss", lambda t: bool(getattr(t, "aux_loss_enabled", False)), "error",
                  "{who}: the MoE router aux loss is not supported; set " + setting + " or use {stock}")


#: Error row: a soft-capped head, where TRL's logged logits/* metric (the mean logit) needs every logit.
SOFTCAP_OPTION = Option(
    "final_logit_softcapping", lambda t: output_head(t.model).softcap is not None, "error",
    "{who}: soft-capped output heads (final_logit_softcapping) are not supported: TRL's logged logits/* metric "
    "(the mean logit) then needs every logit; use {stock}")

def _trl_head_inexpressible(t) -> bool:
    """True for a vision-language model whose text config declares both a final-logit softcap and a logit scale.

    TRL 1.16's fused LM head (``trl.trainer.utils.add_fused_lm_head``) scales the logits by the *text* config's
    ``final_logit_softcapping`` and logit scale (``logit_scale`` / ``output_multiplier`` / ``lm_head_multiplier`` /
    ``logits_scaling``) whatever the model class's forward applies; the trainers listing :data:`VLM_HEAD_OPTION`
    follow it (:func:`dpo_fast.hf.output_head` with ``scalings="text_config"``). Both at once (the scale before
    the cap) is the one such head the engine does not express: refused at construction, not at the first step."""
    from ..hf import _declared_scalings, _text_config, unwrap_model

    _, hf = unwrap_model(t.model)
    cfg = _text_config(hf)
    found = _declared_scalings(cfg)
    return cfg is not hf.config and "final_logit_softcapping" in found and len(found) > 1


#: The row of the trainers whose TRL trainer scores with TRL's fused LM head (DPO, GRPO, RLOO, KTO). Listing it
#: also puts the trainer's models in TRL's head scalings: the text config's softcap / logit scale for every class,
#: as TRL trains on them, even where the model's own forward ignores them (``Gemma3ForConditionalGeneration``
#: ignores ``final_logit_softcapping``; its logits and sampling stay uncapped, the trained log-probs are capped,
#: as in stock TRL). Error row: such a VLM whose text config declares a softcap and a logit scale together.
VLM_HEAD_OPTION = Option(
    "text_config logit scaling", _trl_head_inexpressible, "error",
    "{who}: TRL's fused LM head applies {t.model.__class__.__name__}'s text-config logit scale and then its "
    "final_logit_softcapping; dpo_fast's engine supports one of the two. Use {stock}")

#: Error row: encoder-decoder models (the integrations run decoder-only models).
ENCODER_DECODER_OPTION = Option("is_encoder_decoder", lambda t: bool(getattr(t, "is_encoder_decoder", False)),
                                "error", "{who}: encoder-decoder models are not supported; use {stock}")


def options_from_trainer(cls: type, trainer: Any, *, per_step: tuple[str, ...] = (), **overrides: Any) -> Any:
    """Build the loss family's options dataclass ``cls`` (e.g. :class:`dpo_fast.losses.GRPOOptions`) from a TRL trainer.

    Each field takes, in order: ``overrides[name]``; the trainer's attribute of that name (TRL keeps resolved
    values there, e.g. ``epsilon_low``); its config's (``trainer.args``) field of that name; else the field's
    default. The options use TRL's names, so a new option named as TRL names it reaches the trainer with no
    edit here. ``per_step`` names fields the trainer passes per call instead (e.g. GRPO's adaptive
    ``entropy_coef``) or handles on another route: they keep their defaults.

    Returns:
        ``cls(**values)``; its ``__post_init__`` validates them (a bad config fails at construction).
    """
    import dataclasses

    args = getattr(trainer, "args", None)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in per_step:
            continue
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(trainer, f.name):
            values[f.name] = getattr(trainer, f.name)
        elif args is not None and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"options_from_trainer: {cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**values)


def sequence_sharding(args: Any) -> str | None:
    """What shards the sequence in a TRL config (``parallelism_config`` with ``cp_size`` or ``sp_size`` > 1), or None.

    TRL 1.16's trainers compute their own forward on whole rows (its GRPOTrainer refuses ``cp_size``/``sp_size``
    > 1 itself), so the trainers refuse it, before TRL's ``__init__`` builds the accelerator, with
    :data:`SEQUENCE_PARALLEL_RECIPE` -- except FastDPOTrainer with DeepSpeed Ulysses (``sp_size`` > 1,
    ``sp_backend="deepspeed"``, ``cp_size`` 1; :mod:`dpo_fast.integrations.sequence_sharded`).
    """
    pc = getattr(args, "parallelism_config", None)
    if pc is None:
        return None
    sizes = {k: int(getattr(pc, k, 1) or 1) for k in ("cp_size", "sp_size")}
    found = [f"{k}={v}" for k, v in sizes.items() if v > 1]
    return ", ".join(found) or None


#: The own-loop recipe the trainers' error names (docs/DISTRIBUTED.md, "Sequence-sharded hidden states").
SEQUENCE_PARALLEL_RECIPE = (
    "run the decoder with your context/sequence parallelism in your own loop, keep each rank's slice of the last "
    "hidden states and labels (global cu_seqlens when packed), mark it with "
    "dpo_fast.distributed.sequence_parallel(hidden, group), and call the loss module on it "
    "(e.g. dpo_fast.DPOLoss): the per-sequence sums are all-reduced over the group and every rank gets the global "
    "loss; see 'Sequence-sharded hidden states' in dpo_fast's docs/DISTRIBUTED.md")


#: Why context parallelism is not wired into any trainer (part of the error).
CONTEXT_PARALLEL_REASON = (
    "context parallelism (cp_size > 1, torch context_parallel) is not wired into the dpo_fast trainers: it cannot "
    "run on CPU (accelerate accepts a ParallelismConfig only with FSDP2, DeepSpeed or multi-GPU, not MULTI_CPU, and "
    "torch's context_parallel has no sharding for CPU attention), so it is untested here")


def check_sequence_sharding(who: str, args: Any, ulysses: bool = False) -> None:
    """Raise NotImplementedError naming the own-loop recipe when ``args`` shards the sequence.

    ``ulysses``: the trainer runs DeepSpeed Ulysses sequence parallelism (FastDPOTrainer): ``sp_size`` > 1 with
    ``sp_backend="deepspeed"`` and ``cp_size`` 1 passes.
    """
    found = sequence_sharding(args)
    if not found:
        return
    from .sequence_sharded import ulysses_sp_size

    if ulysses and ulysses_sp_size(args):
        return
    pc = args.parallelism_config
    cp = int(getattr(pc, "cp_size", 1) or 1) > 1
    if cp:
        why = CONTEXT_PARALLEL_REASON
    elif ulysses:
        why = (f"{who} runs sequence parallelism only with sp_backend='deepspeed' (DeepSpeed Ulysses), got "
               f"sp_backend={getattr(pc, 'sp_backend', None)!r}")
    else:
        why = ("the dpo_fast trainers do not run on sequence-sharded batches (FastDPOTrainer alone runs DeepSpeed "
               "Ulysses, sp_backend='deepspeed')")
    raise NotImplementedError(
        f"{who}: parallelism_config shards the sequence ({found}); {why}. Instead, {SEQUENCE_PARALLEL_RECIPE}.")


# ------------------------------------------------------------------------------------------------ the adapter
class TrainerAdapter:
    """Base of every trainer mixin (see the module docstring). Class attributes a trainer sets:

    - ``_dpo_fast_trl_class``: the TRL trainer class the mixin is written for; ``_dpo_fast_stock``: its public
      name, for messages (``"trl.DPOTrainer"``);
    - ``_dpo_fast_kwargs``: :class:`Kwarg` rows, its own constructor keywords;
    - ``_dpo_fast_options``: :class:`Option` rows, checked in order after TRL's ``__init__``;
    - ``_dpo_fast_loss_rejected``: ``"error"`` (default) or ``"two_pass"``: what a ``ValueError`` from
      ``_dpo_fast_build_loss`` means.

    and methods it may override: ``_dpo_fast_setup(**kwargs)`` (its own state, before the table),
    ``_dpo_fast_build_loss(temperature, softcap)`` (its loss module, or None), ``_dpo_fast_temperature()``
    (the sampling temperature the head's logits are divided by, default 1), ``_dpo_fast_constructing(args,
    kwargs, **kwargs)`` (a context around TRL's ``__init__``).
    """

    _dpo_fast_trl_class: type | None = None
    _dpo_fast_stock: str = "TRL's trainer"
    _dpo_fast_kwargs: tuple[Kwarg, ...] = ()
    _dpo_fast_options: tuple[Option, ...] = ()
    _dpo_fast_loss_rejected = "error"
    #: runs DeepSpeed Ulysses sequence parallelism (FastDPOTrainer; :func:`check_sequence_sharding`)
    _dpo_fast_ulysses = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if vars(cls).get("_dpo_fast_kwargs"):  # the class signature shows the trainer's own keywords
            P = inspect.Parameter
            cls.__signature__ = inspect.Signature(
                [P("args", P.VAR_POSITIONAL)]
                + [P(k.name, P.KEYWORD_ONLY, default=k.default, annotation=k.annotation) for k in cls._dpo_fast_kwargs]
                + [P("kwargs", P.VAR_KEYWORD)])

    def __init__(self, *args, **kwargs):
        check_trl_version()
        check_sequence_sharding(type(self).__name__, self._dpo_fast_config_arg(args, kwargs), self._dpo_fast_ulysses)
        own = self._dpo_fast_take_kwargs(kwargs)
        with self._dpo_fast_constructing(args, kwargs, **own):
            super().__init__(*args, **kwargs)
        self._dpo_fast_init(**own)

    @classmethod
    def _dpo_fast_config_arg(cls, args: tuple, kwargs: dict) -> Any:
        """The ``args`` (TRL config) argument of a TRL trainer's constructor call, or None."""
        if "args" in kwargs:
            return kwargs["args"]
        try:
            bound = inspect.signature(cls._dpo_fast_trl_class.__init__).bind_partial(None, *args)
        except (AttributeError, TypeError, ValueError):
            return None
        return bound.arguments.get("args")

    @classmethod
    def _dpo_fast_take_kwargs(cls, kwargs: dict) -> dict:
        """The trainer's own keywords popped from ``kwargs`` (defaults filled in); the rest are TRL's."""
        return {k.name: kwargs.pop(k.name, k.default) for k in cls._dpo_fast_kwargs}

    def _dpo_fast_constructing(self, args, kwargs, **own):
        return contextlib.nullcontext()

    # -------------------------------------------------------------------------------------------- setup
    def _dpo_fast_init(self, **own) -> None:
        """After TRL's ``__init__`` (or on a patched instance): setup, options table, loss module, forward."""
        check_trl_version()
        check_sequence_sharding(type(self).__name__, getattr(self, "args", None), self._dpo_fast_ulysses)
        self.dpo_fast_route: str | None = None
        self.dpo_fast_routes: collections.Counter = collections.Counter()
        if any(k is PADDING_FREE_KWARGS[0] for k in self._dpo_fast_kwargs):
            self._dpo_fast_setup_unpadded(own.pop("padding_free"), own.pop("packed_row_tokens"))
        self._dpo_fast_setup(**own)
        # the fused entry point goes in before accelerate wraps forward (mixed precision), so its autocast
        # applies to our path too; and before the table, whose rows read the head: in TRL's fused-head scalings
        # for the trainers whose TRL scores with that head (they list VLM_HEAD_OPTION)
        scalings = "text_config" if VLM_HEAD_OPTION in self._dpo_fast_options else None
        for m in (self.model, getattr(self, "ref_model", None)):
            if m is not None:
                install_fused_forward(m, head_scalings=scalings)
        reasons, route = self._dpo_fast_check_options()
        self._dpo_fast_loss = None
        if not reasons:
            try:
                self._dpo_fast_loss = self._dpo_fast_build_loss(temperature=self._dpo_fast_temperature(),
                                                                softcap=None)  # validated now, not at step 1
            except ValueError as e:
                if self._dpo_fast_loss_rejected != "two_pass":
                    raise
                reasons, route = [f"options the fused loss rejects ({e})"], "two_pass"
        self.dpo_fast_fallback_reasons: list[str] = reasons
        self._dpo_fast_fallback_route = route
        if reasons:
            logging.getLogger(type(self).__module__).warning(
                "%s: %s not fused by dpo_fast; the loss runs TRL's own loss code (route '%s': %s).",
                type(self).__name__, ", ".join(reasons), route, ROUTE_NOTES[route])

    def _dpo_fast_setup(self, **own) -> None:
        pass

    def _dpo_fast_setup_unpadded(self, padding_free: bool, row_tokens: int | str | None) -> None:
        """``padding_free=True`` (:data:`PADDING_FREE_KWARGS`): check the keywords, refuse a vision-language model,
        and prove with a probe that the policy's (and reference's) attention keeps packed sequences apart."""
        from ..packing.sequences import check_row_tokens
        from .padding_free import check_packed_attention

        if not isinstance(padding_free, bool):
            raise TypeError(f"padding_free: expected a bool, got {type(padding_free).__name__}")
        if row_tokens is not None and not padding_free:
            raise ValueError("packed_row_tokens: only meaningful with padding_free=True")
        check_row_tokens(row_tokens, "packed_row_tokens")
        self.dpo_fast_padding_free = padding_free
        self._dpo_fast_row_tokens = row_tokens
        #: real tokens, slots and rows the decoder saw packed, and what the padded batches had (padding-free forwards)
        self.dpo_fast_packing: collections.Counter = collections.Counter()
        if not padding_free:
            return
        if getattr(self, "_is_vlm", False) or getattr(self, "_is_vision_dataset", False):
            raise NotImplementedError(
                f"{type(self).__name__}: padding_free=True is not supported with a vision-language model: packing "
                "would have to re-lay its image tokens and the model's own position ids (e.g. Qwen2-VL's 3-D RoPE "
                "positions). Set padding_free=False (padded batches are supported).")
        check_packed_attention(self.model)
        if getattr(self, "ref_model", None) is not None:
            check_packed_attention(self.ref_model)

    def _dpo_fast_call(self, model, fn: Callable, input_ids: torch.Tensor, *, attention_mask=None, needed=None,
                       **kwargs):
        """:func:`dpo_fast.hf.call_with_hidden_states`, or with ``padding_free`` its padding removed
        (:func:`dpo_fast.hf.call_without_padding`: ``fn`` still sees hidden states in the padded layout).

        ``needed``: (B, T) bool, the hidden positions ``fn`` reads (e.g. ``labels != -100`` of shifted labels);
        padding-free, each must be a real token -- a left-padded row whose first real token is scored raises
        ``ValueError`` (checked in the packing's one readback; padded forwards ignore it)."""
        from ..packing import PaddedPositionError

        if attention_mask is None or not getattr(self, "dpo_fast_padding_free", False):
            return call_with_hidden_states(model, fn, input_ids, attention_mask=attention_mask, **kwargs)

        def count(rows):
            self.dpo_fast_packing.update(real_tokens=rows.real_tokens, packed_slots=rows.input_ids.numel(),
                                         padded_slots=input_ids.numel(), packed_rows=rows.input_ids.shape[0],
                                         padded_rows=input_ids.shape[0])

        try:
            return call_without_padding(model, fn, input_ids, attention_mask, row_tokens=self._dpo_fast_row_tokens,
                                        on_pack=count, needed=needed, **kwargs)
        except PaddedPositionError as e:
            raise ValueError(f"{type(self).__name__}: padding_free=True: a scored token follows a padding position "
                             f"(a left-padded row; {e}). Use right-padded batches (TRL's collator) or "
                             "padding_free=False.") from None

    def _dpo_fast_check_options(self) -> tuple[list[str], str | None]:
        """Raise for the first applying ``"error"`` row; return (fallback reasons, fallback route or None)."""
        fmt = dict(who=type(self).__name__, stock=self._dpo_fast_stock, t=self)
        reasons, route = [], None
        for row in self._dpo_fast_options:
            if not row.when(self):
                continue
            text = row.message.format(**fmt)
            if row.action == "error":
                raise row.error(text)
            reasons.append(text)
            route = "trl" if "trl" in (route, row.action) else "two_pass"
        return reasons, route

    def _dpo_fast_build_loss(self, temperature: float, softcap: float | None):
        return None

    def _dpo_fast_temperature(self) -> float:
        return 1.0

    # -------------------------------------------------------------------------------------------- the step
    def _dpo_fast_loss_for(self, head):
        """The loss module for ``head``: the one built at construction, rebuilt (once) if the head's transform
        differs from the one it was built with (a model logit scale or softcap)."""
        kw = head.engine_kwargs(self._dpo_fast_temperature())
        m = self._dpo_fast_loss
        if m.temperature != kw["temperature"] or m.softcap != kw["softcap"]:
            m = self._dpo_fast_loss = self._dpo_fast_build_loss(**kw)
        return m

    def _dpo_fast_fused(self, model, input_ids, labels, *args, forward: dict | None = None,
                        rows: Callable | None = None, extra: Callable | None = None, autocast: bool = False,
                        **kwargs):
        """Run the decoder, then this trainer's loss module on its last hidden states; ``(output, extra)``.

        Args:
            labels: the scored tokens of ``rows(hidden)`` (moved to the hidden states' device).
            *args: the module's further positional inputs, as they are.
            forward: the decoder's keyword arguments (``attention_mask``, packed ``position_ids``, ...).
            rows: hidden -> the hidden rows ``labels`` score (default: all).
            extra: (hidden, head) -> a value from the same forward (e.g. mean logits), returned beside the output.
            autocast: run under ``accelerator.autocast()``.
            **kwargs: the module's keyword inputs; tensors are moved to the hidden states' device.
        """
        def fn(hidden, head):
            h, w, b = head.operands(hidden if rows is None else rows(hidden))
            kw = {k: (v.to(h.device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            out = self._dpo_fast_loss_for(head)(h, w, labels.to(h.device), *args, bias=b, **kw)
            return out, (None if extra is None else extra(hidden, head))

        with self.accelerator.autocast() if autocast else contextlib.nullcontext():
            out, ex = self._dpo_fast_call(model, fn, input_ids, **(forward or {}))
        self._dpo_fast_record(out.route)
        return out, ex

    def _dpo_fast_record(self, route: str) -> None:
        self.dpo_fast_route = route
        self.dpo_fast_routes[route] += 1

    def _dpo_fast_mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _dpo_fast_log(self, mode: str, values: dict[str, float]) -> None:
        """Append ``values`` (TRL's names) to TRL's ``_metrics`` store, which TRL averages and logs."""
        m = self._metrics[mode]
        for name, v in values.items():
            m[name].append(v)

    # -------------------------------------------------------------------------------------------- reference
    @contextlib.contextmanager
    def _dpo_fast_reference(self, model=None):
        """Context yielding the model that gives reference log-probs: ``model`` (or ``ref_model``, or the
        policy), under no_grad with gradient checkpointing off; a PEFT policy without ``ref_model`` runs with
        its adapter off (its ``"ref"`` adapter when it has one), as TRL does."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing

        ref = getattr(self, "ref_model", None)
        adapter = contextlib.nullcontext()
        if ref is None and is_peft_model(self.model):
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        run = model if model is not None else (ref if ref is not None else self.model)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter:
            yield run

    def _dpo_fast_ref_values(self, inputs, columns: tuple, compute: Callable):
        """The reference's values of a batch: TRL's precomputed ``columns`` (a None column gives None) when
        ``precompute_ref_log_probs``, else ``compute(model)`` inside :meth:`_dpo_fast_reference`."""
        if self.precompute_ref_logps:
            return tuple(None if c is None else inputs[c] for c in columns)
        with self._dpo_fast_reference() as run:
            return compute(run)


_PATCHED: dict[tuple[type, type], type] = {}


def patch_instance(trainer: Any, mixin: type, **kwargs) -> Any:
    """Swap ``trainer``'s class for ``(mixin, type(trainer))`` and run the adapter's init; returns ``trainer``.

    Args:
        trainer: an instance of ``mixin._dpo_fast_trl_class`` (or a subclass); its state (model, optimizer,
            callbacks) is kept.
        mixin: the :class:`TrainerAdapter` subclass holding the overriding methods.
        **kwargs: the mixin's own keywords (its ``_dpo_fast_kwargs``).

    Raises:
        TypeError: ``trainer`` is not an instance of the TRL class.
    """
    check_trl_version()
    base = mixin._dpo_fast_trl_class
    if not isinstance(trainer, base):
        raise TypeError(f"trainer: expected a {mixin._dpo_fast_stock} instance, got {type(trainer).__name__}")
    if isinstance(trainer, mixin):
        return trainer
    kwargs = dict(kwargs)
    own = mixin._dpo_fast_take_kwargs(kwargs)
    if kwargs:
        raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}; expected some of "
                        f"{[k.name for k in mixin._dpo_fast_kwargs]}")
    cls = type(trainer)
    new = _PATCHED.get((cls, mixin))
    if new is None:
        new = type(f"Fast{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
        _PATCHED[(cls, mixin)] = new
    trainer.__class__ = new
    trainer._dpo_fast_init(**own)
    return trainer
