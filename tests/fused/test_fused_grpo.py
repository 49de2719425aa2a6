"""GRPOLoss: the fused route equals grpo_loss(token_logprobs(...)) — loss, gradients, metrics."""

from __future__ import annotations

import itertools

import pytest
import torch

import dpo_fast
from support import CountMM, assert_close, assert_output_matches, random_labels, seed_of

CONFIGS = [
    dict(),
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="bnpo", importance_sampling_level="sequence"),
    dict(loss_type="dr_grpo", beta=0.04, max_completion_length=12),
]


def _batch(seed, B=4, T=9, H=12, V=61):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / 3
    b = torch.randn(V, generator=g) * 0.1
    labels = random_labels((B, T), V, 0.1, g)
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # a shorter completion
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.3 - 4
    ref = torch.randn(B, T, generator=g) * 0.3 - 4
    return h, w, b, labels, adv, old, ref


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cfg,use_old", list(itertools.product(range(len(CONFIGS)), [False, True])))
def test_fused_grpo_equals_composition(cfg, use_old, backend):
    kw = CONFIGS[cfg]
    h, w, b, labels, adv, old, ref = _batch(cfg * 2 + use_old)
    old_ = old if use_old else None
    ref_ = ref if kw.get("beta") else None
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    tok = dpo_fast.token_logprobs(hh, ww, labels, bias=bb, backend="torch")
    expect = dpo_fast.grpo_loss(tok, adv, labels != -100, old_, ref_, **kw)
    expect.loss.backward()
    ref_grads = (hh.grad, ww.grad, bb.grad)
    m = dpo_fast.GRPOLoss(backend=backend, workspace_bytes=14 * w.shape[0] * 8, **kw)  # ~2 sequences per group
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    out = m(hh, ww, labels, adv, old_, ref_, bias=bb)
    assert out.route == "fused"
    out.loss.backward()
    assert_output_matches(out, expect, ("loss", "per_token_loss"), (hh.grad, ww.grad, bb.grad), ref_grads,
                          metrics_abs=1e-7)


def test_grpo_gemm_counts_and_fallbacks():
    h, w, b, labels, adv, old, ref = _batch(11)
    results = []
    for fused, gemms in ((True, 3), (False, 4)):
        hh = h.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        m = dpo_fast.GRPOLoss(fused=fused, loss_type="dapo", compute_metrics=False)
        with CountMM() as c:
            out = m(hh, ww, labels, adv, old)
            out.loss.backward()
        assert c.calls == gemms and out.route == ("fused" if fused else "two_pass")
        results.append((out.loss.detach(), hh.grad, ww.grad))
    assert_close(results[0][0], results[1][0], torch.float32, "loss")
    assert_close(results[0][2], results[1][2], torch.float32, "dW")
    # a sequence that does not fit the fused workspace: two-pass, same numbers
    m = dpo_fast.GRPOLoss(loss_type="dapo", workspace_bytes=1024)
    out = m(h.clone().requires_grad_(), w, labels, adv, old)
    assert out.route == "two_pass"
    assert_close(out.loss, results[0][0], torch.float32, "fallback loss")


def test_grpo_entropy_metric_and_errors():
    h, w, b, labels, adv, old, ref = _batch(12)
    m = dpo_fast.GRPOLoss(token_metrics=True)
    out = m(h.clone().requires_grad_(), w, labels, adv)
    z = h.double() @ w.double().t()
    ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    assert out.metrics["entropy"] == pytest.approx(ent[labels != -100].mean().item(), rel=1e-4)
    with pytest.raises(ValueError):
        dpo_fast.GRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError):
        dpo_fast.GRPOLoss(epsilon_low=1.5)
    with pytest.raises(ValueError, match="ref_logps"):
        dpo_fast.GRPOLoss(beta=0.1)(h, w, labels, adv)
    with pytest.raises(ValueError, match=r"old_logps: expected shape"):
        m(h, w, labels, adv, old[:, :3])
    with pytest.raises(ValueError, match="advantages"):
        m(h.clone().requires_grad_(), w, labels, adv[:2])
    # packed (N, H) input is supported, but needs its boundaries
    with pytest.raises(ValueError, match=r"hidden: expected \(B, T, H\), or \(N, H\) together with cu_seqlens"):
        m(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), adv)


def _packed(h, labels, old, ref):
    """The padded batch as packed sequences (each row trimmed to a different length; T - r tokens for row r)."""
    B, T = labels.shape
    lens = [T - (r % 3) for r in range(B)]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    cat = lambda x: torch.cat([x[r, :n] for r, n in enumerate(lens)])  # noqa: E731
    return cat(h), cat(labels), cat(old), cat(ref), cu, lens


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_packed_input_equals_padded(cfg, fused):
    """GRPOLoss on packed (N, H) + cu_seqlens equals the padded batch with the same scored tokens."""
    kw = dict(CONFIGS[cfg])
    kw.setdefault("max_completion_length", 9)  # dr_grpo's default is the row length, which packing changes
    h, w, b, labels, adv, old, ref = _batch(40 + cfg)
    hp, lp, oldp, refp, cu, lens = _packed(h, labels, old, ref)
    labels_pad = labels.clone()
    for r, n in enumerate(lens):
        labels_pad[r, n:] = -100  # the same scored tokens in both layouts
    outs = []
    for hidden, lab, o, rf, extra in ((h, labels_pad, old, ref, {}), (hp, lp, oldp, refp, dict(cu_seqlens=cu))):
        hh, ww = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        m = dpo_fast.GRPOLoss(fused=fused, workspace_bytes=14 * w.shape[0] * 8, **kw)
        out = m(hh, ww, lab, adv, o, rf if kw.get("beta") else None, bias=b, **extra)
        assert out.route == ("fused" if fused else "two_pass")
        out.loss.backward()
        assert out.per_token_loss.shape == lab.shape and out.token_logps.shape == lab.shape
        outs.append((out, hh.grad, ww.grad, lab))
    (pad, dh_pad, dw_pad, lab_pad), (pk, dh_pk, dw_pk, lab_pk) = outs
    assert_close(pk.loss, pad.loss, torch.float32, "loss")
    assert_close(dw_pk, dw_pad, torch.float32, "dW")
    cat = lambda x: torch.cat([x[r, :n] for r, n in enumerate(lens)])  # noqa: E731
    assert_close(dh_pk, cat(dh_pad), torch.float32, "dh")
    assert_close(pk.per_token_loss, cat(pad.per_token_loss), torch.float32, "per_token_loss")
    assert_close(pk.token_logps, cat(pad.token_logps), torch.float32, "token_logps")
    for k, v in pad.metrics.items():
        assert pk.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


# every TRL 1.16 loss type and option: fused where the per-token gradient is local, else two-pass (recorded)
TRL_OPTIONS = {
    "cispo": dict(loss_type="cispo", epsilon_high=1.5),
    "sapo": dict(loss_type="sapo"),
    "luspo_seq": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    "delta": dict(loss_type="dapo", delta=1.2, epsilon_high=0.28),
    "bias_kl": dict(loss_type="bnpo", beta=0.05, use_bias_correction_kl=True),
    "off_policy": dict(loss_type="grpo", off_policy_mask_threshold=0.05),
    "vllm_token": dict(loss_type="dapo", vllm_importance_sampling_mode="token_truncate"),
    "vllm_seq": dict(loss_type="grpo", vllm_importance_sampling_mode="sequence_mask",
                     vllm_importance_sampling_clip_min=0.5),
    "vespo_vllm": dict(loss_type="vespo", vllm_importance_sampling_mode="token_mask",
                       vllm_importance_sampling_clip_min=0.5),
    "entropy_mask": dict(loss_type="dapo", top_entropy_quantile=0.5),
}


@pytest.mark.parametrize("name", list(TRL_OPTIONS))
def test_every_trl_option_fused_or_recorded_two_pass(name):
    kw = TRL_OPTIONS[name]
    h, w, b, labels, adv, old, ref = _batch(seed_of(name))
    g = torch.Generator().manual_seed(seed_of(name, "samp"))
    samp = old + torch.randn(old.shape, generator=g) * 0.2
    extra = {"sampling_logps": samp} if kw.get("vllm_importance_sampling_mode") else {}
    ref_ = ref if kw.get("beta") else None
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    tok = dpo_fast.token_logprobs(hh, ww, labels, bias=bb, backend="torch")
    ent = None
    if kw.get("top_entropy_quantile", 1.0) < 1.0:
        z = h.double() @ w.double().t() + b.double()
        ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    expect = dpo_fast.grpo_loss(tok, adv, labels != -100, old, ref_, **kw, entropies=ent, **extra)
    expect.loss.backward()
    ref_grads = (hh.grad, ww.grad, bb.grad)
    m = dpo_fast.GRPOLoss(backend="torch", workspace_bytes=14 * w.shape[0] * 8, **kw)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    out = m(hh, ww, labels, adv, old, ref_, bias=bb, **extra)
    # the entropy threshold is a quantile over the whole batch: not known during a one-pass route
    assert out.route == ("two_pass" if name == "entropy_mask" else "fused")
    out.loss.backward()
    assert_output_matches(out, expect, ("loss", "per_token_loss"), (hh.grad, ww.grad, bb.grad), ref_grads,
                          metrics_abs=1e-6)


def test_per_token_advantages_and_given_is_ratio():
    h, w, b, labels, adv, old, ref = _batch(31)
    g = torch.Generator().manual_seed(32)
    adv_t = torch.randn(labels.shape, generator=g)
    isr = torch.rand(labels.shape[0], 1, generator=g) + 0.5
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    tok = dpo_fast.token_logprobs(hh, ww, labels, bias=b)
    expect = dpo_fast.grpo_loss(tok, adv_t, labels != -100, old, importance_sampling_ratio=isr, loss_type="dapo")
    expect.loss.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = dpo_fast.GRPOLoss(loss_type="dapo", workspace_bytes=14 * w.shape[0] * 8)(
        h2, w2, labels, adv_t, old, bias=b, importance_sampling_ratio=isr)
    assert out.route == "fused"
    out.loss.backward()
    assert_output_matches(out, expect, ("loss", "per_token_loss"), (h2.grad, w2.grad), (hh.grad, ww.grad),
                          metrics_abs=1e-6)


def test_bad_options_rejected_with_a_clear_error():
    dpo_fast.GRPOLoss(entropy_coef=0.01)  # fused since issue 20 (tests/engine/test_entropy_grad.py)
    with pytest.raises(ValueError, match="entropy_coef"):
        dpo_fast.GRPOLoss(entropy_coef=float("inf"))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_fast.GRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        dpo_fast.GRPOLoss(vllm_importance_sampling_mode="sometimes")
    h, w, b, labels, adv, old, ref = _batch(33)
    with pytest.raises(ValueError, match="sampling_logps"):
        dpo_fast.GRPOLoss(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=0.5)(
            h.clone().requires_grad_(), w, labels, adv, old)
