"""Triton row kernels of the fused log-prob engine.

The engine never holds the (B, T, V) logits. It walks the scored tokens in tiles: cuBLAS writes one
tile of logits z (n rows x a vocabulary span, in the input dtype) into a bounded workspace, and these
kernels do everything per row that would otherwise need a full-vocabulary float32 copy:

* ``_logprob_fwd_kernel`` — one program per row of a full-vocabulary tile: applies temperature and
  softcap, runs an online (max, sum-exp) over the V columns in fp32, gathers the label's logit and writes
  ``logp = z[y] - lse`` and ``lse`` (fp32, 8 bytes per token). Traffic: reads n*V*elt bytes once, writes
  8n bytes; no FLOP-heavy work, so it runs at memory speed beside a GEMM that costs 2*n*H*V FLOPs.
* ``_logprob_bwd_kernel`` — one program per (row, column block) of a vocabulary-slice tile: turns the
  recomputed logits into the gradient of the logits *in place*:

      dz_v = g * (onehot(y)_v - softmax(zc)_v) * dzc/dz,   softmax(zc)_v = exp(zc_v - lse)
      zc = cap * tanh(z / cap) / T  ->  dzc/dz = (1 - tanh(z / cap)^2) / T     (zc = z / T without cap)

  (the model's cap first, then the sampling temperature: the order of samplers and TRL)

  Reads and writes n*Vs*elt bytes; the caller then runs cuBLAS for dh = dz @ W_s and dW_s = dz^T @ h.

Both kernels work on any row stride (the tile may be a view into a larger buffer or into user logits)
and use int64 offsets: n * V exceeds 2**31 at real shapes (2048 tokens x 128256 vocab = 2.6e8 per tile,
but row * stride for a 16k-token packed batch is 2.1e9).

The interpreter (TRITON_INTERPRET=1) mishandles bfloat16; tests run these kernels with float32/float16
tiles there, and bfloat16 on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) * (1 - e^{-2|x|}) / (1 + e^{-2|x|}): no overflow for any x (e^{-2|x|} <= 1).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logprob_fwd_kernel(
    # pointers
    z_ptr,  # (n, V) logits tile, any float dtype
    labels_ptr,  # (n,) int64 label of each row, in [0, V)
    logp_ptr,  # (n,) fp32 out: z[y] - lse
    lse_ptr,  # (n,) fp32 out: logsumexp of the (tempered, capped) row
    ent_ptr,  # (n,) fp32 out (WITH_STATS): entropy of the row's softmax
    hit_ptr,  # (n,) fp32 out (WITH_STATS): 1.0 if the label's logit is the row maximum
    zmean_ptr,  # (n,) fp32 out (WITH_STATS): mean over the vocabulary of the (tempered, capped) logits
    lse2_ptr,  # (n,) fp32 out (WITH_STATS): logsumexp(2 z), for WPO's weights
    # shapes
    V,
    # strides
    stride_z_row,
    # scalars
    inv_temp,
    softcap,
    # meta-parameters
    HAS_SOFTCAP: tl.constexpr,
    WITH_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z_row
    cols = tl.arange(0, BLOCK_V)
    # Online logsumexp: keep a per-lane running max m and sum s of exp(z - m); merge lanes at the end.
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)  # WITH_STATS: running sum of exp(z - m) * z, for the entropy
    u = tl.zeros([BLOCK_V], tl.float32)  # WITH_STATS: running sum of z, for the vocab-mean logit
    s2 = tl.zeros([BLOCK_V], tl.float32)  # WITH_STATS: running sum of exp(2 (z - m)), for lse(2z)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + cols
        mask = idx < V
        z = tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = z * inv_temp
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, z)
        # lanes still at -inf (only masked columns so far) must not produce exp(-inf - -inf) = nan
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        s = s * rescale + e
        if WITH_STATS:
            z0 = tl.where(mask, z, 0.0)  # masked lanes: e = 0, and 0 * -inf would be nan
            t = t * rescale + e * z0
            u += z0
            s2 = s2 * rescale * rescale + e * e
        m = m_new
    m_all = tl.max(m, axis=0)
    lane_scale = tl.exp(m - m_all)
    s_all = tl.sum(s * lane_scale, axis=0)
    lse = m_all + tl.log(s_all)
    y = tl.load(labels_ptr + row)
    zy = tl.load(z_row + y).to(tl.float32)
    if HAS_SOFTCAP:
        zy = softcap * _tanh(zy / softcap)
    zy = zy * inv_temp
    tl.store(logp_ptr + row, zy - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_STATS:
        # H = lse - sum_v p_v z_v;  the label is a top-1 hit when its logit is the row maximum
        t_all = tl.sum(t * lane_scale, axis=0)
        tl.store(ent_ptr + row, lse - t_all / s_all)
        tl.store(hit_ptr + row, tl.where(zy >= m_all, 1.0, 0.0))
        tl.store(zmean_ptr + row, tl.sum(u, axis=0) / V)
        tl.store(lse2_ptr + row, 2.0 * m_all + tl.log(tl.sum(s2 * lane_scale * lane_scale, axis=0)))


@triton.jit
def _logprob_bwd_kernel(
    # pointers
    z_ptr,  # (n, Vs) logits tile of vocabulary columns [v_offset, v_offset + Vs)
    dz_ptr,  # (n, Vs) out: gradient of the raw logits (may alias z_ptr)
    labels_ptr,  # (n,) int64 labels in [0, V)
    lse_ptr,  # (n,) fp32 saved logsumexp of each row
    g_ptr,  # (n,) fp32 upstream gradient of each row's log-prob
    # shapes
    n_cols,
    v_offset,
    # strides
    stride_z_row,
    stride_dz_row,
    # scalars
    inv_temp,
    softcap,
    # meta-parameters
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    idx = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = idx < n_cols
    z = tl.load(z_ptr + row * stride_z_row + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        zc = softcap * t * inv_temp
        chain = (1.0 - t * t) * inv_temp  # d zc / d z_raw
    else:
        zc = z * inv_temp
        chain = inv_temp
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    y = tl.load(labels_ptr + row) - v_offset
    p = tl.exp(zc - lse)
    onehot = tl.where(idx == y, 1.0, 0.0)
    dz = g * (onehot - p) * chain
    tl.store(dz_ptr + row * stride_dz_row + idx, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launch variants: the one table that the launchers check their arguments against and that
# tests/test_kernels_compile.py compiles for real GPU targets (so a variant only the interpreter accepts fails CI)

#: dtypes of the logits tiles the engine hands the kernels (float64 runs on the torch backend)
TILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: per kernel: the jit function, its constexpr flags with every value a launch can pass, the GPU block sizes, the tensor dtypes
#: of each variant (forward: the tile; backward: (tile, gradient output), the gradient in the inputs' dtype,
#: also from a float32 tile of 16-bit inputs) and num_warps as a function of the block size
VARIANTS = {
    "fwd": {
        "fn": _logprob_fwd_kernel,
        "flags": {"HAS_SOFTCAP": (False, True), "WITH_STATS": (False, True)},
        "blocks": (4096,),  # 4096 columns per step (16 KB of bf16 in flight); narrower rows are masked
        "dtypes": tuple((d,) for d in TILE_DTYPES),
        "num_warps": lambda block: 8 if block >= 4096 else 4,
    },
    "bwd": {
        "fn": _logprob_bwd_kernel,
        "flags": {"HAS_SOFTCAP": (False, True)},
        "blocks": (1024,),  # the backward's 2-D grid: 1024-column blocks
        "dtypes": tuple((d, d) for d in TILE_DTYPES) + ((torch.float32, torch.float16),
                                                         (torch.float32, torch.bfloat16)),
        "num_warps": lambda block: 4,
    },
}


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_meta(kernel: str, n_cols: int, dtypes: tuple, **flags) -> dict:
    """Constexpr kwargs (flags + BLOCK_V + num_warps) for a launch, checked against :data:`VARIANTS`.

    Raises AssertionError for a flag, value or dtype combination the table does not list: every launch is a
    variant the compile test covers. Interpreted runs (CPU tests) use wide blocks instead, since an
    interpreted program costs per program, not per lane.
    """
    spec = VARIANTS[kernel]
    assert set(flags) == set(spec["flags"]), (kernel, sorted(flags))
    assert all(flags[k] in spec["flags"][k] for k in flags), (kernel, flags)
    assert dtypes in spec["dtypes"], (kernel, dtypes)
    if _interpreting():
        block = min(8192, max(16, triton.next_power_of_2(n_cols)))
    else:
        block = next((b for b in spec["blocks"] if n_cols <= b), spec["blocks"][-1])
    return {**flags, "BLOCK_V": block, "num_warps": spec["num_warps"](block)}


def logprob_fwd(z: torch.Tensor, labels: torch.Tensor, temperature: float, softcap: float | None,
                stats: bool = False):
    """Row log-probs of a full-vocabulary logits tile.

    Args:
        z: (n, V) logits, float32/bfloat16/float16, unit column stride.
        labels: (n,) int64 in [0, V).
        temperature: divides the (capped) logits. softcap: cap c (c * tanh(z / c)) applied first, or None.
        stats: also return per-row entropy, top-1 hit, vocab-mean logit (the token metrics) and
            logsumexp(2 zc) (WPO's weights).
    Returns:
        (logp, lse, stats): (n,) float32 tensors, and ``stats`` = (entropy, hit, zmean, lse2), (n,) float32
        each, or None.
    """
    n, V = z.shape
    assert z.stride(1) == 1 and labels.dtype == torch.int64
    f32 = dict(dtype=torch.float32, device=z.device)
    logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    st = tuple(torch.empty(n if stats else 0, **f32) for _ in range(4))  # entropy, hit, zmean, lse2
    if n > 0:
        meta = launch_meta("fwd", V, (z.dtype,), HAS_SOFTCAP=softcap is not None, WITH_STATS=bool(stats))
        _logprob_fwd_kernel[(n,)](
            z, labels, logp, lse, *st,
            V,
            z.stride(0),
            1.0 / temperature, float(softcap or 1.0),
            **meta,
        )
    return logp, lse, (st if stats else None)


def logprob_bwd(
    z: torch.Tensor,
    out: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    v_offset: int,
    temperature: float,
    softcap: float | None,
) -> torch.Tensor:
    """Gradient of the raw logits tile ``z`` (columns ``v_offset..v_offset+Vs``) written into ``out``.

    Args:
        z: (n, Vs) logits tile; out: (n, Vs) destination (``z`` itself, or a 16-bit tile for a float32 ``z``),
            unit column strides.
        labels: (n,) int64; lse, g: (n,) float32.
        temperature, softcap: as in :func:`logprob_fwd`.
    Returns:
        ``out``.
    """
    n, Vs = z.shape
    assert z.stride(1) == 1 and out.stride(1) == 1 and out.shape == z.shape
    if n == 0 or Vs == 0:
        return out
    meta = launch_meta("bwd", Vs, (z.dtype, out.dtype), HAS_SOFTCAP=softcap is not None)
    grid = (n, triton.cdiv(Vs, meta["BLOCK_V"]))
    _logprob_bwd_kernel[grid](
        z, out, labels, lse, g,
        Vs, v_offset,
        z.stride(0), out.stride(0),
        1.0 / temperature, float(softcap or 1.0),
        **meta,
    )
    return out
