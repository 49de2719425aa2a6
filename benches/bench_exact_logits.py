"""Exact (float32) logits tiles for bfloat16 inputs: accuracy gained and time/memory paid.

    python benches/bench_exact_logits.py [--device cpu|cuda] [--reps 3] [--shape B,T,H,V]

For each mode (bf16 default tiles, bf16 exact tiles, and fp32 inputs for scale) it runs
``sequence_logprobs`` forward + backward (to hidden and weight) on LM-like peaked logits, in a fresh process
per mode on CPU (peak resident-set growth, glibc mmap threshold 64 KiB, as ``dpo-fast bench`` measures), and
reports the median time, the peak memory above the inputs, and the errors against a float64 reference of
the same (bf16-valued) inputs: max |error| of the per-sequence log-probs relative to max(|ref|, 1), and the
norm-relative errors of dh and dW.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time

import torch


def make_inputs(B, T, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 4] = -100  # 25% prompt
    w = torch.randn(V, H, generator=g) / math.sqrt(H)
    h = torch.randn(B, T, H, generator=g)
    tgt = w[labels.clamp_min(0)]
    h = 0.5 * h + 12.0 * tgt / tgt.square().sum(-1, keepdim=True).clamp_min(1e-6)  # peaked, LM-like
    return h.to(dtype).to(device), w.to(dtype).to(device), labels.to(device)


def reference(h, w, labels, go):
    """float64 sequence log-probs and (dh, dW), one sequence at a time."""
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    out = []
    for i in range(h.shape[0]):
        z = h64[i] @ w64.t()
        m = labels[i] != -100
        tok = torch.log_softmax(z, -1).gather(-1, labels[i].clamp_min(0)[:, None]).squeeze(-1)
        out.append((tok * m).sum())
    out = torch.stack(out)
    dh, dw = torch.autograd.grad(out, (h64, w64), go.double())
    return out.detach(), dh, dw


def nrel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure(mode, shape, device, reps):
    import dpo_fast

    B, T, H, V = shape
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    dpo_fast.set_exact_logits(mode == "bf16_exact")
    h, w, labels = make_inputs(B, T, H, V, dtype, device)
    go = torch.linspace(0.5, 1.5, B, device=device)

    def step(hh, ww, ll):
        hh, ww = hh.detach().requires_grad_(), ww.detach().requires_grad_()
        out = dpo_fast.sequence_logprobs(hh, ww, ll, backend="torch")
        dh, dw = torch.autograd.grad(out, (hh, ww), go[: out.shape[0]])
        return out.detach(), dh, dw

    small = torch.where(labels[:, :8] >= 0, labels[:, :8] % 64, labels[:, :8]).contiguous()
    step(h[:, :8].contiguous(), w[:64].contiguous(), small)  # BLAS loaded, allocator warm
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        out, dh, dw = step(h, w, labels)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    ref, rdh, rdw = reference(h.cpu(), w.cpu(), labels.cpu(), go.cpu())
    scale = max(ref.abs().max().item(), 1.0)
    return {"mode": mode, "ms": statistics.median(times[1:]), "peak_mib": peak / 2**20,
            "logp_err": (out.cpu().double() - ref).abs().max().item() / scale,
            "dh_err": nrel(dh.cpu(), rdh), "dw_err": nrel(dw.cpu(), rdw)}


def _child(mode, shape, device, reps):
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    return measure(mode, shape, device, reps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shape", default="4,256,512,16000", help="B,T,H,V")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args()
    shape = tuple(int(x) for x in a.shape.split(","))
    rows = []
    for mode in ("bf16", "bf16_exact", "fp32"):
        if a.device == "cpu":
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
            with mp.get_context("spawn").Pool(1) as pool:
                r = pool.apply(_child, (mode, shape, a.device, a.reps))
        else:
            r = measure(mode, shape, a.device, a.reps)
        rows.append(r)
        print(json.dumps(r), flush=True)
    import dpo_fast

    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, dpo_fast "
          f"{dpo_fast.__version__}, shape B,T,H,V = {shape}, device {a.device}, threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    base = rows[0]
    print("| mode | ms | x bf16 time | peak MiB | logp err | dh err | dW err |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['ms']:.1f} | {r['ms'] / base['ms']:.2f} | {r['peak_mib']:.1f} | "
              f"{r['logp_err']:.2e} | {r['dh_err']:.2e} | {r['dw_err']:.2e} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
