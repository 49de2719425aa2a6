"""Sequence-sharded hidden states vs gathering the whole sequence, on 2 CPU processes (gloo), in one run.

    python benches/bench_sp.py [--vocab 8000] [--hidden 256] [--rows 2] [--seq 1024] [--repeats 3] [--grpo]

Both routes compute ``sequence_logprobs`` forward + backward of the same padded batch (``rows`` sequences of
``seq`` tokens) from a replicated head; rank r holds tokens ``[r T/2, (r+1) T/2)`` of every row:

* ``sp``: the local shard goes to :func:`dpo_fast.sequence_logprobs` marked with
  :func:`dpo_fast.distributed.sequence_parallel`: per-token work local, one all-reduce of the ``rows``
  per-sequence sums; backward: no collective (each rank keeps its dW contribution, dh is local).
* ``gather``: all-gather the hidden states and labels of the whole sequence and run the single-process
  engine on them (every rank computes the full head; the backward keeps this rank's slice of dh and 1/2 of
  dW, so that the data-parallel sum matches): the baseline "gather the sequence before the head".

Measured per rank: median step time, bytes handed to collectives (all-reduce inputs, all-gather outputs:
the payload) per token of the global batch, and the head's activation memory (hidden states + their
gradient the route holds; the weight and dW are the same for both). Prints one JSON line and a markdown table.

``--grpo`` adds the same comparison for ``GRPOLoss`` forward + backward (``dapo``, β = 0.04, token-level ratio:
one all-gather of its statistics; and ``importance_sampling_level="sequence"``: two), the gathered route
all-gathering hidden states, labels and the per-token old / reference log-probs, then the single-process module
(its fused one-pass route) on every rank.
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
    from dpo_fast.distributed import sequence_parallel

    V, H, B, T = args.vocab, args.hidden, args.rows, args.seq
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(V, H, generator=g) * 0.05).requires_grad_(True)
    hidden = torch.randn(B, T, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    Tr = T // world
    s, e = rank * Tr, (rank + 1) * Tr
    h_loc, lab_loc = hidden[:, s:e].contiguous(), labels[:, s:e].contiguous()
    del hidden, labels

    def step_sp():
        h = h_loc.clone().requires_grad_(True)
        dpo_fast.sequence_logprobs(sequence_parallel(h), W, lab_loc).sum().backward()
        return h.grad, W.grad

    def step_gather():
        hs = [torch.empty_like(h_loc) for _ in range(world)]
        ls = [torch.empty_like(lab_loc) for _ in range(world)]
        dist.all_gather(hs, h_loc)
        dist.all_gather(ls, lab_loc)
        full = torch.cat(hs, 1).requires_grad_(True)
        (dpo_fast.sequence_logprobs(full, W, torch.cat(ls, 1)).sum() / world).backward()
        return full.grad[:, s:e] * world, W.grad

    routes = [("sp", step_sp), ("gather", step_gather)]
    if args.grpo:
        g2 = torch.Generator().manual_seed(1)
        old = torch.randn(B, T, generator=g2) * 0.2 - 9.0
        ref = old + torch.randn(B, T, generator=g2) * 0.1
        old_loc, ref_loc = old[:, s:e].contiguous(), ref[:, s:e].contiguous()
        adv = torch.linspace(-1.0, 1.0, B)
        configs = {"grpo_token": dict(loss_type="dapo", beta=0.04),
                   "grpo_seq": dict(loss_type="grpo", importance_sampling_level="sequence")}

        def grpo_sp(kw):
            def step():
                h = h_loc.clone().requires_grad_(True)
                out = dpo_fast.GRPOLoss(**kw)(sequence_parallel(h), W, lab_loc, adv, old_loc, ref_loc)
                out.loss.backward()
                return h.grad, W.grad
            return step

        def grpo_gather(kw):
            def step():
                parts = []
                for t in (h_loc, lab_loc, old_loc, ref_loc):
                    ts = [torch.empty_like(t) for _ in range(world)]
                    dist.all_gather(ts, t)
                    parts.append(torch.cat(ts, 1))
                full = parts[0].requires_grad_(True)
                out = dpo_fast.GRPOLoss(**kw)(full, W, parts[1], adv, parts[2], parts[3])
                (out.loss / world).backward()
                return full.grad[:, s:e] * world, W.grad
            return step

        for key, kw in configs.items():
            routes += [(f"sp_{key}", grpo_sp(kw)), (f"gather_{key}", grpo_gather(kw))]
    def zero_grad():
        W.grad = None

    res, outs = time_routes(routes, args.repeats, zero_grad)
    for name in res:
        res[name]["head_act_bytes"] = B * Tr * H * 4 * 2  # the local hidden and its gradient
        if name.startswith("gather"):
            res[name]["head_act_bytes"] += B * T * H * 4 * 2  # + the gathered sequence and its gradient
    # dW: sp holds this rank's contribution, gather 1/world of the full one; summed over the ranks they agree
    dws = {k: v[1].clone() for k, v in outs.items()}
    for v in dws.values():
        dist.all_reduce(v)
    for name in [n for n in res if n.startswith("sp")]:
        other = "gather" + name[2:]
        suffix = name[2:]
        res["max_diff_dh" + suffix] = float((outs[name][0] - outs[other][0]).abs().max())
        res["max_diff_dw_summed" + suffix] = float((dws[name] - dws[other]).abs().max())
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grpo", action="store_true", help="also GRPOLoss (token- and sequence-level ratios)")
    args = ap.parse_args()
    if args.seq % 2:
        ap.error("--seq: must be even (2 equal token shards)")
    res = spawn(_worker, args, "bench_sp")
    sp, ga = res["sp"], res["gather"]
    tokens = args.rows * args.seq
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = None
    summary = {
        "device": f"CPU ({os.cpu_count()} cores), 2 processes, gloo, 1 thread each", "torch": torch.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "load1": load,
        "V": args.vocab, "H": args.hidden, "rows": args.rows, "seq": args.seq,
        **{f"sp_{k}": v for k, v in sp.items()}, **{f"gather_{k}": v for k, v in ga.items()},
        "sp_comm_bytes_per_token": sp["comm_bytes"] / tokens, "gather_comm_bytes_per_token": ga["comm_bytes"] / tokens,
        "step_time_ratio_gather_over_sp": ga["step_s"] / sp["step_s"],
        "head_act_memory_ratio_sp_over_gather": sp["head_act_bytes"] / ga["head_act_bytes"],
        "max_diff_dh": res["max_diff_dh"], "max_diff_dw_summed": res["max_diff_dw_summed"],
    }
    print(json.dumps(summary))
    print("| route | step (s) | bytes to collectives / rank / token | collectives | head activations / rank |\n"
          "|---|---|---|---|---|")
    for name, r in (("sequence-sharded (sp)", sp), ("gather the sequence", ga)):
        print(f"| {name} | {r['step_s']:.3f} | {r['comm_bytes'] / tokens:.3g} | {r['collectives']} | "
              f"{r['head_act_bytes'] / 2**20:.2f} MiB |")
    print(f"ratios: step time gather/sp {summary['step_time_ratio_gather_over_sp']:.2f}x, head activations sp/gather "
          f"{summary['head_act_memory_ratio_sp_over_gather']:.2f}; max |diff| dh {res['max_diff_dh']:.1e}, "
          f"dW (summed) {res['max_diff_dw_summed']:.1e}; load {load}")
    if args.grpo:
        print("| GRPOLoss route | step (s) | bytes to collectives / rank / token | collectives |\n|---|---|---|---|")
        for key, label in (("grpo_token", "dapo, beta 0.04, token-level ratio"),
                           ("grpo_seq", "grpo, sequence-level ratio")):
            for route, what in (("sp", "sequence-sharded"), ("gather", "gather the sequence")):
                r = res[f"{route}_{key}"]
                summary[f"{route}_{key}"] = r
                print(f"| {label}: {what} | {r['step_s']:.3f} | {r['comm_bytes'] / tokens:.3g} | {r['collectives']} |")
            print(f"{label}: step time gather/sp {res[f'gather_{key}']['step_s'] / res[f'sp_{key}']['step_s']:.2f}x; "
                  f"max |diff| dh {res[f'max_diff_dh_{key}']:.1e}, dW (summed) {res[f'max_diff_dw_summed_{key}']:.1e}")
        print(json.dumps({k: v for k, v in res.items() if "grpo" in k}))


if __name__ == "__main__":
    main()
