"""Property test: random shapes, options, budgets and layouts against the float64 reference (both backends)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dpo_fast
from support import rel_err, ref_sequence_logprobs


@st.composite
def problems(draw):
    packed = draw(st.booleans())
    H = draw(st.integers(1, 24))
    V = draw(st.integers(2, 300))
    if packed:
        lengths = draw(st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(lambda x: sum(x) > 0))
        shape = (sum(lengths),)
    else:
        lengths = None
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 9)))
    return dict(
        packed=packed, H=H, V=V, lengths=lengths, shape=shape,
        drop=draw(st.floats(0.0, 1.0)),
        bias=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0])),
        softcap=draw(st.sampled_from([None, 3.0])),
        average=draw(st.booleans()),
        budget=draw(st.sampled_from([None, 1024, 4096])),
        backend=draw(st.sampled_from(["torch", "triton"])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems_match_float64(p):
    g = torch.Generator().manual_seed(p["seed"])
    h = torch.randn(*p["shape"], p["H"], generator=g, requires_grad=True)
    w = torch.randn(p["V"], p["H"], generator=g, requires_grad=True)
    b = torch.randn(p["V"], generator=g) if p["bias"] else None
    labels = torch.randint(0, p["V"], p["shape"], generator=g)
    labels = labels.masked_fill(torch.rand(p["shape"], generator=g) < p["drop"], -100)
    cu = None
    if p["packed"]:
        cu = torch.tensor([0] + torch.tensor(p["lengths"]).cumsum(0).tolist())
    dpo_fast.set_workspace_bytes(p["budget"])
    try:
        kw = dict(temperature=p["temperature"], softcap=p["softcap"], average=p["average"])
        out = dpo_fast.sequence_logprobs(h, w, labels, bias=b, cu_seqlens=cu, backend=p["backend"], **kw)
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = ref_sequence_logprobs(h64, w64, labels, None if b is None else b.double(), cu_seqlens=cu, **kw)
        assert rel_err(out, ref) < 1e-5
        go = torch.randn(out.shape, generator=g)
        dh, dw = torch.autograd.grad(out, (h, w), go)
        rdh, rdw = torch.autograd.grad(ref, (h64, w64), go.double(), allow_unused=True)
        rdh = torch.zeros_like(h64) if rdh is None else rdh
        rdw = torch.zeros_like(w64) if rdw is None else rdw
        assert rel_err(dh, rdh) < 1e-5 and rel_err(dw, rdw) < 1e-5
    finally:
        dpo_fast.set_workspace_bytes(None)
