"""The fused log-prob engine against float64 references, on both backends.

The Triton backend runs here under TRITON_INTERPRET=1 (set in conftest): the very kernel code that runs on
the GPU. The interpreter mishandles bfloat16 (see DESIGN.md), so Triton is tested with float32/float16
tiles; bfloat16 numerics are proven on the torch backend here and on the GPU benchmark script.
"""

from __future__ import annotations

import math

import pytest
import torch

import dpo_fast
from support import (TOL, CountMM, assert_close, naive_sequence_logprobs, random_labels, ref_sequence_logprobs,
                     ref_token_logprobs, rel_err, seed_of)

BACKEND_DTYPES = [
    ("torch", torch.float32),
    ("torch", torch.bfloat16),
    ("torch", torch.float16),
    ("triton", torch.float32),
    ("triton", torch.float16),
]

# name: (B, T, H, V, options, workspace bytes or None)
CASES = {
    "odd": (3, 7, 24, 101, dict(bias=True), None),
    "t1": (2, 1, 16, 67, dict(), None),
    "temp_softcap": (2, 9, 20, 131, dict(bias=True, temperature=0.7, softcap=5.0), None),
    "average": (3, 5, 12, 97, dict(average=True), None),
    # a 2 KiB budget forces token chunks in the forward and vocabulary slices + token splits in backward
    "tiny_budget": (2, 11, 16, 203, dict(bias=True, softcap=3.0), 2048),
    "big_vocab": (1, 3, 8, 70_001, dict(), None),
}


def _inputs(B, T, H, V, dtype, bias, gen):
    h = (torch.randn(B, T, H, generator=gen) * 1.5).to(dtype)
    w = (torch.randn(V, H, generator=gen) / math.sqrt(H) * 2).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype) if bias else None
    labels = random_labels((B, T), V, 0.3, gen)
    return h, w, b, labels


# every case on every (backend, dtype), except the V > 65536 case, which runs in float32 only
MATRIX = [(c, b, d) for c in CASES for b, d in BACKEND_DTYPES if c != "big_vocab" or d == torch.float32]


@pytest.mark.parametrize("case,backend,dtype", MATRIX, ids=lambda x: str(x).replace("torch.", ""))
def test_sequence_logprobs_matches_float64(backend, dtype, case):
    B, T, H, V, opts, budget = CASES[case]
    gen = torch.Generator().manual_seed(seed_of(case))
    h, w, b, labels = _inputs(B, T, H, V, dtype, opts.get("bias"), gen)
    kw = {k: v for k, v in opts.items() if k != "bias"}
    if budget:
        dpo_fast.set_workspace_bytes(budget)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = b.clone().requires_grad_() if b is not None else None
    out = dpo_fast.sequence_logprobs(hh, ww, labels, bias=bb, backend=backend, **kw)
    assert out.dtype == torch.float32 and out.shape == (B,)
    ref_args = [x.detach().double().requires_grad_() for x in (h, w)] + (
        [b.double().requires_grad_()] if b is not None else [])
    ref = ref_sequence_logprobs(ref_args[0], ref_args[1], labels, ref_args[2] if b is not None else None, **kw)
    assert_close(out, ref, dtype, "logps")
    go = torch.randn(B, generator=gen)
    grads = torch.autograd.grad(out, [hh, ww] + ([bb] if bb is not None else []), go)
    ref_grads = torch.autograd.grad(ref, ref_args, go.double())
    # plain PyTorch at the same precision: the error budget where TOL is out of reach for any float32 code
    base_args = [x.detach().clone().requires_grad_() for x in [h, w] + ([b] if b is not None else [])]
    base = naive_sequence_logprobs(base_args[0], base_args[1], labels, base_args[2] if b is not None else None,
                                   **kw)
    base_grads = torch.autograd.grad(base, base_args, go)
    for name, g, r, bg in zip(("hidden", "weight", "bias"), grads, ref_grads, base_grads):
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"d{name}", baseline=bg)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES[:2] + BACKEND_DTYPES[3:4], ids=str)
def test_packed_uneven_sequences(backend, dtype):
    gen = torch.Generator().manual_seed(7)
    lengths = [5, 1, 0, 13, 2, 9]  # an empty sequence and a one-token one included
    N, H, V = sum(lengths), 12, 89
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    h = torch.randn(N, H, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen) / 3).to(dtype).requires_grad_()
    labels = random_labels((N,), V, 0.25, gen)
    labels[cu[4]:cu[5]] = -100  # a fully masked sequence
    dpo_fast.set_workspace_bytes(4096)
    out = dpo_fast.sequence_logprobs(h, w, labels, cu_seqlens=cu, backend=backend)
    assert out.shape == (len(lengths),)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = ref_sequence_logprobs(h64, w64, labels, cu_seqlens=cu)
    assert_close(out, ref, dtype, "packed logps")
    assert out[2].item() == 0.0 and out[4].item() == 0.0
    go = torch.randn(len(lengths), generator=gen)
    dh, dw = torch.autograd.grad(out, (h, w), go)
    rdh, rdw = torch.autograd.grad(ref, (h64, w64), go.double())
    assert_close(dh, rdh, dtype, "dhidden")
    assert_close(dw, rdw, dtype, "dweight")
    assert torch.all(dh[cu[4]:cu[5]] == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_without_scored_tokens(backend):
    h = torch.randn(3, 4, 8, requires_grad=True)
    w = torch.randn(33, 8, requires_grad=True)
    labels = torch.full((3, 4), -100)
    labels[1, 2] = 5
    out = dpo_fast.sequence_logprobs(h, w, labels, backend=backend, average=True)
    assert torch.isfinite(out).all() and out[0] == 0 and out[2] == 0
    out.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.all(h.grad[0] == 0) and torch.all(h.grad[2] == 0)
    # nothing scored at all: zeros, zero gradients, no NaN
    h2 = torch.randn(2, 3, 8, requires_grad=True)
    w2 = torch.randn(33, 8, requires_grad=True)
    out2 = dpo_fast.sequence_logprobs(h2, w2, torch.full((2, 3), -100), backend=backend)
    out2.sum().backward()
    assert torch.all(out2 == 0) and torch.all(h2.grad == 0) and torch.all(w2.grad == 0)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("triton", torch.float32)], ids=str)
@pytest.mark.parametrize("packed", [False, True])
def test_token_logprobs(backend, dtype, packed):
    gen = torch.Generator().manual_seed(3)
    h, w, b, labels = _inputs(2, 6, 10, 57, dtype, True, gen)
    if packed:
        h, labels = h.reshape(12, 10), labels.reshape(12)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    out = dpo_fast.token_logprobs(hh, ww, labels, bias=bb, temperature=1.3, backend=backend)
    assert out.shape == labels.shape and out.dtype == torch.float32
    refs = [x.double().requires_grad_() for x in (h, w, b)]
    ref = ref_token_logprobs(*refs[:2], labels, refs[2], temperature=1.3)
    assert_close(out, ref, dtype, "token logps")
    assert torch.all(out[labels == -100] == 0)
    go = torch.randn(labels.shape, generator=gen)
    for g, r, n in zip(torch.autograd.grad(out, (hh, ww, bb), go), torch.autograd.grad(ref, refs, go.double()),
                       "hwb"):
        assert_close(g, r, dtype, f"d{n}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gemm_counts_frozen_weight_and_no_grad(backend):
    h = torch.randn(2, 5, 16)
    w = torch.randn(40, 16)
    labels = random_labels((2, 5), 40, 0.2, torch.Generator().manual_seed(0))
    # no grad at all: one GEMM (one tile)
    with torch.no_grad(), CountMM() as c:
        dpo_fast.sequence_logprobs(h, w, labels, backend=backend)
    assert c.calls == 1
    # trainable weight: forward z, backward recomputed z, dh, dW = 4
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with CountMM() as c:
        dpo_fast.sequence_logprobs(hh, ww, labels, backend=backend).sum().backward()
    assert c.calls == 4
    # frozen weight (LoRA): the dW GEMM is skipped entirely
    hh = h.clone().requires_grad_()
    with CountMM() as c:
        dpo_fast.sequence_logprobs(hh, w, labels, backend=backend).sum().backward()
    assert c.calls == 3 and w.grad is None and hh.grad is not None


def test_gradcheck_float64_torch_backend():
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(2, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(13, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([[1, -100, 12, 0], [-100, -100, 7, 3]])
    dpo_fast.set_workspace_bytes(1024)  # several tiles in both passes
    for kw in (dict(), dict(temperature=0.8, softcap=2.0, average=True)):
        assert torch.autograd.gradcheck(
            lambda h, w, b: dpo_fast.sequence_logprobs(h, w, labels, bias=b, backend="torch", **kw), (h, w, b))
    assert torch.autograd.gradcheck(
        lambda h, w: dpo_fast.token_logprobs(h, w, labels, backend="torch", softcap=1.5), (h, w))
    logits = torch.randn(2, 4, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    for red in ("sum", "mean", "none"):
        assert torch.autograd.gradcheck(
            lambda z: dpo_fast.logprobs_from_logits(z, labels, temperature=0.9, reduction=red), (logits,))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logprobs_from_logits(backend, dtype, monkeypatch):
    if backend == "triton":
        # logprobs_from_logits picks its backend from the device; force the kernels on CPU tensors
        import dpo_fast.engine.rows as ro
        monkeypatch.setattr(ro, "resolve_backend", lambda b, d: "triton")
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 5, 77, generator=gen) * 3).to(dtype)
    labels = random_labels((3, 5), 77, 0.3, gen)
    labels[1] = -100
    dpo_fast.set_workspace_bytes(2048)
    for red in ("sum", "mean", "none"):
        z = logits.clone().requires_grad_()
        out = dpo_fast.logprobs_from_logits(z, labels, temperature=0.9, reduction=red)
        z64 = logits.double().requires_grad_()
        tok = torch.log_softmax(z64 / 0.9, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
        tok = tok * (labels != -100)
        ref = {"sum": tok.sum(-1), "mean": tok.sum(-1) / (labels != -100).sum(-1).clamp_min(1),
               "none": tok}[red]
        assert_close(out, ref, dtype, red)
        go = torch.randn(ref.shape, generator=gen)
        (g,) = torch.autograd.grad(out, z, go)
        (r,) = torch.autograd.grad(ref, z64, go.double())
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"dlogits {red}")
    # packed
    cu = torch.tensor([0, 4, 4, 15])
    out = dpo_fast.logprobs_from_logits(logits.reshape(15, 77), labels.reshape(15), cu_seqlens=cu)
    tok = torch.log_softmax(logits.double().reshape(15, 77), -1).gather(
        -1, labels.reshape(15, 1).clamp_min(0)).squeeze(-1) * (labels.reshape(15) != -100)
    ref = torch.stack([tok[0:4].sum(), tok[4:4].sum(), tok[4:15].sum()])
    assert_close(out, ref, dtype, "packed")


def test_non_contiguous_inputs_work():
    gen = torch.Generator().manual_seed(9)
    h_big = torch.randn(6, 3, 10, generator=gen)
    h = h_big.transpose(0, 1)  # (3, 6, 10) non-contiguous
    w = torch.randn(10, 41, generator=gen).t()  # (41, 10) non-contiguous
    labels = random_labels((6, 3), 41, 0.2, gen).t()  # (3, 6) non-contiguous
    b = torch.randn(82, generator=gen)[::2]  # strided bias
    for backend in ("torch", "triton"):
        out = dpo_fast.sequence_logprobs(h, w, labels, bias=b, backend=backend)
        ref = ref_sequence_logprobs(h, w, labels, b)
        assert rel_err(out, ref) <= TOL[torch.float32]["rtol"]


def test_inputs_not_modified():
    gen = torch.Generator().manual_seed(2)
    h, w, b, labels = _inputs(2, 5, 8, 31, torch.float32, True, gen)
    copies = [x.clone() for x in (h, w, b, labels)]
    hh = h.requires_grad_()
    for backend in ("torch", "triton"):
        dpo_fast.sequence_logprobs(hh, w, labels, bias=b, softcap=2.0, backend=backend).sum().backward()
    for x, c in zip((h, w, b, labels), copies):
        assert torch.equal(x.detach(), c)


def test_int32_labels_and_cu_seqlens():
    h = torch.randn(7, 6)
    w = torch.randn(19, 6)
    labels = torch.tensor([1, 2, -100, 4, 5, 6, 18], dtype=torch.int32)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out = dpo_fast.sequence_logprobs(h, w, labels, cu_seqlens=cu)
    assert rel_err(out, ref_sequence_logprobs(h, w, labels.long(), cu_seqlens=cu)) < 1e-5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_hidden_propagates_to_its_sequence_only(backend):
    h = torch.randn(3, 4, 8)
    h[1, 2, 3] = float("nan")
    h[2, 0, 0] = float("inf")
    w = torch.randn(21, 8)
    labels = torch.randint(0, 21, (3, 4))
    out = dpo_fast.sequence_logprobs(h, w, labels, backend=backend)
    assert torch.isfinite(out[0])
    assert torch.isnan(out[1]) and not torch.isfinite(out[2])


def test_inside_torch_compile_runs_eagerly_and_matches():
    """A compiled training step calls the engine eagerly (no tracing into the tiling loops)."""
    gen = torch.Generator().manual_seed(21)
    h = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    w = torch.randn(11, 8, generator=gen, requires_grad=True)
    labels = random_labels((2, 5), 11, 0.2, gen)

    def step(h, w):
        return (dpo_fast.sequence_logprobs(h, w, labels) * 2).sum()

    expected = step(h, w)
    ge = torch.autograd.grad(expected, (h, w))
    got = torch.compile(step, backend="eager", fullgraph=False)(h, w)
    gg = torch.autograd.grad(got, (h, w))
    assert torch.allclose(got, expected)
    assert all(torch.allclose(a, b) for a, b in zip(gg, ge))


def test_segment_sum_matches_index_add_with_empty_segments():
    from dpo_fast.engine import segment_sum

    gen = torch.Generator().manual_seed(31)
    seg = torch.sort(torch.randint(0, 9, (200,), generator=gen)).values
    seg = seg[seg != 4]  # an empty segment in the middle; 9 and 10 empty at the end
    vals = torch.randn(seg.numel(), generator=gen, dtype=torch.float64, requires_grad=True)
    out = segment_sum(vals, seg, 11)
    ref = torch.zeros(11, dtype=torch.float64).index_add(0, seg, vals)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12) and out[4] == 0 and out[9] == 0 and out[10] == 0
    assert torch.autograd.gradcheck(lambda v: segment_sum(v, seg, 11), (vals,))
