"""grpo_loss options beyond TRL's oracle test: the sampler IS ratio, bad options, NaN isolation, dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_fast import losses as L

D64 = torch.float64


def _batch(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=D64) * 3
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=D64)
    samp = old + 0.5 * torch.randn(B, T, generator=g, dtype=D64)
    A = torch.randn(B, generator=g, dtype=D64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return lp, old, samp, A, mask


@pytest.mark.parametrize("mode", L.VLLM_IS_MODES)
def test_vllm_importance_sampling_reference(mode):
    """Element by element, from GRPOConfig's description of the four modes (the loss-side use is in the
    TRL oracle test)."""
    lp, old, samp, A, mask = _batch(1)
    samp[0, 0] = float("nan")  # the sampler gave no value: ratio 1 there
    lo, hi = 0.6, 1.4
    ratio, metrics = L.vllm_importance_sampling(old, samp, mask, mode, lo, hi)
    B, T = lp.shape
    seq = mode.startswith("sequence")
    expect = torch.zeros(B, 1 if seq else T, dtype=D64)
    for b in range(B):
        ds = [0.0 if (not mask[b, t] or math.isnan(samp[b, t])) else float(old[b, t] - samp[b, t]) for t in range(T)]
        vals = [sum(ds)] if seq else ds
        for j, d in enumerate(vals):
            r = math.exp(d)
            if mode.endswith("truncate"):
                r = min(max(r, lo), hi)
            elif not lo <= r <= hi:
                r = 0.0
            expect[b, j] = r
    torch.testing.assert_close(ratio, expect, rtol=1e-12, atol=0)
    kept = expect.flatten() if seq else expect[mask]
    torch.testing.assert_close(metrics["sampling/importance_sampling_ratio/mean"], kept.mean())
    torch.testing.assert_close(metrics["sampling/importance_sampling_ratio/min"], kept.min())
    diffs = (old - samp).abs()[mask & ~torch.isnan(samp)]
    torch.testing.assert_close(metrics["sampling/sampling_logp_difference/max"], diffs.max())


def test_is_mode_computed_inside_equals_precomputed():
    lp, old, samp, A, mask = _batch(2)
    ratio, _ = L.vllm_importance_sampling(old, samp, mask, "token_mask", None, 2.0)
    a = L.grpo_loss(lp, A, mask, old, loss_type="dapo", importance_sampling_ratio=ratio)
    b = L.grpo_loss(lp, A, mask, old, loss_type="dapo", sampling_logps=samp, vllm_importance_sampling_mode="token_mask",
                    vllm_importance_sampling_clip_max=2.0)
    torch.testing.assert_close(a.loss, b.loss)
    assert "sampling/importance_sampling_ratio/mean" in b.metrics


def test_grpo_bad_options_name_the_argument():
    lp, old, samp, A, mask = _batch()
    cases = [
        (dict(loss_type="ppo"), ValueError, r"loss_type 'ppo'.*vespo"),
        (dict(loss_type=None), TypeError, r"loss_type must be a str.*grpo"),
        (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
        (dict(delta=0.0), ValueError, "delta"),
        (dict(sapo_temperature_neg=-1.0), ValueError, "sapo_temperature_neg"),
        (dict(vespo_k_pos=math.inf), ValueError, "vespo_k_pos"),
        (dict(top_entropy_quantile=1.5), ValueError, "top_entropy_quantile"),
        (dict(top_entropy_quantile=0.5), ValueError, "entropies"),
        (dict(entropy_coef=0.1), ValueError, "entropies"),
        (dict(vllm_importance_sampling_mode="tis"), ValueError, "vllm_importance_sampling_mode"),
        (dict(vllm_importance_sampling_mode="token_mask"), ValueError, "sampling_logps"),
        (dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None,
              sampling_logps=samp), ValueError, "clip_min or"),
        (dict(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=3.0,
              sampling_logps=samp), ValueError, "must be less than"),
        (dict(loss_type="vespo", vllm_importance_sampling_mode="sequence_mask", sampling_logps=samp), ValueError,
         "token-level"),
        (dict(max_completion_length=2.5), ValueError, "max_completion_length"),
        (dict(importance_sampling_ratio=torch.ones(3)), ValueError, "importance_sampling_ratio"),
        (dict(entropies=torch.ones(2, 2)), ValueError, "entropies must have shape"),
    ]
    for kw, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            L.grpo_loss(lp, A, mask, old, **kw)


@pytest.mark.parametrize("loss_type", L.GRPO_LOSS_TYPES)
def test_grpo_nan_stays_off_the_mask_and_per_token_advantages(loss_type):
    lp, old, samp, A, mask = _batch(3)
    mask[1, -1] = False
    bad = lp.clone()
    bad[1, -1] = float("nan")  # an unscored position: must not reach the loss or other gradients
    x = bad.clone().requires_grad_()
    out = L.grpo_loss(x, A, mask, old, loss_type=loss_type, importance_sampling_level="sequence")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all() and x.grad[1, -1] == 0
    clean = L.grpo_loss(lp, A, mask, old, loss_type=loss_type, importance_sampling_level="sequence")
    torch.testing.assert_close(out.loss, clean.loss)
    # (B,) advantages and the same values broadcast per token give the same loss
    per_tok = L.grpo_loss(lp, A[:, None].expand_as(lp).contiguous(), mask, old, loss_type=loss_type)
    torch.testing.assert_close(per_tok.loss, L.grpo_loss(lp, A, mask, old, loss_type=loss_type).loss)


def test_grpo_dtypes_and_inputs_untouched():
    lp, old, samp, A, mask = _batch(4)
    ent = torch.rand_like(lp)
    keep = [t.clone() for t in (lp, old, samp, A, ent)]
    out = L.grpo_loss(lp.bfloat16(), A.float(), mask, old.bfloat16(), loss_type="sapo", entropies=ent.float(),
                      entropy_coef=0.01)
    assert out.loss.dtype == torch.float32 and out.per_token_loss.dtype == torch.float32
    L.grpo_loss(lp, A, mask, old, loss_type="cispo", entropies=ent, top_entropy_quantile=0.3, sampling_logps=samp,
                vllm_importance_sampling_mode="sequence_truncate", off_policy_mask_threshold=0.1)
    for a, b in zip(keep, (lp, old, samp, A, ent)):
        assert torch.equal(a, b)


def test_grpo_options_reusable_core():
    """GRPOOptions validates once; grpo_token_terms gives the per-token loss grpo_loss aggregates."""
    lp, old, samp, A, mask = _batch(5)
    o = L.GRPOOptions(loss_type="bnpo", epsilon_high=0.28, delta=1.5)
    assert o.epsilon_high == 0.28 and L.GRPOOptions().epsilon_high == 0.2
    t = L.grpo_token_terms(lp, A, mask, old, options=o)
    out = L.grpo_loss(lp, A, mask, old, **o.as_kwargs())
    torch.testing.assert_close(t.per_token_loss, out.per_token_loss)
    torch.testing.assert_close(t.per_token_loss.sum() / mask.sum(), out.loss)
    with pytest.raises(ValueError, match="epsilon_low"):
        L.GRPOOptions(epsilon_low=1.0)
