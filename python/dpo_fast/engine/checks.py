"""Input checks shared by every layer's entry points (engine, public log-prob functions, fused modules, hf).

Every error names the argument and what was expected. This is the lowest layer that validates, so anything
above the engine imports its checks from here.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, dims: tuple[int, ...] | None = None, floating: bool | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}: expected a {want} tensor, got {_desc(t)}")
    if floating is True and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor (float32, bfloat16, float16 or float64), got {_desc(t)}")
    if floating is False and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor (int64 or int32), got {_desc(t)}")


def check_ignore_index(ignore_index) -> None:
    """``ignore_index`` must be a plain int (not a bool)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")


def check_scalars(temperature, softcap) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float > 0, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap: expected None or a float > 0, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap: expected None or a finite float > 0, got {softcap}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected a tensor on {first_name}'s device {first.device}, got device {t.device}"
            )


def as_cu_seqlens(cu_seqlens, device=None):
    """``cu_seqlens`` as a tensor: tensors pass through unchanged; a list/tuple of ints or a numpy integer
    array becomes an int64 tensor on ``device``. Anything else raises a TypeError naming ``cu_seqlens``."""
    if cu_seqlens is None or isinstance(cu_seqlens, torch.Tensor):
        return cu_seqlens
    expected = "a 1-D integer torch.Tensor (or a list or numpy array of ints) of S+1 sequence boundaries"
    if type(cu_seqlens).__module__ == "numpy" and hasattr(cu_seqlens, "dtype"):
        if cu_seqlens.dtype.kind not in "iu":
            raise TypeError(f"cu_seqlens: expected {expected}, got a numpy array of dtype {cu_seqlens.dtype}")
        if cu_seqlens.dtype.kind == "u" and cu_seqlens.size and int(cu_seqlens.max()) > 2**63 - 1:
            raise ValueError(f"cu_seqlens: expected boundaries < 2**63, got {int(cu_seqlens.max())}")
        return torch.tensor(cu_seqlens.astype("int64"), dtype=torch.int64, device=device)
    if isinstance(cu_seqlens, (list, tuple)):
        for i, v in enumerate(cu_seqlens):
            if isinstance(v, bool) or not (isinstance(v, int) or type(v).__module__ == "numpy"
                                           and getattr(getattr(v, "dtype", None), "kind", "") in "iu"):
                raise TypeError(f"cu_seqlens: expected {expected}, got {type(v).__name__} {v!r} at index {i}")
        try:
            return torch.tensor([int(v) for v in cu_seqlens], dtype=torch.int64, device=device)
        except RuntimeError as e:  # out of int64 range
            raise ValueError(f"cu_seqlens: expected boundaries that fit int64 ({e})") from None
    raise TypeError(f"cu_seqlens: expected {expected}, got {type(cu_seqlens).__name__}")


def check_cu_seqlens(cu_seqlens, n_tokens: int, *, host=None, values: bool = True) -> int:
    """Validate packed boundaries; returns the number of sequences S. One host sync (small tensor), none when
    ``host`` (an int64 CPU copy of the boundaries, e.g. from the engine's one readback) is given or with
    ``values=False`` (dtype and shape only: the engine checks the values on its readback's copy)."""
    cu_seqlens = as_cu_seqlens(cu_seqlens)
    check_tensor("cu_seqlens", cu_seqlens, dims=(1,), floating=False)
    if cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens: expected at least 2 entries [0, ..., N] (one sequence or more), got {_desc(cu_seqlens)}"
        )
    if not values:
        return cu_seqlens.numel() - 1
    cu = cu_seqlens.detach().to("cpu", torch.int64) if host is None else host
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {int(cu[0])}")
    if bool((cu[1:] < cu[:-1]).any()):
        bad = int(torch.nonzero(cu[1:] < cu[:-1])[0, 0])
        raise ValueError(
            f"cu_seqlens: expected non-decreasing boundaries, got cu_seqlens[{bad + 1}]={int(cu[bad + 1])} "
            f"< cu_seqlens[{bad}]={int(cu[bad])}"
        )
    if int(cu[-1]) != n_tokens:
        raise ValueError(
            f"cu_seqlens: expected the last entry to equal the number of tokens N={n_tokens}, got {int(cu[-1])}"
        )
    return cu.numel() - 1


def cu_seqlens_tensor(cu_seqlens, n_tokens: int, device=None):
    """The one conversion of a ``cu_seqlens`` argument for entry points that use it before the engine does:
    a tensor, list/tuple of ints or numpy integer array becomes a tensor on ``device`` (tensors keep their
    integer dtype; lists and arrays become int64), validated as 1-D integer boundaries with
    ``cu[0] == 0``, non-decreasing, ``cu[-1] == n_tokens`` (errors name ``cu_seqlens``). None stays None.
    The caller's object is never modified."""
    if cu_seqlens is None:
        return None
    cu = as_cu_seqlens(cu_seqlens, device)
    check_cu_seqlens(cu, n_tokens)
    return cu if device is None else cu.to(device)


def check_labels_range(labels_scored: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """labels_scored: the labels at scored positions (already != ignore_index)."""
    if labels_scored.numel() == 0:
        return
    bad = (labels_scored < 0) | (labels_scored >= vocab)
    if bool(bad.any()):
        value = int(labels_scored[bad][0])
        raise ValueError(
            f"labels: expected values in [0, {vocab}) (the vocabulary size, weight.shape[0]) or "
            f"ignore_index={ignore_index}; found {value}"
        )


def check_engine_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index, temperature, softcap,
                        cu_values: bool = True):
    """Validate engine inputs. Returns (S, T) where T is the padded row length (None when packed).

    ``cu_values=False``: check ``cu_seqlens``' dtype and shape only; the caller validates its values
    (:func:`dpo_fast.engine.prepare` does, on the copy its one host sync brings).

    ``cu_seqlens`` may be a tensor, a list of ints or a numpy integer array (see :func:`as_cu_seqlens`).
    """
    check_tensor("hidden", hidden, dims=(2, 3), floating=True)
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden: expected a non-empty last (hidden) dimension H = hidden.shape[-1] >= 1, "
                         f"got {_desc(hidden)}")
    cu_seqlens = as_cu_seqlens(cu_seqlens, hidden.device)
    check_tensor("weight", weight, dims=(2,), floating=True)
    check_tensor("labels", labels, floating=False)
    if bias is not None:
        check_tensor("bias", bias, dims=(1,), floating=True)
    check_ignore_index(ignore_index)
    check_scalars(temperature, softcap)
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias, cu_seqlens=cu_seqlens)
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight: expected the same dtype as hidden ({hidden.dtype}), got {weight.dtype}; cast one of them"
        )
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias: expected the same dtype as hidden ({hidden.dtype}), got {bias.dtype}")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(
            f"weight: expected shape (V, H) with H={H} matching hidden.shape[-1], got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight: expected a non-empty vocabulary, got V=0")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias: expected shape ({weight.shape[0]},) matching weight's V, got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), got {tuple(labels.shape)}"
        )
    if cu_seqlens is not None:
        if hidden.dim() != 2:
            raise ValueError(
                f"hidden: expected a packed (N, H) tensor when cu_seqlens is given, got {_desc(hidden)}"
            )
        S = check_cu_seqlens(cu_seqlens, hidden.shape[0], values=cu_values)
        T = None
    else:
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden: expected (B, T, H), or (N, H) together with cu_seqlens, got {_desc(hidden)}"
            )
        S, T = hidden.shape[0], hidden.shape[1]
        if T == 0:
            raise ValueError(f"hidden: expected T >= 1 positions per row, got {_desc(hidden)}")
    if S == 0 or hidden.shape[0] == 0:
        raise ValueError(f"hidden: empty batch (no sequences), got {_desc(hidden)}")
    return S, T
