"""Hugging Face models: log-probs straight from the decoder's last hidden states and the model's output head.

A causal LM computes ``logits = head(decoder(input_ids))`` and then, for DPO, throws almost all of the
(B, T, V) logits away. Here the decoder body runs as usual, and its last hidden states go to the fused
engine (:func:`dpo_fast.sequence_logprobs`, :class:`dpo_fast.DPOLoss`) together with the head's weight —
``model.lm_head`` is never called and no logits tensor exists.

What the head may be (anything else raises :class:`UnsupportedHeadError` instead of giving wrong numbers):

* a plain ``nn.Linear`` (with or without bias; tied to the input embeddings or not);
* with the output scalings Hugging Face configs declare: Gemma-2/3 ``final_logit_softcapping`` (engine
  ``softcap``), Cohere/Cohere2 ``logit_scale``, Muse Glimmer ``output_multiplier`` and Falcon-H1
  ``lm_head_multiplier`` (logits multiplied: engine ``temperature = 1 / scale``), Granite ``logits_scaling``
  (logits divided: ``temperature = scale``; HyperCLOVA X multiplies by it);
* inside a PEFT (LoRA-family) model: adapters in the decoder train as usual; the frozen head costs no dW
  GEMM. An adapter *on* the head cannot be fused (the engine reads ``weight`` directly) and raises;
  prompt-learning PEFT methods (prefix/prompt tuning) change the forward and raise too.
* the language model of a vision-language model (``*ForConditionalGeneration``: Qwen2-VL / Qwen2.5-VL,
  LLaVA-style, Gemma-3, ...) in the transformers 5 layout: ``lm_head`` on the outer model, the decoder body
  (``model``: vision tower, projector and the nested ``language_model``) returning the language model's last
  hidden states. Image tokens are inputs of the body, never scored. The scalings are read from the text config
  (``config.get_text_config()``) only for the classes whose forward applies them (:data:`VLM_HEAD_TRANSFORMS`);
  a VLM class not in that table whose text config sets a scaling raises, and so does any layout where the
  head is not the outer model's own module (e.g. a nested causal LM carrying its own head).

Which scalings: by default (``scalings="forward"``) those the model's own ``forward`` applies, so the log-probs
are those of the model's logits. ``scalings="text_config"`` takes every scaling the text config declares, read
as TRL 1.16's fused LM head reads them (``trl.trainer.utils.add_fused_lm_head``), whatever the class's forward
does: the two differ only for a VLM whose forward ignores a declared scaling (``Gemma3ForConditionalGeneration``
with ``final_logit_softcapping`` set). The Fast trainers whose TRL trainer scores with that head (DPO, GRPO,
RLOO, KTO) put their models in that mode (:func:`install_fused_forward`), as TRL trains on that head.

How the decoder runs. :func:`call_with_hidden_states` installs (once) a thin wrapper around the model's
``forward`` that, only when called with the keyword ``dpo_fast_fn``, runs the decoder body and hands its
last hidden states and the head to that function *inside* the forward. Calls go through whatever wraps
the model (DDP, FSDP, DeepSpeed, ``PeftModel``), so their hooks run as in a normal forward; every other
call (``generate``, plain ``model(...)``) is untouched.

Packed batches (from :func:`dpo_fast.pack_pairs` / :class:`dpo_fast.PairCollator`): pass ``position_ids``
that restart at 0 for each sequence (and ``cu_seqlens``). With flash-attention implementations the
varlen kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``) are passed too; with ``sdpa``/``eager`` Hugging Face
builds the block-diagonal causal mask from the ``position_ids`` (it detects packing when no
``attention_mask`` is given), so packed sequences never attend to each other. Do not pass a 0/1 padding
``attention_mask`` with a packed batch: the model would then ignore the sequence boundaries.
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .engine.checks import cu_seqlens_tensor
from .logprobs import sequence_logprobs
from .distributed import is_zero3_param

__all__ = [
    "OutputHead",
    "UnsupportedHeadError",
    "output_head",
    "unwrap_model",
    "call_with_hidden_states",
    "call_without_padding",
    "install_fused_forward",
    "hidden_states_from_model",
    "sequence_logprobs_from_model",
    "check_output_head",
    "VLM_HEAD_TRANSFORMS",
    "HEAD_SCALINGS",
]

_PATCH_FLAG = "_dpo_fast_forward_installed"
#: the model attribute holding its :data:`HEAD_SCALINGS` mode (set by :func:`install_fused_forward`)
_SCALINGS_MODE = "_dpo_fast_head_scalings"
#: which logit scalings :func:`output_head` applies: ``"forward"`` (those the model's own forward applies, the
#: default) or ``"text_config"`` (every one the text config declares, as TRL 1.16's fused LM head reads them)
HEAD_SCALINGS = ("forward", "text_config")


class UnsupportedHeadError(ValueError):
    """The model's output head cannot be expressed as ``weight``/``bias``/``temperature``/``softcap``."""


@dataclass(frozen=True)
class OutputHead:
    """The model's output head, in the engine's terms.

    Logits of the model == ``softcap * tanh(z / softcap) / temperature`` (without ``softcap``:
    ``z / temperature``) with ``z = h @ weight.T + bias`` — the engine's order: the cap first, then the divisor.

    Attributes:
        weight: (V, H) head weight (the input embedding matrix when tied).
        bias: (V,) or None.
        temperature: divisor reproducing the model's logit scaling (1 / logit_scale for Cohere).
        softcap: Gemma-2/3 final-logit soft cap, or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    temperature: float = 1.0
    softcap: float | None = None

    def engine_kwargs(self, temperature: float = 1.0) -> dict[str, Any]:
        """``temperature``/``softcap`` for :func:`dpo_fast.sequence_logprobs` / :class:`dpo_fast.DPOLoss`.

        Args:
            temperature: your sampling temperature on top of the model's own scaling (default 1), applied
                after the model's softcap, as samplers do.
        """
        return {"temperature": self.temperature * float(temperature), "softcap": self.softcap}

    def operands(self, hidden: torch.Tensor):
        """(hidden, weight, bias) for the engine, as the model's head would combine them.

        Under autocast they are returned as they are: the engine's entry points cast them to the autocast
        dtype themselves, as ``nn.Linear`` does. Otherwise ``hidden`` and ``bias`` are cast to the weight's
        dtype when they differ.
        """
        w, b = self.weight, self.bias
        if not torch.is_autocast_enabled(hidden.device.type):
            if hidden.dtype != w.dtype:
                hidden = hidden.to(w.dtype)
            if b is not None and b.dtype != w.dtype:
                b = b.to(w.dtype)
        return hidden, w, b


# ----------------------------------------------------------------------------------------------------------
# model structure


def _peft_types():
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: nothing can be a PEFT model
        return None, None
    return PeftModel, BaseTunerLayer


def unwrap_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(outer, hf_model): strip DDP/DataParallel/FSDP/DeepSpeed-style ``.module`` wrappers and PEFT.

    ``outer`` is what to call (the wrappers' hooks must run); ``hf_model`` is the Hugging Face
    ``PreTrainedModel`` whose ``forward`` gets the fused entry point.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    m = model
    for _ in range(8):  # DDP(FSDP(...)), torch.compile(...) and the like nest a few levels at most
        compiled = m._modules.get("_orig_mod")  # torch.compile's OptimizedModule (forwards attributes to it)
        inner = compiled if isinstance(compiled, nn.Module) else getattr(m, "module", None)
        # the class, not the instance: DeepSpeedEngine forwards unknown attributes to its module
        if isinstance(inner, nn.Module) and (compiled is not None or not hasattr(type(m), "get_output_embeddings")):
            m = inner
        else:
            break
    PeftModel, _ = _peft_types()
    if PeftModel is not None and isinstance(m, PeftModel):
        cfg = m.peft_config.get(m.active_adapter) if hasattr(m, "active_adapter") else None
        if cfg is not None and getattr(cfg, "is_prompt_learning", False):
            raise UnsupportedHeadError(
                f"model: PEFT prompt-learning methods ({cfg.peft_type}) add virtual tokens in PeftModel.forward, "
                "which the fused path would skip; use a LoRA-family adapter, or compute log-probs from logits")
        m = m.get_base_model()
    if not hasattr(m, "get_output_embeddings"):
        raise TypeError(f"model: expected a Hugging Face PreTrainedModel (causal LM), got {type(m).__name__}")
    return model, m


def _decoder(hf_model: nn.Module) -> nn.Module:
    body = getattr(hf_model, "base_model", None)
    if body is None or body is hf_model:
        raise UnsupportedHeadError(
            f"model: cannot find the decoder body of {type(hf_model).__name__} (expected a causal LM with "
            f"base_model_prefix={getattr(hf_model, 'base_model_prefix', None)!r} naming its decoder)")
    return body


def _text_config(hf_model):
    cfg = hf_model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


#: The head scalings (text-config attributes) that a vision-language model's own ``forward`` applies to its
#: logits, per class, as read in the transformers 5.25 sources. A multimodal model whose text config sets a
#: scaling (a softcap, a logit scale other than 1) must be listed here: its ``forward`` may apply the text
#: model's scaling or not (Gemma-3's ``Gemma3ForConditionalGeneration`` does not apply
#: ``final_logit_softcapping``, unlike ``Gemma3ForCausalLM``). Classes whose text config sets none need no row.
VLM_HEAD_TRANSFORMS: dict[str, frozenset[str]] = {
    "Gemma3ForConditionalGeneration": frozenset(),
    "Gemma3nForConditionalGeneration": frozenset({"final_logit_softcapping"}),
    "PaliGemmaForConditionalGeneration": frozenset({"final_logit_softcapping"}),
    "AyaVisionForConditionalGeneration": frozenset({"logit_scale"}),
    "Granite4VisionForConditionalGeneration": frozenset({"logits_scaling"}),
    "LlavaForConditionalGeneration": frozenset(),
    "LlavaNextForConditionalGeneration": frozenset(),
    "LlavaOnevisionForConditionalGeneration": frozenset(),
    "Qwen2VLForConditionalGeneration": frozenset(),
    "Qwen2_5_VLForConditionalGeneration": frozenset(),
}
#: the logit multipliers a config may declare, in the order TRL 1.16's fused LM head looks for them (the first one
#: set counts); ``logits_scaling`` divides (Granite, MiniCPM3) except for HyperCLOVA X, which multiplies by it
_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _declared_scalings(cfg) -> dict[str, Any]:
    """The scalings (attribute -> value) a text config declares, read as TRL 1.16's ``add_fused_lm_head`` reads them
    (trl/trainer/utils.py: ``final_logit_softcapping``, then the first of :data:`_SCALES` that is set); a
    multiplier of 1 is no scaling."""
    found = {}
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        found["final_logit_softcapping"] = cfg.final_logit_softcapping
    scale = next((a for a in _SCALES if getattr(cfg, a, None) is not None), None)
    if scale is not None and getattr(cfg, scale) != 1:
        found[scale] = getattr(cfg, scale)
    return found


def _scalings_mode(hf, scalings: str | None) -> str:
    mode = getattr(hf, _SCALINGS_MODE, "forward") if scalings is None else scalings
    if mode not in HEAD_SCALINGS:
        raise ValueError(f"scalings: expected one of {HEAD_SCALINGS} or None, got {mode!r}")
    return mode


def _head_config(hf, mode: str = "forward") -> dict[str, Any]:
    """The head scalings (attribute -> value) of ``hf`` in ``mode`` (:data:`HEAD_SCALINGS`): the text config's,
    filtered for a VLM by what its forward applies in mode "forward"."""
    cfg = _text_config(hf)
    found = _declared_scalings(cfg)
    if cfg is hf.config or not found or mode == "text_config":
        return found
    applied = VLM_HEAD_TRANSFORMS.get(type(hf).__name__)
    if applied is None:
        raise UnsupportedHeadError(
            f"model: {type(hf).__name__} is a multimodal model whose text config sets {sorted(found)}; dpo_fast does "
            "not know whether its forward applies them to the logits (dpo_fast.hf.VLM_HEAD_TRANSFORMS lists the "
            "classes it knows). Compute log-probs from the model's logits with dpo_fast.logprobs_from_logits "
            "instead, or add the class to VLM_HEAD_TRANSFORMS after checking with dpo_fast.hf.check_output_head.")
    return {a: v for a, v in found.items() if a in applied}


def _check_layout(hf, head: nn.Module) -> None:
    """The head must be the outer model's own module, applied to what the decoder body returns."""
    if not any(c is head for c in hf.children()):
        raise UnsupportedHeadError(
            f"model: {type(hf).__name__}'s output head is not one of its own modules (it sits in a nested model, "
            "e.g. a language_model that is itself a causal LM with its head); dpo_fast knows the layout where the "
            "outer model holds lm_head and its decoder body (base_model_prefix) returns the last hidden states. "
            "Compute log-probs from the model's logits with dpo_fast.logprobs_from_logits instead.")


def output_head(model: nn.Module, *, scalings: str | None = None) -> OutputHead:
    """The model's output head as (weight, bias, temperature, softcap); raises if it cannot be fused.

    Args:
        model: a Hugging Face causal LM, optionally inside PEFT / DDP / FSDP wrappers.
        scalings: which logit scalings (:data:`HEAD_SCALINGS`): ``"forward"``, those the model's own forward
            applies; ``"text_config"``, every one its text config declares, as TRL 1.16's fused LM head reads them
            (they differ only for a VLM whose forward ignores one: ``Gemma3ForConditionalGeneration``'s
            ``final_logit_softcapping``); None (default), the model's mode set by :func:`install_fused_forward`,
            else ``"forward"``.

    Raises:
        UnsupportedHeadError: adapter on the head, a head that is not a plain linear layer, a quantized
            head, a non-positive logit scale, a head that is not the outer model's own module (a layout dpo_fast
            does not know; the message names the model class), or a multimodal class outside
            :data:`VLM_HEAD_TRANSFORMS` whose text config sets a logit scaling.
    """
    _, hf = unwrap_model(model)
    head = hf.get_output_embeddings()
    if head is None:
        raise UnsupportedHeadError(f"model: {type(hf).__name__} has no output embeddings (not a causal LM head)")
    _check_layout(hf, head)
    _, BaseTunerLayer = _peft_types()
    if BaseTunerLayer is not None and isinstance(head, BaseTunerLayer):
        raise UnsupportedHeadError(
            "model: a PEFT adapter sits on the output head (lm_head in target_modules); the fused engine reads "
            "lm_head.weight directly and would ignore the adapter. Remove 'lm_head' from target_modules (or merge "
            "the adapter) to use dpo_fast.")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise UnsupportedHeadError(
            f"model: the output head is a {type(head).__name__}, not a plain nn.Linear; dpo_fast can only fuse "
            "logits = h @ W.T + b (with the config's softcap / logit scale). Compute log-probs from the model's "
            "logits with dpo_fast.logprobs_from_logits instead.")
    w = head.weight
    dims = len(w.ds_shape) if is_zero3_param(w) else getattr(w, "dim", lambda: 0)()  # ZeRO-3: 0-element partition
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or dims != 2:
        raise UnsupportedHeadError(
            f"model: the output head's weight is {type(w).__name__} {getattr(w, 'dtype', '')} (quantized?); "
            "the fused engine needs a floating (V, H) weight")
    cfg = _head_config(hf, _scalings_mode(hf, scalings))
    softcap = cfg.get("final_logit_softcapping")
    scale, how = 1.0, "multiply"
    for attr in _SCALES:
        v = cfg.get(attr)
        if v is not None:
            scale = float(v)
            if attr == "logits_scaling" and _text_config(hf).model_type != "hyperclovax":
                how = "divide"
            break
    if not (math.isfinite(scale) and scale > 0):
        raise UnsupportedHeadError(f"model: logit scale {scale} from the config is not a finite positive number")
    temperature = 1.0 / scale if how == "multiply" else scale
    if softcap is not None and temperature != 1.0:
        # the engine applies its divisor after the cap; a model scale would act before it
        raise UnsupportedHeadError(
            f"model: the config sets both final_logit_softcapping ({softcap}) and a logit scale ({scale}); the "
            "fused engine supports one of them. Compute log-probs from the model's logits with "
            "dpo_fast.logprobs_from_logits instead.")
    return OutputHead(w, head.bias, temperature, None if softcap is None else float(softcap))


# ----------------------------------------------------------------------------------------------------------
# the fused forward


_DROP_IF_NONE = ("labels", "return_dict", "output_attentions", "output_hidden_states", "logits_to_keep",
                 "num_logits_to_keep", "task_ids", "inputs_embeds", "cache_position", "past_key_values")


def install_fused_forward(model: nn.Module, *, head_scalings: str | None = None) -> None:
    """Give the model's ``forward`` the ``dpo_fast_fn=`` entry point (idempotent; other calls unchanged).

    :func:`call_with_hidden_states` does this on first use. Call it yourself *before* a wrapper that
    replaces ``forward`` (accelerate's mixed-precision autocast wrapper, ``torch.compile``) so that the
    wrapper applies to the fused path too.

    Args:
        head_scalings: one of :data:`HEAD_SCALINGS`: the model's mode from now on, for the head the fused forward
            hands to ``dpo_fast_fn`` and for :func:`output_head` (also on a model already installed); None keeps
            its mode ("forward" unless set).
    """
    _, hf_model = unwrap_model(model)
    if head_scalings is not None:
        setattr(hf_model, _SCALINGS_MODE, _scalings_mode(hf_model, head_scalings))
    if getattr(hf_model, _PATCH_FLAG, False):
        return
    previous = hf_model.forward

    @functools.wraps(type(hf_model).forward)
    def forward(self, *args, dpo_fast_fn: Callable | None = None, **kwargs):
        if dpo_fast_fn is None:
            return previous(*args, **kwargs)
        for k in _DROP_IF_NONE:
            if k in kwargs and kwargs[k] is None:
                del kwargs[k]
        kwargs.pop("labels", None)  # the loss is dpo_fast_fn's business
        kwargs["use_cache"] = False
        out = _decoder(self)(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, H)
        return dpo_fast_fn(hidden, output_head(self))

    hf_model.forward = types.MethodType(forward, hf_model)
    setattr(hf_model, _PATCH_FLAG, True)


def _is_flash(hf_model) -> bool:
    impl = getattr(hf_model.config, "_attn_implementation", None) or ""
    return "flash" in str(impl)


def _positions_from_cu(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64 positions restarting at each boundary of cu_seqlens."""
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lens)
    return torch.arange(n, device=cu.device) - starts


_VISION_KWARGS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "pixel_attention_mask",
                  "image_sizes", "spatial_shapes", "num_tiles", "token_type_ids", "mm_token_type_ids",
                  "image_position_ids", "num_images")


def call_with_hidden_states(model: nn.Module, fn: Callable[[torch.Tensor, OutputHead], Any], input_ids: torch.Tensor,
                            *, attention_mask=None, position_ids=None, cu_seqlens=None, max_seqlen=None,
                            **model_kwargs) -> Any:
    """Run the decoder and return ``fn(hidden, head)`` computed inside the model's forward.

    Args:
        model: Hugging Face causal LM (optionally PEFT / DDP / FSDP wrapped). Called through its wrappers.
        fn: ``fn(hidden (B, T, H), head: OutputHead) -> anything``; runs inside the forward.
        input_ids: (B, T) padded, or (R, L) / (1, N) packed rows (then pass ``cu_seqlens``).
        attention_mask: (B, T) 0/1 padding mask for padded batches; must be None for packed ones.
        position_ids: (B, T); for packed rows they restart at 0 per sequence (derived from ``cu_seqlens``
            when omitted).
        cu_seqlens: (S+1,) boundaries of the sequences in the flattened rows (packed batches): an integer
            tensor, or a list / numpy array of ints; 0 = cu[0] <= ... <= cu[S] = input_ids.numel().
        max_seqlen: longest sequence, for flash-attention varlen (computed when omitted).
        **model_kwargs: passed to the decoder body as they are: a vision-language model's inputs
            (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, ``image_sizes``, ``token_type_ids``,
            ...) go to its ``model`` (vision tower, projector, language model), which returns the language model's
            last hidden states; image-token positions are inputs, score them only if your labels do.

    Returns:
        Whatever ``fn`` returns.
    """
    outer, hf = unwrap_model(model)
    install_fused_forward(hf)
    kwargs = dict(model_kwargs)
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError(
                "attention_mask: must be None for a packed batch (cu_seqlens given): a 0/1 padding mask makes the "
                "model ignore the sequence boundaries in position_ids; pass position_ids (or nothing) instead")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a 2-D (rows, L) packed tensor, got shape {tuple(input_ids.shape)}")
        n = input_ids.numel()
        cu = cu_seqlens_tensor(cu_seqlens, n, input_ids.device)  # a list / numpy array is accepted
        if position_ids is None:
            position_ids = _positions_from_cu(cu, n).view(input_ids.shape)
        if _is_flash(hf):
            # flash-attention varlen: one flattened row and explicit boundaries
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
            if max_seqlen is None:
                max_seqlen = int((cu[1:] - cu[:-1]).max())
            cu32 = cu.to(torch.int32)
            kwargs.update(cu_seq_lens_q=cu32, cu_seq_lens_k=cu32, max_length_q=int(max_seqlen),
                          max_length_k=int(max_seqlen))
        else:
            try:
                from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
            except ImportError as e:  # transformers < 4.54 builds no block-diagonal mask from position_ids
                raise RuntimeError(
                    "packed batches need transformers >= 4.54 with sdpa/eager attention (block-diagonal masks from "
                    "position_ids), or a flash-attention implementation; use mode='padded' otherwise") from e
    return outer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, dpo_fast_fn=fn,
                 **kwargs)


def call_without_padding(model: nn.Module, fn: Callable[[torch.Tensor, OutputHead], Any], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, *, row_tokens: int | str | None = None, pad_token_id: int = 0,
                         on_pack: Callable[[Any], None] | None = None, needed: torch.Tensor | None = None,
                         **model_kwargs) -> Any:
    """:func:`call_with_hidden_states` on a padded batch with its padding removed before the decoder.

    The real tokens of every row are packed into rows of whole sequences
    (:func:`dpo_fast.packing.pack_padded_rows`: best-fit-decreasing, ``position_ids`` restarting per sequence,
    ``cu_seqlens``); the decoder runs on the packed rows only, and ``fn`` receives the hidden states mapped back
    to the padded layout, 0 at padding -- so the same ``fn`` (labels, loss, metrics) serves both. The attention
    implementation must keep packed sequences apart (see
    :func:`dpo_fast.integrations.padding_free.check_packed_attention`).

    Args:
        model, fn: as :func:`call_with_hidden_states`; ``fn`` gets hidden (B, T, H).
        input_ids: (B, T) padded token ids.
        attention_mask: (B, T) 0/1, one contiguous run of ones per row (left-padded prompt + right-padded
            completion is one run).
        row_tokens: packed-row capacity: None (the longest sequence), ``"one_row"`` or an int.
        pad_token_id: id at packed-row padding.
        on_pack: called with the :class:`~dpo_fast.packing.PackedRows` before the decoder runs (statistics).
        needed: optional (B, T) bool: the positions ``fn`` reads from the hidden states; each must be a real token
            (:class:`~dpo_fast.packing.PaddedPositionError` otherwise, from the packing's one readback).
        **model_kwargs: passed to the decoder (not a vision-language model's inputs: their image tokens would
            have to be re-laid too).

    Returns:
        Whatever ``fn`` returns.
    """
    from .packing.sequences import pack_padded_rows

    vision = sorted(k for k, v in model_kwargs.items() if v is not None and k in _VISION_KWARGS)
    if vision:
        raise NotImplementedError(f"call_without_padding: vision-language inputs {vision} cannot be packed "
                                  "(their image tokens and positions would have to be re-laid); use padded batches")
    rows = pack_padded_rows(input_ids, attention_mask, row_tokens=row_tokens, pad_token_id=pad_token_id,
                            needed=needed)
    if on_pack is not None:
        on_pack(rows)
    return call_with_hidden_states(model, lambda h, head: fn(rows.unpack(h), head), rows.input_ids,
                                   position_ids=rows.position_ids, cu_seqlens=rows.cu_seqlens,
                                   max_seqlen=rows.max_seqlen, **model_kwargs)


def hidden_states_from_model(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, OutputHead]:
    """(last hidden states (B, T, H), :class:`OutputHead`) — the decoder only, no logits.

    Same arguments as :func:`call_with_hidden_states`. Convenient in a single-process loop; under FSDP
    (sharded head) compute inside :func:`call_with_hidden_states` instead.
    """
    return call_with_hidden_states(model, lambda h, head: (h, head), input_ids, **kwargs)


def sequence_logprobs_from_model(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                                 attention_mask=None, position_ids=None, cu_seqlens=None, max_seqlen=None,
                                 ignore_index: int = -100, temperature: float = 1.0, average: bool = False,
                                 backend: str = "auto", **model_kwargs) -> torch.Tensor:
    r"""Per-sequence log-probs of ``labels`` under a Hugging Face causal LM, logits never materialised.

    Runs the decoder body for the last hidden states, then :func:`dpo_fast.sequence_logprobs` with the
    model's head (tied embeddings, bias, softcap and logit scale handled; see :func:`output_head`).
    Under ``torch.no_grad()`` this is the 1-GEMM reference forward.

    Args:
        model: Hugging Face causal LM, optionally PEFT / DDP / FSDP wrapped.
        input_ids: (B, T) padded, or (R, L) / (1, N) packed rows with ``cu_seqlens``.
        labels: same shape as ``input_ids``, already shifted (``labels[t]`` is predicted from position t),
            ``ignore_index`` on prompt/padding/last positions — as produced by :func:`dpo_fast.pack_pairs`.
        attention_mask, position_ids, cu_seqlens, max_seqlen: see :func:`call_with_hidden_states`.
        ignore_index, average, backend: as in :func:`dpo_fast.sequence_logprobs`.
        temperature: sampling temperature on top of the model's own logit scaling.
        **model_kwargs: extra decoder kwargs.

    Returns:
        (B,) float32 for padded input, (S,) for packed (S = len(cu_seqlens) - 1). Differentiable w.r.t. the
        model's parameters (a frozen head gets no dW).

    Examples::

        >>> logps = sequence_logprobs_from_model(model, batch["input_ids"], batch["labels"],
        ...                                      attention_mask=batch["attention_mask"])      # (B,)
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels: expected the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    cu_seqlens = cu_seqlens_tensor(cu_seqlens, input_ids.numel(), input_ids.device)  # list / numpy accepted

    def fn(hidden, head: OutputHead):
        h, w, b = head.operands(hidden)
        lab = labels.to(h.device)
        if cu_seqlens is not None:
            h, lab = h.reshape(-1, h.shape[-1]), lab.reshape(-1)  # (N, H), (N,)
        return sequence_logprobs(h, w, lab, bias=b, cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(h.device),
                                 ignore_index=ignore_index, average=average, backend=backend,
                                 **head.engine_kwargs(temperature))

    return call_with_hidden_states(model, fn, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **model_kwargs)


@torch.no_grad()
def check_output_head(model: nn.Module, input_ids: torch.Tensor | None = None, *, atol: float = 1e-3,
                      rtol: float = 1e-3) -> OutputHead:
    """Check once that :func:`output_head` reproduces ``model(input_ids).logits`` (for an unfamiliar model).

    Runs the model's own forward on a short input (default: 2 x 8 token ids) and compares its logits with
    the engine's formula applied to the decoder's hidden states.

    Raises:
        UnsupportedHeadError: the logits differ beyond ``atol + rtol * |logits|``.
    """
    outer, hf = unwrap_model(model)
    head = output_head(hf)
    if input_ids is None:
        V = head.weight.shape[0]
        input_ids = torch.arange(16, device=head.weight.device).view(2, 8) % V
    ref = hf(input_ids=input_ids, use_cache=False).logits.float()  # (B, T, V)
    hidden, _ = hidden_states_from_model(hf, input_ids)
    h, w, b = head.operands(hidden)
    z = torch.nn.functional.linear(h.float(), w.float(), None if b is None else b.float())
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    z = z / head.temperature
    err = (z - ref).abs().max().item()
    if not torch.allclose(z, ref, atol=atol, rtol=rtol):
        raise UnsupportedHeadError(
            f"model: {type(hf).__name__}'s logits are not h @ W.T + b with the config's scaling (max abs error "
            f"{err:.3g}); its forward transforms the logits in a way dpo_fast does not know")
    return head
