"""The fused ``DPOLoss`` against TRL 1.16's own ``DPOTrainer._compute_loss`` (the oracle), from hidden states.

TRL's loss code runs unchanged on a stub trainer (it holds only what ``_compute_loss`` reads). The stub's
policy and reference "models" return what TRL's fused head returns — per-token log-probs, vocabulary-mean
logits, entropies, arg-max hits and log Σ p² — computed in float64 from the *same* hidden states and lm_head
weight that DPOLoss receives, so autograd through the stub gives TRL's gradients w.r.t. hidden and weight.
Compared: the loss, dL/dhidden, dL/dweight and every metric TRL logs (rewards/*, logps/*, logits/*, entropy,
mean_token_accuracy), for every loss type x f-divergence x ld_alpha x use_weighting combination TRL accepts
and for loss lists, on the fused and the two-pass routes. The reference log-probs come from ``ref_hidden``
(DPOLoss's own no-grad forward, LD-weighted as TRL weights them). label_smoothing is passed per loss type as
the TRL trainer path passes it (TRL's sigmoid has no ε).
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

import dpo_fast
from dpo_fast.losses import registry as R
from support.trl_oracle import (DPO_METRICS, StubAccelerator, StubModel, case_precision, dpo_cases,
                                 trl_epsilon)

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
DPOTrainer = trl_dpo.DPOTrainer

METRICS = DPO_METRICS + ["entropy", "mean_token_accuracy"]
P, T, H, V = 3, 8, 6, 19  # T positions per row; TRL scores positions 1..T-1 from hidden 0..T-2


def _batch(seed, dtype=torch.float64):
    """completion_mask (2P, T), labels (2P, T-1), policy/reference hidden (2P, T-1, H), weight (V, H)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * P, T, dtype=torch.long)
    for i in range(2 * P):
        start = int(torch.randint(1, 3, (1,), generator=g))
        n = int(torch.randint(1, T - start + 1, (1,), generator=g))
        mask[i, start:start + n] = 1
    ids = torch.randint(0, V, (2 * P, T), generator=g)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    h = torch.randn(2 * P, T - 1, H, generator=g, dtype=torch.float64)
    ref_h = h + 0.3 * torch.randn(2 * P, T - 1, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    # make some scored labels the arg-max, so that mean_token_accuracy is not trivially 0
    top = (h @ w.t()).argmax(-1)
    labels = torch.where((labels != -100) & (torch.rand(labels.shape, generator=g) < 0.4), top, labels)
    return mask, ids, labels, h.to(dtype), ref_h.to(dtype), w.to(dtype)


def _head(h, w, labels):
    """TRL's fused-head outputs of hidden h (2P, T-1, H) through w (V, H): what ``model(...)`` returns."""
    z = h @ w.t()  # (2P, T-1, V)
    logp = torch.log_softmax(z, -1)
    shift = labels != -100
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        heads = dict(mean_logits=z.mean(-1), entropy=-(logp.exp() * logp).sum(-1),
                     is_top1=z.argmax(-1) == labels, log_sum_sq_probs=torch.logsumexp(2 * logp, -1))
    return types.SimpleNamespace(log_probs=torch.where(shift, tok, 0.0), **heads)


def _trl(cfg, mask, ids, labels, h, ref_h, w):
    loss_types, weights, eps, fdiv, alpha, ld_alpha, weighting, beta = cfg
    args = types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None)
    ref_out = _head(ref_h, w.detach(), labels)
    s = types.SimpleNamespace(
        args=args, accelerator=StubAccelerator(), model=StubModel().eval(),
        ref_model=lambda **kw: types.SimpleNamespace(log_probs=ref_out.log_probs.detach()), aux_loss_enabled=False,
        precompute_ref_logps=False, _total_train_tokens=0, _tp_size=1, ld_alpha=ld_alpha, f_divergence_type=fdiv,
        f_alpha_divergence_coef=alpha, loss_types=loss_types, loss_weights=weights, beta=beta, label_smoothing=eps,
        use_weighting=weighting, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    out = _head(h, w, labels)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(mask), completion_mask=mask)
    loss = DPOTrainer._compute_loss(s, lambda **kw: out, inputs, False)
    return loss, {k: v[-1] for k, v in s._metrics["eval"].items()}


@pytest.mark.parametrize("loss_types,fdiv,ld_alpha,weighting", list(dpo_cases(wpo_ld_default_fdiv_only=True)))
def test_fused_dpo_loss_matches_trl(loss_types, fdiv, ld_alpha, weighting):
    dtype, tol = case_precision(loss_types, fdiv)
    seed = sum(map(ord, "".join(loss_types) + fdiv + str(ld_alpha) + str(weighting)))
    mask, ids, labels, h, ref_h, w = _batch(seed, dtype)
    eps = trl_epsilon(loss_types)
    weights = [1.0] if len(loss_types) == 1 else [1.0 + 0.5 * i for i in range(len(loss_types))]
    cfg = (loss_types, weights, eps, fdiv, 0.3, ld_alpha, weighting, 0.4)
    h_t, w_t = h.clone().requires_grad_(), w.clone().requires_grad_()
    try:
        loss_trl, m_trl = _trl(cfg, mask, ids, labels, h_t, ref_h, w_t)
    except RuntimeError as e:  # TRL's in-place WPO product on the expanded sft term
        assert weighting and "sft" in loss_types, e
        pytest.skip(f"TRL 1.16 fails on this combination: {e}")
    try:
        g_trl = torch.autograd.grad(loss_trl, (h_t, w_t))
    except RuntimeError as e:  # TRL 1.16: `per_sequence_loss *= weights` in place on relu's output (hinge)
        assert weighting and "inplace" in str(e), e
        g_trl = None
    smoothing = [eps if R.pairwise(lt).trl_uses_label_smoothing else 0.0 for lt in loss_types]
    expect_route = "two_pass" if any(R.pairwise(lt).batch_coupled for lt in loss_types) else "fused"
    for fused in (True, False):
        m = dpo_fast.DPOLoss(beta=0.4, loss_type=loss_types, loss_weights=weights, label_smoothing=smoothing,
                             f_divergence_type=fdiv, f_alpha_divergence_coef=0.3, use_weighting=weighting,
                             ld_alpha=ld_alpha, fused=fused, token_metrics=True)
        h_o, w_o = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = m(h_o, w_o, labels, ref_hidden=ref_h)
        assert out.route == (expect_route if fused else "two_pass")
        torch.testing.assert_close(out.loss, loss_trl.detach(), **tol)
        out.loss.backward()
        if g_trl is not None:
            torch.testing.assert_close(h_o.grad, g_trl[0], **tol, msg=f"dhidden fused={fused}")
            torch.testing.assert_close(w_o.grad, g_trl[1], **tol, msg=f"dweight fused={fused}")
        for k in METRICS:  # TRL takes the accuracies in float32 (``.float()``)
            t = dict(rtol=1e-7, atol=0.0) if k in ("rewards/accuracies", "mean_token_accuracy") else tol
            if k in ("entropy", "logits/chosen", "logits/rejected") and dtype == torch.float32:
                t = dict(rtol=1e-5, atol=1e-6)  # float32 per-token sums in a different order
            torch.testing.assert_close(torch.tensor(out.metrics[k], dtype=torch.float64),
                                       torch.tensor(m_trl[k], dtype=torch.float64), **t, msg=k)


def test_logits_metrics_without_token_metrics_match_trl():
    """Without token_metrics, logits/* come from the one-GEMV shortcut: TRL's values all the same."""
    mask, ids, labels, h, ref_h, w = _batch(5)
    cfg = (["sigmoid"], [1.0], 0.0, "reverse_kl", 0.5, None, False, 0.1)
    loss_trl, m_trl = _trl(cfg, mask, ids, labels, h, ref_h, w)
    out = dpo_fast.DPOLoss(beta=0.1)(h.clone().requires_grad_(), w, labels, ref_hidden=ref_h)
    torch.testing.assert_close(out.loss, loss_trl, rtol=1e-10, atol=1e-12)
    for k in ("logits/chosen", "logits/rejected", "rewards/margins", "logps/chosen"):
        assert out.metrics[k] == pytest.approx(m_trl[k], rel=1e-9, abs=1e-11), k
