"""End-to-end DPO training throughput: stock TRL vs FastDPOTrainer padded, packed, and packed + token budget.

One run, four trainers, each in a fresh subprocess (its own peak-memory measurement), same model, data, seed
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

Usage: ``python benches/bench_train.py [--pairs 32] [--batch 8] [--threads 2] [--json benches/train.json]``
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

_CHILD = r"""
import json, math, os, random, re, sys, time
os.environ["TQDM_DISABLE"] = "1"
import torch
torch.set_num_threads({threads})
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
from dpo_fast.integrations.trl import FastDPOTrainer

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
rows = [dict(prompt=text(cfg["prompt_median"], 0.9, 2000), chosen=text(cfg["completion_median"], 1.0, 2000),
             rejected=text(cfg["completion_median"], 1.0, 2000)) for _ in range(cfg["pairs"])]
data = Dataset.from_list(rows)

mc = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["hidden"] * 8 // 3,
                 num_hidden_layers=cfg["layers"], num_attention_heads=cfg["hidden"] // 64,
                 num_key_value_heads=max(1, cfg["hidden"] // 128), max_position_embeddings=4096, pad_token_id=0,
                 eos_token_id=1, bos_token_id=1)
mc._attn_implementation = "sdpa"
torch.manual_seed(0)
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
json.dump(dict(kind=kind, seconds=dt, cpu_seconds=cpu, steps=len(logs), peak_bytes=peak, real=count["real"], slots=count["slots"],
               batches=count["batches"], losses=[h["loss"] for h in logs]), open({out!r}, "w"))
"""

KINDS = ("trl", "fast_padded", "fast_packed", "fast_budget")


def run(kind: str, cfg: dict, threads: int, tmp: str) -> dict:
    out = os.path.join(tmp, f"{kind}.json")
    code = _CHILD.format(kind=kind, cfg=cfg, threads=threads, tmp=tmp, out=out)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--prompt-median", type=int, default=120)
    ap.add_argument("--completion-median", type=int, default=80)
    ap.add_argument("--budget", type=int, default=None, help="token budget (default: batch x the mean pair cost)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here (default: only print)")
    a = ap.parse_args()
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
