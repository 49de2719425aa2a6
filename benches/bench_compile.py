"""Eager vs torch.compile on CPU: a tiny Llama forward + DPOLoss + backward, step time and compile time.

    python benches/bench_compile.py [--backend inductor|aot_eager] [--steps 10]

Compile time is the first compiled step minus a warm eager step; step time the median of ``--steps`` steps
after warm-up. Record the printed line in benches/RESULTS.md with the date, versions and machine load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers

import dpo_fast


def model_and_batch(pairs=4, T=64, vocab=2048, hidden=128):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(1, vocab, (2 * pairs, T))
    labels = ids.roll(-1, 1)
    labels[:, : T // 4] = -100
    labels[:, -1] = -100
    ref = torch.randn(pairs) - float(T)
    return model, ids, labels, ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    model, ids, labels, ref = model_and_batch()
    loss_fn = dpo_fast.DPOLoss(beta=0.1, compute_metrics=False)

    def step(ids, labels):
        hidden = model.model(input_ids=ids).last_hidden_state
        return loss_fn(hidden, model.lm_head.weight, labels, ref, ref).loss

    def timed(fn):
        t = time.perf_counter()
        fn(ids, labels).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    timed(step)
    eager = statistics.median(timed(step) for _ in range(a.steps))
    cstep = torch.compile(step, backend=a.backend, fullgraph=True)
    first = timed(cstep)
    compiled = statistics.median(timed(cstep) for _ in range(a.steps))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, backend {a.backend}, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}: eager step {eager * 1e3:.1f} ms, "
          f"compiled step {compiled * 1e3:.1f} ms, compile (first step - eager step) {first - eager:.1f} s")


if __name__ == "__main__":
    main()
