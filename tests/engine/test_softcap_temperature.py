"""Softcap with a sampling temperature: the model's cap first, then the temperature (c tanh(z/c) / T).

The oracle is TRL 1.16's own fused head, ``trl.kernels.ChunkedLogProbFunction`` (on CPU it runs its torch
tile fallback), called as TRL's trainers call it; a float64 reference on the full logits backs it up.
"""

from __future__ import annotations

import pytest
import torch

import dpo_fast
from support import ref_token_logprobs

trl_kernels = pytest.importorskip("trl.kernels")

CASES = [(0.7, 5.0), (1.3, 2.0), (0.5, 30.0)]  # (temperature, softcap)


def _problem(seed, n=23, H=16, V=61):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=gen) * 2.5  # large logits: the cap bites
    w = torch.randn(V, H, generator=gen)
    b = torch.randn(V, generator=gen)
    y = torch.randint(0, V, (n,), generator=gen)
    return h, w, b, y


def _trl(h, w, b, y, temperature, softcap):
    """TRL's fused head: per-token log-probs and, by autograd, their gradients."""
    hh, ww, bb = (t.detach().clone().requires_grad_() for t in (h, w, b))
    logp = trl_kernels.ChunkedLogProbFunction.apply(hh, ww, bb, y, temperature, 32, softcap, 1.0, ())[0]
    return logp, hh, ww, bb


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature,softcap", CASES)
def test_token_logprobs_match_trl_fused_head(backend, temperature, softcap):
    h, w, b, y = _problem(int(temperature * 10 + softcap))
    ref, rh, rw, rb = _trl(h, w, b, y, temperature, softcap)
    g = torch.linspace(-1.0, 2.0, y.numel())
    (ref * g).sum().backward()
    hh, ww, bb = (t.detach().clone().requires_grad_() for t in (h, w, b))
    dpo_fast.set_workspace_bytes(2048)  # several tiles in both passes
    out = dpo_fast.token_logprobs(hh, ww, y, bias=bb, temperature=temperature, softcap=softcap, backend=backend)
    (out * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for mine, theirs in ((hh, rh), (ww, rw), (bb, rb)):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)
    # and the float64 reference on the full logits
    ref64 = ref_token_logprobs(h, w, y, b, temperature=temperature, softcap=softcap)
    torch.testing.assert_close(out.double(), ref64, rtol=1e-5, atol=1e-5)


def test_order_matters_and_is_the_samplers():
    """The two orders differ by far more than rounding at T = 0.7, c = 5 (the issue's example)."""
    h, w, b, y = _problem(3)
    out = dpo_fast.token_logprobs(h, w, y, bias=b, temperature=0.7, softcap=5.0)
    z = (h.double() @ w.double().t() + b.double())
    sampler = torch.log_softmax(5.0 * torch.tanh(z / 5.0) / 0.7, -1).gather(1, y[:, None]).squeeze(1)
    other = torch.log_softmax(5.0 * torch.tanh(z / (0.7 * 5.0)), -1).gather(1, y[:, None]).squeeze(1)
    assert (sampler - other).abs().max() > 0.5
    torch.testing.assert_close(out.double(), sampler, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_dpo_and_grpo_follow_the_same_order(backend):
    """The fused modules go through the same row ops: their log-probs equal TRL's head summed/per token."""
    h, w, b, y = _problem(11, n=24)
    h, y = h.view(4, 6, -1), y.view(4, 6).clone()
    y[:, :2] = -100
    T, c = 0.7, 5.0
    flat = y.reshape(-1)
    keep = flat != -100
    tok = torch.zeros(flat.numel())
    tok[keep] = _trl(h.reshape(-1, h.shape[-1])[keep], w, b, flat[keep], T, c)[0].detach()
    tok = tok.view(4, 6)
    out = dpo_fast.DPOLoss(temperature=T, softcap=c, backend=backend)(h.requires_grad_(), w, y, bias=b,
                                                                      ref_chosen_logps=torch.zeros(2),
                                                                      ref_rejected_logps=torch.zeros(2))
    torch.testing.assert_close(out.chosen_logps.detach(), tok.sum(-1)[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps.detach(), tok.sum(-1)[2:], rtol=1e-5, atol=1e-5)
    seq = dpo_fast.sequence_logprobs(h.detach(), w, y, bias=b, temperature=T, softcap=c, backend=backend)
    torch.testing.assert_close(seq, tok.sum(-1), rtol=1e-5, atol=1e-5)


def test_hf_gemma2_sampling_temperature_matches_capped_logits_over_t():
    """hf: a Gemma-2 head at sampling temperature T gives log_softmax(model logits / T), as generate() samples."""
    transformers = pytest.importorskip("transformers")
    from dpo_fast import hf

    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64, final_logit_softcapping=2.0)
    cfg._attn_implementation = "eager"
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits well beyond the cap
    ids = torch.randint(0, 48, (2, 7))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    T = 0.7
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()  # the model's own (capped) logits
        want = (torch.log_softmax(logits / T, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
                * (labels != -100)).sum(-1)
        got = hf.sequence_logprobs_from_model(model, ids, labels, temperature=T)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_hf_rejects_a_cap_with_a_logit_scale():
    transformers = pytest.importorskip("transformers")
    from dpo_fast import hf

    cfg = transformers.Gemma2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64, final_logit_softcapping=2.0)
    cfg.logit_scale = 0.5  # not expressible: the engine divides after the cap
    with pytest.raises(hf.UnsupportedHeadError, match="final_logit_softcapping"):
        hf.output_head(transformers.Gemma2ForCausalLM(cfg))
