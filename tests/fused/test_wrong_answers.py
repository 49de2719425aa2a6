"""Wrong or unclear answers (issue 16, section 3): each case used to give a wrong number or an obscure error.

1. every fused module under ``torch.inference_mode()`` / ``torch.no_grad()`` (loss value and metrics);
2. ``cu_seqlens`` as a list, numpy array or tensor at every entry point that takes it;
3. double backward: a clear RuntimeError on every route, never a silently non-differentiable gradient;
4. fused ``GRPOLoss`` with per-token inputs and unscored positions against TRL's own ``_compute_loss``;
5. ``pack_pairs`` truncation is counted (``num_truncated``) and warned about;
6. an out-of-range ``pairs`` entry is named with its row and value.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dpo_fast
from dpo_fast import losses as L
from support import random_labels, seed_of

D64 = torch.float64


def _pairs_batch(seed, S=4, T=7, H=8, V=23, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, T, H, generator=g, dtype=dtype)
    w = (torch.randn(V, H, generator=g) / 3).to(dtype)
    labels = random_labels((S, T), V, 0.2, g)
    labels[:, :2] = -100  # prompt
    return h, w, labels


# the five fused modules and a forward call for each on the same (S=4, T=7) batch
def _call(name, module, h, w, labels):
    S = labels.shape[0]
    g = torch.Generator().manual_seed(seed_of(name, "extra"))
    if name == "DPOLoss":
        return module(h, w, labels, -torch.rand(S // 2, generator=g) * 5, -torch.rand(S // 2, generator=g) * 5)
    if name in ("CPOLoss", "ORPOLoss"):
        return module(h, w, labels)
    if name == "KTOLoss":
        return module(h, w, labels, torch.tensor([True, False] * (S // 2)), -torch.rand(S, generator=g) * 5,
                      kl=0.1)
    old = -torch.rand(labels.shape, generator=g) * 3
    return module(h, w, labels, torch.randn(S, generator=g), old)


FUSED = {
    "DPOLoss": lambda: dpo_fast.DPOLoss(beta=0.2),
    "CPOLoss": lambda: dpo_fast.CPOLoss(beta=0.2),
    "ORPOLoss": lambda: dpo_fast.ORPOLoss(beta=0.2),
    "KTOLoss": lambda: dpo_fast.KTOLoss(beta=0.2),
    "GRPOLoss": lambda: dpo_fast.GRPOLoss(loss_type="dapo", beta=0.0),
}


# ------------------------------------------------------------------------------------------------ 1
@pytest.mark.parametrize("ctx", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("name", list(FUSED))
def test_fused_modules_give_loss_and_metrics_without_grad(name, ctx):
    h, w, labels = _pairs_batch(seed_of(name))
    hh = h.clone().requires_grad_()
    want = _call(name, FUSED[name](), hh, w, labels)
    assert want.route == "fused"
    h_before, w_before = h.clone(), w.clone()
    with (torch.inference_mode() if ctx == "inference_mode" else torch.no_grad()):
        got = _call(name, FUSED[name](), h, w, labels)
    assert got.route == "two_pass" and not got.loss.requires_grad
    torch.testing.assert_close(got.loss, want.loss.detach(), rtol=1e-6, atol=1e-7)
    assert got.metrics and set(got.metrics) == set(want.metrics)
    for k, v in want.metrics.items():
        assert got.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert torch.equal(h, h_before) and torch.equal(w, w_before)  # nothing the caller passed is modified


def test_grpo_under_inference_mode_with_entropy_quantile_and_token_metrics():
    h, w, labels = _pairs_batch(3)
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2])
    m = dpo_fast.GRPOLoss(loss_type="vespo", top_entropy_quantile=0.5, token_metrics=True)
    want = m(h.clone().requires_grad_(), w, labels, adv)
    with torch.inference_mode():
        got = m(h, w, labels, adv, num_items_in_batch=torch.tensor(11.0))
        got_default = m(h, w, labels, adv)
    torch.testing.assert_close(got_default.loss, want.loss.detach(), rtol=1e-6, atol=1e-7)
    assert got.metrics["entropy"] == pytest.approx(want.metrics["entropy"], rel=1e-6)
    assert torch.isfinite(got.loss)


# ------------------------------------------------------------------------------------------------ 2
CU = [0, 5, 9, 9, 16]  # an empty sequence included
N = CU[-1]


def _cu(kind, cu=CU):
    return {"list": list(cu), "tuple": tuple(cu), "numpy": np.array(cu, dtype=np.int64),
            "numpy32": np.array(cu, dtype=np.int32), "tensor": torch.tensor(cu, dtype=torch.int32)}[kind]


def _packed(seed, V=19, H=6):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / 3
    labels = random_labels((N,), V, 0.2, g)
    return h, w, labels


def _entry_points():
    """name -> f(cu_seqlens) for every public entry point that takes cu_seqlens."""
    h, w, labels = _packed(1)
    S = len(CU) - 1
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(N, w.shape[0], generator=g)
    pairs = torch.tensor([[0, 1], [3, 2]])
    adv = torch.randn(S, generator=g)
    old = -torch.rand(N, generator=g) * 3
    return {
        "sequence_logprobs": lambda cu: dpo_fast.sequence_logprobs(h, w, labels, cu_seqlens=cu),
        "logprobs_from_logits": lambda cu: dpo_fast.logprobs_from_logits(logits, labels, cu_seqlens=cu),
        "pair_logprobs": lambda cu: torch.stack(dpo_fast.pair_logprobs(h, w, labels, cu_seqlens=cu, pairs=pairs)),
        "DPOLoss": lambda cu: dpo_fast.DPOLoss()(h, w, labels, cu_seqlens=cu, pairs=pairs).loss,
        "CPOLoss": lambda cu: dpo_fast.CPOLoss()(h, w, labels, cu_seqlens=cu, pairs=pairs).loss,
        "ORPOLoss": lambda cu: dpo_fast.ORPOLoss()(h, w, labels, cu_seqlens=cu, pairs=pairs).loss,
        "KTOLoss": lambda cu: dpo_fast.KTOLoss()(h, w, labels, torch.tensor([True, False, True, False]),
                                                 cu_seqlens=cu, kl_hidden=h, kl_labels=labels, kl_cu_seqlens=cu,
                                                 ref_kl_logps=torch.zeros(S)).loss,
        "GRPOLoss": lambda cu: dpo_fast.GRPOLoss()(h, w, labels, adv, old, cu_seqlens=cu).loss,
        "GRPOLoss_per_token": lambda cu: dpo_fast.GRPOLoss(loss_type="vespo")(
            h, w, labels, old * 0.1, old, cu_seqlens=cu, importance_sampling_ratio=torch.exp(old * 0.01)).loss,
    }


@pytest.mark.parametrize("name", list(_entry_points()))
def test_cu_seqlens_list_numpy_tensor_at_every_entry_point(name):
    f = _entry_points()[name]
    want = f(_cu("tensor"))
    for kind in ("list", "tuple", "numpy", "numpy32"):
        arg = _cu(kind)
        before = list(arg)
        torch.testing.assert_close(f(arg), want, rtol=0, atol=0, msg=kind)
        assert list(arg) == before  # the caller's boundaries are untouched
    # bad boundaries: a clear error naming cu_seqlens, whatever the container
    for bad, exc, msg in (([1, 5, 9, 9, 16], ValueError, r"cu_seqlens\[0\] == 0"),
                          ([0, 9, 5, 9, 16], ValueError, "non-decreasing"),
                          ([0, 5, 9, 9, 15], ValueError, "last entry"),
                          ([0.0, 5.0, 9.0, 9.0, 16.0], TypeError, "cu_seqlens: expected")):
        with pytest.raises(exc, match=msg):
            f(bad)
        with pytest.raises(exc, match=msg):
            f(np.array(bad))
    with pytest.raises(TypeError, match="cu_seqlens: expected"):
        f([CU])
    with pytest.raises(ValueError, match="cu_seqlens: expected a 1-D"):
        f(np.array(CU).reshape(1, -1))


def test_cu_seqlens_list_numpy_with_hf_model():
    pytest.importorskip("transformers")
    from dpo_fast import hf
    from support.models import examples, tiny_model

    model = tiny_model()
    ex = examples(4, seed=3)
    b = dpo_fast.pack_pairs([e["prompt_ids"] for e in ex], [e["chosen_ids"] for e in ex],
                            [e["rejected_ids"] for e in ex], max_tokens=40).to_torch()
    cu = b["cu_seqlens"]
    with torch.no_grad():
        want = hf.sequence_logprobs_from_model(model, b["input_ids"], b["labels"], cu_seqlens=cu)
        for arg in (cu.tolist(), cu.numpy(), cu.numpy().astype(np.int64)):
            got = hf.sequence_logprobs_from_model(model, b["input_ids"], b["labels"], cu_seqlens=arg)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            h, _ = hf.hidden_states_from_model(model, b["input_ids"], cu_seqlens=arg)
            assert h.shape[:2] == b["input_ids"].shape
        bad = cu.tolist()
        bad[-1] -= 1
        with pytest.raises(ValueError, match="cu_seqlens: expected the last entry"):
            hf.sequence_logprobs_from_model(model, b["input_ids"], b["labels"], cu_seqlens=bad)


# ------------------------------------------------------------------------------------------------ 3
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", list(FUSED))
def test_double_backward_raises_a_clear_error(name, fused):
    h, w, labels = _pairs_batch(seed_of(name, "dbl"))
    hh = h.clone().requires_grad_()
    module = FUSED[name]()
    module.fused = fused
    out = _call(name, module, hh, w, labels)
    assert out.route == ("fused" if fused else "two_pass")
    with pytest.raises(RuntimeError, match="double backward .* is not supported.*dpo_fast.dpo_loss"):
        torch.autograd.grad(out.loss, hh, create_graph=True)
    # a first-order gradient still works on a fresh forward
    hh2 = h.clone().requires_grad_()
    (gh,) = torch.autograd.grad(_call(name, FUSED[name](), hh2, w, labels).loss, hh2)
    assert torch.isfinite(gh).all() and gh.abs().sum() > 0


def test_double_backward_engine_functions_raise_and_the_way_out_works():
    h, w, labels = _pairs_batch(5)
    for f in (lambda x: dpo_fast.sequence_logprobs(x, w, labels).sum(),
              lambda x: dpo_fast.token_logprobs(x, w, labels).sum(),
              lambda x: dpo_fast.logprobs_from_logits(x @ w.t(), labels).sum()):
        x = h.clone().requires_grad_()
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(f(x), x, create_graph=True)
    # the documented way out: plain-PyTorch log-probs + the loss functions give a working gradient penalty
    x = h.clone().double().requires_grad_()
    lp = torch.log_softmax(x @ w.double().t(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    lp = torch.where(labels != -100, lp, 0.0)
    seq = lp.sum(-1)
    loss = dpo_fast.dpo_loss(seq[:2], seq[2:], torch.full((2,), -9.0, dtype=D64),
                             torch.full((2,), -9.0, dtype=D64)).loss
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    assert g.requires_grad
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    assert gg.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ 4
# fused GRPOLoss against TRL 1.16's own GRPOTrainer._compute_loss, every loss type x every per-token input,
# in a (B, T) layout with prompt columns and right padding (unscored positions) and a packed layout
PER_TOKEN_INPUTS = {
    "old": dict(),
    "ref_kl": dict(beta=0.04),
    "is_ratio_token": dict(is_ratio="token"),
    "is_ratio_token_with_zeros": dict(is_ratio="token_zeros"),
    "advantages_token": dict(adv_token=True),
    "sampling_off_policy_mask": dict(off_policy_mask_threshold=0.05),
    "all": dict(beta=0.04, is_ratio="token", adv_token=True, off_policy_mask_threshold=0.05),
}


def _grpo_case(seed, B=4, P=3, Tc=6, H=8, V=17):
    """A (B, P + Tc) batch: P prompt columns, Tc completion columns with right padding; float64."""
    g = torch.Generator().manual_seed(seed)
    T = P + Tc
    h = torch.randn(B, T, H, generator=g, dtype=D64)
    w = torch.randn(V, H, generator=g, dtype=D64) / 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :P] = -100
    lens = torch.tensor([Tc, Tc - 2, 1, Tc - 3])[:B]
    for i, n in enumerate(lens.tolist()):
        labels[i, P + n:] = -100
    return h, w, labels, g


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("inp", list(PER_TOKEN_INPUTS))
@pytest.mark.parametrize("loss_type", L.GRPO_LOSS_TYPES)
def test_fused_grpo_with_unscored_positions_matches_trl(loss_type, inp, level):
    pytest.importorskip("trl.trainer.grpo_trainer")
    from support.trl_oracle import trl_grpo_loss

    spec = PER_TOKEN_INPUTS[inp]
    P = 3
    h, w, labels, g = _grpo_case(seed_of(loss_type, inp, level), P=P)
    B, T = labels.shape
    scored = labels != -100
    cm = scored[:, P:].long()  # TRL's completion_mask
    Tc = cm.shape[1]
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=spec.get("beta", 0.0),
                epsilon_low=0.2, epsilon_high=5.0 if loss_type == "cispo" else 0.28, max_completion_length=Tc,
                off_policy_mask_threshold=spec.get("off_policy_mask_threshold"))
    o = L.GRPOOptions(**opts)

    # per-token inputs in labels' layout; unscored positions hold values that must not be read
    garbage = torch.full((B, T), 0.0, dtype=D64)  # the worst filler: log 0, exp 0

    def labels_layout(completion_values):
        return torch.where(scored, torch.cat([garbage[:, :P], completion_values], 1), garbage)

    lp0 = torch.log_softmax(h @ w.t(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0][:, P:].detach()
    old_c = lp0 + 0.3 * torch.randn(B, Tc, generator=g, dtype=D64)
    ref_c = lp0 + 0.3 * torch.randn(B, Tc, generator=g, dtype=D64)
    samp_c = old_c + 0.2 * torch.randn(B, Tc, generator=g, dtype=D64)
    adv_c = torch.randn(B, Tc, generator=g, dtype=D64) if spec.get("adv_token") else None
    adv_s = torch.tensor([1.0, -0.7, 0.4, -1.3], dtype=D64)
    isr_c = None
    if spec.get("is_ratio"):
        isr_c = torch.rand(B, Tc, generator=g, dtype=D64) * 1.5 + 0.25
        if spec["is_ratio"] == "token_zeros":  # token_mask mode: masked-out tokens have ratio 0
            isr_c[0, 1] = isr_c[1, 0] = 0.0
        isr_c = torch.where(cm > 0, isr_c, 1.0)  # TRL's own ratio is exp(0) = 1 at padding
    n_items = torch.tensor(float(cm.sum()) + 2.0, dtype=D64)

    # TRL on the completion columns, its log-probs from the same float64 head
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    lp_trl = torch.log_softmax(hh @ ww.t(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0][:, P:]
    inputs = dict(prompt_ids=torch.zeros(B, P, dtype=torch.long), prompt_mask=torch.ones(B, P),
                  completion_ids=torch.zeros_like(cm), completion_mask=cm,
                  advantages=adv_s if adv_c is None else adv_c, old_per_token_logps=old_c,
                  ref_per_token_logps=ref_c, num_items_in_batch=n_items)
    if o.off_policy_mask_threshold is not None:
        inputs["sampling_per_token_logps"] = samp_c
    if isr_c is not None:
        inputs["importance_sampling_ratio"] = isr_c
    trl_loss, trl_metrics = trl_grpo_loss(lp_trl, torch.zeros_like(lp_trl), inputs, o.as_kwargs())
    trl_gh, trl_gw = torch.autograd.grad(trl_loss, (hh, ww))

    module = dpo_fast.GRPOLoss(**opts)
    kw = dict(num_items_in_batch=n_items)
    if o.off_policy_mask_threshold is not None:
        kw["sampling_logps"] = labels_layout(samp_c)
    if isr_c is not None:
        kw["importance_sampling_ratio"] = labels_layout(isr_c)
    adv = adv_s if adv_c is None else labels_layout(adv_c)
    ref = labels_layout(ref_c) if o.beta else None
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    out = module(hh, ww, labels, adv, labels_layout(old_c), ref, **kw)
    assert out.route == "fused"
    out.loss.backward()
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hh.grad, trl_gh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ww.grad, trl_gw, rtol=1e-9, atol=1e-12)
    for k, v in trl_metrics.items():
        if k in ("entropy", "entropy_coef"):
            continue  # TRL's entropy comes from our stub's zeros; GRPOLoss logs it only with token_metrics
        assert k in out.metrics, k
        torch.testing.assert_close(torch.tensor(out.metrics[k], dtype=D64), torch.tensor(float(v), dtype=D64),
                                   rtol=1e-7, atol=1e-12, equal_nan=True, msg=k)

    # the same batch packed (one row per sequence, prompts included): the same loss
    cu = torch.tensor([0] + [T] * B).cumsum(0)
    pk = {k: v.reshape(-1) if isinstance(v, torch.Tensor) and v.shape == (B, T) else v for k, v in kw.items()}
    adv_p = adv.reshape(-1) if adv.dim() == 2 else adv
    out_p = module(h.reshape(-1, h.shape[-1]).clone().requires_grad_(), w, labels.reshape(-1), adv_p,
                   labels_layout(old_c).reshape(-1), None if ref is None else ref.reshape(-1), cu_seqlens=cu, **pk)
    torch.testing.assert_close(out_p.loss, trl_loss, rtol=1e-10, atol=1e-12)


def test_fused_vespo_with_vllm_ratio_and_prompt_positions_is_not_zero():
    """The reported case: per-token IS ratio, rows with prompt/padding positions; the loss was ~4e-15."""
    h, w, labels, g = _grpo_case(41)
    isr = torch.where(labels != -100, 0.9, 0.0).to(D64)
    adv = torch.tensor([1.0, -0.7, 0.4, -1.3], dtype=D64)
    old = -torch.rand(labels.shape, generator=g, dtype=D64) * 3
    m = dpo_fast.GRPOLoss(loss_type="vespo")
    fused = m(h.clone().requires_grad_(), w, labels, adv, old, importance_sampling_ratio=isr)
    two_pass = dpo_fast.GRPOLoss(loss_type="vespo", fused=False)(h.clone().requires_grad_(), w, labels, adv, old,
                                                                 importance_sampling_ratio=isr)
    assert fused.route == "fused" and two_pass.route == "two_pass"
    assert abs(float(fused.loss.detach())) > 1e-3
    torch.testing.assert_close(fused.loss, two_pass.loss, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ 5
@pytest.mark.parametrize("backend", ["rust", "python"])
@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_pack_pairs_counts_and_warns_about_truncation(backend, mode):
    prompts, chosen, rejected = [[1, 2, 3, 4], [1, 2], [5]], [[6] * 6, [7] * 2, [8]], [[9] * 6, [3] * 2, [4]]
    with pytest.warns(UserWarning, match=r"pack_pairs: 1 of 3 pairs were truncated .*max_tokens=8 "
                                         r".*truncation='keep_start'.*truncation='error'") as rec:
        b = dpo_fast.pack_pairs(prompts, chosen, rejected, max_tokens=8, mode=mode, backend=backend)
    assert len([r for r in rec if "pack_pairs" in str(r.message)]) == 1  # once per call, not per pair
    assert b.num_truncated == 1 and b.num_tokens == 8 + 8 + 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the policy named by the caller: counted, not warned about
        b = dpo_fast.pack_pairs(prompts, chosen, rejected, max_tokens=7, mode=mode, truncation="keep_end",
                                backend=backend)
        assert b.num_truncated == 2
        opts = dpo_fast.PackOptions(max_tokens=8, mode=mode)
        assert dpo_fast.pack_pairs(prompts, chosen, rejected, options=opts, backend=backend).num_truncated == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing truncated: no warning
        b = dpo_fast.pack_pairs(prompts, chosen, rejected, max_tokens=20, mode=mode, backend=backend)
    assert b.num_truncated == 0
    with pytest.raises(ValueError, match="pair 0 needs 20 tokens"):
        dpo_fast.pack_pairs(prompts, chosen, rejected, max_tokens=8, mode=mode, truncation="error",
                            backend=backend)
    assert prompts[0] == [1, 2, 3, 4] and chosen[0] == [6] * 6  # inputs untouched


# ------------------------------------------------------------------------------------------------ 6
def test_out_of_range_pair_names_its_row_and_value():
    h, w, labels = _packed(7)
    cu = torch.tensor(CU)
    m = dpo_fast.DPOLoss()
    with pytest.raises(ValueError, match=r"pairs\[2, 1\] = 7, which is outside \[0, 4\)"):
        m(h, w, labels, cu_seqlens=cu, pairs=torch.tensor([[0, 1], [2, 3], [1, 7]]))
    with pytest.raises(ValueError, match=r"pairs\[0, 0\] = -1, which is outside \[0, 4\)"):
        dpo_fast.CPOLoss()(h, w, labels, cu_seqlens=cu, pairs=torch.tensor([[-1, 1]]))
    with pytest.raises(ValueError, match=r"pairs\[1, 0\] = 4, which is outside"):
        dpo_fast.pair_logprobs(h, w, labels, cu_seqlens=cu, pairs=torch.tensor([[0, 1], [4, 2]]))
    with pytest.raises(ValueError, match=r"sequence 1 at pairs\[0, 1\] and pairs\[1, 0\]"):
        m(h, w, labels, cu_seqlens=cu, pairs=torch.tensor([[0, 1], [1, 2]]))
