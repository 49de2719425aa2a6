"""cpo_loss, orpo_loss, kto_loss, bco_loss, grpo_loss against float64 references written from LOSSES.md."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_fast import losses as L
from support import TOL

D64 = torch.float64


def close(a, b, kind):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D64), torch.as_tensor(b, dtype=D64), **TOL[kind])


def logsig(x):
    return torch.log(torch.sigmoid(x))  # naive on purpose: the references only see moderate inputs


def batch(P=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    nw = torch.randint(3, 30, (P,), generator=g)
    nl = torch.randint(3, 30, (P,), generator=g)
    lw = -nw * (0.2 + torch.rand(P, generator=g, dtype=D64))
    ll = -nl * (0.2 + torch.rand(P, generator=g, dtype=D64))
    return lw, ll, nw, nl


# ================================================================================================ CPO
def ref_cpo(lt, lw, ll, nw, nl, *, beta, eps=0.0, gamma=0.5, cpo_alpha=1.0, alpha=0.0):
    if lt in ("ipo", "simpo"):
        aw, al = lw / nw, ll / nl
    else:
        aw, al = lw, ll
    if alpha != 0.0:
        uw = (1 - torch.exp(aw) ** (-alpha)) / alpha  # (1 − p^{−α})/α
        ul = (1 - torch.exp(al) ** (-alpha)) / alpha
    else:
        uw, ul = aw, al
    h = uw - ul
    if lt == "sigmoid":
        per = -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    elif lt == "simpo":
        per = -(1 - eps) * logsig(beta * h - gamma) - eps * logsig(-(beta * h - gamma))
    elif lt == "hinge":
        per = torch.clamp(1 - beta * h, min=0)
    else:
        per = (h - 1 / (2 * beta)) ** 2
    nll = -lw.sum() / nw.sum()
    return per.mean() + cpo_alpha * nll, beta * uw, beta * ul


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_cpo_matches_reference(loss_type, alpha):
    lw, ll, nw, nl = batch(seed=1)
    eps = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    if loss_type in ("sigmoid", "hinge") and alpha:
        lw, ll = lw / 10, ll / 10  # keep p^{−α} of summed log-probs moderate
    kw = dict(beta=0.5, label_smoothing=eps, simpo_gamma=0.3, cpo_alpha=0.7, alpha=alpha)
    out = L.cpo_loss(lw, ll, loss_type=loss_type, chosen_lengths=nw, rejected_lengths=nl, **kw)
    ref, rw, rl = ref_cpo(loss_type, lw, ll, nw.double(), nl.double(), beta=0.5, eps=eps, gamma=0.3,
                          cpo_alpha=0.7, alpha=alpha)
    close(out.loss, ref, "f64")
    close(out.chosen_rewards, rw, "f64")
    close(out.rejected_rewards, rl, "f64")
    close(out.metrics["nll_loss"], -lw.sum() / nw.sum(), "metric")
    a, b = lw.clone().requires_grad_(), ll.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y: L.cpo_loss(x, y, loss_type=loss_type, chosen_lengths=nw, rejected_lengths=nl,
                                compute_metrics=False, **kw).loss, (a, b))


def test_cpo_simpo_proper_and_explicit_nll():
    lw, ll, nw, nl = batch(seed=2)
    out = L.cpo_loss(lw, ll, loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0,
                     chosen_lengths=nw, rejected_lengths=nl)
    h = lw / nw - ll / nl
    close(out.loss, (-logsig(2.0 * h - 0.5)).mean(), "f64")
    assert out.metrics["nll_loss"] == 0.0
    # explicit NLL (e.g. from the engine's token mean); no lengths needed for sigmoid
    out = L.cpo_loss(lw, ll, chosen_nll=torch.tensor(1.25, dtype=D64))
    close(out.loss, (-logsig(0.1 * (lw - ll))).mean() + 1.25, "f64")


def test_cpo_extreme_and_errors():
    lw = torch.tensor([2000.0, -2000.0], requires_grad=True)
    out = L.cpo_loss(lw, -lw.detach(), beta=1.0, cpo_alpha=0.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lw.grad).all()
    x = torch.tensor([-1.0, -2.0])
    with pytest.raises(ValueError, match=r"unknown loss_type 'dpo'.*simpo"):
        L.cpo_loss(x, x, loss_type="dpo")
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        L.cpo_loss(x, x, loss_type="simpo", cpo_alpha=0.0)
    with pytest.raises(ValueError, match="chosen_nll"):
        L.cpo_loss(x, x)  # cpo_alpha = 1 needs the NLL or chosen_lengths
    with pytest.raises(ValueError, match="label_smoothing"):
        L.cpo_loss(x, x, label_smoothing=0.7, cpo_alpha=0.0)
    with pytest.raises(ValueError, match="beta"):
        L.cpo_loss(x, x, beta=0.0, cpo_alpha=0.0)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        L.cpo_loss(x, x[:1], cpo_alpha=0.0)


# ================================================================================================ ORPO
def ref_orpo(lw, ll, nw, nl, beta):
    aw, al = lw / nw, ll / nl
    log_odds = (aw - al) - (torch.log(1 - torch.exp(aw)) - torch.log(1 - torch.exp(al)))
    ratio = logsig(log_odds)
    nll = -lw.sum() / nw.sum()
    return nll - beta * ratio.mean(), ratio, log_odds


def test_orpo_matches_reference():
    lw, ll, nw, nl = batch(seed=3)
    out = L.orpo_loss(lw, ll, chosen_lengths=nw, rejected_lengths=nl, beta=0.25)
    ref, ratio, log_odds = ref_orpo(lw, ll, nw.double(), nl.double(), 0.25)
    close(out.loss, ref, "f64")
    close(out.metrics["log_odds_ratio"], ratio.mean(), "metric")
    close(out.metrics["log_odds_chosen"], log_odds.mean(), "metric")
    close(out.chosen_rewards, 0.25 * lw / nw, "f64")
    a, b = lw.clone().requires_grad_(), ll.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y: L.orpo_loss(x, y, chosen_lengths=nw, rejected_lengths=nl, compute_metrics=False).loss, (a, b))
    # float32: same within the float32 tolerance
    o32 = L.orpo_loss(lw.float(), ll.float(), chosen_lengths=nw, rejected_lengths=nl, beta=0.25)
    assert o32.loss.dtype == torch.float32
    close(o32.loss, ref, "f32")


def test_orpo_extremes():
    # mean log-prob ≈ 0 (certain tokens) and very negative: finite loss and gradient
    lw = torch.tensor([-1e-9, -800.0, -5.0], requires_grad=True)
    ll = torch.tensor([-900.0, -1e-12, -5.0], requires_grad=True)
    n = torch.tensor([4, 4, 4])
    out = L.orpo_loss(lw, ll, chosen_lengths=n, rejected_lengths=n)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        L.orpo_loss(lw, ll, chosen_lengths=None, rejected_lengths=n)


# ================================================================================================ KTO
def ref_kto(lp, lr, des, kl_p, kl_r, beta, wd, wu):
    z = max(0.0, float((kl_p - kl_r).mean())) if kl_p is not None else 0.0
    out = []
    for i in range(lp.shape[0]):
        r = float(lp[i] - lr[i])
        if des[i]:
            out.append(wd * (1 - 1 / (1 + math.exp(-beta * (r - z)))))
        else:
            out.append(wu * (1 - 1 / (1 + math.exp(-beta * (z - r)))))
    return torch.tensor(out, dtype=D64), z


@pytest.mark.parametrize("kl_shift", [0.5, -3.0])  # positive KL estimate, and one clamped to 0
def test_kto_matches_reference(kl_shift):
    g = torch.Generator().manual_seed(4)
    N = 9
    lp = -20 + 3 * torch.randn(N, generator=g, dtype=D64)
    lr = lp + torch.randn(N, generator=g, dtype=D64)
    des = torch.rand(N, generator=g) > 0.4
    kl_p = -30 + torch.randn(N, generator=g, dtype=D64)
    kl_r = kl_p - kl_shift + 0.1 * torch.randn(N, generator=g, dtype=D64)
    out = L.kto_loss(lp, lr, des, kl_p, kl_r, beta=0.3, desirable_weight=1.33, undesirable_weight=0.7)
    ref, z = ref_kto(lp, lr, des, kl_p, kl_r, 0.3, 1.33, 0.7)
    close(out.losses, ref, "f64")
    close(out.loss, ref.mean(), "f64")
    close(out.baseline, z, "f64")
    if kl_shift < 0:
        assert float(out.baseline) == 0.0
    m = out.metrics
    close(m["kl"], z, "metric")
    close(m["rewards/chosen"], (0.3 * (lp - lr))[des].mean(), "metric")
    close(m["rewards/rejected"], (0.3 * (lp - lr))[~des].mean(), "metric")
    close(m["logps/chosen"], lp[des].mean(), "metric")
    assert m["count/chosen"] == float(des.sum())


def test_kto_kl_is_detached_and_gradcheck():
    g = torch.Generator().manual_seed(5)
    lp = (-10 + torch.randn(6, generator=g, dtype=D64)).requires_grad_()
    lr = -10 + torch.randn(6, generator=g, dtype=D64)
    kl_p = (lp.detach() - 1 + torch.randn(6, generator=g, dtype=D64)).requires_grad_()
    des = torch.tensor([True, False, True, False, False, True])
    out = L.kto_loss(lp, lr, des, kl_p, lr - 2.0)
    out.loss.backward()
    assert kl_p.grad is None and torch.isfinite(lp.grad).all()
    assert torch.autograd.gradcheck(
        lambda x: L.kto_loss(x, lr, des, kl_p.detach(), lr - 2.0, compute_metrics=False).loss,
        (lp.detach().clone().requires_grad_(),))
    # a precomputed z overrides; no KL and no z means z = 0; only-desirable batch omits rejected metrics
    a = L.kto_loss(lp, lr, des, kl=0.7)
    assert float(a.baseline) == pytest.approx(0.7)
    b = L.kto_loss(lp, lr, torch.ones(6, dtype=torch.bool))
    assert float(b.baseline) == 0.0 and "rewards/rejected" not in b.metrics and "rewards/margins" not in b.metrics


def test_kto_extremes_and_errors():
    lp = torch.tensor([3000.0, -3000.0, 3000.0, -3000.0], requires_grad=True)
    des = torch.tensor([True, True, False, False])
    out = L.kto_loss(lp, None, des, beta=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lp.grad).all()
    close(out.losses, [0.0, 1.0, 1.0, 0.0], "f32")
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="desirable must be a bool tensor"):
        L.kto_loss(x, x, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="desirable must be a bool tensor of shape"):
        L.kto_loss(x, x, torch.tensor([True]))
    with pytest.raises(ValueError, match="both policy_kl_logps and ref_kl_logps"):
        L.kto_loss(x, x, torch.ones(3, dtype=torch.bool), x)
    with pytest.raises(ValueError, match="undesirable_weight"):
        L.kto_loss(x, x, torch.ones(3, dtype=torch.bool), undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="ref_logps must have shape"):
        L.kto_loss(x, x[:2], torch.ones(3, dtype=torch.bool))


# ================================================================================================ BCO
def ref_bco(lp, lr, des, beta, delta):
    rho = beta * (lp - lr)
    return torch.where(des, -logsig(rho - delta), -logsig(-(rho - delta)))


def test_bco_matches_reference_and_running_mean():
    g = torch.Generator().manual_seed(6)
    lp1, lp2 = (-15 + 2 * torch.randn(7, generator=g, dtype=D64) for _ in range(2))
    lr1, lr2 = lp1 + torch.randn(7, generator=g, dtype=D64), lp2 + torch.randn(7, generator=g, dtype=D64)
    des = torch.rand(7, generator=g) > 0.5
    # explicit δ
    out = L.bco_loss(lp1, lr1, des, beta=0.2, delta=0.05)
    close(out.losses, ref_bco(lp1, lr1, des, 0.2, 0.05), "f64")
    close(out.loss, ref_bco(lp1, lr1, des, 0.2, 0.05).mean(), "f64")
    # running mean: updated with the batch's mean reward first (TRL order), mean of batch means
    rm = L.BCORunningMean()
    o1 = L.bco_loss(lp1, lr1, des, beta=0.2, running_mean=rm)
    d1 = float((0.2 * (lp1 - lr1)).mean())
    close(o1.baseline, d1, "f64")
    close(o1.loss, ref_bco(lp1, lr1, des, 0.2, d1).mean(), "f64")
    o2 = L.bco_loss(lp2, lr2, des, beta=0.2, running_mean=rm)
    d2 = (d1 + float((0.2 * (lp2 - lr2)).mean())) / 2
    close(o2.baseline, d2, "f64")
    close(o2.loss, ref_bco(lp2, lr2, des, 0.2, d2).mean(), "f64")
    close(o2.metrics["delta"], d2, "metric")
    # per-element weighting and state round trip
    pe = L.BCORunningMean(per_element=True)
    pe.update(torch.tensor([1.0, 2.0, 3.0]))
    pe.update(torch.tensor([7.0]))
    assert float(pe.mean) == pytest.approx(13.0 / 4)
    st = pe.state_dict()
    pe2 = L.BCORunningMean()
    pe2.load_state_dict(st)
    assert float(pe2.mean) == pytest.approx(13.0 / 4) and pe2.count == 4.0 and pe2.per_element
    # gradient, extremes, errors
    a = lp1.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: L.bco_loss(x, lr1, des, delta=0.1, compute_metrics=False).loss, (a,))
    big = torch.tensor([4000.0, -4000.0], requires_grad=True)
    o = L.bco_loss(big, None, torch.tensor([False, True]), beta=1.0)
    o.loss.backward()
    assert torch.isfinite(o.loss) and torch.isfinite(big.grad).all()
    with pytest.raises(ValueError, match="either delta or running_mean"):
        L.bco_loss(lp1, lr1, des, delta=0.0, running_mean=rm)
    with pytest.raises(ValueError, match="delta must be a scalar"):
        L.bco_loss(lp1, lr1, des, delta=torch.zeros(2))
    with pytest.raises(ValueError, match="at least one"):
        L.BCORunningMean().update(torch.zeros(0))


# ================================================================================================ GRPO
def ref_grpo(lp, old, ref, A, mask, *, beta, e_lo, e_hi, level, loss_type, max_len=None, n_items=None):
    B, T = lp.shape
    per = torch.zeros(B, T, dtype=D64)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        seq = math.exp(sum(float(lp[b, t] - old[b, t]) for t in idx) / max(len(idx), 1))
        for t in idx:
            rho = seq if level == "sequence" else math.exp(float(lp[b, t] - old[b, t]))
            a = float(A[b])
            v = -min(rho * a, min(max(rho, 1 - e_lo), 1 + e_hi) * a)
            if beta:
                d = float(ref[b, t] - lp[b, t])
                v += beta * (math.exp(d) - d - 1)
            per[b, t] = v
    m = mask.to(D64)
    if loss_type == "grpo":
        return torch.stack([per[b].sum() / max(float(m[b].sum()), 1.0) for b in range(B)]).mean(), per
    if loss_type == "bnpo":
        return per.sum() / m.sum(), per
    if loss_type == "dr_grpo":
        return per.sum() / (B * (max_len or T)), per
    return per.sum() / (n_items if n_items is not None else m.sum()), per


def grpo_batch(seed=0, B=4, T=9):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=D64) * 4
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=D64)
    ref = lp + 0.2 * torch.randn(B, T, generator=g, dtype=D64)
    A = torch.randn(B, generator=g, dtype=D64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return lp, old, ref, A, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_matches_reference(loss_type, level, beta):
    lp, old, ref, A, mask = grpo_batch(seed=7)
    kw = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level=level, loss_type=loss_type,
              max_completion_length=12, num_items_in_batch=50)
    out = L.grpo_loss(lp, A, mask, old, ref, **kw)
    expect, per = ref_grpo(lp, old, ref, A, mask, beta=beta, e_lo=0.2, e_hi=0.28, level=level,
                           loss_type=loss_type, max_len=12, n_items=50)
    close(out.loss, expect, "f64")
    close(out.per_token_loss, per, "f64")
    x = lp.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda y: L.grpo_loss(y, A, mask, old, ref, compute_metrics=False, **kw).loss,
                                    (x,))


def test_grpo_metrics_and_on_policy():
    lp, old, ref, A, mask = grpo_batch(seed=8)
    out = L.grpo_loss(lp, A, mask, old, ref, beta=0.1, epsilon_low=0.1, epsilon_high=0.15)
    rho = torch.exp(lp - old)
    a = A.unsqueeze(-1).expand_as(lp)
    m = mask.to(D64)
    low = (((rho < 0.9) & (a < 0)).to(D64) * m).sum() / m.sum()
    high = (((rho > 1.15) & (a > 0)).to(D64) * m).sum() / m.sum()
    d = ref - lp
    close(out.metrics["clip_ratio/low_mean"], low, "metric")
    close(out.metrics["clip_ratio/high_mean"], high, "metric")
    close(out.metrics["clip_ratio/region_mean"], low + high, "metric")
    close(out.metrics["kl"], ((torch.exp(d) - d - 1) * m).sum() / m.sum(), "metric")
    # old_logps=None: ratio 1, loss = −mean over sequences of A, gradient −A/|y| per scored token (grpo)
    x = lp.clone().requires_grad_()
    o = L.grpo_loss(x, A, mask)
    close(o.loss, -A.mean(), "f64")
    o.loss.backward()
    expect = -(A.unsqueeze(-1) * m / m.sum(-1, keepdim=True)) / lp.shape[0]
    close(x.grad, expect, "f64")
    assert "kl" not in o.metrics
    # float32 input, float32 output
    assert L.grpo_loss(lp.float(), A.float(), mask).loss.dtype == torch.float32


def test_grpo_errors():
    lp, old, ref, A, mask = grpo_batch()
    with pytest.raises(ValueError, match=r"unknown loss_type 'ppo'.*dapo"):
        L.grpo_loss(lp, A, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        L.grpo_loss(lp, A, mask, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="logps must be a float"):
        L.grpo_loss(lp[0], A, mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        L.grpo_loss(lp, A, mask[:, :3])
    with pytest.raises(ValueError, match="advantages must have shape"):
        L.grpo_loss(lp, A[:2], mask)
    with pytest.raises(ValueError, match="old_logps must have shape"):
        L.grpo_loss(lp, A, mask, old[:, :2])
    with pytest.raises(ValueError, match="pass ref_logps"):
        L.grpo_loss(lp, A, mask, beta=0.1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        L.grpo_loss(lp, A, mask, ref_logps=ref, beta=-0.1)
    with pytest.raises(ValueError, match="epsilon_low"):
        L.grpo_loss(lp, A, mask, epsilon_low=1.0)
    with pytest.raises(ValueError, match="epsilon_high"):
        L.grpo_loss(lp, A, mask, epsilon_high=-0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        L.grpo_loss(lp, A, mask, loss_type="dr_grpo", max_completion_length=0)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        L.grpo_loss(lp, A, mask, loss_type="dapo", num_items_in_batch=0)


def test_family_inputs_not_modified():
    lw, ll, nw, nl = batch(seed=9)
    lp, old, ref, A, mask = grpo_batch(seed=9)
    snap = [t.clone() for t in (lw, ll, nw, nl, lp, old, ref, A, mask)]
    L.cpo_loss(lw, ll, loss_type="simpo", chosen_lengths=nw, rejected_lengths=nl, alpha=0.1)
    L.orpo_loss(lw, ll, chosen_lengths=nw, rejected_lengths=nl)
    des = torch.arange(lw.shape[0]) % 2 == 0
    L.kto_loss(lw, ll, des, lw, ll)
    L.bco_loss(lw, ll, des, running_mean=L.BCORunningMean())
    L.grpo_loss(lp, A, mask, old, ref, beta=0.1, importance_sampling_level="sequence")
    for a, b in zip(snap, (lw, ll, nw, nl, lp, old, ref, A, mask)):
        assert torch.equal(a, b)


def test_public_names_resolve_lazily():
    import dpo_fast

    for name in ("dpo_loss", "DPOOutput", "LOSS_TYPES", "cpo_loss", "orpo_loss", "kto_loss", "bco_loss",
                 "grpo_loss"):
        assert getattr(dpo_fast, name) is getattr(L, name)
    assert len(dpo_fast.LOSS_TYPES) == 15


def test_cpo_orpo_log_the_averaged_logps():
    lw, ll, nw, nl = batch(seed=10)
    m = L.cpo_loss(lw, ll, loss_type="simpo", chosen_lengths=nw, rejected_lengths=nl).metrics
    close(m["logps/chosen"], (lw / nw).mean(), "metric")
    m = L.cpo_loss(lw, ll, loss_type="sigmoid", chosen_lengths=nw).metrics
    close(m["logps/rejected"], ll.mean(), "metric")
    m = L.orpo_loss(lw, ll, chosen_lengths=nw, rejected_lengths=nl).metrics
    close(m["logps/rejected"], (ll / nl).mean(), "metric")
    close(m["rewards/margins"], (0.1 * (lw / nw - ll / nl)).mean(), "metric")
