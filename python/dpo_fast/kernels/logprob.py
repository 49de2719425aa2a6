"""Triton row kernels of the fused log-prob engine.

The engine never holds the (B, T, V) logits. It walks the scored tokens in tiles: cuBLAS writes one
tile of logits z (n rows x a vocabulary span, in the input dtype) into a bounded workspace, and these
kernels do everything per row that would otherwise need a full-vocabulary float32 copy:

* ``_logprob_fwd_kernel`` — one program per row of a full-vocabulary tile: applies temperature and
  softcap, runs an online (max, sum-exp) over the V columns in fp32, gathers the label's logit and writes
  ``logp = z[y] - lse`` and ``lse`` (fp32, 8 bytes per token). Traffic: reads n*V*elt bytes once, writes
  8n bytes; no FLOP-heavy work, so it runs at memory speed beside a GEMM that costs 2*n*H*V FLOPs.
  Instruction diet (the SASS is read back by compile_check): exponentials in base 2 with log2 e folded
  into the temperature scale (one FFMA + one MUFU.EX2 per element, flush-to-zero), one maximum per block
  (a scalar: the per-lane sums rescale by one scalar factor, and only when it grows), unmasked loads
  except in the last block, softcap's tanh from one exp2 and one approximate reciprocal.
* ``_logprob_bwd_kernel`` — one program per (row, column block) of a vocabulary-slice tile: turns the
  recomputed logits into the gradient of the logits *in place*:

      dz_v = g * (onehot(y)_v - softmax(zc)_v) * dzc/dz,   softmax(zc)_v = exp(zc_v - lse)
      zc = cap * tanh(z / cap) / T  ->  dzc/dz = (1 - tanh(z / cap)^2) / T     (zc = z / T without cap)

  (the model's cap first, then the sampling temperature: the order of samplers and TRL)

  Reads and writes n*Vs*elt bytes; the caller then runs cuBLAS for dh = dz @ W_s and dW_s = dz^T @ h.

Precision: as the float32 formulas they replace (tests compare against float64): the exponent arguments
are formed in one rounding, lse is assembled in natural units (m + ln2 log2 s, with the base-2 shift's
rounding added back), tanh keeps relative precision ((1 - e) q with e <= 1, no overflow at +-inf) and
1 - tanh^2 = 4 e q^2 has no cancellation. NaN stays in its row (nan - max is nan); -inf logits get
probability 0.

Both kernels work on any row stride (the tile may be a view into a larger buffer or into user logits)
and use int64 offsets: n * V exceeds 2**31 at real shapes (2048 tokens x 128256 vocab = 2.6e8 per tile,
but row * stride for a 16k-token packed batch is 2.1e9).

The interpreter (TRITON_INTERPRET=1) mishandles bfloat16; tests run these kernels with float32/float16
tiles there, and bfloat16 on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# PTX fast paths (flush-to-zero exp2, approximate reciprocal) on NVIDIA GPUs; the interpreter cannot run inline
# PTX, so there (and on ROCm) the same formulas use tl.exp2 and a division.
_PTX: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.version.hip is None)
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # fp32: 1.44269502162933349609375
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp2(x):
    # 2^x as one MUFU.EX2 with denormal results flushed to zero. tl.exp2 keeps denormals, at the cost of a range
    # check and two predicated multiplies per element; a term under 2^-126 of the row maximum cannot change an
    # fp32 sum, nor a gradient beside the row's O(1) entries. Same rounding as tl.exp2 otherwise (ex2.approx).
    if _PTX:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _rcp(x):
    # 1/x within 1 ulp (one MUFU.RCP), instead of an IEEE division's Newton steps and slow path
    if _PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _tanh_parts(x, c_neg):
    # tanh(x / cap) = sign(x) (1 - e) q with e = e^{-2 |x| / cap} <= 1 and q = 1 / (1 + e); c_neg = -2 log2(e) / cap.
    # Returns (tanh, e, q). q (1 - e) is one FFMA with the relative precision of (1 - e) / (1 + e), e <= 1 cannot
    # overflow, and 1 - tanh^2 = 4 e q^2 has no cancellation. A nan x gives nan.
    e = _exp2(tl.abs(x) * c_neg)
    q = _rcp(1.0 + e)
    ta = q - e * q
    return tl.where(x < 0, -ta, ta), e, q


@triton.jit
def _fwd_block(z_row, v0, cols, V, m_raw, mb, s, t, s2, u, scale, K, c_neg,
               HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr, MASKED: tl.constexpr):
    """One BLOCK_V step of the forward's online logsumexp, with one maximum for the whole block.

    State: m_raw, the running maximum of the raw logits (a scalar); mb, the exponent shift in base 2 (a scalar,
    the capped and tempered m_raw times log2 e, 0 while nothing finite was seen); per lane s = sum 2^d with
    d = zc log2 e - mb; with WITH_STATS per lane t = sum 2^d d, s2 = sum 2^{2d}, u = sum of the raw logits
    (softcap: sum of tanh(z / cap)). A new maximum rescales the lanes by the scalar r = 2^{mb_old - mb}.
    MASKED: the last, partial block (columns past V masked); every other block is loaded without a mask.
    """
    idx = v0 + cols
    if MASKED:
        mask = idx < V
        z = tl.load(z_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        z = tl.load(z_row + idx).to(tl.float32)
    m_raw_new = tl.maximum(m_raw, tl.max(z, axis=0))
    if HAS_SOFTCAP:  # cap * tanh is increasing: the block's maximum maps to the capped maximum
        mb_new = _tanh_parts(m_raw_new, c_neg)[0] * K
    else:
        mb_new = m_raw_new * scale
    mb_new = tl.where(mb_new == float("-inf"), 0.0, mb_new)  # an all -inf prefix: no -inf - -inf = nan
    r = _exp2(mb - mb_new)  # 0 on the first block (mb = -inf)
    if HAS_SOFTCAP:
        th = _tanh_parts(z, c_neg)[0]
        d = th * K - mb_new  # zc log2 e - mb = K tanh - mb: one FFMA
    else:
        d = z * scale - mb_new  # one FFMA
    e = _exp2(d)
    if MASKED:  # masked columns: z = -inf gives e = 0 without a cap, but cap * tanh(-inf) = -cap does not
        e = tl.where(mask, e, 0.0)
    if WITH_STATS:
        # t holds sum e d relative to the old shift: moving the shift by delta adds delta to every d
        delta = tl.where(mb == float("-inf"), 0.0, mb - mb_new)
        if MASKED:
            d = tl.where(mask, d, 0.0)  # e = 0 there; keep 0 * -inf = nan out of t
        t = (t + delta * s) * r + e * d
        s2 = s2 * (r * r) + e * e
        if HAS_SOFTCAP:
            uu = th
        else:
            uu = z
        if MASKED:
            uu = tl.where(mask, uu, 0.0)
        u += uu
    s = s * r + e
    return m_raw_new, mb_new, s, t, s2, u


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
    # base 2: zc log2 e = z * scale (no cap) or K tanh(z / cap) (cap), so each element costs one MUFU.EX2
    scale = inv_temp * _LOG2E
    K = softcap * scale
    c_neg = -2.0 * _LOG2E / softcap
    m_raw = -float("inf")
    mb = -float("inf")
    s = tl.zeros([BLOCK_V], tl.float32)
    if WITH_STATS:
        t = tl.zeros([BLOCK_V], tl.float32)
        s2 = tl.zeros([BLOCK_V], tl.float32)
        u = tl.zeros([BLOCK_V], tl.float32)
    else:
        t = 0.0
        s2 = 0.0
        u = 0.0
    n_full = V // BLOCK_V
    for i in range(0, n_full):
        m_raw, mb, s, t, s2, u = _fwd_block(z_row, i * BLOCK_V, cols, V, m_raw, mb, s, t, s2, u, scale, K,
                                            c_neg, HAS_SOFTCAP, WITH_STATS, False)
    if n_full * BLOCK_V < V:
        m_raw, mb, s, t, s2, u = _fwd_block(z_row, n_full * BLOCK_V, cols, V, m_raw, mb, s, t, s2, u, scale, K,
                                            c_neg, HAS_SOFTCAP, WITH_STATS, True)
    # every lane shares the shift mb: no per-lane rescale when merging
    s_all = tl.sum(s, axis=0)
    y = tl.load(labels_ptr + row)
    zy = tl.load(z_row + y).to(tl.float32)
    if HAS_SOFTCAP:
        zcy = _tanh_parts(zy, c_neg)[0] * (softcap * inv_temp)
        m_nat = _tanh_parts(m_raw, c_neg)[0] * (softcap * inv_temp)
    else:
        zcy = zy * inv_temp
        m_nat = m_raw * inv_temp
    m_nat = tl.where(m_nat == float("-inf"), 0.0, m_nat)
    # lse = m_nat + ln2 (log2 s + mb - m_nat log2 e): the last term is mb's rounding, so lse is as exact as
    # m_nat itself (converting mb back to natural units would cost ~2 ulp of lse)
    lse = m_nat + (tl.log2(s_all) + (mb - m_nat * _LOG2E)) * _LN2
    tl.store(logp_ptr + row, zcy - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_STATS:
        # entropy = lse - E_p[zc] = ln2 (log2 s - E_p[d]), with d = zc log2 e - mb: no cancellation of lse
        t_all = tl.sum(t, axis=0)
        tl.store(ent_ptr + row, (tl.log2(s_all) - t_all / s_all) * _LN2)
        tl.store(hit_ptr + row, tl.where(zcy >= m_nat, 1.0, 0.0))
        if HAS_SOFTCAP:
            zmean = tl.sum(u, axis=0) / V * (softcap * inv_temp)
        else:
            zmean = tl.sum(u, axis=0) / V * inv_temp
        tl.store(zmean_ptr + row, zmean)
        tl.store(lse2_ptr + row, 2.0 * m_nat + (tl.log2(tl.sum(s2, axis=0)) + 2.0 * (mb - m_nat * _LOG2E)) * _LN2)


@triton.jit
def _logprob_bwd_kernel(
    # pointers
    z_ptr,  # (n, Vs) logits tile of vocabulary columns [v_offset, v_offset + Vs)
    dz_ptr,  # (n, Vs) out: gradient of the raw logits (may alias z_ptr)
    labels_ptr,  # (n,) int64 labels in [0, V)
    lse_ptr,  # (n,) fp32 saved logsumexp of each row
    g_ptr,  # (n,) fp32 upstream gradient of each row's log-prob
    gh_ptr,  # (n,) fp32 (WITH_ENTROPY) upstream gradient of each row's entropy
    ent_ptr,  # (n,) fp32 (WITH_ENTROPY) the row's entropy H from the forward's stats
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
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    idx = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = idx < n_cols
    z = tl.load(z_ptr + row * stride_z_row + idx, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    y = tl.load(labels_ptr + row) - v_offset
    if HAS_SOFTCAP:
        # zc = c tanh, c = cap / T; dzc/dz = (1 - tanh^2) / T = 4 e q^2 / T
        th, e, q = _tanh_parts(z, -2.0 * _LOG2E / softcap)
        a = th * (softcap * inv_temp) - lse  # zc - lse in natural units, one FFMA: as exact as zc itself
        coef = (4.0 * inv_temp * g) * (e * q * q)
    else:
        a = z * inv_temp - lse  # one FFMA
        coef = g * inv_temp
    p = _exp2(a * _LOG2E)
    if WITH_ENTROPY:
        # + g_H dH/dz = -g_H p (zc - sum_u p_u zc_u) dzc/dz, and zc - sum_u p_u zc_u = (zc - lse) + H = a + H
        gh = tl.load(gh_ptr + row)
        ent = tl.load(ent_ptr + row)
        if HAS_SOFTCAP:
            chain = (4.0 * inv_temp) * (e * q * q)
        else:
            chain = inv_temp
        dz = tl.where(idx == y, coef, 0.0) - p * ((g + gh * (a + ent)) * chain)
    else:
        # dz = g (onehot - p) dzc/dz
        dz = tl.where(idx == y, coef, 0.0) - coef * p
    tl.store(dz_ptr + row * stride_dz_row + idx, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launch variants: the one table that the launchers check their arguments against and that
# tests/kernels/test_kernels_compile.py compiles for real GPU targets (so a variant only the interpreter accepts fails CI)

#: dtypes of the logits tiles the engine hands the kernels (float64 runs on the torch backend)
TILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: per kernel: the jit function, its constexpr flags with every value a launch can pass, the GPU block sizes (a
#: function of the flags), the tensor dtypes of each variant (forward: the tile; backward: (tile, gradient
#: output), the gradient in the inputs' dtype, also from a float32 tile of 16-bit inputs) and num_warps as a
#: function of the block size. The sizes hold registers under budget (see compile_check.BUDGETS): the forward
#: steps 4096 columns (16 per thread at 8 warps; 16 KB of bf16 in flight); with WITH_STATS it keeps four
#: per-lane sums, so 2048 columns (8 per thread, ~64 registers instead of ~125 at 4096).
VARIANTS = {
    "fwd": {
        "fn": _logprob_fwd_kernel,
        "flags": {"HAS_SOFTCAP": (False, True), "WITH_STATS": (False, True)},
        "blocks": lambda flags: (2048,) if flags["WITH_STATS"] else (4096,),
        "dtypes": tuple((d,) for d in TILE_DTYPES),
        "num_warps": lambda block: 8 if block >= 2048 else 4,
    },
    "bwd": {
        "fn": _logprob_bwd_kernel,
        "flags": {"HAS_SOFTCAP": (False, True), "WITH_ENTROPY": (False, True)},
        "blocks": lambda flags: (1024,),  # the backward's 2-D grid: 1024-column blocks
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
        blocks = spec["blocks"](flags)
        block = next((b for b in blocks if n_cols <= b), blocks[-1])
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
    g_ent: torch.Tensor | None = None,
    ent: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the raw logits tile ``z`` (columns ``v_offset..v_offset+Vs``) written into ``out``.

    Args:
        z: (n, Vs) logits tile; out: (n, Vs) destination (``z`` itself, or a 16-bit tile for a float32 ``z``),
            unit column strides.
        labels: (n,) int64; lse, g: (n,) float32.
        temperature, softcap: as in :func:`logprob_fwd`.
        g_ent, ent: (n,) float32 upstream gradient of each row's entropy and the entropy (forward stats), both
            or neither: adds -g_ent p (zc - lse + H) dzc/dz (the ``WITH_ENTROPY`` variant).
    Returns:
        ``out``.
    """
    n, Vs = z.shape
    assert z.stride(1) == 1 and out.stride(1) == 1 and out.shape == z.shape
    assert (g_ent is None) == (ent is None)
    if n == 0 or Vs == 0:
        return out
    with_ent = g_ent is not None
    meta = launch_meta("bwd", Vs, (z.dtype, out.dtype), HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=with_ent)
    grid = (n, triton.cdiv(Vs, meta["BLOCK_V"]))
    _logprob_bwd_kernel[grid](
        z, out, labels, lse, g, g_ent if with_ent else g, ent if with_ent else lse,
        Vs, v_offset,
        z.stride(0), out.stride(0),
        1.0 / temperature, float(softcap or 1.0),
        **meta,
    )
    return out
