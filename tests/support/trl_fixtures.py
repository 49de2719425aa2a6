"""TRL fixtures shared by tests: a character tokenizer, a sums dataset, a tiny Llama pair and DPO trainers
(stock, fast, patched) on them. Needs trl, datasets, tokenizers and transformers."""

from __future__ import annotations

import random

import torch


def char_tokenizer():
    """A character-level fast tokenizer over "0123456789+=" with <pad> (0) and <eos> (1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("0123456789+=")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def sums_dataset(n=32, seed=0):
    """``n`` rows {"prompt": "a+b=", "chosen": the sum, "rejected": a wrong sum} (a datasets.Dataset)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)})
    return Dataset.from_list(rows)


def tiny_llama(vocab=64, seed=0):
    """(model, ref): two identical randomly initialised 2-layer Llamas, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    ref = LlamaForCausalLM(cfg)
    ref.load_state_dict(model.state_dict())
    return model, ref


def make_trainer(kind, out_dir, *, vocab=64, steps=3, peft_config=None, with_ref=True, **cfg):
    """A DPO trainer on :func:`tiny_llama` and :func:`sums_dataset`: ``kind`` "trl" (stock DPOTrainer), "fast"
    (FastDPOTrainer) or "patched" (patch_trainer on a stock one); ``cfg`` overrides DPOConfig fields."""
    from trl import DPOConfig, DPOTrainer

    model, ref = tiny_llama(vocab)
    defaults = dict(per_device_train_batch_size=8, max_steps=steps, logging_steps=1, learning_rate=1e-3,
                    report_to=[], save_strategy="no", use_cpu=True, seed=0, beta=0.1, bf16=False,
                    disable_tqdm=True, dataloader_num_workers=0)
    defaults.update(cfg)
    args = DPOConfig(output_dir=str(out_dir), **defaults)
    from dpo_fast.integrations import trl as fast_trl

    cls = fast_trl.FastDPOTrainer if kind == "fast" else DPOTrainer
    kw = dict(model=model, args=args, train_dataset=sums_dataset(), processing_class=char_tokenizer(),
              peft_config=peft_config)
    if with_ref and peft_config is None:
        kw["ref_model"] = ref
    tr = cls(**kw)
    if kind == "patched":
        tr = fast_trl.patch_trainer(tr)
    return tr


def logged(trainer):
    """The per-step log records of a trained trainer (the final summary record left out)."""
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
