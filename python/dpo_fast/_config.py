"""The one memory knob of the engine: the workspace budget.

Every pass of the engine works on a bounded tile of logits (tokens x vocabulary slice). The tile size is
derived from a single number, the *workspace budget in bytes*: the most memory the engine's temporaries
(the logits tile, its float32 copies on the torch backend) may take at once. It never allocates (B, T, V).

Set it with :func:`set_workspace_bytes` or the environment variable ``DPO_FAST_WORKSPACE_BYTES`` (read
when the engine first runs, not at import). Defaults: 256 MiB on CUDA, 32 MiB on CPU. Larger tiles mean
bigger, more efficient GEMMs; below ~64 MiB on a GPU the GEMMs get too thin to run at full speed.
"""

from __future__ import annotations

import os

import torch

_DEFAULTS = {"cuda": 256 << 20, "cpu": 32 << 20}
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
