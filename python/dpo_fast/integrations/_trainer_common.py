"""Helpers of the TRL trainer integrations that need no trainer (the trainer side is :mod:`.adapter`).

- the TRL version gate (:func:`check_trl_version`): the hooks the integrations override are private TRL API;
- :func:`no_grad_token_logprobs`: per-token log-probs of a padded batch through the 1-GEMM no-grad forward
  (decoder, then the fused engine on the scored positions only; no logits tensor), vision inputs included;
- :func:`vision_inputs`: a vision-language batch's model inputs for a chunk of rows, sliced as TRL slices them;
- :func:`reduced_mean`: a metric's mean over all processes from per-process (sum, count).

Imports TRL only inside functions, so it can be imported to read :data:`SUPPORTED_TRL` without TRL installed.
"""

from __future__ import annotations

import os

import torch


__all__ = ["SUPPORTED_TRL", "UnsupportedTRLVersion", "check_trl_version", "no_grad_token_logprobs",
           "reduced_mean", "vision_inputs"]

#: TRL versions the integrations are tested with: [low, high).
SUPPORTED_TRL = ("1.16.0", "1.17.0")
_ALLOW_ENV = "DPO_FAST_ALLOW_UNTESTED_TRL"


class UnsupportedTRLVersion(RuntimeError):
    """The installed TRL is outside :data:`SUPPORTED_TRL`."""


def check_trl_version(version: str | None = None) -> str:
    """Raise :class:`UnsupportedTRLVersion` unless TRL's version is in :data:`SUPPORTED_TRL`.

    Set the environment variable ``DPO_FAST_ALLOW_UNTESTED_TRL=1`` to try an untested release anyway.

    Returns:
        The version string checked.
    """
    from packaging.version import Version

    if version is None:
        import trl

        version = trl.__version__
    lo, hi = SUPPORTED_TRL
    if not (Version(lo) <= Version(version) < Version(hi)) and os.environ.get(_ALLOW_ENV) != "1":
        raise UnsupportedTRLVersion(
            f"dpo_fast.integrations supports TRL >={lo},<{hi}; found trl {version}. Install a supported "
            f"release (pip install 'trl>={lo},<{hi}') or set {_ALLOW_ENV}=1 to try this one untested.")
    return version


def vision_inputs(modality: dict, start: int, end: int, total: int) -> dict:
    """The model inputs of rows ``[start, end)`` of a vision-language batch of ``total`` rows, as TRL's GRPO / RLOO
    ``_get_per_token_logps_and_entropies`` slices them (image-indexed tensors by ``num_images`` and
    ``image_grid_thw``, tile-indexed ones by ``num_tiles``, token-indexed ones by row). ``num_images`` and
    ``num_tiles`` are bookkeeping, not model inputs; None values are left out.
    """
    get = modality.get
    pv, thw, num_images = get("pixel_values"), get("image_grid_thw"), get("num_images")
    whole = start == 0 and end == total
    out = {}
    if num_images is not None:
        cum = torch.tensor([0] + list(num_images)).cumsum(0)
        i0, i1 = int(cum[start]), int(cum[end])
    if pv is not None:
        if thw is not None:  # Qwen-VL: rows of pixel_values per image = prod(grid)
            rows = thw.prod(dim=-1)
            if whole:
                out.update(pixel_values=pv, image_grid_thw=thw)
            else:
                per_sample = torch.stack([r.sum() for r in torch.split(rows, list(num_images))])
                cum_rows = torch.cat([per_sample.new_zeros(1), per_sample.cumsum(0)])
                out.update(pixel_values=pv[int(cum_rows[start]):int(cum_rows[end])], image_grid_thw=thw[i0:i1])
        elif get("image_position_ids") is not None:
            out.update(pixel_values=pv[i0:i1], image_position_ids=get("image_position_ids")[i0:i1])
        elif get("spatial_shapes") is not None or get("num_tiles") is not None:
            tiles = torch.tensor([0] + list(get("num_tiles"))).cumsum(0)
            t0, t1 = int(tiles[start]), int(tiles[end])
            out["pixel_values"] = pv[t0:t1]
            if get("spatial_shapes") is not None:
                out.update(pixel_attention_mask=get("pixel_attention_mask")[t0:t1],
                           spatial_shapes=get("spatial_shapes")[t0:t1])
        elif num_images is not None and pv.size(0) == sum(num_images):
            out["pixel_values"] = pv[i0:i1]
        else:
            out["pixel_values"] = pv[start:end]
    if get("pixel_attention_mask") is not None and get("spatial_shapes") is None:
        out["pixel_attention_mask"] = get("pixel_attention_mask")[start:end]
    if get("image_sizes") is not None:
        out["image_sizes"] = get("image_sizes")[i0:i1]
    for k in ("token_type_ids", "mm_token_type_ids"):
        if get(k) is not None:
            out[k] = get(k)[start:end]
    return out


def no_grad_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, *,
                           temperature: float = 1.0, batch_size: int | None = None,
                           autocast=None, call=None, **vision) -> torch.Tensor:
    """(B, logits_to_keep) float32 log-probs of the last ``logits_to_keep`` tokens of each row, under no_grad.

    The decoder runs through :func:`dpo_fast.hf.call_with_hidden_states` (the model's wrappers and hooks
    run); the fused engine scores only the positions whose token has ``attention_mask == 1`` (0 elsewhere),
    as TRL's fused LM head does. ``temperature`` divides the model's logits (the sampling temperature).

    Args:
        model: Hugging Face causal LM (PEFT / DDP wrapped OK).
        input_ids, attention_mask: (B, T) prompt + completion.
        logits_to_keep: completion length C (1 <= C < T).
        batch_size: rows per decoder call (TRL's chunking); default all.
        autocast: a context manager factory for mixed precision (``accelerator.autocast``), or None.
        call: the decoder call, ``call(model, fn, input_ids, attention_mask=..., **vision)``: default
            :func:`dpo_fast.hf.call_with_hidden_states`; a trainer's ``_dpo_fast_call`` removes the padding
            (``padding_free=True``).
        **vision: a vision-language model's inputs of the whole batch (``pixel_values``, ``image_grid_thw``,
            ``num_images``, ...), as TRL's GRPO passes them; each chunk gets its slice (:func:`vision_inputs`).
    """
    import contextlib

    from .. import token_logprobs
    from ..hf import call_with_hidden_states

    B, T = input_ids.shape
    C = int(logits_to_keep)
    if not 1 <= C < T:
        raise ValueError(f"logits_to_keep: expected 1 <= logits_to_keep < {T} (the sequence length), got {C}")
    step = batch_size or B
    out = []
    for s in range(0, B, step):
        ids, am = input_ids[s:s + step], attention_mask[s:s + step]
        labels = ids[:, -C:].masked_fill(am[:, -C:] == 0, -100)  # (b, C); hidden[t] predicts token t+1

        def fn(hidden, head, labels=labels):
            h, w, b = head.operands(hidden[:, -C - 1:-1])
            return token_logprobs(h, w, labels.to(h.device), bias=b, **head.engine_kwargs(temperature))

        with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
            out.append((call or call_with_hidden_states)(model, fn, ids, attention_mask=am,
                                               **vision_inputs(vision, s, s + ids.shape[0], B)))
    return torch.cat(out, 0)


def reduced_mean(accelerator, total: torch.Tensor, count: torch.Tensor) -> float:
    """sum(total) / max(sum(count), 1) over all processes (one all-reduce of the pair)."""
    pair = torch.stack([total.detach().float().reshape(()), count.detach().float().reshape(())])
    pair = accelerator.reduce(pair, reduction="sum")
    return (pair[0] / pair[1].clamp(min=1.0)).item()
