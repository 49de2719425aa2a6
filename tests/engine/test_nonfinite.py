"""NaN/inf in one sequence stay in that sequence: values and gradients of the others equal the clean run."""

from __future__ import annotations

import pytest
import torch

import dpo_fast
from dpo_fast.engine import segment_sum
from support import random_labels

NAN, INF = float("nan"), float("inf")


def _batch(seed, B=4, T=7, H=16, V=45):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * 0.5
    b = torch.randn(V, generator=gen)
    labels = random_labels((B, T), V, 0.25, gen)
    labels[:, 0] = 3  # every row scores a token at position 0
    return h, w, b, labels


def _run(h, w, b, labels, backend, **kw):
    hh = h.clone().requires_grad_()
    out = dpo_fast.sequence_logprobs(hh, w, labels, bias=b, backend=backend, **kw)
    out.sum().backward()
    return out.detach(), hh.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_padded_nonfinite_hidden_stays_in_its_sequence(backend, bad):
    h, w, b, labels = _batch(1)
    dpo_fast.set_workspace_bytes(2048)  # many tiles
    clean, gclean = _run(h, w, b, labels, backend)
    hb = h.clone()
    hb[0, 0, 5] = bad
    out, g = _run(hb, w, b, labels, backend)
    assert not torch.isfinite(out[0])
    assert torch.equal(out[1:], clean[1:])
    assert torch.equal(g[1:], gclean[1:])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_nan_stays_in_its_sequence(backend):
    h, w, b, labels = _batch(2)
    H = h.shape[-1]
    cu = torch.tensor([0, 3, 3, 10, 20, 28], dtype=torch.int32)  # an empty sequence too
    h1, l1 = h.reshape(-1, H), labels.reshape(-1)
    clean = dpo_fast.sequence_logprobs(h1, w, l1, bias=b, cu_seqlens=cu, backend=backend)
    hb = h1.clone()
    hb[4, 0] = NAN  # sequence 2 (tokens 3..9)
    l1 = l1.clone()
    l1[4] = 7
    clean = dpo_fast.sequence_logprobs(h1, w, l1, bias=b, cu_seqlens=cu, backend=backend)
    out = dpo_fast.sequence_logprobs(hb, w, l1, bias=b, cu_seqlens=cu, backend=backend)
    assert torch.isnan(out[2])
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.equal(out[keep], clean[keep]) and out[1] == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_inf_bias_at_a_label_stays_in_its_sequence(backend):
    h, w, b, labels = _batch(3)
    b = b.clone()
    b[11] = -INF
    labels = labels.clone()
    labels[labels == 11] = 12
    clean = dpo_fast.sequence_logprobs(h, w, labels, bias=b, backend=backend)
    labels[0, 0] = 11  # sequence 0 scores the impossible token
    out = dpo_fast.sequence_logprobs(h, w, labels, bias=b, backend=backend)
    assert out[0] == -INF
    assert torch.equal(out[1:], clean[1:])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_logprobs_from_logits_nan_row(reduction):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 20, generator=gen)
    labels = random_labels((3, 5), 20, 0.2, gen)
    labels[0, 1] = 2
    clean = dpo_fast.logprobs_from_logits(logits, labels, reduction=reduction)
    bad = logits.clone()
    bad[0, 1, 7] = NAN
    z = bad.clone().requires_grad_()
    out = dpo_fast.logprobs_from_logits(z, labels, reduction=reduction)
    out.sum().backward()
    assert torch.isnan(out[0]) and torch.equal(out[1:], clean[1:])
    assert torch.isfinite(z.grad[1:]).all()
    # packed
    cu = torch.tensor([0, 5, 10, 15])
    outp = dpo_fast.logprobs_from_logits(bad.view(15, 20), labels.view(15), cu_seqlens=cu, reduction=reduction)
    assert torch.isnan(outp[0]) and torch.equal(outp[1:], clean[1:])


def test_segment_sum_isolates_and_is_repeatable():
    gen = torch.Generator().manual_seed(5)
    for n, S in ((40, 4), (3000, 3), (70000, 2)):  # one, two and three levels of the dense layout
        seg = torch.sort(torch.randint(0, S, (n,), generator=gen)).values
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        clean = segment_sum(v, seg, S)
        ref = torch.zeros(S, dtype=torch.float64).index_add(0, seg, v)
        assert torch.allclose(clean, ref, rtol=0, atol=1e-10)
        vb = v.clone()
        first = int(torch.nonzero(seg == 0)[0])
        vb[first] = NAN
        vb[int(torch.nonzero(seg == S - 1)[-1])] = 1e300  # huge but finite: no cancellation elsewhere
        out = segment_sum(vb, seg, S)
        assert torch.isnan(out[0]) and torch.equal(out[1:-1], clean[1:-1]) and out[-1] == pytest.approx(1e300)
        torch.testing.assert_close(segment_sum(vb, seg, S), out, rtol=0, atol=0, equal_nan=True)  # bit-identical
    # IEEE sum semantics inside a segment
    seg = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    v = torch.tensor([INF, 1.0, INF, -INF, -INF, 2.0, 5.0])
    out = segment_sum(v, seg, 5)
    assert out[0] == INF and torch.isnan(out[1]) and out[2] == -INF and out[3] == 5.0 and out[4] == 0


def test_sums_bitwise_repeatable():
    h, w, b, labels = _batch(6, B=3, T=40, V=300)
    runs = [dpo_fast.sequence_logprobs(h, w, labels, bias=b) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
