"""Logits tiles: the GEMM that writes one into the workspace, and the workspace accounting.

A tile is an (n, v) view at the start of a flat workspace buffer: n scored tokens x a vocabulary span.
The engine sizes n and v so that ``n * v * per_elem_bytes(rows, dtype)`` stays within the workspace budget
(:mod:`dpo_fast.engine.workspace`).
"""

from __future__ import annotations

import torch

from .rows import RowOps


def linear_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """out (n, v) = h (n, H) @ w (v, H)^T (+ b (v,)), in the input dtype with fp32 accumulation. Returns out."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def tile(buf: torch.Tensor, n: int, v: int) -> torch.Tensor:
    """A contiguous (n, v) view at the start of a flat workspace buffer ``buf`` (at least n*v elements)."""
    return buf[: n * v].view(n, v)


def per_elem_bytes(rows: RowOps, dtype: torch.dtype) -> int:
    """Workspace bytes per logits-tile element: the tile itself (``dtype``) plus the backend's temporaries."""
    return dtype.itemsize + rows.bytes_per_elem


_EPILOGUE_OK: dict[tuple, bool] = {}


def epilogue_probe_results() -> dict[str, bool]:
    """{"device/dtype": whether the fp32 addmm epilogue is used} for the probes run so far (for gpu_check)."""
    return {f"{d}/{t}": v for (d, t), v in _EPILOGUE_OK.items()}


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (m, k) float32 += a (m, j) @ b (j, k) with 16-bit a, b.

    On CUDA, cuBLAS can add the fp32 product into ``acc`` in its epilogue (``addmm(..., out_dtype=float32)``),
    with no 16-bit temporary and no extra pass over (m, k). That overload is recent, so it is probed once per
    (device, dtype) against the plain route on a small problem, and used only if it exists and agrees.
    """
    key = (acc.device, a.dtype)
    ok = _EPILOGUE_OK.get(key)
    if ok is None:
        ok = _EPILOGUE_OK[key] = _probe_epilogue(acc.device, a.dtype)
    if ok:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b))  # 16-bit product, added into fp32 without an fp32 temporary


def _probe_epilogue(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda":
        return False  # the dtype overload is CUDA-only
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(96, 80, generator=g).to(device, dtype)
        b = torch.randn(80, 72, generator=g).to(device, dtype)
        c = torch.randn(96, 72, generator=g).to(device)
        expect = c + a.float() @ b.float()
        got = c.clone()
        torch.addmm(got, a, b, out_dtype=torch.float32, out=got)
        return bool(torch.allclose(got, expect, rtol=1e-3, atol=1e-2))
    except (RuntimeError, TypeError, NotImplementedError):
        return False
