"""dpo_fast.hf against log-probs computed from the model's own logits (tiny random configs, no download)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dpo_fast  # noqa: E402
from dpo_fast import hf  # noqa: E402

V, H = 97, 32


def _tiny(arch: str):
    base = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    attn = "sdpa"
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**base), transformers.LlamaForCausalLM
    elif arch == "llama_tied":
        cfg, cls = transformers.LlamaConfig(tie_word_embeddings=True, **base), transformers.LlamaForCausalLM
    elif arch == "gemma2":  # tied embeddings + final_logit_softcapping (small cap so it matters)
        cfg, cls = transformers.Gemma2Config(final_logit_softcapping=2.0, head_dim=8, **base), transformers.Gemma2ForCausalLM
        attn = "eager"
    elif arch == "cohere":  # logits * logit_scale
        cfg, cls = transformers.CohereConfig(logit_scale=0.3, **base), transformers.CohereForCausalLM
    elif arch == "phi":  # biased lm_head
        cfg, cls = transformers.PhiConfig(**base), transformers.PhiForCausalLM
    elif arch == "granite":  # logits / logits_scaling
        cfg, cls = transformers.GraniteConfig(logits_scaling=4.0, **base), transformers.GraniteForCausalLM
    else:
        raise KeyError(arch)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = cls(cfg)
    if arch == "phi":
        with torch.no_grad():
            model.lm_head.bias.normal_(0, 0.5)
    return model.eval()


def _triples(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = ([], [], [])
    for _ in range(n):
        for k, (lo, hi) in enumerate(((2, 7), (1, 6), (1, 8))):
            L = int(torch.randint(lo, hi, (1,), generator=g))
            out[k].append(torch.randint(1, V, (L,), generator=g).tolist())
    return out


def _reference_from_logits(model, input_ids, labels, attention_mask=None):
    """Σ log_softmax(model(...).logits)[label] per row, fp32 — the thing we must reproduce."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    lp = torch.log_softmax(logits, -1)
    mask = labels != -100
    tok = lp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * mask
    return tok.sum(-1)


ARCHS = ["llama", "llama_tied", "gemma2", "cohere", "phi", "granite"]


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_values_and_grads_match_logits(arch):
    model = _tiny(arch)
    b = dpo_fast.pack_pairs(*_triples(), max_tokens=64, mode="padded").to_torch()
    ids, lab, am = b["input_ids"], b["labels"], b["attention_mask"]
    ref_model = copy.deepcopy(model)
    ref = _reference_from_logits(ref_model, ids, lab, am)
    got = hf.sequence_logprobs_from_model(model, ids, lab, attention_mask=am)
    assert got.shape == (ids.shape[0],) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    (got * g).sum().backward()
    (ref * g).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=2e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_packed_equals_padded(arch):
    model = _tiny(arch)
    trip = _triples(6, seed=1)
    padded = dpo_fast.pack_pairs(*trip, max_tokens=64, mode="padded").to_torch()
    packed = dpo_fast.pack_pairs(*trip, max_tokens=40, mode="packed").to_torch()
    assert packed["input_ids"].shape[0] > 1  # several rows, several pairs per row
    P = len(trip[0])
    with torch.no_grad():
        want = hf.sequence_logprobs_from_model(model, padded["input_ids"], padded["labels"],
                                               attention_mask=padded["attention_mask"])  # (2P,) [c..., r...]
        got = hf.sequence_logprobs_from_model(model, packed["input_ids"], packed["labels"],
                                              position_ids=packed["position_ids"], cu_seqlens=packed["cu_seqlens"])
        # position_ids derived from cu_seqlens, and the flattened (1, R*L) form of PairCollator
        got2 = hf.sequence_logprobs_from_model(model, packed["input_ids"].view(1, -1), packed["labels"].view(1, -1),
                                               cu_seqlens=packed["cu_seqlens"])
    pairs, ex = packed["pairs"], packed["example_index"]
    torch.testing.assert_close(got[pairs[:, 0]], want[ex], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[pairs[:, 1]], want[P + ex], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got2, got, atol=2e-5, rtol=1e-5)


def test_packed_rejects_padding_mask():
    model = _tiny("llama")
    b = dpo_fast.pack_pairs(*_triples(), max_tokens=64).to_torch()
    with pytest.raises(ValueError, match="attention_mask"):
        hf.sequence_logprobs_from_model(model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"],
                                        cu_seqlens=b["cu_seqlens"])


def test_plain_forward_untouched_and_generate_works():
    model = _tiny("llama")
    ids = torch.randint(0, V, (2, 6))
    before = model(input_ids=ids).logits
    hf.sequence_logprobs_from_model(model, ids, ids)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_hidden_states_and_head():
    model = _tiny("cohere")
    ids = torch.randint(0, V, (2, 5))
    hidden, head = hf.hidden_states_from_model(model, ids)
    assert hidden.shape == (2, 5, H)
    assert head.engine_kwargs() == {"temperature": pytest.approx(1 / 0.3), "softcap": None}
    assert head.engine_kwargs(2.0)["temperature"] == pytest.approx(2 / 0.3)


def test_fused_dpo_loss_with_model_head_matches_logits():
    model = _tiny("gemma2")
    ref_model = copy.deepcopy(model)
    b = dpo_fast.pack_pairs(*_triples(4, seed=3), max_tokens=64, mode="padded").to_torch()
    refc, refr = torch.randn(4) - 20, torch.randn(4) - 20
    hidden, head = hf.hidden_states_from_model(model, b["input_ids"], attention_mask=b["attention_mask"])
    loss_fn = dpo_fast.DPOLoss(beta=0.1, **head.engine_kwargs())
    out = loss_fn(hidden, head.weight, b["labels"], refc, refr, bias=head.bias)
    out.loss.backward()
    assert out.route == "fused"
    lp = _reference_from_logits(ref_model, b["input_ids"], b["labels"], b["attention_mask"])
    want = dpo_fast.dpo_loss(lp[:4], lp[4:], refc, refr, beta=0.1)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, atol=1e-6, rtol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_autocast_bf16_close_to_fp32():
    model = _tiny("llama")
    b = dpo_fast.pack_pairs(*_triples(), max_tokens=64, mode="padded").to_torch()
    with torch.no_grad():
        want = hf.sequence_logprobs_from_model(model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = hf.sequence_logprobs_from_model(model, b["input_ids"], b["labels"],
                                                  attention_mask=b["attention_mask"])
    torch.testing.assert_close(got, want, atol=0.15, rtol=0.02)


# ------------------------------------------------------------------------------------------------ errors


def test_custom_head_raises():
    model = _tiny("llama")

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    head = ScaledHead(H, V, bias=False)
    model.lm_head = head
    with pytest.raises(hf.UnsupportedHeadError, match="plain nn.Linear"):
        hf.output_head(model)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(H, V))
    with pytest.raises(hf.UnsupportedHeadError, match="Sequential"):
        hf.sequence_logprobs_from_model(model, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_check_output_head_catches_unknown_scaling():
    model = _tiny("llama")
    hf.check_output_head(model)
    model.config.logit_scale = 0.5  # the config now claims a scale the forward does not apply
    with pytest.raises(hf.UnsupportedHeadError, match="max abs error"):
        hf.check_output_head(model)


def test_not_a_causal_lm():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.output_head(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ PEFT


def test_peft_lora_frozen_head_no_dw():
    peft = pytest.importorskip("peft")
    model = _tiny("llama")
    ref = copy.deepcopy(model)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    pr = peft.get_peft_model(ref, copy.deepcopy(cfg))
    pr.load_state_dict(pm.state_dict())
    b = dpo_fast.pack_pairs(*_triples(), max_tokens=64, mode="padded").to_torch()
    got = hf.sequence_logprobs_from_model(pm, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
    want = _reference_from_logits(pr, b["input_ids"], b["labels"], b["attention_mask"])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    head = hf.output_head(pm)
    assert not head.weight.requires_grad
    got.sum().backward()
    want.sum().backward()
    assert head.weight.grad is None
    n_lora = 0
    for (n, p), (_, q) in zip(pm.named_parameters(), pr.named_parameters()):
        if p.requires_grad:
            n_lora += 1
            torch.testing.assert_close(p.grad, q.grad, atol=2e-5, rtol=1e-4, msg=n)
    assert n_lora > 0
    # the adapter really is applied: with it disabled the numbers change
    with pm.disable_adapter(), torch.no_grad():
        base = hf.sequence_logprobs_from_model(pm, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
    assert not torch.allclose(base, got.detach())


def test_peft_lora_on_lm_head_raises():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    pm = peft.get_peft_model(_tiny("llama"), cfg)
    with pytest.raises(hf.UnsupportedHeadError, match="lm_head"):
        hf.output_head(pm)


def test_peft_prompt_learning_raises():
    peft = pytest.importorskip("peft")
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    pm = peft.get_peft_model(_tiny("llama"), cfg)
    with pytest.raises(hf.UnsupportedHeadError, match="prompt-learning"):
        hf.output_head(pm)
