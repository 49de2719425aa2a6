"""Logits tiles: the GEMM that writes one into the workspace, and the workspace accounting.

A tile is an (n, v) view at the start of a flat workspace buffer: n scored tokens x a vocabulary span.
The engine sizes n and v so that ``n * v * per_elem_bytes(rows, dtype)`` stays within the workspace budget
(:mod:`dpo_fast.engine.workspace`). A tile is in :func:`tile_dtype` of the inputs: float32 for float16
inputs (whose logits could exceed float16's 65504) and, with exact logits on, for bfloat16.
"""

from __future__ import annotations

import torch

from .rows import RowOps
from .workspace import get_exact_logits


def tile_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logits tiles for inputs of ``dtype``.

    float16 -> float32 (always: float16 logits overflow to inf above 65504); bfloat16 -> bfloat16, or
    float32 with :func:`dpo_fast.set_exact_logits`; float32/float64 -> themselves.
    """
    if dtype == torch.float16 or (dtype == torch.bfloat16 and get_exact_logits()):
        return torch.float32
    return dtype


#: bytes of float32 temporaries per block of the CPU 16-bit GEMM paths
_CPU_BLOCK_BYTES = 8 << 20


def _cpu_16bit(t: torch.Tensor) -> bool:
    """CPU tensor in float16/bfloat16: torch's CPU GEMMs in these dtypes are 2-40x slower than in float32
    (measured on the 2-core CI machines, worst for (n, V) @ (V, H)), so the engine upcasts blocks instead."""
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)


def linear_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """out (n, v) = h (n, H) @ w (v, H)^T (+ b (v,)) with fp32 accumulation. Returns out.

    ``out`` is in the inputs' dtype, or float32 for 16-bit inputs (:func:`tile_dtype`): then cuBLAS writes
    its fp32 accumulator directly (``out_dtype``) where available. On CPU, 16-bit inputs always run as float32
    GEMMs on upcast blocks of at most 8 MiB of ``w`` (much faster than torch's 16-bit CPU GEMM), rounded once
    into a 16-bit ``out``.
    """
    if out.dtype == h.dtype and not _cpu_16bit(h):
        if b is None:
            return torch.mm(h, w.t(), out=out)
        return torch.addmm(b, h, w.t(), out=out)
    if out.dtype != h.dtype and _mm_out_dtype_ok(h.device, h.dtype):
        torch.mm(h, w.t(), out_dtype=out.dtype, out=out)
        if b is not None:
            out.add_(b)
        return out
    hf = h.to(torch.float32)
    V = w.shape[0]
    step = max(1, min(V, _CPU_BLOCK_BYTES // max(1, w.shape[1] * 4)))
    for v0 in range(0, V, step):
        v1 = min(V, v0 + step)
        wb = w[v0:v1].to(torch.float32)
        if out.dtype == torch.float32:
            if b is None:
                torch.mm(hf, wb.t(), out=out[:, v0:v1])
            else:
                torch.addmm(b[v0:v1].to(torch.float32), hf, wb.t(), out=out[:, v0:v1])
        else:  # 16-bit tile on CPU: one rounding of the fp32 block
            blk = hf @ wb.t() if b is None else torch.addmm(b[v0:v1].to(torch.float32), hf, wb.t())
            out[:, v0:v1].copy_(blk)
    return out


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (m, j) @ b (j, k) with fp32 accumulation, into ``out`` (m, k) when given, in the operands' dtype.

    ``torch.mm`` except for 16-bit operands on CPU: float32 GEMMs on upcast blocks (at most ~8 MiB of float32
    temporaries each), one rounding per output element.
    """
    if not _cpu_16bit(a):
        return torch.mm(a, b, out=out)
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    _cpu_addmm_f32(a, b, out=out)
    return out


def _cpu_addmm_f32(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None,
                   acc: torch.Tensor | None = None, round_to: torch.dtype | None = None) -> None:
    """out = a @ b (rounded once to out's dtype) or acc (float32) += a @ b (the product first rounded to
    ``round_to`` when given, as a 16-bit GEMM would), as float32 GEMMs on upcast blocks."""
    m, j = a.shape
    k = b.shape[1]
    rb = max(16, min(m, _CPU_BLOCK_BYTES // (4 * max(k, 1))))  # output rows per block: rb x k float32
    jb = max(16, min(j, _CPU_BLOCK_BYTES // (4 * max(k, rb))))  # inner block: jb x k and rb x jb float32
    for r0 in range(0, m, rb):
        r1 = min(m, r0 + rb)
        direct = acc is not None and round_to is None
        part = acc[r0:r1] if direct else torch.zeros(r1 - r0, k, dtype=torch.float32)
        for j0 in range(0, j, jb):
            j1 = min(j, j0 + jb)
            part.addmm_(a[r0:r1, j0:j1].to(torch.float32), b[j0:j1].to(torch.float32))
        if acc is None:
            out[r0:r1].copy_(part)
        elif not direct:
            acc[r0:r1] += part.to(round_to)


_MM_OUT_OK: dict[tuple, bool] = {}


def _mm_out_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=float32, out=...)`` works and agrees on (device, dtype); CUDA only."""
    key = (device, dtype)
    ok = _MM_OUT_OK.get(key)
    if ok is None:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                a = torch.randn(40, 24, generator=g).to(device, dtype)
                b = torch.randn(56, 24, generator=g).to(device, dtype)
                got = torch.empty(40, 56, device=device)
                torch.mm(a, b.t(), out_dtype=torch.float32, out=got)
                ok = bool(torch.allclose(got, a.float() @ b.float().t(), rtol=1e-3, atol=1e-2))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _MM_OUT_OK[key] = ok
    return ok


def tile(buf: torch.Tensor, n: int, v: int) -> torch.Tensor:
    """A contiguous (n, v) view at the start of a flat workspace buffer ``buf`` (at least n*v elements)."""
    return buf[: n * v].view(n, v)


def per_elem_bytes(rows: RowOps, dtype: torch.dtype, *, grad: bool = False) -> int:
    """Workspace bytes per logits-tile element for inputs of ``dtype``.

    The tile itself (in :func:`tile_dtype`), the backend's temporaries and, with ``grad`` when the tile is
    wider than the inputs, the input-dtype copy of the logits gradient that the dh/dW GEMMs read.
    """
    t = tile_dtype(dtype)
    return t.itemsize + rows.bytes_per_elem + (dtype.itemsize if grad and t != dtype else 0)


_EPILOGUE_OK: dict[tuple, bool] = {}


def epilogue_probe_results() -> dict[str, bool]:
    """{"device/dtype": whether the fp32 addmm epilogue is used} for the probes run so far (for gpu_check)."""
    out = {f"{d}/{t}": v for (d, t), v in _EPILOGUE_OK.items()}
    out.update({f"mm out_dtype {d}/{t}": v for (d, t), v in _MM_OUT_OK.items()})
    return out


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
    elif _cpu_16bit(a):
        # as below (the product rounded once to 16 bits, then added), but as fp32 GEMMs on upcast blocks
        _cpu_addmm_f32(a, b, acc=acc, round_to=a.dtype)
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
