"""Logits tiles: the GEMM that writes one into the workspace, and the workspace accounting.

A tile is an (n, v) view at the start of a flat workspace buffer: n scored tokens x a vocabulary span.
The engine sizes n and v so that ``n * v * per_elem_bytes(rows, dtype)`` stays within the workspace budget
(:mod:`dpo_fast.engine.workspace`). A tile is in :func:`tile_dtype` of the inputs: float32 for float16
inputs (whose logits could exceed float16's 65504) and, with exact logits on, for bfloat16.
"""

from __future__ import annotations

import contextlib

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
    # float32 blocks of W of at most 8 MiB (64 MiB on an accelerator) and, on CPU, at most the tile's own
    # float32 size: the upcast copies stay within the workspace's order of magnitude at any budget
    block = _block_bytes(h.device) if h.device.type != "cpu" else min(_CPU_BLOCK_BYTES, max(1 << 16, out.numel() * 4))
    step = max(1, min(V, block // max(1, w.shape[1] * 4)))
    with _exact_tf32(h):
        _upcast_linear(out, hf, w, b, step)
    return out


def _upcast_linear(out, hf, w, b, step) -> None:
    V = w.shape[0]
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


#: bytes of float32 upcast blocks per GEMM on an accelerator without the fp32-output GEMM: large enough that
#: the blocks stay big GEMMs (512 rows of W at H 4096 with the CPU's 8 MiB was ~10x slower than cuBLAS's bf16)
_GPU_BLOCK_BYTES = 64 << 20


def _block_bytes(device: torch.device) -> int:
    return _CPU_BLOCK_BYTES if device.type == "cpu" else _GPU_BLOCK_BYTES


@contextlib.contextmanager
def _exact_tf32(t: torch.Tensor):
    """TF32 math for float32 GEMMs on upcast 16-bit operands (CUDA only), restored afterwards.

    Exact: every bfloat16 (8-bit exponent, 7-bit mantissa) and float16 (5-bit exponent, 10-bit mantissa)
    value is a TF32 value (8-bit exponent, 10-bit mantissa), so TF32 tensor cores form the same products as
    a 16-bit GEMM and accumulate them in fp32 — at about half the bf16 rate instead of the fp32 rate.
    """
    if t.device.type != "cuda" or t.dtype not in (torch.float16, torch.bfloat16):
        yield
        return
    m = torch.backends.cuda.matmul
    # the fp32_precision API only: reading the legacy allow_tf32 after the new API was used raises in torch 2.9+
    name, on = ("fp32_precision", "tf32") if hasattr(torch.backends, "fp32_precision") else ("allow_tf32", True)
    prev = getattr(m, name)
    setattr(m, name, on)
    try:
        yield
    finally:
        setattr(m, name, prev)


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
                   acc: torch.Tensor | None = None, round_to: torch.dtype | None = None,
                   block: int = _CPU_BLOCK_BYTES) -> None:
    """out = a @ b (rounded once to out's dtype) or acc (float32) += a @ b (the product first rounded to
    ``round_to`` when given, as a 16-bit GEMM would), as float32 GEMMs on upcast blocks of ``block`` bytes."""
    m, j = a.shape
    k = b.shape[1]
    rb = max(16, min(m, block // (4 * max(k, 1))))  # output rows per block: rb x k float32
    jb = max(16, min(j, block // (4 * max(k, rb))))  # inner block: jb x k and rb x jb float32
    for r0 in range(0, m, rb):
        r1 = min(m, r0 + rb)
        direct = acc is not None and round_to is None
        part = acc[r0:r1] if direct else torch.zeros(r1 - r0, k, dtype=torch.float32, device=a.device)
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


def per_elem_bytes(rows: RowOps, dtype: torch.dtype, *, grad: bool = False,
                   tile_dt: torch.dtype | None = None) -> int:
    """Workspace bytes per logits-tile element for inputs of ``dtype``.

    The tile itself (in ``tile_dt``, default :func:`tile_dtype` — a backward passes the forward's), the
    backend's temporaries and, with ``grad`` when the tile is wider than the inputs, the input-dtype copy of
    the logits gradient that the dh/dW GEMMs read.
    """
    t = tile_dtype(dtype) if tile_dt is None else tile_dt
    return t.itemsize + rows.bytes_per_elem + (dtype.itemsize if grad and t != dtype else 0)


#: GEMM row granularity: tensor-core GEMM tiles are 64-256 rows (128 the common one); a token chunk of
#: 392 rows runs as 4 tiles of 128 with 120 of the 512 rows wasted, 384 rows as 3 full ones
ROW_ALIGN = 128


def tile_rows(fit: int, n: int) -> int:
    """Rows of a token chunk: at most ``fit`` (what the budget allows) and ``n`` (the tokens); rounded down to
    a multiple of :data:`ROW_ALIGN` when the chunk is smaller than ``n`` and at least that large."""
    rows = max(1, min(n, fit))
    if rows < n and rows >= ROW_ALIGN:
        rows -= rows % ROW_ALIGN
    return rows


_EPILOGUE_OK: dict[tuple, bool] = {}


def epilogue_probe_results() -> dict[str, bool]:
    """{"device/dtype": whether the fp32 addmm epilogue is used} for the probes run so far (for gpu_check)."""
    out = {f"{d}/{t}": v for (d, t), v in _EPILOGUE_OK.items()}
    out.update({f"mm out_dtype {d}/{t}": v for (d, t), v in _MM_OUT_OK.items()})
    return out


def gemm_path(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Which path the engine's fp32-output GEMMs on 16-bit operands take on ``device`` (probing it once):
    {"fp32 logits": ..., "fp32 accumulate": ...}, each one of

    - ``"cublas out_dtype"``: cuBLAS writes (``mm(..., out_dtype=float32)``) or adds (``addmm(...,
      out_dtype=float32)``, the epilogue) the fp32 product of the 16-bit operands: the fast path;
    - ``"tf32 upcast blocks"``: TF32 GEMMs on float32 copies of blocks of the operands (exact: 16-bit values
      are TF32 values; about half the 16-bit GEMM rate), when that overload is missing or wrong;
    - ``"fp32 upcast blocks"``: float32 GEMMs on upcast blocks (the CPU path: faster than torch's 16-bit CPU
      GEMM); for "fp32 accumulate" on CPU the product is rounded once to 16 bits before it is added.

    "fp32 logits" is the forward tile for float16 (always) and bfloat16 with exact logits; "fp32 accumulate"
    the dh / dW accumulation over vocabulary slices, token chunks or fused groups.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    fallback = "tf32 upcast blocks" if device.type == "cuda" else "fp32 upcast blocks"
    logits = "cublas out_dtype" if _mm_out_dtype_ok(device, dtype) else fallback
    key = (device, dtype)
    if key not in _EPILOGUE_OK:
        _EPILOGUE_OK[key] = _probe_epilogue(device, dtype)
    return {"fp32 logits": logits, "fp32 accumulate": "cublas out_dtype" if _EPILOGUE_OK[key] else fallback}


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
        # the product rounded once to 16 bits, then added, as fp32 GEMMs on upcast blocks
        _cpu_addmm_f32(a, b, acc=acc, round_to=a.dtype)
    elif a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        with _exact_tf32(a):  # exact products, fp32 accumulation into acc: TF32 GEMMs on upcast blocks
            _cpu_addmm_f32(a, b, acc=acc, block=_GPU_BLOCK_BYTES)
    else:
        acc.add_(torch.mm(a, b))  # product in the operands' dtype, added into fp32


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
