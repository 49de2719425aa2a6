"""The one memory knob of the engine: the workspace budget.

Every pass of the engine works on a bounded tile of logits (tokens x vocabulary slice). The tile size is
derived from a single number, the *workspace budget in bytes*: the most memory the engine's temporaries
(the logits tile, its float32 copies on the torch backend) may take at once. It never allocates (B, T, V).

Set it with :func:`dpo_fast.set_workspace_bytes` or the environment variable ``DPO_FAST_WORKSPACE_BYTES`` (read
when the engine first runs, not at import). Defaults: 96 MiB on CUDA, 32 MiB on CPU. Larger tiles mean
bigger GEMMs; at 96 MiB and an 8B model's head (H 4096, V 128256, bf16) the forward tile is ~390 tokens x
the full vocabulary and the backward slices are ~4k vocabulary columns x all scored tokens — GEMMs of
0.3+ TFLOP each, still large enough for full speed, while the no-grad forward stays under 0.1 GiB.

Peak memory of a generic forward+backward beyond inputs and the gradients it returns, with N scored tokens:
budget + N*H*(2 + 4) bytes (the gathered scored hidden rows, and an fp32 dh accumulator when the vocabulary
is split into several slices and inputs are 16-bit) + small O(N) vectors. The fused ``DPOLoss`` holds the
logits of a group of whole pairs instead (its own ``workspace_bytes``, default 8 x this budget).
"""

from __future__ import annotations

import os

import torch

_DEFAULTS = {"cuda": 96 << 20, "cpu": 32 << 20}
_MIN_BYTES = 1024  # tests use tiny budgets to force many tiles
_override: int | None = None


def set_workspace_bytes(nbytes: int | None) -> None:
    """Set the engine's workspace budget in bytes for every device (``None`` restores the defaults).

    Args:
        nbytes: budget in bytes (at least 1024), or None.
    """
    global _override
    if nbytes is None:
        _override = None
        return
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes: expected an int number of bytes or None, got {type(nbytes).__name__}")
    if nbytes < _MIN_BYTES:
        raise ValueError(f"nbytes: expected at least {_MIN_BYTES} bytes, got {nbytes}")
    _override = nbytes


def get_workspace_bytes(device: torch.device | str | None = None) -> int:
    """The workspace budget in bytes that the engine uses on ``device`` (default: CPU)."""
    if _override is not None:
        return _override
    env = os.environ.get("DPO_FAST_WORKSPACE_BYTES")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"DPO_FAST_WORKSPACE_BYTES: expected an integer number of bytes, got {env!r}") from None
        if value < _MIN_BYTES:
            raise ValueError(f"DPO_FAST_WORKSPACE_BYTES: expected at least {_MIN_BYTES}, got {value}")
        return value
    kind = torch.device(device).type if device is not None else "cpu"
    return _DEFAULTS.get(kind, _DEFAULTS["cuda"])
