"""Tiny Hugging Face models and tokenized preference examples shared by tests (needs transformers)."""

from __future__ import annotations

import torch

V = 61  # vocabulary of :func:`tiny_model` and of the token ids :func:`examples` draws


def tiny_model(seed=0):
    """A randomly initialised 2-layer Llama (hidden 32, vocab ``V``, sdpa attention), seeded."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def examples(n=11, seed=0, keys=("prompt_ids", "chosen_ids", "rejected_ids")):
    """``n`` tokenized (prompt, chosen, rejected) examples under ``keys``: random ids in [1, V), short lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ex = {}
        for k, (lo, hi) in zip(keys, ((1, 6), (1, 7), (1, 9))):
            ex[k] = torch.randint(1, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
        out.append(ex)
    return out
