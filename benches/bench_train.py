"""End-to-end training throughput: stock TRL vs dpo_fast's trainers, DPO (``--task dpo``) or GRPO (``--task grpo``).

DPO: one run, four trainers, each in a fresh subprocess (its own peak-memory measurement), same model, data, seed
and optimizer settings:

- ``trl``: stock ``trl.DPOTrainer`` (TRL 1.16 switches ``padding_free`` off: every batch padded);
- ``fast_padded``: ``FastDPOTrainer``, TRL's padded batches, the fused DPOLoss head;
- ``fast_packed``: ``FastDPOTrainer`` with ``DPOConfig(padding_free=True)``: the same pairs per step, packed by
  the Rust packer (rows of up to the batch's longest pair, sdpa block-diagonal masks from position_ids);
- ``fast_budget``: packed + ``token_budget`` (micro-batches of at most N tokens instead of N pairs).

Model: a random Llama with several layers (the decoder dominates, as in real training). Data: text pairs with
log-normal prompt and completion lengths (a long tail, truncated at ``max_length``), the shape of real
preference data. Reported per trainer: real (non-padding) tokens per second over all training steps (per
wall-clock second, and per CPU second of the process -- the steadier figure on a shared machine), step
time, peak memory (growth of the process's peak RSS during ``train()``), and the padding fraction of the
batches the model saw (1 - real tokens / token slots).

GRPO (``--task grpo``): six trainers, each in a fresh subprocess -- stock ``trl.GRPOTrainer``, ``FastGRPOTrainer``
padded, ``FastGRPOTrainer(padding_free=True)``, and the same three with the entropy bonus (``entropy_coef > 0``).
The same random Llama, prompts (log-normal lengths) and seed; ``num_iterations=2`` and ``beta > 0``, so every
step runs the policy forward and backward plus the old-policy and reference forwards. Completions are sampled
with an EOS logit bias (``sequence_bias``), so their lengths are geometric -- a long tail up to
``--max-completion`` -- as sampled lengths are. Generation (HF ``generate``) is timed apart and excluded: the
training part of a step is the trainer's CPU time minus the CPU time spent in ``_generate``. Reported: real
(non-padding) tokens the decoder trained on per CPU second of the training part, its step time, peak memory and
the padding share of the decoder's batches (padded: 1 - real / (rows x padded length); packed: the packed rows).

Usage: ``python benches/bench_train.py [--task dpo|grpo] [--threads 2] [--json benches/train.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# The pieces every child process shares: the character tokenizer, long-tailed random text, the random Llama config
# (``mc``), and the peak-RSS / CPU-time measurement around ``tr.train()``. Formatted with kind, cfg, threads, tmp, out.
_HEAD = r"""
import json, math, os, random, re, sys, time
os.environ["TQDM_DISABLE"] = "1"
import torch
torch.set_num_threads({threads})
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

kind, cfg = {kind!r}, {cfg!r}
alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .,"
vocab = {{"<pad>": 0, "<eos>": 1, **{{c: i + 2 for i, c in enumerate(alphabet)}}}}
tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")

rng = random.Random(cfg["seed"])
def text(median, sigma, cap):
    n = max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma))))
    return "".join(rng.choice(alphabet) for _ in range(n))

mc = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["hidden"] * 8 // 3,
                 num_hidden_layers=cfg["layers"], num_attention_heads=cfg["hidden"] // 64,
                 num_key_value_heads=max(1, cfg["hidden"] // 128), max_position_embeddings=4096, pad_token_id=0,
                 eos_token_id=1, bos_token_id=1)
mc._attn_implementation = "sdpa"
torch.manual_seed(0)
"""

_MEASURE = r"""
def status(k):
    return int(re.search(k + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
before = status("VmRSS")
c0, t0 = time.process_time(), time.perf_counter()
tr.train()
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = status("VmHWM") - before
logs = [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]
"""

_CHILD = _HEAD + r"""
from trl import DPOConfig, DPOTrainer
from dpo_fast.integrations.trl import FastDPOTrainer

rows = [dict(prompt=text(cfg["prompt_median"], 0.9, 2000), chosen=text(cfg["completion_median"], 1.0, 2000),
             rejected=text(cfg["completion_median"], 1.0, 2000)) for _ in range(cfg["pairs"])]
data = Dataset.from_list(rows)
model = LlamaForCausalLM(mc)
ref = LlamaForCausalLM(mc)
ref.load_state_dict(model.state_dict())

steps = cfg["pairs"] // cfg["batch"]
args = DPOConfig(output_dir=os.path.join({tmp!r}, kind), per_device_train_batch_size=cfg["batch"], max_steps=steps,
                 logging_steps=1, learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                 bf16=False, disable_tqdm=True, dataloader_num_workers=0, max_length=cfg["max_length"],
                 padding_free=kind in ("fast_packed", "fast_budget"))
kw = dict(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
if kind == "trl":
    tr = DPOTrainer(**kw)
elif kind == "fast_budget":
    tr = FastDPOTrainer(**kw, token_budget=cfg["budget"])
else:
    tr = FastDPOTrainer(**kw)

count = dict(real=0, slots=0, batches=0)
step = tr.training_step
def counting(model, inputs, *a, **k):  # the micro-batches actually trained (not the loader's prefetch)
    count["real"] += int(inputs["seq_lens"].sum()) if "seq_lens" in inputs else int(inputs["attention_mask"].sum())
    count["slots"] += int(inputs["input_ids"].numel())
    count["batches"] += 1
    return step(model, inputs, *a, **k)
tr.training_step = counting
""" + _MEASURE + r"""
json.dump(dict(kind=kind, seconds=dt, cpu_seconds=cpu, steps=len(logs), peak_bytes=peak, real=count["real"], slots=count["slots"],
               batches=count["batches"], losses=[h["loss"] for h in logs]), open({out!r}, "w"))
"""

_GRPO_CHILD = _HEAD + r"""
from trl import GRPOConfig, GRPOTrainer
from dpo_fast.integrations.trl_grpo import FastGRPOTrainer

base, entropy = kind.removesuffix("+entropy"), kind.endswith("+entropy")
data = Dataset.from_list([dict(prompt=text(cfg["prompt_median"], 0.9, cfg["max_prompt"]))
                          for _ in range(cfg["prompts"])])
path = os.path.join({tmp!r}, "model")
if not os.path.exists(os.path.join(path, "config.json")):
    LlamaForCausalLM(mc).save_pretrained(path)
    tok.save_pretrained(path)

def reward(completions, **kw):  # any deterministic reward: advantages need not be meaningful here
    return [(sum(c in "aeiou" for c in s) / max(len(s), 1)) for s in completions]

# EOS logit bias while sampling: geometric completion lengths, mean ~ completion_mean (the trained log-probs are
# the model's own)
bias = math.log(cfg["vocab"] / cfg["completion_mean"])
args = GRPOConfig(output_dir=os.path.join({tmp!r}, kind), per_device_train_batch_size=cfg["batch"],
                  num_generations=cfg["generations"], max_completion_length=cfg["max_completion"],
                  max_steps=cfg["steps"], num_iterations=2, beta=0.04, entropy_coef=0.01 if entropy else 0.0,
                  generation_kwargs={{"sequence_bias": [[[1], bias]]}}, logging_steps=1, learning_rate=1e-5,
                  report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False, disable_tqdm=True,
                  dataloader_num_workers=0, model_init_kwargs={{"dtype": torch.float32}})
kw = dict(model=path, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
if base == "trl":
    tr = GRPOTrainer(**kw)
else:
    tr = FastGRPOTrainer(**kw, padding_free=base == "fast_packed")

count = dict(real=0, slots=0, batches=0, gen_cpu=0.0, gen_wall=0.0)
compute = tr._compute_loss
def counting(model, inputs):  # the micro-batches trained: prompt + completion real tokens, padded slots
    m = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    count["real"] += int(m.sum())
    count["slots"] += m.numel()
    count["batches"] += 1
    return compute(model, inputs)
tr._compute_loss = counting
generate = tr._generate
def timed(*a, **k):
    c, t = time.process_time(), time.perf_counter()
    try:
        return generate(*a, **k)
    finally:
        count["gen_cpu"] += time.process_time() - c
        count["gen_wall"] += time.perf_counter() - t
tr._generate = timed
""" + _MEASURE + r"""
packing = dict(getattr(tr, "dpo_fast_packing", {{}}) or {{}})
json.dump(dict(kind=kind, seconds=dt - count["gen_wall"], cpu_seconds=cpu - count["gen_cpu"],
               gen_seconds=count["gen_wall"], gen_cpu_seconds=count["gen_cpu"], steps=len(logs), peak_bytes=peak,
               real=count["real"], slots=count["slots"], batches=count["batches"], packing=packing,
               routes=dict(getattr(tr, "dpo_fast_routes", {{}}) or {{}}), losses=[h["loss"] for h in logs],
               entropy=[h.get("entropy") for h in logs]), open({out!r}, "w"))
"""

KINDS = ("trl", "fast_padded", "fast_packed", "fast_budget")
GRPO_KINDS = ("trl", "fast_padded", "fast_packed", "trl+entropy", "fast_padded+entropy", "fast_packed+entropy")


def run(kind: str, cfg: dict, threads: int, tmp: str, template: str = _CHILD) -> dict:
    out = os.path.join(tmp, f"{kind}.json")
    code = template.format(kind=kind, cfg=cfg, threads=threads, tmp=tmp, out=out)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{r.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def versions() -> dict:
    import torch
    import transformers
    import trl

    import dpo_fast

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                trl=trl.__version__, dpo_fast=dpo_fast.__version__, cpus=os.cpu_count())


def table(res: dict) -> str:
    base = res["runs"]["trl"]
    lines = ["| run | real tok/s (wall) | vs TRL | real tok / CPU s | vs TRL | step time (s) | peak memory (MiB) "
             "| padding | micro-batches |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in KINDS:
        r = res["runs"][k]
        tps, tpc = r["real"] / r["seconds"], r["real"] / r["cpu_seconds"]
        lines.append(f"| {k} | {tps:,.0f} | {tps / (base['real'] / base['seconds']):.2f}x | "
                     f"{tpc:,.0f} | {tpc / (base['real'] / base['cpu_seconds']):.2f}x | "
                     f"{r['seconds'] / r['steps']:.3f} | {r['peak_bytes'] / 2**20:,.0f} | "
                     f"{1 - r['real'] / r['slots']:.1%} | {r['batches']} |")
    return "\n".join(lines)


def padding(r: dict) -> float:
    """Padding share of the decoder's batches: the packed rows when the run packed, else the padded batches."""
    p = r.get("packing") or {}
    if p.get("packed_slots"):
        return 1 - p["real_tokens"] / p["packed_slots"]
    return 1 - r["real"] / r["slots"]


def grpo_table(res: dict) -> str:
    lines = ["| run | real tok / CPU s (training) | vs TRL | step time, CPU s | peak memory (MiB) | padding "
             "(decoder) | generation CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k in GRPO_KINDS:
        r = res["runs"][k]
        base = res["runs"]["trl+entropy" if k.endswith("+entropy") else "trl"]
        tpc = r["real"] / r["cpu_seconds"]
        lines.append(f"| {k} | {tpc:,.0f} | {tpc / (base['real'] / base['cpu_seconds']):.2f}x | "
                     f"{r['cpu_seconds'] / r['steps']:.2f} | {r['peak_bytes'] / 2**20:,.0f} | {padding(r):.1%} | "
                     f"{r['gen_cpu_seconds']:.1f} |")
    return "\n".join(lines)


def main_grpo(a) -> int:
    cfg = dict(prompts=a.prompts, batch=a.batch, generations=a.generations, steps=a.steps, layers=a.layers,
               hidden=a.hidden, vocab=a.vocab, prompt_median=a.prompt_median, max_prompt=a.max_prompt,
               completion_mean=a.completion_mean, max_completion=a.max_completion, seed=0)
    res = dict(task="grpo", config=cfg, threads=a.threads, versions=versions(), date=time.strftime("%Y-%m-%d"),
               runs={})
    with tempfile.TemporaryDirectory() as tmp:
        for kind in GRPO_KINDS:
            res["runs"][kind] = r = run(kind, cfg, a.threads, tmp, _GRPO_CHILD)
            print(f"{kind}: training {r['cpu_seconds']:.1f} CPU s, generation {r['gen_cpu_seconds']:.1f} CPU s, "
                  f"{r['steps']} steps, {r['real']} real tokens, routes {r['routes']}", file=sys.stderr)
    print(grpo_table(res))
    for e in ("", "+entropy"):
        lt, lp = res["runs"]["trl" + e]["losses"], res["runs"]["fast_packed" + e]["losses"]
        print(f"per-step loss, max |trl{e} - fast_packed{e}|: {max(abs(x - y) for x, y in zip(lt, lp)):.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("dpo", "grpo"), default="dpo")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=None, help="pairs (dpo, default 8) or completions (grpo, default "
                    "16) per micro-batch")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--prompt-median", type=int, default=120)
    ap.add_argument("--completion-median", type=int, default=80)
    ap.add_argument("--budget", type=int, default=None, help="token budget (default: batch x the mean pair cost)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here (default: only print)")
    grpo = ap.add_argument_group("grpo")
    grpo.add_argument("--prompts", type=int, default=64)
    grpo.add_argument("--generations", type=int, default=8)
    grpo.add_argument("--steps", type=int, default=4)
    grpo.add_argument("--max-prompt", type=int, default=512)
    grpo.add_argument("--completion-mean", type=int, default=96)
    grpo.add_argument("--max-completion", type=int, default=512)
    a = ap.parse_args()
    if a.task == "grpo":
        a.batch = a.batch or 16
        if a.prompt_median == 120:
            a.prompt_median = 64
        return main_grpo(a)
    a.batch = a.batch or 8
    cfg = dict(pairs=a.pairs, batch=a.batch, layers=a.layers, hidden=a.hidden, vocab=a.vocab,
               max_length=a.max_length, prompt_median=a.prompt_median, completion_median=a.completion_median,
               seed=0, budget=a.budget or 0)
    if a.budget is None:
        # the same tokens per micro-batch on average as the padded runs' real tokens, but never below a max pair
        import math

        mean_pair = 2 * (a.prompt_median * math.exp(0.9**2 / 2)) + 2 * a.completion_median * math.exp(0.5)
        cfg["budget"] = max(2 * a.max_length, int(a.batch * mean_pair))
    res = dict(config=cfg, threads=a.threads, versions=versions(), date=time.strftime("%Y-%m-%d"), runs={})
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            res["runs"][kind] = run(kind, cfg, a.threads, tmp)
            r = res["runs"][kind]
            print(f"{kind}: {r['seconds']:.1f} s, {r['steps']} steps, {r['real']} real tokens", file=sys.stderr)
    print(table(res))
    lt, lp = res["runs"]["trl"]["losses"], res["runs"]["fast_packed"]["losses"]
    print(f"\nper-step loss, max |trl - fast_packed|: {max(abs(x - y) for x, y in zip(lt, lp)):.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
