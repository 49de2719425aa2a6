"""Fixtures for the GRPO / KTO / CPO / ORPO trainer tests: a tiny Llama saved to a directory (so TRL can load
its own reference copy from the path), a character tokenizer, small datasets and a deterministic reward.
Needs trl, datasets, tokenizers and transformers."""

from __future__ import annotations

import random

import torch

from .trl_fixtures import char_tokenizer, logged, sums_dataset, tiny_llama

__all__ = ["char_tokenizer", "logged", "saved_tiny_llama", "prompts_dataset", "unpaired_dataset", "digit_reward",
           "assert_same_logs", "rss_growth_script", "make_grpo_trainer", "grpo_for_memory", "make_pair_trainer",
           "make_kto_trainer", "make_rloo_trainer", "pair_for_memory", "long_tail_prompts", "EARLY_EOS"]


def saved_tiny_llama(path, vocab=64, seed=0) -> str:
    """Save :func:`tiny_llama` (vocab ``vocab``) and the character tokenizer to ``path``; return it as str."""
    model, _ = tiny_llama(vocab, seed)
    model.save_pretrained(str(path))
    char_tokenizer().save_pretrained(str(path))
    return str(path)


def prompts_dataset(n=16, seed=0):
    """``n`` rows {"prompt": "a+b="} (a datasets.Dataset)."""
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list([{"prompt": f"{rng.randrange(50)}+{rng.randrange(50)}="} for _ in range(n)])


def long_tail_prompts(n=16, seed=0, longest=40, alpha=0.6):
    """``n`` rows {"prompt": zeros + "a+b="}: prompt lengths from a long-tailed (Pareto, shape ``alpha``) mix up to
    ``longest`` characters, so a batch's prompts are left-padded by very different amounts."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        extra = min(int(rng.paretovariate(alpha)) - 1, longest - 6)
        rows.append({"prompt": "0" * extra + f"{rng.randrange(50)}+{rng.randrange(50)}="})
    return Dataset.from_list(rows)


#: generation settings that end completions early (an EOS logit bias while sampling; the trained log-probs are
#: the model's own), so a batch's completions are right-padded by different amounts
EARLY_EOS = {"sequence_bias": [[[1], 3.0]]}


def digit_reward(completions, **kwargs):
    """A deterministic reward: the fraction of digit characters in each completion, minus 0.3 per '+'."""
    return [sum(c.isdigit() for c in s) / max(len(s), 1) - 0.3 * s.count("+") for s in completions]


def unpaired_dataset(n=32, seed=0):
    """KTO rows {"prompt", "completion", "label"}: the right sum (True) or a wrong one (False), mixed."""
    from datasets import Dataset

    rows = []
    for i, r in enumerate(sums_dataset(n, seed)):
        good = (i % 3) != 0
        rows.append({"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good})
    return Dataset.from_list(rows)


def assert_same_logs(a, b, keys=None, rtol=1e-4, atol=1e-5):
    """Every logged step of ``a`` and ``b`` has the same metric names and values within fp32 tolerance."""
    import pytest

    assert len(a) == len(b) > 0
    for step, (x, y) in enumerate(zip(a, b)):
        names = sorted(set(x) | set(y)) if keys is None else keys
        for k in names:
            if k in ("step_time", "epoch", "learning_rate") or k.startswith("train_"):
                continue  # wall-clock / schedule bookkeeping, not a computed metric
            assert k in x and k in y, (step, k, sorted(x), sorted(y))
            if x[k] is None or y[k] is None:
                assert x[k] is None and y[k] is None, (step, k, x[k], y[k])
                continue
            assert x[k] == pytest.approx(y[k], rel=rtol, abs=atol), (step, k, x[k], y[k])


# Run one trainer factory in a fresh process and record the growth of its peak RSS during train() (VmHWM reset via
# /proc/self/clear_refs right before); the one copy, used by the trainer tests and benches/bench_vlm.py. Format with
# tests, module, fn, kwargs, res.
rss_growth_script = r"""
import json, os, re, sys, time
os.environ["TQDM_DISABLE"] = "1"
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import importlib
mod = importlib.import_module({module!r})
def status(k):
    return int(re.search(k + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
tr = getattr(mod, {fn!r})(**{kwargs!r})
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
t0 = time.perf_counter()
tr.train()
dt = time.perf_counter() - t0
logs = [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]
json.dump({{"logs": logs, "peak_bytes": status("VmHWM") - before, "seconds": dt}}, open({res!r}, "w"))
"""


GRPO_DEFAULTS = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=3,
                     logging_steps=1, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                     bf16=False, disable_tqdm=True, dataloader_num_workers=0)


def make_grpo_trainer(kind, out_dir, model_path, *, reward=digit_reward, n_prompts=16, own=None, dataset=None,
                      **cfg):
    """A GRPO trainer on the saved tiny Llama at ``model_path``: ``kind`` "trl" (stock GRPOTrainer), "fast"
    (FastGRPOTrainer) or "patched" (patch_grpo_trainer on a stock one); ``cfg`` overrides GRPOConfig fields.
    The model is passed as a path, so with ``beta > 0`` TRL loads its own reference copy from it. ``own``: the
    Fast trainer's own keywords (e.g. ``padding_free``)."""
    from trl import GRPOConfig, GRPOTrainer

    from dpo_fast.integrations import trl_grpo

    opts = dict(GRPO_DEFAULTS, model_init_kwargs={"dtype": torch.float32})
    opts.update(cfg)
    args = GRPOConfig(output_dir=str(out_dir), **opts)
    cls = trl_grpo.FastGRPOTrainer if kind == "fast" else GRPOTrainer
    data = prompts_dataset(n_prompts) if dataset is None else dataset
    tr = cls(model=str(model_path), reward_funcs=reward, args=args, train_dataset=data, processing_class=char_tokenizer(), **(own or {}) if kind == "fast" else {})
    if kind == "patched":
        tr = trl_grpo.patch_grpo_trainer(tr, **(own or {}))
    return tr


def make_rloo_trainer(kind, out_dir, model_path, *, reward=digit_reward, own=None, dataset=None, **cfg):
    """An RLOO trainer (stock trl.RLOOTrainer or FastRLOOTrainer) on the saved tiny Llama at ``model_path``;
    ``own``: FastRLOOTrainer's own keywords."""
    from trl import RLOOConfig, RLOOTrainer

    from dpo_fast.integrations import trl_grpo

    opts = dict(GRPO_DEFAULTS, model_init_kwargs={"dtype": torch.float32})
    opts.update(cfg)
    args = RLOOConfig(output_dir=str(out_dir), **opts)
    cls = trl_grpo.FastRLOOTrainer if kind == "fast" else RLOOTrainer
    data = prompts_dataset() if dataset is None else dataset
    return cls(model=str(model_path), reward_funcs=reward, args=args, train_dataset=data, processing_class=char_tokenizer(), **(own or {}) if kind == "fast" else {})


def grpo_for_memory(kind, out_dir, vocab=8192, **cfg):
    """For the peak-memory comparison: save a tiny Llama with ``vocab`` under ``out_dir`` and build a GRPO
    trainer of ``kind`` on it (beta > 0 and num_iterations 2: reference and old log-probs are computed)."""
    from pathlib import Path

    path = saved_tiny_llama(Path(out_dir) / "model", vocab=vocab)
    opts = dict(beta=0.1, use_bias_correction_kl=False, num_iterations=2, max_completion_length=24, max_steps=2)
    opts.update(cfg)
    return make_grpo_trainer(kind, Path(out_dir) / "run", path, **opts)


PAIR_DEFAULTS = dict(per_device_train_batch_size=8, max_steps=3, logging_steps=1, learning_rate=1e-3, report_to=[],
                     save_strategy="no", use_cpu=True, seed=0, bf16=False, disable_tqdm=True, dataloader_num_workers=0,
                     max_length=32)


def make_pair_trainer(algo, kind, out_dir, *, vocab=64, own=None, **cfg):
    """A trl.experimental CPO (``algo="cpo"``) or ORPO (``"orpo"``) trainer on a tiny Llama and the sums dataset:
    ``kind`` "trl" (stock), "fast" (FastCPOTrainer / FastORPOTrainer) or "patched"; ``own``: the Fast trainer's
    own keywords."""
    from dpo_fast.integrations import trl_cpo_orpo as F

    if algo == "cpo":
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Stock
        fast, patch = F.FastCPOTrainer, F.patch_cpo_trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Stock
        fast, patch = F.FastORPOTrainer, F.patch_orpo_trainer
    model, _ = tiny_llama(vocab)
    opts = dict(PAIR_DEFAULTS)
    opts.update(cfg)
    args = Config(output_dir=str(out_dir), **opts)
    cls = fast if kind == "fast" else Stock
    tr = cls(model=model, args=args, train_dataset=sums_dataset(), processing_class=char_tokenizer(),
             **(own or {}) if kind == "fast" else {})
    return patch(tr, **(own or {})) if kind == "patched" else tr


def make_kto_trainer(kind, out_dir, model_path, own=None, **cfg):
    """A KTO trainer on the saved tiny Llama at ``model_path`` (TRL loads the reference copy from the path) and
    :func:`unpaired_dataset`: ``kind`` "trl" (trl.KTOTrainer), "fast" (FastKTOTrainer) or "patched"; ``own``: the
    Fast trainer's own keywords."""
    from trl import KTOConfig, KTOTrainer

    from dpo_fast.integrations import trl_kto

    opts = dict(PAIR_DEFAULTS, model_init_kwargs={"dtype": torch.float32})
    opts.update(cfg)
    args = KTOConfig(output_dir=str(out_dir), **opts)
    cls = trl_kto.FastKTOTrainer if kind == "fast" else KTOTrainer
    tr = cls(model=str(model_path), args=args, train_dataset=unpaired_dataset(), processing_class=char_tokenizer(),
             **(own or {}) if kind == "fast" else {})
    return trl_kto.patch_kto_trainer(tr, **(own or {})) if kind == "patched" else tr


def pair_for_memory(algo, kind, out_dir, vocab=8192, **cfg):
    """For peak-memory comparisons: a CPO / ORPO (``algo``) or KTO (``"kto"``) trainer of ``kind`` on a tiny Llama
    with vocabulary ``vocab`` (saved under ``out_dir`` for KTO's reference copy)."""
    from pathlib import Path

    if algo == "kto":
        path = saved_tiny_llama(Path(out_dir) / "model", vocab=vocab)
        return make_kto_trainer(kind, Path(out_dir) / "run", path, **cfg)
    return make_pair_trainer(algo, kind, Path(out_dir) / "run", vocab=vocab, **cfg)
