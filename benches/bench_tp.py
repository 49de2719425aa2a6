"""Vocabulary-parallel head vs gathering the weight, on 2 CPU processes (gloo), in one run.

    python benches/bench_tp.py [--vocab 32000] [--hidden 512] [--tokens 512] [--repeats 3]

Both routes compute ``sequence_logprobs`` forward + backward of the same batch from a head whose weight is
split over the vocabulary across the 2 ranks (every rank holds the same hidden states):

* ``tp``: the split weight goes to :func:`dpo_fast.sequence_logprobs` as it is (marked with
  :func:`dpo_fast.distributed.vocab_parallel`): per token, a max all-reduce and a [sum-exp, label logit]
  all-reduce; backward one all-reduce of the scored hidden-state gradient.
* ``gather``: all-gather the weight and run the single-process engine on it; each rank keeps its slice of
  dW (the loss is replicated over the tensor-parallel ranks, so no gradient reduction is needed: this is
  the cheapest gathering baseline).

Measured per rank: median step time, bytes handed to collectives (input tensors of all-reduce, the output
of all-gather: the payload, not the wire bytes of a particular algorithm), and the head memory each route
needs (the local slice vs the gathered copy plus its gradient). Prints one JSON line and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.distributed as dist

from dist_harness import spawn, time_routes


def _worker(rank, world, args):
    import dpo_fast
    from dpo_fast.distributed import vocab_parallel

    V, H, N = args.vocab, args.hidden, args.tokens
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, H, generator=g) * 0.05
    hidden = torch.randn(N, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    cu = torch.tensor([0, N // 4, N // 2, 3 * N // 4, N])
    per = V // world
    s, e = rank * per, (rank + 1) * per
    w_local = W[s:e].clone().requires_grad_(True)
    vocab_parallel(w_local)
    del W

    def step_tp():
        h = hidden.clone().requires_grad_(True)
        dpo_fast.sequence_logprobs(h, w_local, labels, cu_seqlens=cu).sum().backward()
        return h.grad, w_local.grad

    def step_gather():
        h = hidden.clone().requires_grad_(True)
        full = torch.empty(V, H)
        dist.all_gather_into_tensor(full, w_local.detach())
        full.requires_grad_(True)
        dpo_fast.sequence_logprobs(h, full, labels, cu_seqlens=cu).sum().backward()
        # every rank computed the same (replicated) loss: its slice of the full dW is the gradient, no reduction
        return h.grad, full.grad[s:e]

    def zero_grad():
        w_local.grad = None

    res, outs = time_routes((("tp", step_tp), ("gather", step_gather)), args.repeats, zero_grad)
    res["tp"]["head_bytes"] = w_local.numel() * 4 * 2  # the slice and its gradient
    res["gather"]["head_bytes"] = w_local.numel() * 4 * 2 + V * H * 4 * 2  # + the gathered copy and its full gradient
    res["max_diff_dh"] = float((outs["tp"][0] - outs["gather"][0]).abs().max())
    res["max_diff_dw"] = float((outs["tp"][1] - outs["gather"][1]).abs().max())
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.vocab % 2:
        ap.error("--vocab: must be even (2 equal shards)")
    res = spawn(_worker, args, "bench_tp")
    tp, ga = res["tp"], res["gather"]
    N = args.tokens
    summary = {
        "device": f"CPU ({os.cpu_count()} cores), 2 processes, gloo, 1 thread each", "torch": torch.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "V": args.vocab, "H": args.hidden, "tokens": N, **{f"tp_{k}": v for k, v in tp.items()},
        **{f"gather_{k}": v for k, v in ga.items()},
        "tp_comm_floats_per_token": tp["comm_bytes"] / 4 / N,
        "step_time_ratio_gather_over_tp": ga["step_s"] / tp["step_s"],
        "comm_ratio_gather_over_tp": ga["comm_bytes"] / tp["comm_bytes"],
        "head_memory_ratio_tp_over_gather": tp["head_bytes"] / ga["head_bytes"],
        "max_diff_dh": res["max_diff_dh"], "max_diff_dw": res["max_diff_dw"],
    }
    print(json.dumps(summary))
    print(f"| route | step (s) | bytes to collectives / rank | collectives | head memory / rank |\n|---|---|---|---|---|")
    for name, r in (("vocab-parallel (tp)", tp), ("gather the weight", ga)):
        print(f"| {name} | {r['step_s']:.3f} | {r['comm_bytes']:,} | {r['collectives']} | {r['head_bytes'] / 2**20:.1f} MiB |")
    print(f"ratios: step time gather/tp {summary['step_time_ratio_gather_over_tp']:.2f}x, bytes gather/tp "
          f"{summary['comm_ratio_gather_over_tp']:.0f}x, head memory tp/gather {summary['head_memory_ratio_tp_over_gather']:.2f}; "
          f"tp: {summary['tp_comm_floats_per_token']:.1f} floats per token in all (forward 3 + backward H={args.hidden} "
          f"for dh); max |diff| dh {res['max_diff_dh']:.1e}, dW {res['max_diff_dw']:.1e}")


if __name__ == "__main__":
    main()
