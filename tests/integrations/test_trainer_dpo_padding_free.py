"""DPOConfig(padding_free=True) in FastDPOTrainer / patch_trainer: packed batches equal TRL's padded path.

The padded FastDPOTrainer is itself tested against stock TRL (test_trainer_dpo.py); here the packed path must give the
same per-step losses and every logged metric, on a long-tailed length mix with truncation, for each supported
attention implementation (eager, sdpa), with a reference model, the PEFT adapter-off reference,
precompute_ref_log_probs and evaluation. Flash-attention (varlen kwargs) needs CUDA and is not run here.
"""

from __future__ import annotations

import random

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from dpo_fast.integrations import trl as fast_trl  # noqa: E402
from dpo_fast.integrations.padding_free import (PaddingFreePreferenceCollator, check_packed_attention,  # noqa: E402
                                                truncate_like_trl)
from dpo_fast.packing import shifted_labels  # noqa: E402
from support.trl_fixtures import char_tokenizer, logged, tiny_llama  # noqa: E402

METRICS = ["loss", "grad_norm", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy",
           "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]


def long_tailed(n=24, seed=0, prompt=True):
    """Text pairs over the char tokenizer's alphabet with Pareto-distributed lengths (a few long, most short)."""
    from datasets import Dataset

    rng = random.Random(seed)

    def text(scale, cap):
        return "".join(rng.choice("0123456789+=") for _ in range(max(1, min(cap, int(rng.paretovariate(1.2) * scale)))))

    rows = []
    for _ in range(n):
        row = {"chosen": text(2, 30), "rejected": text(2, 30)}
        if prompt:
            row["prompt"] = text(3, 40)
        rows.append(row)
    return Dataset.from_list(rows)


def trainer(tmp_path, *, padding_free, impl="sdpa", patched=False, with_ref=True, peft=False, data=None,
            fast_kwargs=None, **cfg):
    from trl import DPOConfig, DPOTrainer

    model, ref = tiny_llama(64)
    for m in (model, ref):
        m.config._attn_implementation = impl
    kw = dict(per_device_train_batch_size=6, max_steps=4, logging_steps=1, learning_rate=1e-3, report_to=[],
              save_strategy="no", use_cpu=True, seed=0, beta=0.1, bf16=False, disable_tqdm=True,
              dataloader_num_workers=0, max_length=40)
    kw.update(cfg)
    args = DPOConfig(output_dir=str(tmp_path / f"out{int(padding_free)}"), padding_free=padding_free, **kw)
    init = dict(model=model, args=args, train_dataset=data if data is not None else long_tailed(),
                processing_class=char_tokenizer())
    if "eval_strategy" in cfg:
        init["eval_dataset"] = long_tailed(8, seed=1)
    if peft:
        from peft import LoraConfig

        init["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    elif with_ref:
        init["ref_model"] = ref
    if patched:
        return fast_trl.patch_trainer(DPOTrainer(**init), **(fast_kwargs or {}))
    return fast_trl.FastDPOTrainer(**init, **(fast_kwargs or {}))


def assert_same_logs(a, b, rtol=1e-4, atol=1e-5):
    assert len(a) == len(b) > 0
    for step, (x, y) in enumerate(zip(a, b)):
        assert sorted(x) == sorted(y), (step, sorted(x), sorted(y))
        for k, v in x.items():
            if isinstance(v, float) and not k.endswith(("_runtime", "_per_second")):  # timings differ
                assert v == pytest.approx(y[k], rel=rtol, abs=atol), (step, k, v, y[k])


def run_pair(tmp_path, **kw):
    logs = []
    for pf in (False, True):
        tr = trainer(tmp_path, padding_free=pf, **kw)
        assert isinstance(tr.data_collator, PaddingFreePreferenceCollator) == pf
        tr.train()
        logs.append(tr.state.log_history[:-1])  # every record but the final summary (eval records included)
    return logs


@pytest.mark.parametrize("impl, truncation", [("sdpa", "keep_start"), ("eager", "keep_end")])
def test_packed_equals_padded_every_metric(tmp_path, impl, truncation):
    padded, packed = run_pair(tmp_path, impl=impl, truncation_mode=truncation, eval_strategy="steps", eval_steps=2)
    assert any("eval_loss" in r for r in packed) and all(k in packed[0] for k in METRICS)
    assert_same_logs(padded, packed)


def test_packed_reference_paths(tmp_path):
    """precompute_ref_log_probs (a packed reference pass, columns back in example order) and the PEFT adapter-off
    reference: packed == padded."""
    trainers = [trainer(tmp_path, padding_free=pf, precompute_ref_log_probs=True, max_steps=2) for pf in (False, True)]
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        a, b = (torch.tensor(t.train_dataset[name]) for t in trainers)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for t in trainers:
        t.train()
    assert_same_logs(logged(trainers[0]), logged(trainers[1]))
    padded, packed = run_pair(tmp_path, peft=True, max_steps=2)
    assert_same_logs(padded, packed)


def test_patch_trainer_and_no_prompt_column(tmp_path):
    """patch_trainer honours args.padding_free; a dataset with implicit (empty) prompts packs the same too."""
    padded = trainer(tmp_path, padding_free=False, max_steps=2)
    padded.train()
    patched = trainer(tmp_path, padding_free=True, patched=True, max_steps=2)
    assert isinstance(patched.data_collator, PaddingFreePreferenceCollator)
    patched.train()
    assert_same_logs(logged(padded), logged(patched))
    data = long_tailed(12, seed=3, prompt=False)
    a = trainer(tmp_path, padding_free=False, data=data, max_steps=2, per_device_train_batch_size=4)
    b = trainer(tmp_path, padding_free=True, data=data, max_steps=2, per_device_train_batch_size=4)
    a.train()
    b.train()
    assert_same_logs(logged(a), logged(b))


def test_caller_config_not_modified_and_no_fallback_warning(tmp_path, caplog):
    tr = trainer(tmp_path, padding_free=True, max_steps=1)
    assert tr.args.padding_free is True and tr.padding_free is True
    assert "temporarily unavailable" not in caplog.text


# ------------------------------------------------------------------------------------------------ token budget


def test_token_budget_step_gradient_is_mean_over_the_steps_pairs(tmp_path):
    budget = 160
    tr = trainer(tmp_path, padding_free=True, gradient_accumulation_steps=3, max_steps=2,
                 fast_kwargs=dict(token_budget=budget))
    loader = tr.get_train_dataloader()
    batches = [b for _, b in zip(range(3), loader)]
    sizes = [int(b["pairs"].shape[0]) for b in batches]
    assert len(set(sizes)) > 1, sizes  # micro-batches of different pair counts: the case that needs weighting
    assert all(int(b["seq_lens"].sum()) <= budget for b in batches)
    model = tr.model
    model.train()
    n = tr._get_num_items_in_batch(batches, torch.device("cpu"))
    assert int(n) == sum(sizes)
    model.zero_grad()
    for b in batches:
        tr.training_step(model, b, n)
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    # expected: TRL's loss (mean over pairs) of all the step's pairs in one padded batch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    sampler = loader.batch_sampler
    sampler = getattr(sampler, "batch_sampler", sampler)
    idx = [i for b in list(sampler)[:3] for i in b]
    examples = [tr.train_dataset[i] for i in idx]
    padded = DataCollatorForPreference(pad_token_id=0, max_length=tr.args.max_length)(examples)
    model.zero_grad()
    tr._dpo_fast_step_pairs = None
    tr._compute_loss(model, padded, False).backward()
    for k, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_token_budget_trains(tmp_path):
    tr = trainer(tmp_path, padding_free=True, gradient_accumulation_steps=2, max_steps=2,
                 fast_kwargs=dict(token_budget=128))
    tr.train()
    logs = logged(tr)
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)


# ------------------------------------------------------------------------------------------------ collator


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_collator_scores_exactly_trls_tokens(mode):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rng = random.Random(4)
    ex = [{"prompt_ids": [rng.randrange(2, 50) for _ in range(rng.randrange(0, 12))],
           "chosen_ids": [rng.randrange(2, 50) for _ in range(rng.randrange(1, 9))],
           "rejected_ids": [rng.randrange(2, 50) for _ in range(rng.randrange(1, 9))]} for _ in range(9)]
    ml = 10
    trl_b = DataCollatorForPreference(pad_token_id=0, max_length=ml, truncation_mode=mode)(ex)
    trl_lab = shifted_labels(trl_b["input_ids"], trl_b["completion_mask"])
    ours = PaddingFreePreferenceCollator(max_length=ml, truncation_mode=mode, row_tokens=24)(ex)
    assert "attention_mask" not in ours and (ours["input_ids"].shape[1] <= 24 or ours["input_ids"].shape[0] == 1)
    flat_ids, flat_lab, cu = ours["input_ids"].view(-1), ours["labels"].view(-1), ours["cu_seqlens"].long()
    P = len(ex)
    for j, (c, r) in enumerate(ours["pairs"].tolist()):
        e = int(ours["example_index"][j])
        for s, row in ((c, e), (r, P + e)):
            n = int(ours["seq_lens"][s])
            seg = slice(int(cu[s]), int(cu[s]) + n)
            real = int(trl_b["attention_mask"][row].sum())
            assert flat_ids[seg].tolist() == trl_b["input_ids"][row, :real].tolist()
            assert flat_lab[seg].tolist() == trl_lab[row, :real].tolist()


def test_truncate_like_trl_and_bad_input():
    assert truncate_like_trl([1, 2, 3], [4, 5], 4, "keep_start") == ([1, 2, 3, 4], 3)
    assert truncate_like_trl([1, 2, 3], [4, 5], 4, "keep_end") == ([2, 3, 4, 5], 2)
    assert truncate_like_trl([1, 2, 3], [4, 5, 6, 7, 8], 4, "keep_end") == ([5, 6, 7, 8], 0)
    with pytest.raises(ValueError, match="truncation_mode"):
        PaddingFreePreferenceCollator(truncation_mode="middle")
    with pytest.raises(KeyError, match="no prompt"):
        PaddingFreePreferenceCollator()([{"chosen_ids": [1], "rejected_ids": [2]}])
    with pytest.raises(ValueError, match="empty batch"):
        PaddingFreePreferenceCollator()([])


# ------------------------------------------------------------------------------------------------ bad setups


def test_attention_that_ignores_boundaries_is_refused(tmp_path, monkeypatch):
    model, _ = tiny_llama(64)
    assert check_packed_attention(model) == "sdpa"
    model.config._attn_implementation = "eager"
    assert check_packed_attention(model) == "eager"
    # a model that builds no block-diagonal mask from position_ids: the probe sees the leak
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match="does not build a block-diagonal mask from position_ids.*attn_implementation"):
        check_packed_attention(model)
    with pytest.raises(ValueError, match="padding_free=True: with attention implementation"):
        trainer(tmp_path, padding_free=True)
    monkeypatch.undo()
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match="not known to respect packed sequence boundaries"):
        check_packed_attention(model)


def test_bad_setups_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="token_budget: .* needs DPOConfig\\(padding_free=True\\)"):
        trainer(tmp_path, padding_free=False, fast_kwargs=dict(token_budget=256))
    with pytest.raises(ValueError, match="token_budget: 50 tokens cannot hold a pair"):
        trainer(tmp_path, padding_free=True, fast_kwargs=dict(token_budget=50))
    from trl import DPOConfig

    model, ref = tiny_llama(64)
    args = DPOConfig(output_dir=str(tmp_path / "c"), padding_free=True, use_cpu=True, report_to=[], max_steps=1)
    with pytest.raises(ValueError, match="a custom data_collator .* cannot be packed"):
        fast_trl.FastDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=long_tailed(4),
                                processing_class=char_tokenizer(), data_collator=lambda ex: ex)
    assert args.padding_free is True  # the caller's config is given back unchanged
