"""Vision-language models in FastDPOTrainer / FastGRPOTrainer / FastRLOOTrainer / FastKTOTrainer and dpo_fast.hf
(issue 23).

Tiny random VLMs built from the configs transformers ships (no download; support/vlm_fixtures.py): Qwen2-VL
(``image_grid_thw``, ``mm_token_type_ids``, 3-D M-RoPE positions), LLaVA (CLIP tower, ``<image>`` placeholders)
and Gemma-3 (``token_type_ids``, bidirectional attention over image tokens; its text config's
``final_logit_softcapping``, which its forward ignores but TRL's fused LM head applies), each with a processor
built locally and small random images. Stock TRL and the fast trainer run the same data and seed; their logged
metrics must agree over several steps.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("PIL")

from dpo_fast import hf as H  # noqa: E402
from support.trainer_fixtures import assert_same_logs  # noqa: E402
from support.vlm_fixtures import (DPO_METRICS, image, logged, make_dpo, make_grpo, make_kto, make_rloo,  # noqa: E402
                                  preference_dataset, tiny_vlm)

#: a Gemma-3 text-config softcap that bites on the tiny model's logits (|z| up to ~0.4): tanh(z / 0.2) is far
#: from z / 0.2 there, so capped and uncapped log-probs differ well beyond the tests' 1e-4
SOFTCAP = 0.2


def _image_batch(proc, n=2):
    """A processor batch of ``n`` one-image prompts (input_ids, attention_mask, pixel values, the model's token
    types / grid sizes)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return proc(images=[[image(i)] for i in range(n)], text=[text] * n, return_tensors="pt")


# ------------------------------------------------------------------------------------------------ dpo_fast.hf


@pytest.mark.parametrize("kind, softcap", [("qwen2_vl", None), ("llava", None), ("gemma3", SOFTCAP)])
def test_head_and_hidden_states_reproduce_vlm_logits(kind, softcap):
    """The outer lm_head + the body's last hidden states (vision inputs passed) give the model's own logits; for
    Gemma3ForConditionalGeneration (transformers 5.25) without the text config's softcap, which its forward
    ignores (unlike Gemma3ForCausalLM)."""
    model, proc = tiny_vlm(kind, softcap=softcap)
    batch = _image_batch(proc)
    assert "pixel_values" in batch and (kind != "gemma3" or "token_type_ids" in batch)
    with torch.no_grad():
        logits = model(**batch).logits
        ids = batch.pop("input_ids")
        hidden, head = H.hidden_states_from_model(model, ids, **batch)
    assert head.weight is model.lm_head.weight and head.softcap is None and head.temperature == 1.0
    torch.testing.assert_close(hidden @ head.weight.T, logits, rtol=1e-5, atol=1e-5)


def test_gemma3_text_config_head_is_trls_fused_head():
    """``scalings="text_config"`` gives TRL 1.16's fused-LM-head log-probs (trl.trainer.utils.add_fused_lm_head,
    the oracle, run on a copy): Gemma-3's softcap applied, though the model's forward does not apply it."""
    from trl.trainer.utils import add_fused_lm_head

    from dpo_fast import token_logprobs

    model, proc = tiny_vlm("gemma3", softcap=SOFTCAP)
    batch = _image_batch(proc)
    labels = batch["input_ids"].masked_fill(batch["token_type_ids"] == 1, -100)  # image tokens are not scored
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model)
    ids = batch.pop("input_ids")

    def fn(hidden, head):
        h, w, b = head.operands(hidden[:, :-1])
        return token_logprobs(h, w, labels[:, 1:], bias=b, **head.engine_kwargs())

    with torch.no_grad():
        want = trl_model(input_ids=ids, **batch, labels=labels, fused_lm_head=True).log_probs
        assert H.output_head(model).softcap is None  # the default mode: the model's forward
        uncapped = H.call_with_hidden_states(model, fn, ids, **batch)
        H.install_fused_forward(model, head_scalings="text_config")
        assert H.output_head(model).softcap == SOFTCAP and H.output_head(model, scalings="forward").softcap is None
        got = H.call_with_hidden_states(model, fn, ids, **batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (uncapped - want).abs().max() > 1e-2  # the cap bites: the forward's head would not match TRL
    with pytest.raises(ValueError, match="scalings"):
        H.output_head(model, scalings="model")


def test_unknown_vlm_layout_raises():
    """A VLM whose head sits in a nested causal LM (the pre-5 layout) is refused, naming the class."""
    from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

    class NestedVLM(PreTrainedModel):
        config_class = PretrainedConfig
        base_model_prefix = "language_model"

        def __init__(self, config):
            super().__init__(config)
            self.vision_tower = torch.nn.Linear(4, 4)
            self.language_model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                               num_hidden_layers=1, num_attention_heads=2))

        def get_input_embeddings(self):
            return self.language_model.get_input_embeddings()

        def get_output_embeddings(self):
            return self.language_model.get_output_embeddings()

    with pytest.raises(H.UnsupportedHeadError, match="NestedVLM"):
        H.output_head(NestedVLM(PretrainedConfig()))


def test_unknown_vlm_class_with_a_scaled_text_head_raises():
    """In the forward's scalings an unknown VLM class with a scaled text head raises; TRL's (text_config) reading
    needs no knowledge of the class."""
    model, _ = tiny_vlm("llava")
    model.config.get_text_config().final_logit_softcapping = 30.0
    assert H.output_head(model).softcap is None  # LLaVA is known: its forward applies no text-config scaling
    Renamed = type("MyVLMForConditionalGeneration", (type(model),), {})
    model.__class__ = Renamed
    with pytest.raises(H.UnsupportedHeadError, match="MyVLMForConditionalGeneration"):
        H.output_head(model)
    assert H.output_head(model, scalings="text_config").softcap == 30.0


def test_hyperclovax_logits_scaling_multiplies():
    """``logits_scaling`` divides Granite's logits but multiplies HyperCLOVA X's (its forward, and TRL's fused head):
    the head found reproduces the model's logits."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "HyperCLOVAXForCausalLM", None)
    if cls is None:
        pytest.skip("transformers without HyperCLOVA X")
    cfg = transformers.HyperCLOVAXConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         logits_scaling=0.25)
    torch.manual_seed(0)
    head = H.check_output_head(cls(cfg), atol=1e-6, rtol=1e-5)
    assert head.temperature == 4.0 and head.softcap is None


# ------------------------------------------------------------------------------------------------ DPO


@pytest.mark.parametrize("kind, softcap", [("qwen2_vl", None), ("llava", None), ("gemma3", None),
                                           ("gemma3", SOFTCAP)])
def test_dpo_vlm_matches_stock(tmp_path, kind, softcap):
    """Every logged metric equals stock TRL's over 3 steps; for Gemma-3 with a text-config softcap, TRL's capped
    head (which the model's own forward does not apply) is the one trained."""
    stock = make_dpo(False, tmp_path / "a", kind, softcap=softcap)
    stock.train()
    fast = make_dpo(True, tmp_path / "b", kind, softcap=softcap)
    fast.train()
    assert not fast.dpo_fast_fallback_reasons and fast.dpo_fast_routes["fused"] == 3
    assert H.output_head(fast.model).softcap == softcap
    a, b = logged(stock), logged(fast)
    assert len(b) == 3
    assert_same_logs(a, b, keys=DPO_METRICS)


def test_dpo_text_only_batch_through_a_vlm(tmp_path):
    stock = make_dpo(False, tmp_path / "a", images=False, max_steps=2)
    stock.train()
    fast = make_dpo(True, tmp_path / "b", images=False, max_steps=2)
    fast.train()
    assert_same_logs(logged(stock), logged(fast), keys=DPO_METRICS)


def test_dpo_vlm_padding_free_is_refused(tmp_path):
    with pytest.raises(NotImplementedError, match="padding_free=True is not supported with a vision-language"):
        make_dpo(True, tmp_path / "a", padding_free=True)


def test_vlm_softcap_with_a_logit_scale_is_refused(tmp_path):
    """TRL's fused head would apply a Gemma-3 text config's logit scale and then its softcap: the engine applies
    one of the two, so the fast trainers refuse that configuration at construction."""
    from trl import DPOConfig

    from dpo_fast.integrations.trl import FastDPOTrainer
    from support.vlm_fixtures import COMMON

    (model, proc), (ref, _) = tiny_vlm("gemma3", softcap=SOFTCAP), tiny_vlm("gemma3", softcap=SOFTCAP)
    for m in (model, ref):
        m.config.get_text_config().logit_scale = 2.0
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, **COMMON)
    with pytest.raises(NotImplementedError, match="logit scale and then its final_logit_softcapping"):
        FastDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=preference_dataset(images=False),
                       processing_class=proc)


# ------------------------------------------------------------------------------------------------ GRPO / RLOO


@pytest.mark.parametrize("kind, softcap, options", [
    ("qwen2_vl", None, dict(beta=0.1, num_iterations=2, epsilon=0.02)),  # reference and old-policy passes
    ("llava", None, dict(beta=0.1)),
    ("gemma3", SOFTCAP, dict(beta=0.1)),  # TRL's capped head, for the policy and the reference it loads
])
def test_grpo_vlm_matches_stock(tmp_path, kind, softcap, options):
    stock = make_grpo(False, tmp_path / "a", kind, softcap=softcap, **options)
    stock.train()
    fast = make_grpo(True, tmp_path / "b", kind, softcap=softcap, **options)
    fast.train()
    assert fast.dpo_fast_routes["fused"] == fast.state.global_step
    assert H.output_head(fast.model).softcap == softcap and H.output_head(fast.ref_model).softcap == softcap
    a, b = logged(stock), logged(fast)
    assert "kl" in b[0] and "entropy" in b[0]
    assert_same_logs(a, b)


def test_rloo_vlm_matches_stock(tmp_path):
    """RLOO shares GRPO's log-prob hook, vision inputs included: old / reference passes and the policy's engine
    pass on Qwen2-VL, TRL's RLOO loss on them."""
    opts = dict(beta=0.05, num_iterations=2, epsilon=0.02)
    stock = make_rloo(False, tmp_path / "a", **opts)
    stock.train()
    fast = make_rloo(True, tmp_path / "b", **opts)
    fast.train()
    assert fast._is_vlm and fast.dpo_fast_routes["two_pass"] >= 1
    a, b = logged(stock), logged(fast)
    assert "kl" in b[0] and "entropy" in b[0]
    assert_same_logs(a, b)


# ------------------------------------------------------------------------------------------------ KTO


@pytest.mark.parametrize("kind, steps", [("qwen2_vl", 3), ("gemma3", 2)])
def test_kto_vlm_matches_stock(tmp_path, kind, steps):
    stock = make_kto(False, tmp_path / "a", kind, max_steps=steps)
    stock.train()
    fast = make_kto(True, tmp_path / "b", kind, max_steps=steps)
    fast.train()
    assert fast.dpo_fast_routes["fused"] == steps
    a, b = logged(stock), logged(fast)
    assert "kl" in b[0] and "logits/chosen" in b[0]
    assert_same_logs(a, b)


def test_kto_softcapped_gemma3_vlm_is_refused(tmp_path):
    """FastKTOTrainer refuses a soft-capped head (its logits/* metric, the mean logit, is a GEMV with the head's
    mean row, which a cap breaks): with a Gemma-3 VLM too, whose cap only TRL's head applies."""
    with pytest.raises(NotImplementedError, match="soft-capped output heads"):
        make_kto(True, tmp_path / "b", "gemma3", softcap=SOFTCAP)
