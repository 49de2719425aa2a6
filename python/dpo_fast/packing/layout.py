"""TRL's data layout, in one place: where tokenized pairs live in an example, and the shifted-label rule.

- :func:`resolve_pair_keys`: the (prompt, chosen, rejected) key names of a tokenized example -- TRL's current
  ``prompt_ids``/``chosen_ids``/``rejected_ids`` or its older ``*_input_ids`` (or explicit ``keys``).
- :func:`shifted_labels`: the engine's labels from ``input_ids`` and TRL's unshifted ``completion_mask``:
  ``labels[t] = input_ids[t + 1]`` where ``t + 1`` is a completion token *of the same sequence*, else -100.
  The same rule serves padded rows and packed rows (then ``position_ids`` mark where sequences start).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

__all__ = ["TRL_KEYS", "REF_KEYS", "resolve_pair_keys", "shifted_labels"]

#: (prompt, chosen, rejected) key names, tried in order: TRL's DPO data before its 2025 rewrite
#: (``prompt_input_ids``...) and after it (``prompt_ids``...).
TRL_KEYS: tuple[tuple[str, str, str], ...] = (
    ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
    ("prompt_ids", "chosen_ids", "rejected_ids"),
)
#: precomputed reference log-prob columns (TRL's names)
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def resolve_pair_keys(example: Mapping[str, Any], keys: Sequence[str] | None = None) -> tuple[str, str, str]:
    """The (prompt, chosen, rejected) key names under which ``example`` holds token ids.

    Args:
        example: one tokenized preference example (a mapping).
        keys: explicit names; checked to be present.

    Raises:
        KeyError: no complete set of keys is present. The message lists what the example has; an example
            without any prompt key is called out as such (padding-free DPO needs the prompt to know which
            tokens to score).
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"example must be a mapping of column name to token ids, got {type(example).__name__}")
    if keys is not None:
        keys = tuple(keys)
        if len(keys) != 3 or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"keys must be three str key names (prompt, chosen, rejected), got {keys!r}")
        missing = [k for k in keys if k not in example]
        if missing:
            raise KeyError(f"example has no key(s) {missing}; it has {sorted(example)}")
        return keys  # type: ignore[return-value]
    for candidate in TRL_KEYS:
        if all(k in example for k in candidate):
            return candidate
    if not any(c[0] in example for c in TRL_KEYS) and any(c[1] in example for c in TRL_KEYS):
        raise KeyError(
            "example has tokenized chosen/rejected completions but no prompt (prompt_ids / prompt_input_ids): "
            "preference pairs need the prompt to tell prompt tokens from scored completion tokens; tokenize the "
            f"prompt separately (TRL's DPOTrainer does when the dataset has a 'prompt' column). It has {sorted(example)}")
    raise KeyError(
        "example must hold tokenized prompt/chosen/rejected under TRL's keys "
        f"{TRL_KEYS[0]} or {TRL_KEYS[1]} (or pass keys=...); it has {sorted(example)}")


def shifted_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor, *,
                   position_ids: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Labels for the engine (already shifted) from TRL's unshifted completion mask.

    TRL scores token ``t + 1`` of ``input_ids.masked_fill(completion_mask == 0, -100)`` from position ``t``;
    this returns that same set of tokens at position ``t``. With ``position_ids`` (packed rows), a position
    whose successor starts a new sequence (``position_ids[t + 1] == 0``) is never scored, so no label crosses a
    sequence boundary.

    Args:
        input_ids: (R, L) integer token ids.
        completion_mask: (R, L), nonzero on completion tokens.
        position_ids: (R, L) positions restarting at 0 per sequence, for packed rows; None for padded rows.
        ignore_index: label of unscored positions.

    Returns:
        (R, L) int64 labels; the last column is always ``ignore_index``.
    """
    if input_ids.dim() != 2 or completion_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and completion_mask: expected the same (R, L) shape, got "
                         f"{tuple(input_ids.shape)} and {tuple(completion_mask.shape)}")
    scored = completion_mask[:, 1:] != 0
    if position_ids is not None:
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids: expected shape {tuple(input_ids.shape)}, got {tuple(position_ids.shape)}")
        scored = scored & (position_ids[:, 1:] != 0)
    lab = torch.full(input_ids.shape, ignore_index, dtype=torch.int64, device=input_ids.device)
    lab[:, :-1] = input_ids[:, 1:].to(torch.int64).masked_fill(~scored, ignore_index)
    return lab
