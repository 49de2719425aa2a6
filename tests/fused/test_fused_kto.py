"""KTOLoss: the fused route equals kto_loss(sequence_logprobs(...)), with the KL reference point three ways."""

from __future__ import annotations

import pytest
import torch

import dpo_fast
from support import CountMM, assert_close, assert_output_matches, random_labels


def _batch(seed, B=6, T=9, H=12, V=61):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / 3
    b = torch.randn(V, generator=g) * 0.1
    labels = random_labels((B, T), V, 0.1, g)
    labels[:, :3] = -100
    des = torch.tensor([True, False, True, True, False, False])
    ref = torch.randn(B, generator=g) * 2 - 40
    kl_h = torch.randn(B, T, H, generator=g)
    kl_l = random_labels((B, T), V, 0.1, g)
    kl_l[:, :3] = -100
    ref_kl = torch.randn(B, generator=g) - 38
    return h, w, b, labels, des, ref, kl_h, kl_l, ref_kl


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kl_mode", ["none", "given", "kl_pass"])
def test_fused_kto_equals_composition(kl_mode, backend):
    h, w, b, labels, des, ref, kl_h, kl_l, ref_kl = _batch(3)
    opts = dict(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    lp = dpo_fast.sequence_logprobs(hh, ww, labels, bias=bb, backend="torch")
    kw, ref_kw = {}, {}
    if kl_mode == "given":
        kw = ref_kw = dict(kl=torch.tensor(0.7))
    elif kl_mode == "kl_pass":
        with torch.no_grad():
            pol_kl = dpo_fast.sequence_logprobs(kl_h, w, kl_l, bias=b)
        ref_kw = dict(policy_kl_logps=pol_kl, ref_kl_logps=ref_kl)
        kw = dict(kl_hidden=kl_h, kl_labels=kl_l, ref_kl_logps=ref_kl)
    expect = dpo_fast.kto_loss(lp, ref, des, **opts, **{k: v for k, v in ref_kw.items() if k == "kl"},
                               **{k: v for k, v in ref_kw.items() if k != "kl"})
    expect.loss.backward()
    m = dpo_fast.KTOLoss(**opts, backend=backend, workspace_bytes=14 * w.shape[0] * 8)
    h2, w2, b2 = (x.clone().requires_grad_() for x in (h, w, b))
    out = m(h2, w2, labels, des, ref, bias=b2, **kw)
    assert out.route == "fused"
    out.loss.backward()
    assert_output_matches(out, expect, ("loss", "losses"), (h2.grad, w2.grad, b2.grad), (hh.grad, ww.grad, bb.grad),
                          metrics_abs=1e-7)


def test_kto_gemm_counts_packed_and_errors():
    h, w, b, labels, des, ref, kl_h, kl_l, ref_kl = _batch(4)
    for fused, gemms in ((True, 3), (False, 4)):
        m = dpo_fast.KTOLoss(fused=fused, compute_metrics=False)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with CountMM() as c:
            m(hh, ww, labels, des, ref).loss.backward()
        assert c.calls == gemms
    # packed layout gives the same loss
    B, T, H = h.shape
    cu = torch.arange(0, B * T + 1, T)
    a = dpo_fast.KTOLoss()(h.clone().requires_grad_(), w, labels, des, ref).loss
    p = dpo_fast.KTOLoss()(h.reshape(-1, H).clone().requires_grad_(), w, labels.reshape(-1), des, ref,
                           cu_seqlens=cu).loss
    assert_close(p, a, torch.float32, "packed")
    m = dpo_fast.KTOLoss()
    with pytest.raises(ValueError, match=r"desirable: expected shape \(6,\)"):
        m(h, w, labels, des[:3], ref)
    with pytest.raises(ValueError, match="either kl or kl_hidden"):
        m(h, w, labels, des, ref, kl=0.1, kl_hidden=kl_h, kl_labels=kl_l, ref_kl_logps=ref_kl)
    with pytest.raises(ValueError, match="needs kl_labels and ref_kl_logps"):
        m(h, w, labels, des, ref, kl_hidden=kl_h)
    with pytest.raises(ValueError, match="ref_kl_logps: also pass kl_hidden"):
        m(h, w, labels, des, ref, ref_kl_logps=ref_kl)
    with pytest.raises(ValueError):
        dpo_fast.KTOLoss(beta=0.0)


@pytest.mark.parametrize("fused", [True, False])
def test_kto_token_metrics_and_packed(fused):
    """KTOLoss has the other modules' features: token metrics from the same pass, packed input, route record."""
    h, w, b, labels, des, ref, *_ = _batch(7)
    m = dpo_fast.KTOLoss(token_metrics=True, fused=fused)
    out = m(h.clone().requires_grad_(), w, labels, des, ref, bias=b, kl=0.3)
    assert out.route == ("fused" if fused else "two_pass")
    z = h.double() @ w.double().t() + b.double()
    ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    mask = labels != -100
    assert out.metrics["entropy"] == pytest.approx(ent[mask].mean().item(), rel=1e-4)
    assert out.token_sums["tokens"].item() == mask.sum().item()
    # packed: the same sequences concatenated
    cu = torch.arange(0, h.shape[0] * h.shape[1] + 1, h.shape[1])
    hp = h.reshape(-1, h.shape[-1]).clone().requires_grad_()
    outp = m(hp, w, labels.reshape(-1), des, ref, bias=b, kl=0.3, cu_seqlens=cu)
    assert_close(outp.loss, out.loss, torch.float32, "packed loss")
    assert outp.metrics["entropy"] == pytest.approx(out.metrics["entropy"], rel=1e-6)
