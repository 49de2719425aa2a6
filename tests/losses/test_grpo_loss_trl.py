"""grpo_loss against TRL 1.16's own ``GRPOTrainer._compute_loss`` (the oracle), called on a stub trainer.

The stub (:func:`support.trl_oracle.trl_grpo_loss`) holds only what ``_compute_loss`` reads (config values, a
one-process accelerator, the metric store) and returns our per-token log-probs and entropies from
``_get_per_token_logps_and_entropies``, so TRL's loss code runs unchanged on the same tensors. Loss, gradients w.r.t. the log-probs (and the entropies under
the entropy bonus) and every metric TRL logs are compared, in float64, for every loss type and option.
"""

from __future__ import annotations

import pytest
import torch

from dpo_fast import losses as L
from support.trl_oracle import trl_grpo_loss as _trl_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
GRPOTrainer = trl_grpo.GRPOTrainer
D64 = torch.float64


def _batch(seed, B=5, T=7, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=D64) * 3
    old = lp + spread * torch.randn(B, T, generator=g, dtype=D64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=D64)
    samp = old + 0.2 * torch.randn(B, T, generator=g, dtype=D64)
    ent = torch.rand(B, T, generator=g, dtype=D64) * 3
    A = torch.randn(B, generator=g, dtype=D64)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[:, 0] = 1
    mask[-1] = 0  # a sequence without tokens
    return lp, old, ref, samp, ent, A, mask


# option sets: name -> overrides of GRPOOptions (each also runs at both IS levels and for every loss type)
OPTION_SETS = {
    "plain": {},
    "kl": dict(beta=0.04),
    "kl_bias_corrected": dict(beta=0.04, use_bias_correction_kl=True),
    "delta": dict(delta=1.3),
    "entropy": dict(top_entropy_quantile=0.4, entropy_coef=0.05),
    "off_policy_mask": dict(off_policy_mask_threshold=0.05),
    "is_token": dict(is_ratio="token"),
    "is_sequence": dict(is_ratio="sequence", beta=0.02),
}


def _options(loss_type, level, overrides):
    o = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_low=0.2,
             epsilon_high=5.0 if loss_type == "cispo" else 0.28, max_completion_length=9)
    o.update({k: v for k, v in overrides.items() if k != "is_ratio"})
    return L.GRPOOptions(**o)


@pytest.mark.parametrize("opt_name", list(OPTION_SETS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", L.GRPO_LOSS_TYPES)
def test_grpo_loss_matches_trl(loss_type, level, opt_name):
    overrides = OPTION_SETS[opt_name]
    if loss_type == "vespo" and overrides.get("is_ratio") == "sequence":
        pytest.skip("TRL rejects vespo with a sequence-level sampler IS mode (so does GRPOOptions)")
    opts = _options(loss_type, level, overrides)
    lp, old, ref, samp, ent, A, mask = _batch(seed=sum(map(ord, loss_type + level + opt_name)))
    is_ratio = None
    if "is_ratio" in overrides:
        mode = "token_truncate" if overrides["is_ratio"] == "token" else "sequence_mask"
        is_ratio, _ = L.vllm_importance_sampling(old, samp, mask, mode, 0.5, 1.5)
    n_items = torch.tensor(float(mask.sum()) + 3.0, dtype=D64)

    x_ours = lp.clone().requires_grad_()
    e_ours = ent.clone().requires_grad_()
    out = L.grpo_loss(x_ours, A, mask, old, ref, **opts.as_kwargs(), num_items_in_batch=n_items,
                      entropies=e_ours, sampling_logps=samp if opts.off_policy_mask_threshold is not None else None,
                      importance_sampling_ratio=is_ratio)
    x_trl = lp.clone().requires_grad_()
    e_trl = ent.clone().requires_grad_()
    inputs = dict(prompt_ids=torch.zeros(lp.shape[0], 2, dtype=torch.long), prompt_mask=torch.ones(lp.shape[0], 2),
                  completion_ids=torch.zeros_like(mask), completion_mask=mask, advantages=A, old_per_token_logps=old,
                  ref_per_token_logps=ref, num_items_in_batch=n_items)
    if opts.off_policy_mask_threshold is not None:
        inputs["sampling_per_token_logps"] = samp
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    trl_loss, trl_metrics = _trl_loss(x_trl, e_trl, inputs, opts.as_kwargs())

    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-10, atol=1e-12)
    g_ours = torch.autograd.grad(out.loss, (x_ours, e_ours), allow_unused=True)
    g_trl = torch.autograd.grad(trl_loss, (x_trl, e_trl), allow_unused=True)
    for a, b in zip(g_ours, g_trl):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    expected = {k: v for k, v in trl_metrics.items() if k != "entropy_coef"}
    assert set(out.metrics) == set(expected), (sorted(out.metrics), sorted(expected))
    for k, v in expected.items():
        # TRL takes the clip fractions in float32 (``.float()``): compare at float32 precision
        torch.testing.assert_close(torch.tensor(out.metrics[k], dtype=D64), torch.tensor(float(v), dtype=D64),
                                   rtol=1e-7, atol=1e-12, equal_nan=True, msg=k)


def test_trl_loss_type_set_is_the_registry():
    """The registry's GRPO loss types are exactly those TRL 1.16 documents and handles."""
    import inspect
    import re

    from trl import GRPOConfig

    src = inspect.getsource(GRPOTrainer._compute_loss)
    for lt in L.GRPO_LOSS_TYPES:
        assert f'"{lt}"' in src, lt
    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    documented = set(re.findall(r"'(\w+)'", help_text)) - set(L.IS_LEVELS)  # it also quotes 'sequence'
    assert documented == set(L.GRPO_LOSS_TYPES), documented ^ set(L.GRPO_LOSS_TYPES)


def test_grpo_defaults_match_trl_config():
    """Every option's default agrees with GRPOConfig's, except the two documented differences."""
    from trl import GRPOConfig

    fields = GRPOConfig.__dataclass_fields__
    ours = L.GRPOOptions()
    same = ["beta", "delta", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
            "vespo_k_neg", "vespo_lambda_neg", "importance_sampling_level", "top_entropy_quantile", "entropy_coef",
            "off_policy_mask_threshold", "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"]
    for name in same:
        assert getattr(ours, name) == fields[name].default, name
    assert ours.epsilon_low == fields["epsilon"].default
    # documented differences: dpo_fast keeps its first release's defaults
    assert (ours.loss_type, fields["loss_type"].default) == ("grpo", "dapo")
    assert (ours.use_bias_correction_kl, fields["use_bias_correction_kl"].default) == (False, True)
