"""Helpers of the TRL trainer integrations that need no trainer (the trainer side is :mod:`.adapter`).

- the TRL version gate (:func:`check_trl_version`): the hooks the integrations override are private TRL API;
- :func:`no_grad_token_logprobs`: per-token log-probs of a padded batch through the 1-GEMM no-grad forward
  (decoder, then the fused engine on the scored positions only; no logits tensor);
- :func:`reduced_mean`: a metric's mean over all processes from per-process (sum, count).

Imports TRL only inside functions, so it can be imported to read :data:`SUPPORTED_TRL` without TRL installed.
"""

from __future__ import annotations

import os

import torch


__all__ = ["SUPPORTED_TRL", "UnsupportedTRLVersion", "check_trl_version", "no_grad_token_logprobs",
           "reduced_mean", "reject_multimodal"]

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


def reject_multimodal(who: str, inputs: dict, keys=("pixel_values", "image_grid_thw", "pixel_attention_mask",
                                                     "image_sizes", "num_images", "num_tiles")) -> None:
    """Raise NotImplementedError if ``inputs`` carries vision inputs (the fused path is text-only)."""
    found = [k for k in keys if inputs.get(k) is not None]
    if found:
        raise NotImplementedError(f"{who}: vision-language inputs ({', '.join(found)}) are not supported; use "
                                  "the stock TRL trainer")


def no_grad_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, *,
                           temperature: float = 1.0, batch_size: int | None = None,
                           autocast=None) -> torch.Tensor:
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
            out.append(call_with_hidden_states(model, fn, ids, attention_mask=am))
    return torch.cat(out, 0)


def reduced_mean(accelerator, total: torch.Tensor, count: torch.Tensor) -> float:
    """sum(total) / max(sum(count), 1) over all processes (one all-reduce of the pair)."""
    pair = torch.stack([total.detach().float().reshape(()), count.detach().float().reshape(())])
    pair = accelerator.reduce(pair, reduction="sum")
    return (pair[0] / pair[1].clamp(min=1.0)).item()
