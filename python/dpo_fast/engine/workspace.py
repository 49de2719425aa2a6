"""The one memory knob of the engine: the workspace budget.

Every pass of the engine works on a bounded tile of logits (tokens x vocabulary slice). The tile size is
derived from a single number, the *workspace budget in bytes*: the most memory the engine's temporaries
(the logits tile, its float32 copies on the torch backend) may take at once. It never allocates (B, T, V).

Set it with :func:`dpo_fast.set_workspace_bytes` or the environment variable ``DPO_FAST_WORKSPACE_BYTES`` (read
when the engine first runs, not at import). Defaults: 96 MiB on CUDA, 32 MiB on CPU. Larger tiles mean
bigger GEMMs; at 96 MiB and an 8B model's head (H 4096, V 128256, bf16) the forward tile is ~390 tokens x
the full vocabulary and the backward slices are ~4k vocabulary columns x all scored tokens — GEMMs of
0.3+ TFLOP each, still large enough for full speed, while the no-grad forward stays under 0.1 GiB.

Peak memory of a generic forward+backward beyond inputs and the gradients it returns, with N scored tokens
among M positions and s bytes per input element: budget + N*H*(s + 4) + 64*M bytes (the gathered scored
hidden rows, the fp32 dh accumulator when the vocabulary is split into several slices, the O(M) index
vectors); the split-token backward's fp32 dW slice buffer is inside the budget. On CPU, 16-bit inputs add
the GEMMs' float32 upcast blocks (at most 2*budget + N*H*4 + 16*1024*H bytes). docs/DESIGN.md has the
derivation; tests/engine/test_memory.py checks it. The fused ``DPOLoss`` holds the logits of a group of whole pairs
instead (its own ``workspace_bytes``, default 8 x this budget).

The second knob is the tile precision (:func:`set_exact_logits`, or ``DPO_FAST_EXACT_LOGITS=1``). float16
inputs always get float32 tiles (float16 logits would overflow to inf above 65504); bfloat16 tiles are
bfloat16 by default (the GEMM accumulates in fp32, then the logits are rounded to bf16's 8-bit mantissa) and
float32 with exact logits on: twice the bytes per tile element, so tiles hold half the tokens within the
same budget.
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


_exact_override: bool | None = None


def set_exact_logits(enabled: bool | None) -> None:
    """Opt in to float32 logits tiles for bfloat16 inputs (``None`` restores the default, off).

    The GEMMs still read bfloat16 operands and accumulate in fp32; only the rounding of each logit to bf16
    before the row pass is skipped. float16 inputs always use float32 tiles. Applies from the next call.

    Args:
        enabled: True, False, or None.
    """
    global _exact_override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool or None, got {type(enabled).__name__}")
    _exact_override = enabled


def get_exact_logits() -> bool:
    """Whether bfloat16 inputs get float32 logits tiles (:func:`set_exact_logits`, ``DPO_FAST_EXACT_LOGITS``)."""
    if _exact_override is not None:
        return _exact_override
    env = os.environ.get("DPO_FAST_EXACT_LOGITS", "").strip()
    if env in ("", "0"):
        return False
    if env == "1":
        return True
    raise ValueError(f"DPO_FAST_EXACT_LOGITS: expected 0 or 1, got {env!r}")
