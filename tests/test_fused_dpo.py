"""DPOLoss: the one-pass fused route equals dpo_loss(sequence_logprobs(...)) — values and gradients."""

from __future__ import annotations

import pytest
import torch

import dpo_fast
from dpo_fast import losses as L
from support import CountMM, assert_close, assert_output_matches, random_labels, ref_token_logprobs, seed_of

DECOMPOSABLE = [lt for lt in L.LOSS_TYPES if lt not in ("aot", "aot_unpaired")]


def _loss_kwargs(lt):
    kw = {}
    if lt == "exo_pair":
        kw["label_smoothing"] = 1e-3
    if lt == "sigmoid":
        kw["label_smoothing"] = 0.1
    return kw


def _batch(P=3, T=7, H=12, V=61, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * P, T, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) / 3).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.1).to(dtype)
    labels = random_labels((2 * P, T), V, 0.2, gen)
    labels[:, :2] = -100  # prompt
    rc, rr = torch.randn(P, generator=gen) - 15, torch.randn(P, generator=gen) - 15
    return h, w, b, labels, rc, rr


def _reference_route(h, w, b, labels, rc, rr, lt, **kw):
    """The unfused composition the fused route must reproduce."""
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    logps = dpo_fast.sequence_logprobs(hh, ww, labels, bias=bb, backend="torch")
    P = logps.shape[0] // 2
    n = (labels != -100).sum(-1)
    out = dpo_fast.dpo_loss(logps[:P], logps[P:], rc, rr, beta=0.1, loss_type=lt, chosen_lengths=n[:P],
                            rejected_lengths=n[P:], **kw)
    out.loss.backward()
    return out, (hh.grad, ww.grad, bb.grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lt", DECOMPOSABLE)
def test_fused_equals_composition(lt, backend):
    h, w, b, labels, rc, rr = _batch(seed=seed_of(lt))
    kw = _loss_kwargs(lt)
    ref, ref_grads = _reference_route(h, w, b, labels, rc, rr, lt, **kw)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    m = dpo_fast.DPOLoss(beta=0.1, loss_type=lt, backend=backend, **kw)
    out = m(hh, ww, labels, rc, rr, bias=bb)
    assert m.last_route == "fused"
    out.loss.backward()
    assert_output_matches(out, ref, ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards"),
                          (hh.grad, ww.grad, bb.grad), ref_grads, metrics_abs=1e-6)


def test_fused_many_groups_packed_layout_and_bf16():
    # packed: sequences in arbitrary order, pairs given explicitly; a tiny fused workspace => many groups
    gen = torch.Generator().manual_seed(4)
    lengths = [6, 3, 9, 4, 7, 5, 2, 8]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    N, H, V = sum(lengths), 10, 47
    pairs = torch.tensor([[3, 0], [1, 6], [5, 2], [7, 4]])
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(N, H, generator=gen).to(dtype)
        w = (torch.randn(V, H, generator=gen) / 3).to(dtype)
        labels = random_labels((N,), V, 0.2, gen)
        m = dpo_fast.DPOLoss(beta=0.2, workspace_bytes=20 * V * 12, backend="torch")  # ~20 tokens per group
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = m(hh, ww, labels, cu_seqlens=cu, pairs=pairs)
        assert m.last_route == "fused"
        out.loss.backward()
        # float64 reference of the whole thing
        h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
        tok = ref_token_logprobs(h64, w64, labels)
        seq = torch.stack([tok[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
        lw, ll = seq[pairs[:, 0]], seq[pairs[:, 1]]
        ref = -torch.nn.functional.logsigmoid(0.2 * (lw - ll)).mean()
        ref.backward()
        assert_close(out.loss, ref, dtype, "loss")
        assert_close(hh.grad, h64.grad, dtype, "dh")
        assert_close(ww.grad, w64.grad, dtype, "dW")


def test_gemm_count_fused_three_two_pass_four():
    h, w, b, labels, rc, rr = _batch()
    for fused, expected in ((True, 3), (False, 4)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with CountMM() as c:
            m = dpo_fast.DPOLoss(fused=fused, compute_metrics=False)
            m(hh, ww, labels, rc, rr).loss.backward()
        # the logits/* metric's GEMV is an mv, not an mm; WPO is off
        assert c.calls == expected, (fused, c.calls)
    # frozen weight on the fused route: dW skipped => 2 GEMMs
    hh = h.clone().requires_grad_()
    with CountMM() as c:
        dpo_fast.DPOLoss(compute_metrics=False)(hh, w, labels, rc, rr).loss.backward()
    assert c.calls == 2


def test_fallbacks_give_the_same_numbers():
    h, w, b, labels, rc, rr = _batch(seed=2)
    ref, ref_grads = _reference_route(h, w, b, labels, rc, rr, "sigmoid")
    for kw, route in ((dict(workspace_bytes=1024), "two_pass"), (dict(fused=False), "two_pass")):
        hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
        m = dpo_fast.DPOLoss(**kw)
        out = m(hh, ww, labels, rc, rr, bias=bb)
        assert m.last_route == route
        out.loss.backward()
        assert_close(out.loss, ref.loss, torch.float32, "loss")
        assert_close(ww.grad, ref_grads[1], torch.float32, "dW")
    # aot couples the batch: always two-pass
    m = dpo_fast.DPOLoss(loss_type="aot")
    hh = h.clone().requires_grad_()
    out = m(hh, w, labels, rc, rr)
    assert m.last_route == "two_pass"
    out.loss.backward()
    assert torch.isfinite(hh.grad).all()
    # no grad: forward only
    with torch.no_grad():
        out = dpo_fast.DPOLoss()(h, w, labels, rc, rr, bias=b)
    assert_close(out.loss, ref.loss, torch.float32, "no-grad loss")


def test_reference_from_hidden_states_and_logits_metric():
    h, w, b, labels, _, _ = _batch(seed=5)
    gen = torch.Generator().manual_seed(9)
    ref_h = h + 0.1 * torch.randn(h.shape, generator=gen)
    with torch.no_grad():
        ref_lp = dpo_fast.sequence_logprobs(ref_h, w, labels, bias=b)
    P = ref_lp.shape[0] // 2
    m = dpo_fast.DPOLoss()
    a = m(h.clone().requires_grad_(), w, labels, ref_lp[:P], ref_lp[P:], bias=b)
    c = m(h.clone().requires_grad_(), w, labels, bias=b, ref_hidden=ref_h)
    assert_close(a.loss, c.loss, torch.float32, "loss with ref_hidden")
    # logits/chosen = mean over chosen scored tokens of the vocab-mean logit (materialised here)
    z = (h @ w.t() + b)  # (2P, T, V)
    mask = labels != -100
    zbar = z.mean(-1)
    exp_c = (zbar[:P] * mask[:P]).sum() / mask[:P].sum()
    assert a.metrics["logits/chosen"] == pytest.approx(exp_c.item(), rel=1e-4, abs=1e-5)


def test_ld_alpha_matches_losses_helper():
    h, w, b, labels, rc, rr = _batch(seed=6)
    P = h.shape[0] // 2
    tok = dpo_fast.token_logprobs(h, w, labels, bias=b)
    mask = labels != -100
    lw, ll = L.ld_dpo_logps(tok[:P], tok[P:], mask[:P], mask[P:], 0.3)
    ref = dpo_fast.dpo_loss(lw, ll, rc, rr, beta=0.1)
    out = dpo_fast.DPOLoss(ld_alpha=0.3)(h.clone().requires_grad_(), w, labels, rc, rr, bias=b)
    assert_close(out.loss, ref.loss, torch.float32, "LD-DPO loss")
    assert_close(out.chosen_logps, lw, torch.float32, "LD-DPO logps")


def test_wpo_weights_match_losses_helper():
    h, w, b, labels, rc, rr = _batch(seed=8)
    P = h.shape[0] // 2
    logits = h @ w.t() + b
    lw_all = L.wpo_logweights_from_logits(logits, labels)
    lp = dpo_fast.sequence_logprobs(h, w, labels, bias=b)
    ref = dpo_fast.dpo_loss(lp[:P], lp[P:], rc, rr, use_weighting=True, chosen_wpo_logweights=lw_all[:P],
                            rejected_wpo_logweights=lw_all[P:])
    out = dpo_fast.DPOLoss(use_weighting=True)(h.clone().requires_grad_(), w, labels, rc, rr, bias=b)
    assert_close(out.loss, ref.loss, torch.float32, "WPO loss")


def test_extreme_margins_finite():
    h, w, b, labels, rc, rr = _batch(seed=3)
    hh, ww = (h * 30).requires_grad_(), w.clone().requires_grad_()
    out = dpo_fast.DPOLoss(beta=50.0)(hh, ww, labels, rc * 100, rr * 100)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()


def test_backward_twice_is_a_clear_error():
    h, w, b, labels, rc, rr = _batch()
    out = dpo_fast.DPOLoss()(h.clone().requires_grad_(), w, labels, rc, rr)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run once"):
        out.loss.backward()


def test_bad_input():
    h, w, b, labels, rc, rr = _batch()
    m = dpo_fast.DPOLoss()
    with pytest.raises(ValueError, match="even number of sequences"):
        m(h[:5], w, labels[:5])
    N = 12
    hp, lp = torch.randn(N, h.shape[-1]), torch.randint(0, w.shape[0], (N,))
    cu = torch.tensor([0, 4, 8, 12])
    with pytest.raises(ValueError, match=r"pairs: expected shape \(P, 2\)"):
        m(hp, w, lp, cu_seqlens=cu, pairs=torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="pairs: expected sequence indices in"):
        m(hp, w, lp, cu_seqlens=cu, pairs=torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="at most one pair"):
        m(hp, w, lp, cu_seqlens=cu, pairs=torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(TypeError, match="pairs: expected an integer"):
        m(hp, w, lp, cu_seqlens=cu, pairs=torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="pass both or neither"):
        m(h, w, labels, rc, None)
    with pytest.raises(ValueError, match=r"ref_chosen_logps: expected shape \(3,\)"):
        m(h, w, labels, rc[:2], rr[:2])
    with pytest.raises(ValueError, match="ref_hidden: expected shape"):
        m(h, w, labels, ref_hidden=h[:, :3])
    with pytest.raises(ValueError, match="ld_alpha"):
        dpo_fast.DPOLoss(ld_alpha=2.0)
    with pytest.raises(ValueError, match="unknown"):
        dpo_fast.DPOLoss(loss_type="dpo++")
    with pytest.raises(ValueError, match="beta"):
        dpo_fast.DPOLoss(beta=-1.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fused", [True, False])
def test_token_metrics_entropy_and_accuracy(backend, fused):
    h, w, b, labels, rc, rr = _batch(seed=12)
    h = h * 3  # sharper softmax, so some labels are the arg-max
    labels = labels.clone()
    z = h.double() @ w.double().t() + b.double()
    top = z.argmax(-1)
    labels[:, 3:5] = top[:, 3:5]  # make a few scored labels the arg-max
    m = dpo_fast.DPOLoss(token_metrics=True, fused=fused, backend=backend)
    out = m(h.clone().requires_grad_(), w, labels, rc, rr, bias=b)
    mask = labels != -100
    p = torch.softmax(z, -1)
    ent = -(p * torch.log_softmax(z, -1)).sum(-1)
    P = h.shape[0] // 2
    exp_ent = ent[mask].mean().item()  # TRL: over all scored tokens
    exp_acc = (top == labels)[:P][mask[:P]].double().mean().item()  # TRL: over chosen tokens
    zbar = z.mean(-1)
    assert out.metrics["entropy"] == pytest.approx(exp_ent, rel=1e-4)
    assert out.metrics["mean_token_accuracy"] == pytest.approx(exp_acc, abs=1e-6)
    assert out.metrics["logits/chosen"] == pytest.approx(zbar[:P][mask[:P]].mean().item(), rel=1e-4, abs=1e-5)
    assert out.metrics["logits/rejected"] == pytest.approx(zbar[P:][mask[P:]].mean().item(), rel=1e-4, abs=1e-5)
    assert 0 < exp_acc < 1
    sums = m.last_token_sums
    assert sums["tokens"].item() == mask.sum().item() and sums["chosen_tokens"].item() == mask[:P].sum().item()


def test_token_metrics_logits_include_softcap():
    h, w, b, labels, rc, rr = _batch(seed=14)
    out = dpo_fast.DPOLoss(token_metrics=True, softcap=2.0)(h * 4, w, labels, rc, rr)
    z = 2.0 * torch.tanh((h.double() * 4) @ w.double().t() / 2.0)
    P, mask = h.shape[0] // 2, labels != -100
    assert out.metrics["logits/chosen"] == pytest.approx(z.mean(-1)[:P][mask[:P]].mean().item(), rel=1e-4)


def test_autocast_bf16_activations_with_fp32_master_weight():
    """Under autocast the inputs are cast like F.linear would; gradients reach the fp32 weight."""
    h, w, b, labels, rc, rr = _batch(seed=13)
    ww = w.clone().requires_grad_()
    lin = torch.nn.Linear(h.shape[-1], h.shape[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hb = lin(h)  # bf16 activations
        assert hb.dtype == torch.bfloat16
        out = dpo_fast.DPOLoss(token_metrics=True)(hb, ww, labels, rc, rr, bias=b)
        lp = dpo_fast.sequence_logprobs(hb, ww, labels, bias=b)
    out.loss.backward()
    assert ww.grad is not None and ww.grad.dtype == torch.float32 and torch.isfinite(ww.grad).all()
    assert lin.weight.grad is not None
    # same numbers as an explicit bf16 computation
    with torch.no_grad():
        ref = dpo_fast.sequence_logprobs(hb.detach(), w.to(torch.bfloat16), labels, bias=b.to(torch.bfloat16))
    assert torch.allclose(lp, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_wpo_same_pass_both_routes_no_extra_gemm(backend):
    """WPO's lse(2z) comes from the loss's own logits pass: same numbers on both routes, no extra GEMM."""
    h, w, b, labels, rc, rr = _batch(seed=15)
    P = h.shape[0] // 2
    logits = h @ w.t() + b
    lw_all = L.wpo_logweights_from_logits(logits, labels)
    lp = dpo_fast.sequence_logprobs(h, w, labels, bias=b)
    hh = h.clone().requires_grad_()
    ref = dpo_fast.dpo_loss(lp[:P], lp[P:], rc, rr, use_weighting=True, chosen_wpo_logweights=lw_all[:P],
                            rejected_wpo_logweights=lw_all[P:])
    for fused, gemms in ((True, 3), (False, 4)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with CountMM() as c:
            m = dpo_fast.DPOLoss(use_weighting=True, fused=fused, backend=backend, compute_metrics=False)
            out = m(hh, ww, labels, rc, rr, bias=b)
            out.loss.backward()
        assert m.last_route == ("fused" if fused else "two_pass")
        assert c.calls == gemms
        assert_close(out.loss, ref.loss, torch.float32, f"WPO loss fused={fused}")


def test_pair_logprobs_reference_matches_policy_sums_exactly():
    """Reference log-probs from pair_logprobs equal the policy sums DPOLoss forms: rewards are exactly 0."""
    h, w, b, labels, _, _ = _batch(seed=16)
    for ld in (None, 0.4):
        with torch.no_grad():
            rc, rr = dpo_fast.pair_logprobs(h, w, labels, bias=b, ld_alpha=ld)
        for fused in (True, False):
            out = dpo_fast.DPOLoss(ld_alpha=ld, fused=fused)(h.clone().requires_grad_(), w, labels, rc, rr, bias=b)
            assert torch.equal(out.chosen_rewards, torch.zeros_like(out.chosen_rewards)), (ld, fused)
            assert torch.equal(out.rejected_rewards, torch.zeros_like(out.rejected_rewards)), (ld, fused)
