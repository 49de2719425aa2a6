"""dpo_loss, pair_loss_and_grads, LD-DPO and WPO helpers against float64 references written from LOSSES.md.

The references below are deliberately naive (log(sigmoid(x)), explicit exponentials) and only ever see
moderate inputs in float64; the code under test uses stable forms, checked separately at extreme margins.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_fast import losses as L
from support import TOL, seed_of

D64 = torch.float64
PAIRWISE_EPS = {"exo_pair": 1e-3, "robust": 0.1, "sigmoid": 0.1, "aot": 0.1, "aot_unpaired": 0.1}


def close(a, b, kind):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D64), torch.as_tensor(b, dtype=D64), **TOL[kind])


# ---------------------------------------------------------------------------------------------- reference
def ref_score(r, fdiv, alpha):
    """TRL 1.16's scores, 0 at r = 0 (the constants matter for ipo / sigmoid_norm)."""
    if fdiv == "reverse_kl":
        return r
    if fdiv == "forward_kl":
        return 1.0 - torch.exp(-r)
    if fdiv == "js_divergence":
        return math.log(2.0) + torch.log(torch.sigmoid(r))
    return (torch.exp((alpha - 1.0) * r) - 1.0) / (alpha - 1.0)


def ref_pair_loss(lt, lw, ll, lwr, llr, *, beta, eps=0.0, fdiv="reverse_kl", alpha=0.5, tau=0.05,
                  nw=None, nl=None, sft=None):
    """Per-pair loss of one loss type, from docs/LOSSES.md (TRL 1.16's formulas), in float64.

    nca_pair, bco_pair, sppo_hard and apo_down use the plain log-ratios r, not the f-divergence scores, as TRL's
    code does."""
    sig = torch.sigmoid
    logsig = lambda x: torch.log(torch.sigmoid(x))  # noqa: E731  (naive on purpose)
    rw, rl = lw - lwr, ll - llr
    sw, sl = ref_score(rw, fdiv, alpha), ref_score(rl, fdiv, alpha)
    d = sw - sl
    z = beta * d
    if lt == "sigmoid":
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    if lt == "hinge":
        return torch.clamp(1 - z, min=0)
    if lt == "ipo":
        return (sw / nw - sl / nl - 1 / (2 * beta)) ** 2
    if lt == "exo_pair":
        qw, ql = sig(z), sig(-z)
        return qw * (torch.log(qw) - math.log(1 - eps)) + ql * (torch.log(ql) - math.log(eps))
    if lt == "nca_pair":
        return -logsig(beta * rw) - 0.5 * logsig(-beta * rw) - 0.5 * logsig(-beta * rl)
    if lt == "robust":
        return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    if lt == "bco_pair":
        return -logsig(beta * rw) - logsig(-beta * rl)
    if lt == "sppo_hard":
        return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if lt in ("aot", "aot_unpaired"):
        if lt == "aot":
            delta = torch.sort(lw - ll).values - torch.sort(lwr - llr).values
        else:
            delta = torch.sort(rw).values - torch.sort(rl).values
        return -(1 - eps) * logsig(beta * delta) - eps * logsig(-beta * delta)
    if lt == "apo_zero":
        return 1 - sig(beta * rw) + sig(beta * rl)
    if lt == "apo_down":
        return sig(beta * rw) + 1 - sig(beta * (rw - rl))
    if lt == "discopop":
        m = sig(z / tau)
        return (1 - m) * (-logsig(z)) + m * torch.exp(-z)
    if lt == "sigmoid_norm":
        return -logsig(beta * (sw / nw - sl / nl))
    if lt == "sft":
        if sft is not None:
            return sft.expand_as(lw)
        return (-lw.sum() / nw.sum()).expand_as(lw)  # TRL: token-mean NLL of all chosen tokens
    raise AssertionError(lt)


def make_batch(P=7, seed=0, scale=3.0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    lw = -20 + scale * torch.randn(P, generator=g, dtype=D64)
    ll = -22 + scale * torch.randn(P, generator=g, dtype=D64)
    lwr = lw + torch.randn(P, generator=g, dtype=D64)
    llr = ll + torch.randn(P, generator=g, dtype=D64)
    nw = torch.randint(1, 40, (P,), generator=g)
    nl = torch.randint(1, 40, (P,), generator=g)
    return [t.to(dtype) for t in (lw, ll, lwr, llr)] + [nw, nl]


# ---------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
@pytest.mark.parametrize("fdiv", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_every_loss_type_matches_reference_f64(loss_type, fdiv):
    lw, ll, lwr, llr, nw, nl = make_batch(P=9, seed=seed_of(loss_type, fdiv), scale=0.5)
    # keep log-ratios O(1) so that e^{±r} of the f-divergences stays moderate
    eps = PAIRWISE_EPS.get(loss_type, 0.0)
    kw = dict(beta=0.7, label_smoothing=eps, f_divergence_type=fdiv, f_alpha_divergence_coef=0.3)
    out = L.dpo_loss(lw, ll, lwr, llr, loss_type=loss_type, chosen_lengths=nw, rejected_lengths=nl, **kw)
    ref = ref_pair_loss(loss_type, lw, ll, lwr, llr, beta=0.7, eps=eps, fdiv=fdiv, alpha=0.3,
                        nw=nw.to(D64), nl=nl.to(D64))
    assert out.loss.dtype == D64 and out.losses.shape == (9,)
    close(out.loss, ref.mean(), "f64")
    if loss_type != "sft":  # the sft share per pair differs from the broadcast by design; the mean agrees
        close(out.losses, ref, "f64")


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_float32_inputs_match_reference(loss_type):
    lw, ll, lwr, llr, nw, nl = make_batch(P=16, seed=3)
    eps = PAIRWISE_EPS.get(loss_type, 0.0)
    out = L.dpo_loss(lw.float(), ll.float(), lwr.float(), llr.float(), beta=0.1, loss_type=loss_type,
                     label_smoothing=eps, chosen_lengths=nw, rejected_lengths=nl)
    ref = ref_pair_loss(loss_type, *(t.float().double() for t in (lw, ll, lwr, llr)), beta=0.1, eps=eps,
                        nw=nw.double(), nl=nl.double())
    assert out.loss.dtype == torch.float32 and out.losses.dtype == torch.float32
    close(out.loss, ref.mean(), "f32")


def test_bf16_inputs_give_float32_outputs():
    lw, ll, lwr, llr, _, _ = make_batch(P=4)
    out = L.dpo_loss(lw.bfloat16(), ll.bfloat16(), lwr.bfloat16(), llr.bfloat16())
    for t in (out.loss, out.losses, out.chosen_rewards, out.rejected_rewards, out.chosen_logps):
        assert t.dtype == torch.float32


def test_reference_free_equals_zero_reference():
    lw, ll, _, _, nw, nl = make_batch()
    z = torch.zeros_like(lw)
    a = L.dpo_loss(lw, ll, loss_type="ipo", chosen_lengths=nw, rejected_lengths=nl)
    b = L.dpo_loss(lw, ll, z, z, loss_type="ipo", chosen_lengths=nw, rejected_lengths=nl)
    close(a.loss, b.loss, "f64")


def test_loss_list_with_weights_and_sum_reduction():
    lw, ll, lwr, llr, nw, nl = make_batch()
    types, w = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    out = L.dpo_loss(lw, ll, lwr, llr, loss_type=types, loss_weights=w, chosen_lengths=nw)
    ref = sum(wk * ref_pair_loss(t, lw, ll, lwr, llr, beta=0.1, nw=nw.double()).mean() for t, wk in zip(types, w))
    close(out.loss, ref, "f64")
    close(out.losses.mean(), out.loss, "f64")
    s = L.dpo_loss(lw, ll, lwr, llr, loss_type=types, loss_weights=w, chosen_lengths=nw, reduction="sum")
    close(s.loss, ref * lw.shape[0], "f64")
    n = L.dpo_loss(lw, ll, lwr, llr, reduction="none")
    assert n.loss.shape == lw.shape
    # default weights are 1 each
    d = L.dpo_loss(lw, ll, lwr, llr, loss_type=["sigmoid", "hinge"])
    close(d.loss, L.dpo_loss(lw, ll, lwr, llr).loss + L.dpo_loss(lw, ll, lwr, llr, loss_type="hinge").loss, "f64")


def test_sft_explicit_nll_scalar_and_per_pair():
    lw, ll, lwr, llr, _, _ = make_batch(P=3)
    out = L.dpo_loss(lw, ll, lwr, llr, loss_type="sft", sft_nll=torch.tensor(2.5, dtype=D64))
    close(out.loss, 2.5, "f64")
    per = torch.tensor([1.0, 2.0, 4.0], dtype=D64)
    out = L.dpo_loss(lw, ll, lwr, llr, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], sft_nll=per)
    close(out.loss, ref_pair_loss("sigmoid", lw, ll, lwr, llr, beta=0.1).mean() + 0.5 * per.mean(), "f64")


def test_wpo_weighting():
    lw, ll, lwr, llr, _, _ = make_batch(P=6)
    g = torch.Generator().manual_seed(5)
    cw = (-torch.rand(6, generator=g, dtype=D64)).requires_grad_()
    cr = (-torch.rand(6, generator=g, dtype=D64)).requires_grad_()
    out = L.dpo_loss(lw, ll, lwr, llr, use_weighting=True, chosen_wpo_logweights=cw, rejected_wpo_logweights=cr)
    W = torch.exp(cw.detach() + cr.detach())
    close(out.loss, (ref_pair_loss("sigmoid", lw, ll, lwr, llr, beta=0.1) * W).mean(), "f64")
    assert not out.loss.requires_grad  # W is detached and nothing else requires grad
    # weights ignored when use_weighting is False
    close(L.dpo_loss(lw, ll, lwr, llr, chosen_wpo_logweights=cw, rejected_wpo_logweights=cr).loss,
          L.dpo_loss(lw, ll, lwr, llr).loss, "f64")


def test_alpha_divergence_alpha_to_one_is_reverse_kl():
    lw, ll, lwr, llr, _, _ = make_batch()
    base = L.dpo_loss(lw, ll, lwr, llr).loss
    one = L.dpo_loss(lw, ll, lwr, llr, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0).loss
    near = L.dpo_loss(lw, ll, lwr, llr, f_divergence_type="alpha_divergence",
                      f_alpha_divergence_coef=1.0 - 1e-9).loss
    close(one, base, "f64")
    torch.testing.assert_close(near, base, rtol=1e-7, atol=1e-9)
    # alpha = 0 is forward KL
    close(L.dpo_loss(lw, ll, lwr, llr, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0).loss,
          L.dpo_loss(lw, ll, lwr, llr, f_divergence_type="forward_kl").loss, "f64")


def test_rewards_are_plain_log_ratios_under_f_divergence():
    lw, ll, lwr, llr, _, _ = make_batch()
    out = L.dpo_loss(lw, ll, lwr, llr, beta=0.3, f_divergence_type="js_divergence")
    close(out.chosen_rewards, 0.3 * (lw - lwr), "f64")
    close(out.rejected_rewards, 0.3 * (ll - llr), "f64")
    assert not out.chosen_rewards.requires_grad


# ---------------------------------------------------------------------------------------------- extremes
EXTREME = torch.tensor([1500.0, -1500.0, 400.0, -400.0, 0.0])


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_extreme_margins_finite_loss_and_grad(loss_type, dtype):
    # β = 1 and Δ up to ±3000: |βΔ| far beyond 100
    lw = EXTREME.to(dtype).clone().requires_grad_()
    ll = (-EXTREME).to(dtype).clone().requires_grad_()
    eps = PAIRWISE_EPS.get(loss_type, 0.0)
    n = torch.full((5,), 10)
    out = L.dpo_loss(lw, ll, beta=1.0, loss_type=loss_type, label_smoothing=eps, chosen_lengths=n,
                     rejected_lengths=n)
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.loss)
    for g in (lw.grad, ll.grad):
        assert g is None or torch.isfinite(g).all()  # sft has no rejected gradient
    assert lw.grad is not None


def test_extreme_margin_asymptotics():
    lw = torch.tensor([500.0, -500.0], requires_grad=True)
    ll = torch.zeros(2)
    out = L.dpo_loss(lw, ll, beta=1.0, reduction="none")
    close(out.losses, [0.0, 500.0], "f32")
    out.loss.sum().backward()
    close(lw.grad, [0.0, -1.0], "f32")
    # discopop: z → −∞ is the logistic branch (−log σ z ≈ −z), z → +∞ goes to 0
    d = L.dpo_loss(torch.tensor([-300.0, 300.0]), torch.zeros(2), beta=1.0, loss_type="discopop",
                   reduction="none")
    close(d.losses, [300.0, 0.0], "f32")


# ---------------------------------------------------------------------------------------------- ε edges
def test_label_smoothing_edges():
    lw, ll, lwr, llr, _, _ = make_batch()
    # sigmoid ε = 0.5: symmetric in Δ
    a = L.dpo_loss(lw, ll, lwr, llr, label_smoothing=0.5, reduction="none").losses
    b = L.dpo_loss(ll, lw, llr, lwr, label_smoothing=0.5, reduction="none").losses
    close(a, b, "f64")
    # ε = 0 is plain DPO, robust with ε = 0 too
    close(L.dpo_loss(lw, ll, lwr, llr, loss_type="robust").loss, L.dpo_loss(lw, ll, lwr, llr).loss, "f64")
    # robust close to 0.5 and exo at tiny ε stay finite and match the reference
    for lt, eps in (("robust", 0.499), ("exo_pair", 1e-8), ("exo_pair", 0.5), ("aot", 0.5)):
        out = L.dpo_loss(lw, ll, lwr, llr, loss_type=lt, label_smoothing=eps)
        close(out.loss, ref_pair_loss(lt, lw, ll, lwr, llr, beta=0.1, eps=eps).mean(), "f64")


@pytest.mark.parametrize(
    "loss_type,eps",
    [("sigmoid", -0.01), ("sigmoid", 0.51), ("robust", 0.5), ("robust", -1e-9), ("exo_pair", 0.0),
     ("exo_pair", 0.6), ("aot", 0.7), ("aot_unpaired", -0.1), ("sigmoid", float("nan"))],
)
def test_label_smoothing_out_of_range_raises(loss_type, eps):
    lw, ll, lwr, llr, _, _ = make_batch(P=3)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(lw, ll, lwr, llr, loss_type=loss_type, label_smoothing=eps)


def test_label_smoothing_ignored_with_warning():
    lw, ll, lwr, llr, _, _ = make_batch(P=3)
    with pytest.warns(UserWarning, match="ignored"):
        out = L.dpo_loss(lw, ll, lwr, llr, loss_type="hinge", label_smoothing=0.2)
    close(out.loss, L.dpo_loss(lw, ll, lwr, llr, loss_type="hinge").loss, "f64")


# ---------------------------------------------------------------------------------------------- all equal
def test_all_equal_rewards():
    P = 4
    lw = torch.full((P,), -10.0, requires_grad=True)
    ll = torch.full((P,), -10.0)
    out = L.dpo_loss(lw, ll, beta=0.2)
    close(out.loss, math.log(2.0), "f32")
    out.loss.backward()
    close(lw.grad, torch.full((P,), -0.2 * 0.5 / P), "f32")
    m = out.metrics
    assert m["rewards/accuracies"] == 0.0  # strict >, as TRL
    assert m["rewards/margins"] == 0.0
    close(m["logps/chosen"], -10.0, "metric")
    for lt in L.LOSS_TYPES:
        n = torch.full((P,), 3)
        o = L.dpo_loss(lw.detach(), ll, loss_type=lt, label_smoothing=PAIRWISE_EPS.get(lt, 0.0),
                       chosen_lengths=n, rejected_lengths=n)
        assert torch.isfinite(o.loss)


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_values():
    lw, ll, lwr, llr, nw, nl = make_batch(P=8, seed=11)
    lw, ll, lwr, llr = (t.float() for t in (lw, ll, lwr, llr))
    cm = torch.randn(8)
    rm = torch.randn(8)
    out = L.dpo_loss(lw, ll, lwr, llr, beta=0.25, chosen_logits_mean=cm, rejected_logits_mean=rm,
                     chosen_lengths=nw, rejected_lengths=nl)
    m = out.metrics
    rw, rl = 0.25 * (lw.double() - lwr.double()), 0.25 * (ll.double() - llr.double())
    expect = {
        "rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(),
        "rewards/accuracies": (rw > rl).double().mean(), "rewards/margins": (rw - rl).mean(),
        "logps/chosen": lw.double().mean(), "logps/rejected": ll.double().mean(),
        "logits/chosen": (cm.double() * nw).sum() / nw.sum(), "logits/rejected": (rm.double() * nl).sum() / nl.sum(),
    }
    assert set(m) == set(expect)
    for k, v in expect.items():
        assert isinstance(m[k], float)
        close(m[k], v, "metric")
    # scalar logits mean is used as given; no lengths -> plain mean
    m2 = L.dpo_loss(lw, ll, chosen_logits_mean=1.5, rejected_logits_mean=torch.tensor([1.0, 3.0] * 4)).metrics
    assert m2["logits/chosen"] == 1.5 and m2["logits/rejected"] == 2.0
    assert L.dpo_loss(lw, ll, compute_metrics=False).metrics == {}


def test_inputs_not_modified():
    lw, ll, lwr, llr, nw, nl = make_batch()
    before = [t.clone() for t in (lw, ll, lwr, llr, nw, nl)]
    for lt in L.LOSS_TYPES:
        L.dpo_loss(lw, ll, lwr, llr, loss_type=lt, label_smoothing=PAIRWISE_EPS.get(lt, 0.0),
                   chosen_lengths=nw, rejected_lengths=nl)
        L.pair_loss_and_grads(lw, ll, lwr, llr, loss_type=lt, label_smoothing=PAIRWISE_EPS.get(lt, 0.0),
                              chosen_lengths=nw, rejected_lengths=nl)
    for a, b in zip(before, (lw, ll, lwr, llr, nw, nl)):
        assert torch.equal(a, b)


def test_zero_length_sequence_is_finite():
    lw = torch.tensor([0.0, -5.0], requires_grad=True)
    ll = torch.tensor([-3.0, 0.0])
    out = L.dpo_loss(lw, ll, torch.zeros(2), torch.zeros(2), loss_type="ipo",
                     chosen_lengths=torch.tensor([0, 4]), rejected_lengths=torch.tensor([3, 0]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lw.grad).all()


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_gradcheck_f64(loss_type):
    lw, ll, lwr, llr, nw, nl = make_batch(P=5, seed=21, scale=0.5)
    eps = PAIRWISE_EPS.get(loss_type, 0.0)
    ins = [t.clone().requires_grad_() for t in (lw, ll, lwr, llr)]

    def f(a, b, c, d):
        return L.dpo_loss(a, b, c, d, beta=0.5, loss_type=loss_type, label_smoothing=eps,
                          chosen_lengths=nw, rejected_lengths=nl, reduction="none", compute_metrics=False).losses

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_gradcheck_f_divergences(fdiv):
    lw, ll, lwr, llr, nw, nl = make_batch(P=4, seed=2, scale=0.3)
    ins = [t.clone().requires_grad_() for t in (lw, ll)]
    for lt in ("sigmoid", "nca_pair", "ipo"):
        def f(a, b):
            return L.dpo_loss(a, b, lwr, llr, loss_type=lt, f_divergence_type=fdiv, chosen_lengths=nw,
                              rejected_lengths=nl, compute_metrics=False).loss

        assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_autograd_matches_reference_autograd(loss_type):
    lw, ll, lwr, llr, nw, nl = make_batch(P=6, seed=8)
    eps = PAIRWISE_EPS.get(loss_type, 0.0)
    a = [t.clone().requires_grad_() for t in (lw, ll)]
    b = [t.clone().requires_grad_() for t in (lw, ll)]
    L.dpo_loss(*a, lwr, llr, loss_type=loss_type, label_smoothing=eps, chosen_lengths=nw,
               rejected_lengths=nl).loss.backward()
    ref_pair_loss(loss_type, *b, lwr, llr, beta=0.1, eps=eps, nw=nw.double(), nl=nl.double()).mean().backward()
    for x, y in zip(a, b):
        close(x.grad if x.grad is not None else torch.zeros(6), y.grad if y.grad is not None else torch.zeros(6),
              "f64")


def pair_kwargs(loss_type):
    eps = PAIRWISE_EPS.get(loss_type, 0.0) if isinstance(loss_type, str) else 0.0
    return dict(beta=0.3, loss_type=loss_type, label_smoothing=eps)


@pytest.mark.parametrize("loss_type", list(L.LOSS_TYPES) + [["sigmoid", "sft"], ["ipo", "hinge", "apo_down"]])
@pytest.mark.parametrize("use_weighting", [False, True])
def test_pair_loss_and_grads_matches_autograd(loss_type, use_weighting):
    lw, ll, lwr, llr, nw, nl = make_batch(P=10, seed=4)
    cw, cr = -torch.rand(10, dtype=D64), -torch.rand(10, dtype=D64)
    kw = dict(pair_kwargs(loss_type), chosen_lengths=nw, rejected_lengths=nl, use_weighting=use_weighting,
              chosen_wpo_logweights=cw, rejected_wpo_logweights=cr)
    a, b = lw.clone().requires_grad_(), ll.clone().requires_grad_()
    out = L.dpo_loss(a, b, lwr, llr, **kw)
    ga, gb = torch.autograd.grad(out.loss, (a, b), allow_unused=True)
    ga = torch.zeros_like(lw) if ga is None else ga
    gb = torch.zeros_like(ll) if gb is None else gb
    with torch.no_grad():
        losses, dc, dr = L.pair_loss_and_grads(lw, ll, lwr, llr, **kw)
    close(losses, out.losses, "grad")
    close(dc, ga, "grad")
    close(dr, gb, "grad")
    assert not losses.requires_grad and not dc.requires_grad


@pytest.mark.parametrize("loss_type", [t for t in L.LOSS_TYPES if t not in ("aot", "aot_unpaired")]
                         + [["sigmoid", "sft"]])
def test_pair_loss_and_grads_group_by_group(loss_type):
    """Decomposable losses: groups of pairs with the batch's num_pairs / num_chosen_tokens reproduce the batch."""
    P = 11
    lw, ll, lwr, llr, nw, nl = make_batch(P=P, seed=9)
    cw, cr = -torch.rand(P, dtype=D64), -torch.rand(P, dtype=D64)
    kw = dict(pair_kwargs(loss_type), use_weighting=True, chosen_wpo_logweights=cw, rejected_wpo_logweights=cr)
    full = L.pair_loss_and_grads(lw, ll, lwr, llr, chosen_lengths=nw, rejected_lengths=nl, **kw)
    parts = []
    for idx in (slice(0, 4), slice(4, 5), slice(5, P)):
        parts.append(L.pair_loss_and_grads(
            lw[idx], ll[idx], lwr[idx], llr[idx], chosen_lengths=nw[idx], rejected_lengths=nl[idx],
            num_pairs=P, num_chosen_tokens=int(nw.sum()),
            **{**kw, "chosen_wpo_logweights": cw[idx], "rejected_wpo_logweights": cr[idx]}))
    for k in range(3):
        close(torch.cat([p[k] for p in parts]), full[k], "grad")
    ref = L.dpo_loss(lw, ll, lwr, llr, chosen_lengths=nw, rejected_lengths=nl, **kw).loss
    close(sum(p[0].sum() for p in parts) / P, ref, "grad")


def test_pair_loss_and_grads_sum_reduction_and_float32():
    lw, ll, lwr, llr, _, _ = make_batch(P=5)
    losses, dc, dr = L.pair_loss_and_grads(lw.float(), ll.float(), lwr.float(), llr.float(), reduction="sum")
    assert dc.dtype == torch.float32
    z = 0.1 * ((lw - lwr) - (ll - llr))
    close(dc, -0.1 * torch.sigmoid(-z), "f32")
    close(dr, 0.1 * torch.sigmoid(-z), "f32")
    with pytest.raises(ValueError, match="reduction"):
        L.pair_loss_and_grads(lw, ll, reduction="none")
    with pytest.raises(ValueError, match="num_pairs"):
        L.pair_loss_and_grads(lw, ll, num_pairs=0)


def test_pair_loss_and_grads_extreme_margins():
    lw = EXTREME.clone()
    _, dc, dr = L.pair_loss_and_grads(lw, -lw, beta=1.0, loss_type="discopop")
    assert torch.isfinite(dc).all() and torch.isfinite(dr).all()


def test_is_pair_decomposable():
    for lt in L.LOSS_TYPES:
        assert L.is_pair_decomposable(lt) == (lt not in ("aot", "aot_unpaired"))
    assert not L.is_pair_decomposable(["sigmoid", "aot"])
    assert L.is_pair_decomposable(["sigmoid", "sft", "ipo"])
    with pytest.raises(ValueError, match="valid loss types"):
        L.is_pair_decomposable("dpo")


# ---------------------------------------------------------------------------------------------- errors
def test_errors():
    lw, ll, lwr, llr, nw, nl = make_batch(P=4)
    with pytest.raises(ValueError, match=r"unknown loss_type 'dpo'.*sigmoid.*sft"):
        L.dpo_loss(lw, ll, loss_type="dpo")
    with pytest.raises(ValueError, match="non-empty"):
        L.dpo_loss(lw, ll, loss_type=[])
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        L.dpo_loss(lw, ll[:3])
    with pytest.raises(ValueError, match=r"policy_chosen_logps must be 1-D"):
        L.dpo_loss(lw.reshape(2, 2), ll.reshape(2, 2))
    with pytest.raises(TypeError, match="policy_chosen_logps must be a floating-point"):
        L.dpo_loss(torch.ones(4, dtype=torch.long), ll)
    with pytest.raises(TypeError, match="policy_chosen_logps must be a torch.Tensor"):
        L.dpo_loss([1.0, 2.0], ll)
    with pytest.raises(ValueError, match="ref_chosen_logps must have shape"):
        L.dpo_loss(lw, ll, lwr[:2], llr)
    with pytest.raises(ValueError, match="both ref_chosen_logps and ref_rejected_logps"):
        L.dpo_loss(lw, ll, lwr, None)
    with pytest.raises(ValueError, match="empty"):
        L.dpo_loss(lw[:0], ll[:0])
    for beta in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="beta"):
            L.dpo_loss(lw, ll, beta=beta)
    with pytest.raises(TypeError, match="beta"):
        L.dpo_loss(lw, ll, beta="0.1")
    with pytest.raises(ValueError, match="loss_weights has 1 entries"):
        L.dpo_loss(lw, ll, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="f_divergence_type"):
        L.dpo_loss(lw, ll, f_divergence_type="kl")
    with pytest.raises(ValueError, match="f_alpha_divergence_coef"):
        L.dpo_loss(lw, ll, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("inf"))
    with pytest.raises(ValueError, match="discopop_tau"):
        L.dpo_loss(lw, ll, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match="reduction"):
        L.dpo_loss(lw, ll, reduction="avg")
    for lt in ("ipo", "sigmoid_norm"):
        with pytest.raises(ValueError, match=r"chosen_lengths and rejected_lengths"):
            L.dpo_loss(lw, ll, loss_type=lt)
        with pytest.raises(ValueError, match=r"chosen_lengths and rejected_lengths"):
            L.dpo_loss(lw, ll, loss_type=["sigmoid", lt], chosen_lengths=nw)
    with pytest.raises(ValueError, match="chosen_lengths must have shape"):
        L.dpo_loss(lw, ll, loss_type="ipo", chosen_lengths=nw[:3], rejected_lengths=nl)
    with pytest.raises(TypeError, match="token counts"):
        L.dpo_loss(lw, ll, loss_type="ipo", chosen_lengths=nw > 3, rejected_lengths=nl)
    with pytest.raises(ValueError, match="sft_nll"):
        L.dpo_loss(lw, ll, loss_type="sft")
    with pytest.raises(ValueError, match="sft_nll must be"):
        L.dpo_loss(lw, ll, loss_type="sft", sft_nll=torch.ones(3))
    with pytest.raises(ValueError, match="chosen_wpo_logweights"):
        L.dpo_loss(lw, ll, use_weighting=True)
    with pytest.raises(ValueError, match="rejected_wpo_logweights must have shape"):
        L.dpo_loss(lw, ll, use_weighting=True, chosen_wpo_logweights=lw, rejected_wpo_logweights=lw[:1])
    with pytest.raises(ValueError, match="chosen_logits_mean must have shape"):
        L.dpo_loss(lw, ll, chosen_logits_mean=torch.ones(3))


# ---------------------------------------------------------------------------------------------- LD-DPO
def ref_ld(tok, mask, shared, alpha):
    out = []
    for i in range(tok.shape[0]):
        total, k = 0.0, 0
        for t in range(tok.shape[1]):
            if mask[i, t]:
                k += 1
                total += (1.0 if k <= shared[i] else alpha) * float(tok[i, t])
        out.append(total)
    return torch.tensor(out, dtype=D64)


@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_ld_dpo_logps_matches_definition(alpha):
    g = torch.Generator().manual_seed(1)
    P, Tw, Tl = 5, 13, 9
    tc = -torch.rand(P, Tw, generator=g, dtype=D64) * 3
    tr = -torch.rand(P, Tl, generator=g, dtype=D64) * 3
    mc = torch.rand(P, Tw, generator=g) > 0.35
    mr = torch.rand(P, Tl, generator=g) > 0.35
    mc[0] = False  # a sequence without scored tokens
    tc_masked = torch.where(mc, tc, float("-inf"))  # garbage at unscored positions must not leak
    shared = torch.minimum(mc.sum(-1), mr.sum(-1)).tolist()
    lc, lr = L.ld_dpo_logps(tc_masked, tr, mc, mr, alpha)
    close(lc, ref_ld(tc, mc, shared, alpha), "f64")
    close(lr, ref_ld(tr, mr, shared, alpha), "f64")
    if alpha == 1.0:
        close(lc, (tc * mc).sum(-1), "f64")
    # gradient: d ℓ / d token = weight at scored tokens, 0 elsewhere
    x = tc.clone().requires_grad_()
    L.ld_dpo_logps(x, tr, mc, mr, alpha)[0].sum().backward()
    wc, _ = L.ld_dpo_token_weights(mc, mr, alpha, dtype=D64)
    close(x.grad, wc, "f64")
    assert L.ld_dpo_token_weights(mc, mr, alpha)[0].dtype == torch.float32


def test_ld_dpo_errors():
    m = torch.ones(2, 3, dtype=torch.bool)
    t = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ld_alpha"):
        L.ld_dpo_logps(t, t, m, m, 1.5)
    with pytest.raises(ValueError, match="token_logps_chosen"):
        L.ld_dpo_logps(torch.zeros(3), t, m, m, 0.5)
    with pytest.raises(ValueError, match="mask has shape"):
        L.ld_dpo_logps(t, t, torch.ones(2, 4, dtype=torch.bool), m, 0.5)
    with pytest.raises(ValueError, match="same number of pairs"):
        L.ld_dpo_token_weights(m, torch.ones(3, 3, dtype=torch.bool), 0.5)


# ---------------------------------------------------------------------------------------------- WPO helper
def test_wpo_logweights_from_logits():
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g, dtype=D64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[2] = -100
    p = torch.softmax(logits, -1)
    expect = []
    for b in range(B):
        vals = [math.log(p[b, t, labels[b, t]]) - math.log((p[b, t] ** 2).sum())
                for t in range(T) if labels[b, t] >= 0]
        expect.append(sum(vals) / len(vals) if vals else 0.0)
    close(L.wpo_logweights_from_logits(logits, labels), expect, "f64")


# ---------------------------------------------------------------------------------------------- properties
_finite = st.floats(min_value=-5e3, max_value=5e3, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_finite, _finite, _finite, _finite), min_size=1, max_size=6),
       st.sampled_from([lt for lt in L.LOSS_TYPES]), st.floats(min_value=0.01, max_value=10.0))
def test_property_finite_and_grads_consistent(rows, loss_type, beta):
    """Any finite inputs up to ±5e3 (|βΔ| up to 1e5): finite loss and d/dℓ, equal to autograd of dpo_loss."""
    t = torch.tensor(rows, dtype=torch.float32).T  # (4, P)
    n = torch.full((t.shape[1],), 7)
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=PAIRWISE_EPS.get(loss_type, 0.0),
              chosen_lengths=n, rejected_lengths=n)
    a, b = t[0].clone().requires_grad_(), t[1].clone().requires_grad_()
    out = L.dpo_loss(a, b, t[2], t[3], compute_metrics=False, **kw)
    if loss_type in ("sppo_hard", "ipo"):  # quadratic losses: finite as long as the square fits in float32
        assert torch.isfinite(out.loss)
    ga, gb = torch.autograd.grad(out.loss, (a, b), allow_unused=True)
    losses, dc, dr = L.pair_loss_and_grads(t[0], t[1], t[2], t[3], **kw)
    assert torch.isfinite(losses).all() and torch.isfinite(dc).all() and torch.isfinite(dr).all()
    torch.testing.assert_close(dc, torch.zeros_like(dc) if ga is None else ga)
    torch.testing.assert_close(dr, torch.zeros_like(dr) if gb is None else gb)


def test_docstring_examples():
    import doctest

    import importlib
    import pkgutil

    from dpo_fast import losses as package

    failed = attempted = 0
    for info in pkgutil.iter_modules(package.__path__):  # the losses package: every submodule's examples
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        res = doctest.testmod(module, globs={"torch": torch, **vars(package), **vars(module)},
                              optionflags=doctest.ELLIPSIS)
        failed, attempted = failed + res.failed, attempted + res.attempted
    assert failed == 0 and attempted > 0


# ---------------------------------------------------------------------------------------------- bad input (issue 8)
@pytest.mark.parametrize("bad", [[-1, 3], [float("nan"), 3.0], [2.5, 3.0], [float("inf"), 1.0]],
                         ids=["negative", "nan", "fractional", "inf"])
@pytest.mark.parametrize("side", ["chosen_lengths", "rejected_lengths"])
def test_bad_lengths_are_rejected_naming_the_argument(bad, side):
    lw, ll = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -6.0])
    good = torch.tensor([2, 3])
    lengths = {"chosen_lengths": good, "rejected_lengths": good, side: torch.tensor(bad)}
    calls = [
        lambda: L.dpo_loss(lw, ll, loss_type="ipo", **lengths),
        lambda: L.dpo_loss(lw, ll, **lengths),  # even where the loss type does not need them
        lambda: L.pair_loss_and_grads(lw, ll, loss_type="sigmoid_norm", **lengths),
        lambda: L.cpo_loss(lw, ll, loss_type="simpo", **lengths),
        lambda: L.orpo_loss(lw, ll, **lengths),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=rf"{side} must hold token counts"):
            call()


def test_lengths_as_whole_floats_and_lists_are_accepted():
    lw, ll = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -6.0])
    a = L.dpo_loss(lw, ll, loss_type="ipo", chosen_lengths=[2, 3], rejected_lengths=[4, 0]).loss
    b = L.dpo_loss(lw, ll, loss_type="ipo", chosen_lengths=torch.tensor([2.0, 3.0]),
                   rejected_lengths=torch.tensor([4.0, 0.0])).loss
    close(a, b, "f32")
    with pytest.raises(TypeError, match="chosen_lengths must be a"):
        L.dpo_loss(lw, ll, loss_type="ipo", chosen_lengths=object(), rejected_lengths=[1, 1])


@pytest.mark.parametrize("bad", [None, 3, ["sigmoid", None]])
def test_loss_type_not_a_str_names_the_argument(bad):
    lw, ll = torch.tensor([-3.0]), torch.tensor([-5.0])
    with pytest.raises(TypeError, match=r"loss_type must be a str.*sigmoid.*sft"):
        L.dpo_loss(lw, ll, loss_type=bad)
    with pytest.raises(TypeError, match="loss_type must be a str"):
        L.is_pair_decomposable(bad)
    if not isinstance(bad, list):
        with pytest.raises(TypeError, match=r"loss_type must be a str.*simpo"):
            L.cpo_loss(lw, ll, loss_type=bad)
        with pytest.raises(TypeError, match=r"loss_type must be a str.*vespo"):
            L.grpo_loss(torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), loss_type=bad)


def test_per_type_label_smoothing_and_ignored_options_warn():
    lw, ll, lwr, llr, nw, nl = make_batch(P=5, seed=11)
    out = L.dpo_loss(lw, ll, lwr, llr, loss_type=["sigmoid", "robust"], label_smoothing=[0.0, 0.1],
                     reduction="none").losses
    ref = ref_pair_loss("sigmoid", lw, ll, lwr, llr, beta=0.1) + ref_pair_loss("robust", lw, ll, lwr, llr, beta=0.1,
                                                                               eps=0.1)
    close(out, ref, "f64")
    with pytest.raises(ValueError, match="label_smoothing has 1 entries"):
        L.dpo_loss(lw, ll, loss_type=["sigmoid", "robust"], label_smoothing=[0.1])
    with pytest.warns(UserWarning, match=r"label_smoothing is ignored by loss_type \['hinge'\]"):
        L.dpo_loss(lw, ll, loss_type=["sigmoid", "hinge"], label_smoothing=[0.1, 0.1])
    with pytest.warns(UserWarning, match=r"f_divergence_type='js_divergence' is ignored by loss_type \['nca_pair'\]"):
        L.dpo_loss(lw, ll, loss_type=["sigmoid", "nca_pair"], f_divergence_type="js_divergence")


def test_sft_chosen_logps_unweighted_term():
    """The derived SFT term reads sft_chosen_logps (unweighted sums under LD-DPO); pair_loss_and_grads returns
    its derivative separately."""
    lw, ll, lwr, llr, nw, nl = make_batch(P=4, seed=12)
    lu = lw - 1.5  # e.g. the plain sums, while lw are LD-weighted
    kw = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], chosen_lengths=nw, rejected_lengths=nl)
    out = L.dpo_loss(lw, ll, lwr, llr, sft_chosen_logps=lu, reduction="none", **kw).losses
    expect = ref_pair_loss("sigmoid", lw, ll, lwr, llr, beta=0.1) + 0.7 * (-lu.sum() / nw.to(D64).sum())
    close(out.mean(), expect.mean(), "f64")
    a = lw.clone().requires_grad_()
    u = lu.clone().requires_grad_()
    total = L.dpo_loss(a, ll, lwr, llr, sft_chosen_logps=u, **kw).loss
    ga, gu = torch.autograd.grad(total, (a, u))
    losses, dc, dr, du = L.pair_loss_and_grads(lw, ll, lwr, llr, sft_chosen_logps=lu, **kw)
    close(dc, ga, "grad")
    close(du, gu, "grad")
    close(du, torch.full_like(du, -0.7 / nw.to(D64).sum()), "grad")
    assert len(L.pair_loss_and_grads(lw, ll, lwr, llr, **kw)) == 3


def test_readme_loss_table_is_the_registry():
    """The README's loss table is the registry's rendering (regenerate: python -m dpo_fast.losses README.md)."""
    import pathlib

    from dpo_fast.losses import registry

    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = text.index("\n", text.index("<!-- loss-table:")) + 1
    assert text[start:text.index("<!-- /loss-table -->")] == registry.render_markdown_table()
    assert L.LOSS_TYPES == tuple(e.name for e in registry.PAIRWISE)
    # the docstring table is rendered from the registry too
    for e in registry.PAIRWISE:
        assert e.rst_formula in L.dpo_loss.__doc__


def test_check_lengths_false_skips_only_the_value_check():
    lw, ll = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -6.0])
    n = torch.tensor([2.0, 3.0])
    a = L.dpo_loss(lw, ll, loss_type="ipo", chosen_lengths=n, rejected_lengths=n, check_lengths=False).loss
    close(a, L.dpo_loss(lw, ll, loss_type="ipo", chosen_lengths=n, rejected_lengths=n).loss, "f32")
    with pytest.raises(ValueError, match="chosen_lengths must have shape"):
        L.dpo_loss(lw, ll, loss_type="ipo", chosen_lengths=n[:1], rejected_lengths=n, check_lengths=False)


def test_kto_loss_types():
    lp, lr = torch.tensor([-3.0, -5.0], dtype=D64), torch.tensor([-3.5, -4.0], dtype=D64)
    des = torch.tensor([True, False])
    out = L.kto_loss(lp, lr, des, kl=0.2, beta=0.5, loss_type="apo_zero_unpaired", desirable_weight=2.0)
    r = lp - lr
    expect = torch.stack([2.0 * (1 - torch.sigmoid(0.5 * r[0])), torch.sigmoid(0.5 * r[1])])
    close(out.losses, expect, "f64")
    assert out.metrics["kl"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"unknown loss_type 'apo' for kto_loss.*apo_zero_unpaired"):
        L.kto_loss(lp, lr, des, loss_type="apo")
    with pytest.raises(TypeError, match="loss_type must be a str"):
        L.kto_loss(lp, lr, des, loss_type=None)
