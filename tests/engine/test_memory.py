"""The torch backend's peak memory stays bounded on a shape whose logits would take >= 1 GB.

Measured in a fresh process by the peak resident set size (ru_maxrss) above what the inputs already take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CODE = r"""
import json, resource, torch, dpo_fast
torch.manual_seed(0)
B, T, H, V = 4, 1024, 64, 65536       # fp32 logits would be B*T*V*4 = 1.07 GB
h = torch.randn(B, T, H, requires_grad=True)
w = (torch.randn(V, H) / 8).requires_grad_()
labels = torch.randint(0, V, (B, T))
labels[:, :256] = -100                # 25% prompt
# warm up allocator / BLAS on a tiny call, so one-time library buffers are not counted
dpo_fast.sequence_logprobs(h[:, :8], w[:64], labels[:, :8].clamp(max=63)).sum().backward()
h.grad = None; w.grad = None
grads_bytes = h.numel() * 4 + w.numel() * 4   # dh and dW are outputs any method must produce
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = dpo_fast.sequence_logprobs(h, w, labels, backend="torch")
out.sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra": peak - base, "grads": grads_bytes, "logits": B * T * V * 4,
                  "finite": bool(torch.isfinite(out).all())}))
"""


def test_torch_backend_peak_memory_is_a_tenth_of_the_logits():
    # glibc: blocks >= 64 KiB are mmapped and returned on free, so the resident set tracks live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["finite"]
    assert m["logits"] >= 1e9
    # everything above the inputs, the gradients included, under a tenth of the logits
    assert m["extra"] < m["logits"] / 10, m


# ----------------------------------------------------------------------------------------------------------
# the memory formula of docs/DESIGN.md ("Tiling and memory"), checked on the live tensor bytes of a call

import pytest  # noqa: E402
import torch  # noqa: E402

import dpo_fast  # noqa: E402
from support.live_bytes import LiveBytes  # noqa: E402

MIN_COLS = 1024  # the backward's narrowest vocabulary slice


def formula_bytes(budget: int, N: int, M: int, H: int, V: int, dtype: torch.dtype) -> int:
    """docs/DESIGN.md's bound on the engine's own memory for a forward + backward (inputs and the returned
    dh, dW excluded): budget + N*H*(s + 4) + 64 bytes per position; on CPU with 16-bit inputs, plus the float32
    upcast blocks of the GEMMs: 2 x budget + N*H*4 + 4 * 1024 * H * 4 (fp32 copies of a tile-sized operand,
    of the hidden rows and of two vocabulary slices of < 2048 rows of W)."""
    s = dtype.itemsize
    bound = budget + N * H * (s + 4) + 64 * M
    if dtype in (torch.float16, torch.bfloat16):
        bound += 2 * budget + N * H * 4 + 4 * MIN_COLS * H * 4
    return bound


def measured(B, T, H, V, dtype, budget, exact_fwd=False, exact_bwd=False):
    """(peak live bytes of forward + backward minus the returned gradients, N, M)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 4] = -100
    h = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 8).to(dtype).requires_grad_()
    dpo_fast.set_workspace_bytes(budget)
    try:
        dpo_fast.set_exact_logits(exact_fwd)
        with LiveBytes() as m:
            out = dpo_fast.sequence_logprobs(h, w, labels, backend="torch")
            dpo_fast.set_exact_logits(exact_bwd)
            out.sum().backward()
    finally:
        dpo_fast.set_exact_logits(None)
    assert torch.isfinite(w.grad.float()).all()
    grads = (h.numel() + w.numel()) * dtype.itemsize
    return m.peak - grads, int((labels != -100).sum()), B * T


# split: 1 MiB cannot hold 1024 columns x all 384 tokens, so the backward also splits the tokens
CASES = [(torch.float32, 8 << 20), (torch.float32, 1 << 20), (torch.bfloat16, 8 << 20), (torch.bfloat16, 1 << 20)]


@pytest.mark.parametrize("dtype,budget", CASES, ids=["fp32", "fp32-split", "bf16", "bf16-split"])
def test_peak_within_the_formula(dtype, budget):
    """V x H = 16384 x 64: with split tokens, a float32 dW (4 MiB) outside the budget, as the split-token
    backward once made, would exceed the bound."""
    B, T, H, V = 2, 256, 64, 16384
    peak, N, M = measured(B, T, H, V, dtype, budget)
    bound = formula_bytes(budget, N, M, H, V, dtype, )
    assert peak <= bound, (peak, bound)
    if budget < N * MIN_COLS * 6:  # split tokens: the test would see an fp32 V x H buffer
        assert peak + V * H * 4 > bound, (peak, bound)


def test_backward_sizes_tiles_by_the_forward_tile_dtype():
    """exact logits on in forward (float32 tiles) and off before backward: the backward keeps the forward's
    tiles and sizes them by their bytes, not by today's knob (which would put 10/6 x the budget in tiles)."""
    B, T, H, V, budget = 2, 128, 64, 16384, 1 << 20
    same, N, M = measured(B, T, H, V, torch.bfloat16, budget, exact_fwd=True, exact_bwd=True)
    toggled, _, _ = measured(B, T, H, V, torch.bfloat16, budget, exact_fwd=True, exact_bwd=False)
    assert toggled <= same * 1.02, (toggled, same)
    assert toggled <= formula_bytes(budget, N, M, H, V, torch.bfloat16)


class _GemmRows(torch.utils._python_dispatch.TorchDispatchMode):
    """Rows (first dimension) of each mm / addmm product."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.rows.append(out.shape[0])
        return out


def test_token_chunks_are_multiples_of_128_rows():
    """A budget that fits 392 rows of full-vocabulary tiles gives 384-row chunks (3 full tensor-core tiles
    of 128) instead of 392 (4 tiles, 120 rows of the last wasted), forward and split-token backward."""
    torch.manual_seed(0)
    N, H, V = 1000, 32, 1024
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    dpo_fast.set_workspace_bytes(392 * V * 8)  # float32 tiles, torch backend: 8 bytes per element
    with _GemmRows() as fwd:
        out = dpo_fast.token_logprobs(h, w, labels, backend="torch")
    assert fwd.rows == [384, 384, 232]
    with _GemmRows() as bwd:
        out.sum().backward()
    chunks = bwd.rows[::3]  # z, dh, dW per tile: the z GEMMs' rows are the token chunk
    assert max(chunks) < N and all(r % 128 == 0 for r in chunks[:-1]) and chunks[-1] == N % chunks[0], chunks


# ----------------------------------------------------------------------------------------------------------
# the GEMM path of 16-bit inputs (fp32 logits / fp32 accumulation), named by engine.gemm_path


def test_gemm_path_is_named():
    from dpo_fast.engine import gemm_path

    for dt in (torch.bfloat16, torch.float16):
        p = gemm_path("cpu", dt)
        assert p == {"fp32 logits": "fp32 upcast blocks", "fp32 accumulate": "fp32 upcast blocks"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_values_are_tf32_values(dtype):
    """Why the TF32 fallback on CUDA is exact: every bf16 / fp16 value (subnormals included), upcast to
    float32, has a zero in the 13 mantissa bits that TF32 drops."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    f = bits.float()
    f = f[torch.isfinite(f)]
    assert ((f.view(torch.int32) & 0x1FFF) == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tf32_fallback_matches_the_fp32_output_gemm(dtype):
    from dpo_fast.engine import tiles

    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 256, generator=g).to("cuda", dtype)
    w = torch.randn(1000, 256, generator=g).to("cuda", dtype)
    ref = h.double() @ w.double().t()
    key = (h.device, dtype)
    saved = tiles._MM_OUT_OK.get(key), tiles._EPILOGUE_OK.get(key)
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        tiles._MM_OUT_OK[key] = tiles._EPILOGUE_OK[key] = False  # force the fallback
        z = tiles.linear_into(torch.empty(300, 1000, device="cuda"), h, w, None)
        acc = torch.zeros(300, 1000, device="cuda")
        tiles.addmm_fp32_(acc, h, w.t())
        assert torch.backends.cuda.matmul.fp32_precision == before  # TF32 only inside the fallback
    finally:
        for d, v in zip((tiles._MM_OUT_OK, tiles._EPILOGUE_OK), saved):
            d.pop(key, None) if v is None else d.__setitem__(key, v)
    for got in (z, acc):
        assert ((got.double() - ref).abs().max() / ref.abs().max()) < 1e-6
