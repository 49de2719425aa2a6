"""DPOLoss: the one-pass fused route equals dpo_loss(sequence_logprobs(...)) — values and gradients."""

from __future__ import annotations

import pytest
import torch

import dpo_fast
from dpo_fast import losses as L
from support import (CountMM, assert_close, assert_output_matches, random_labels, ref_token_logprobs, rel_err,
                     seed_of)

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
    assert out.route == "fused"
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
        assert out.route == "fused"
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
        assert out.route == route
        out.loss.backward()
        assert_close(out.loss, ref.loss, torch.float32, "loss")
        assert_close(ww.grad, ref_grads[1], torch.float32, "dW")
    # aot couples the batch: always two-pass
    m = dpo_fast.DPOLoss(loss_type="aot")
    hh = h.clone().requires_grad_()
    out = m(hh, w, labels, rc, rr)
    assert out.route == "two_pass"
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
    sums = out.token_sums
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
        assert out.route == ("fused" if fused else "two_pass")
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


# ----------------------------------------------------------------------------------------------------------
# the route's record, LD-DPO + sft, non-finite isolation, dW accumulation, construction-time validation


@pytest.mark.parametrize("fused", [True, False])
def test_ld_alpha_sft_uses_unweighted_chosen_logps(fused):
    """TRL: with ld_alpha, the "sft" term of a loss list is the token-mean NLL of the *unweighted* chosen logps."""
    h, w, b, labels, rc, rr = _batch(seed=21)
    P = h.shape[0] // 2
    kw = dict(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    hh = h.clone().requires_grad_()
    out = dpo_fast.DPOLoss(**kw, ld_alpha=0.5, fused=fused)(hh, w, labels, rc, rr, bias=b)
    out.loss.backward()
    # the composition: LD-weighted sums for the preference term, plain sums for the NLL
    h64 = h.double().requires_grad_()
    tok = ref_token_logprobs(h64, w, labels, b)  # (2P, T)
    mask = labels != -100
    n = mask.sum(-1)
    shared = torch.minimum(n[:P], n[P:]).repeat(2)
    rank = mask.cumsum(-1)
    wt = torch.where(rank <= shared[:, None], 1.0, 0.5).double() * mask
    ld = (tok * wt).sum(-1)
    plain = tok.sum(-1)
    nll = -plain[:P] * (P / n[:P].clamp_min(1).sum())
    ref = dpo_fast.dpo_loss(ld[:P], ld[P:], rc.double(), rr.double(), **kw, sft_nll=nll, compute_metrics=False)
    ref.loss.backward()
    assert out.route == ("fused" if fused else "two_pass")
    assert_close(out.loss, ref.loss, torch.float32, "loss")
    assert_close(hh.grad, h64.grad, torch.float32, "dh")
    # and not the LD-weighted NLL (the old behaviour differs measurably)
    wrong = dpo_fast.dpo_loss(ld[:P], ld[P:], rc.double(), rr.double(), **kw, chosen_lengths=n[:P],
                              rejected_lengths=n[P:], compute_metrics=False)
    assert abs(wrong.loss.item() - ref.loss.item()) > 1e-3


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_pair_stays_in_its_pair(fused, bad):
    """NaN/inf in pair 0's hidden states: the other pairs' losses and hidden-state gradients stay finite."""
    h, w, b, labels, rc, rr = _batch(P=4, seed=22)
    P = 4
    h[0, 3] = bad  # a scored position of pair 0's chosen sequence
    assert labels[0, 3] != -100
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = dpo_fast.DPOLoss(fused=fused)(hh, ww, labels, rc, rr, bias=b)
    out.loss.backward()
    assert out.route == ("fused" if fused else "two_pass")
    assert not torch.isfinite(out.losses[0])
    assert torch.isfinite(out.losses[1:]).all() and torch.isfinite(out.chosen_logps[1:]).all()
    others = [i for i in range(2 * P) if i not in (0, P)]
    assert torch.isfinite(hh.grad[others]).all()
    # the other pairs' values equal those of a clean batch without pair 0
    keep = torch.tensor([1, 2, 3, 5, 6, 7])
    clean = dpo_fast.DPOLoss(fused=fused)(h[keep].clone().requires_grad_(), w, labels[keep], rc[1:], rr[1:], bias=b)
    assert_close(out.losses[1:], clean.losses, torch.float32, "other pairs' losses")


def test_fp32_master_weight_accumulates_dw_in_fp32():
    """Under autocast with an fp32 weight, dW is accumulated in fp32: its error against float64 does not grow
    with the number of groups, while a bf16 weight's running sum (one rounding per group) does."""
    P, T, H, V = 32, 9, 16, 257
    gen = torch.Generator().manual_seed(23)
    h = torch.randn(2 * P, T, H, generator=gen).to(torch.bfloat16)
    w = (torch.randn(V, H, generator=gen) / 4).to(torch.bfloat16).float()  # exactly representable in bf16
    labels = random_labels((2 * P, T), V, 0.1, gen)
    rc, rr = torch.randn(P, generator=gen) - 40, torch.randn(P, generator=gen) - 40
    w64 = w.double().requires_grad_()
    tok = ref_token_logprobs(h.double(), w64, labels).sum(-1)
    ref = -torch.nn.functional.logsigmoid(0.1 * ((tok[:P] - rc) - (tok[P:] - rr))).mean()
    ref.backward()
    err = {}
    for name, ws in (("one", None), ("many", 2 * T * V * 12)):  # ~one pair per group: 32 groups
        for master in (True, False):
            ww = (w if master else w.to(torch.bfloat16)).clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=master):
                out = dpo_fast.DPOLoss(backend="torch", workspace_bytes=ws)(h, ww, labels, rc, rr)
            assert out.route == "fused"
            out.loss.backward()
            assert ww.grad.dtype == ww.dtype
            err[name, master] = rel_err(ww.grad, w64.grad)
    assert err["one", True] == pytest.approx(err["one", False], rel=1e-6)  # same bf16 tiles, one GEMM
    assert err["many", True] < 1.5 * err["one", True]  # fp32 sum: no growth with the group count
    assert err["many", False] > 1.5 * err["many", True]  # bf16 running sum: grows


@pytest.mark.parametrize("cls", ["DPOLoss", "CPOLoss", "ORPOLoss", "KTOLoss", "GRPOLoss"])
@pytest.mark.parametrize("kw, err, match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index"),
    (dict(ignore_index=True), TypeError, "ignore_index"),
    (dict(workspace_bytes=10), ValueError, "workspace_bytes"),
])
def test_module_options_validated_at_construction(cls, kw, err, match):
    with pytest.raises(err, match=match):
        getattr(dpo_fast, cls)(**kw)


def test_output_record_carries_route_and_token_sums():
    h, w, b, labels, rc, rr = _batch(seed=24)
    m = dpo_fast.DPOLoss(token_metrics=True)
    out = m(h.clone().requires_grad_(), w, labels, rc, rr)
    assert isinstance(out, dpo_fast.DPOOutput) and out.route == "fused"
    assert set(out.token_sums) >= {"entropy_sum", "tokens", "chosen_hits", "chosen_tokens", "chosen_logits_sum",
                                   "rejected_logits_sum", "rejected_tokens"}
    assert not hasattr(m, "last_route") and not hasattr(m, "last_token_sums")
    assert dpo_fast.DPOLoss()(h, w, labels, rc, rr).token_sums is None
