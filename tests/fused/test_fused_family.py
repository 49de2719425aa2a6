"""CPOLoss (CPO / SimPO / AlphaPO) and ORPOLoss: the fused route equals the composition with the engine."""

from __future__ import annotations

import pytest
import torch

import dpo_fast
from support import CountMM, assert_close, assert_output_matches, random_labels, seed_of

CONFIGS = {
    "cpo_sigmoid": lambda **kw: (dpo_fast.CPOLoss(beta=0.1, **kw), dict(beta=0.1)),
    "cpo_hinge": lambda **kw: (dpo_fast.CPOLoss(beta=0.5, loss_type="hinge", **kw),
                               dict(beta=0.5, loss_type="hinge")),
    "cpo_ipo": lambda **kw: (dpo_fast.CPOLoss(beta=0.3, loss_type="ipo", **kw), dict(beta=0.3, loss_type="ipo")),
    "simpo": lambda **kw: (dpo_fast.CPOLoss(beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0, **kw),
                           dict(beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0)),
    "alphapo": lambda **kw: (dpo_fast.CPOLoss(beta=2.0, loss_type="simpo", alpha=0.25, cpo_alpha=0.1, **kw),
                             dict(beta=2.0, loss_type="simpo", alpha=0.25, cpo_alpha=0.1)),
    "orpo": lambda **kw: (dpo_fast.ORPOLoss(beta=0.2, **kw), dict(beta=0.2)),
}


def _batch(seed, P=3, T=8, H=12, V=59):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * P, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / 3
    b = torch.randn(V, generator=g) * 0.1
    labels = random_labels((2 * P, T), V, 0.2, g)
    labels[:, :2] = -100
    return h, w, b, labels


def _composition(name, opts, h, w, b, labels):
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    lp = dpo_fast.sequence_logprobs(hh, ww, labels, bias=bb, backend="torch")
    P = lp.shape[0] // 2
    n = (labels != -100).sum(-1)
    fn = dpo_fast.orpo_loss if name == "orpo" else dpo_fast.cpo_loss
    out = fn(lp[:P], lp[P:], chosen_lengths=n[:P], rejected_lengths=n[P:], **opts)
    out.loss.backward()
    return out, (hh.grad, ww.grad, bb.grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_family_equals_composition(name, backend):
    h, w, b, labels = _batch(seed_of(name))
    ref, ref_grads = _composition(name, CONFIGS[name]()[1], h, w, b, labels)
    # a workspace of ~2 pairs' logits: several groups
    module, _ = CONFIGS[name](backend=backend, workspace_bytes=30 * w.shape[0] * 8)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    out = module(hh, ww, labels, bias=bb)
    assert out.route == "fused"
    out.loss.backward()
    assert_output_matches(out, ref, ("loss", "losses"), (hh.grad, ww.grad, bb.grad), ref_grads, metrics_abs=1e-6)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_family_packed_two_pass_and_gemm_counts(name):
    h, w, b, labels = _batch(7)
    P, T, H = h.shape[0] // 2, h.shape[1], h.shape[2]
    # packed: the same sequences flattened, pairs explicit and shuffled
    order = torch.tensor([4, 0, 3, 5, 1, 2])
    hp, lp = h[order].reshape(-1, H), labels[order].reshape(-1)
    cu = torch.arange(0, 2 * P * T + 1, T)
    pos = {int(s): i for i, s in enumerate(order)}
    pairs = torch.tensor([[pos[i], pos[i + P]] for i in range(P)])
    ref, _ = _composition(name, CONFIGS[name]()[1], h, w, b, labels)
    for fused, gemms in ((True, 3), (False, 4)):
        module, _ = CONFIGS[name](fused=fused, compute_metrics=False)
        hh = hp.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        with CountMM() as c:
            out = module(hh, ww, lp, bias=b, cu_seqlens=cu, pairs=pairs)
            out.loss.backward()
        assert c.calls == gemms and out.route == ("fused" if fused else "two_pass")
        assert_close(out.loss, ref.loss, torch.float32, f"packed loss fused={fused}")


def test_family_bad_options_fail_at_construction():
    with pytest.raises(ValueError):
        dpo_fast.CPOLoss(beta=-1.0)
    with pytest.raises(ValueError):
        dpo_fast.CPOLoss(loss_type="dpo")
    with pytest.raises(ValueError):
        dpo_fast.ORPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="workspace_bytes"):
        dpo_fast.ORPOLoss(workspace_bytes=1)
    h, w, b, labels = _batch(1)
    with pytest.raises(ValueError, match="even number of sequences"):
        dpo_fast.ORPOLoss()(h[:5], w, labels[:5])


def test_family_token_metrics_and_no_grad():
    h, w, b, labels = _batch(3)
    m = dpo_fast.CPOLoss(loss_type="simpo", cpo_alpha=0.0, token_metrics=True)
    out = m(h.clone().requires_grad_(), w, labels, bias=b)
    assert out.route == "fused" and 0.0 <= out.metrics["mean_token_accuracy"] <= 1.0
    assert out.metrics["entropy"] > 0
    with torch.no_grad():
        out2 = m(h, w, labels, bias=b)
    assert out2.route == "two_pass"
    assert_close(out2.loss, out.loss, torch.float32, "no-grad loss")
    assert out2.metrics["entropy"] == pytest.approx(out.metrics["entropy"], rel=1e-5)


@pytest.mark.parametrize("cls, fn", [("CPOLoss", "cpo_loss"), ("ORPOLoss", "orpo_loss"), ("KTOLoss", "kto_loss"),
                                     ("GRPOLoss", None), ("DPOLoss", "dpo_loss")])
def test_group_gradient_sees_only_the_groups_units(cls, fn, monkeypatch):
    """The per-group gradient is the loss on that group's units only (batch constants given), and the
    whole-batch loss runs once, for the value: never the whole batch once per group."""
    from dpo_fast import losses as L

    name = fn or "grpo_token_terms"
    real = getattr(L, name)
    sizes = []

    def spy(first, *args, **kwargs):
        sizes.append(first.shape[0])
        return real(first, *args, **kwargs)

    P = 6
    h, w, b, labels = _batch(9, P=P)
    S = 2 * P
    m = getattr(dpo_fast, cls)(workspace_bytes=20 * w.shape[0] * 8)  # a few units per group
    monkeypatch.setattr(L, name, spy)  # after construction (which validates options with a tiny call)
    hh = h.clone().requires_grad_()
    if cls == "KTOLoss":
        out = m(hh, w, labels, torch.arange(S) % 2 == 0, kl=0.1)
    elif cls == "GRPOLoss":
        out = m(hh, w, labels, torch.randn(S))
    else:
        out = m(hh, w, labels)
    assert out.route == "fused"
    units = S if cls in ("KTOLoss", "GRPOLoss") else P
    group_calls = sizes if cls == "GRPOLoss" else sizes[:-1]  # grpo_loss (the value) is not spied there
    assert len(group_calls) > 1 and sum(group_calls) == units and max(group_calls) < units
    if cls != "GRPOLoss":
        assert sizes[-1] == units  # the value: once, on the whole batch
