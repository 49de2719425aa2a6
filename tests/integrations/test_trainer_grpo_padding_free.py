"""FastGRPOTrainer / FastRLOOTrainer with ``padding_free=True`` against stock TRL and the padded fast path.

The prompts are long-tailed in length (left padding) and generation is biased towards an early EOS (right
padding), so the batches hold real padding; with the same seed every trainer samples the same completions
while the parameters agree, and every logged metric must agree within fp32 tolerance over the steps, for each
TRL loss type, with ``num_iterations=2``, ``beta > 0`` and the entropy bonus.
"""

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from dpo_fast.integrations import trl_grpo  # noqa: E402
from support.trainer_fixtures import (EARLY_EOS, assert_same_logs, logged, long_tail_prompts,  # noqa: E402
                                      make_grpo_trainer, make_rloo_trainer, saved_tiny_llama)

try:
    trl_grpo.check_trl_version()
except trl_grpo.UnsupportedTRLVersion as e:  # pragma: no cover
    pytest.skip(str(e), allow_module_level=True)

# 16 completions (4 prompts x 4 generations) of very different lengths per step; 2 iterations per generation, a
# large step and a narrow clip range so the ratios leave the clip range; the reference model and entropy bonus on
PADDED = dict(per_device_train_batch_size=16, num_generations=4, max_completion_length=16, generation_kwargs=EARLY_EOS,
              num_iterations=2, epsilon=0.02, learning_rate=0.05, max_steps=2, beta=0.05)
PF = dict(padding_free=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("grpo_pf_model"))


@pytest.fixture(scope="module")
def prompts():
    return long_tail_prompts(32, seed=3)


def _run(make, kind, out, model_path, prompts, own=None, **cfg):
    tr = make(kind, out, model_path, dataset=prompts, own=own, **{**PADDED, **cfg})
    tr.train()
    return tr


def _check_packed(tr):
    """The packed forwards ran, removed padding and put several sequences in a row: fewer decoder slots and rows
    than the padded batches had."""
    p = tr.dpo_fast_packing
    assert p["real_tokens"] > 0 and p["packed_slots"] < p["padded_slots"], dict(p)
    assert p["packed_rows"] < p["padded_rows"], dict(p)
    assert p["real_tokens"] <= p["packed_slots"]


@pytest.mark.parametrize("options", [
    dict(loss_type="grpo", entropy_coef=0.05),
    dict(loss_type="bnpo", gradient_accumulation_steps=2),
    dict(loss_type="dr_grpo"),
    dict(loss_type="dapo", epsilon_high=0.05, entropy_coef=0.05, use_adaptive_entropy=True, entropy_target=4.2),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="cispo", epsilon_high=1.02),
    dict(loss_type="sapo"),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="vespo"),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_packed_grpo_matches_stock_every_metric(tmp_path, model_path, prompts, options):
    stock = _run(make_grpo_trainer, "trl", tmp_path / "a", model_path, prompts, **options)
    fast = _run(make_grpo_trainer, "fast", tmp_path / "b", model_path, prompts, own=PF, **options)
    assert set(fast.dpo_fast_routes) == {"fused"}
    _check_packed(fast)
    a, b = logged(stock), logged(fast)
    assert_same_logs(a, b)
    assert a[0]["completions/min_length"] < a[0]["completions/max_length"]  # right padding in the batch
    assert "kl" in b[0] and "entropy" in b[0]
    if options.get("entropy_coef"):
        assert "policy_loss" in b[0] and "entropy_coef" in b[0]


def test_packed_equals_padded_fast_and_row_capacities(tmp_path, model_path, prompts):
    opts = dict(loss_type="dapo", entropy_coef=0.05)
    padded = _run(make_grpo_trainer, "fast", tmp_path / "a", model_path, prompts, **opts)
    assert not padded.dpo_fast_padding_free and not padded.dpo_fast_packing
    ref = logged(padded)
    for i, rows in enumerate((None, "one_row", 64)):
        tr = _run(make_grpo_trainer, "fast", tmp_path / f"b{i}", model_path, prompts,
                  own=dict(padding_free=True, packed_row_tokens=rows), **opts)
        _check_packed(tr)
        assert_same_logs(ref, logged(tr))
        if rows == "one_row":  # every sequence of a forward in one row: no padding at all
            assert tr.dpo_fast_packing["packed_slots"] == tr.dpo_fast_packing["real_tokens"]


def test_packed_two_pass_route_and_patch(tmp_path, model_path, prompts):
    """The two-pass route (TRL's loss on the engine's differentiable log-probs and entropies) packs too."""
    opts = dict(top_entropy_quantile=0.5, entropy_coef=0.05)
    stock = _run(make_grpo_trainer, "trl", tmp_path / "a", model_path, prompts, **opts)
    patched = _run(make_grpo_trainer, "patched", tmp_path / "b", model_path, prompts, own=PF, **opts)
    assert set(patched.dpo_fast_routes) == {"two_pass"}
    _check_packed(patched)
    assert_same_logs(logged(stock), logged(patched))


def test_packed_rloo_matches_stock(tmp_path, model_path, prompts):
    stock = _run(make_rloo_trainer, "trl", tmp_path / "a", model_path, prompts)
    fast = _run(make_rloo_trainer, "fast", tmp_path / "b", model_path, prompts, own=PF)
    _check_packed(fast)
    assert_same_logs(logged(stock), logged(fast))


def test_packed_forward_hidden_states_equal_padded(model_path):
    """The decoder on the packed rows gives the padded batch's hidden states at every real token."""
    from transformers import AutoModelForCausalLM

    from dpo_fast.hf import call_with_hidden_states, call_without_padding

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    B, T = 6, 20
    ids = torch.randint(2, 14, (B, T), generator=g)
    am = torch.zeros(B, T, dtype=torch.int64)
    for b, (lo, hi) in enumerate([(0, 20), (5, 20), (3, 11), (12, 14), (0, 1), (19, 20)]):
        am[b, lo:hi] = 1
    ids_before, am_before = ids.clone(), am.clone()
    with torch.no_grad():
        padded = call_with_hidden_states(model, lambda h, head: h, ids, attention_mask=am)
        packed = call_without_padding(model, lambda h, head: h, ids, am)
    m = am.bool()
    torch.testing.assert_close(packed[m], padded[m], rtol=1e-5, atol=1e-5)
    assert (packed[~m] == 0).all()
    assert torch.equal(ids, ids_before) and torch.equal(am, am_before)


def test_bad_padding_free_setups(tmp_path, model_path, prompts, monkeypatch):
    with pytest.raises(TypeError, match="padding_free: expected a bool"):
        make_grpo_trainer("fast", tmp_path / "a", model_path, own=dict(padding_free="yes"))
    with pytest.raises(ValueError, match="packed_row_tokens: only meaningful with padding_free=True"):
        make_grpo_trainer("fast", tmp_path / "b", model_path, own=dict(packed_row_tokens=64))
    with pytest.raises(ValueError, match="packed_row_tokens: expected None, 'one_row' or an int"):
        make_rloo_trainer("fast", tmp_path / "c", model_path, own=dict(padding_free=True, packed_row_tokens=0))
    # an attention implementation that lets packed sequences see each other is refused at construction
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match="padding_free=True: with attention implementation"):
        make_grpo_trainer("fast", tmp_path / "d", model_path, own=PF)
    monkeypatch.undo()
    # a packed row must hold the longest sequence
    tr = make_grpo_trainer("fast", tmp_path / "e", model_path, dataset=prompts,
                           own=dict(padding_free=True, packed_row_tokens=8), **PADDED)
    with pytest.raises(ValueError, match="row_tokens: 8 cannot hold row"):
        tr.train()
