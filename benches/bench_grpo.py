"""One GRPO step's head work: dpo_fast (FastGRPOTrainer's routes) against TRL 1.16's GRPOTrainer head.

The step is what a GRPOTrainer optimisation step does after the decoder, for B completions of C tokens
behind P prompt tokens: the old-policy and reference per-token log-probs (no-grad), then the policy's
per-token log-probs and entropies, TRL's DAPO loss (beta > 0, clipped ratio, token-level IS) and its backward
to the last hidden states and the head weight. The decoder is left out (the same in every method): the
last hidden states are a random (B, P + C, H) leaf.

Methods:

* ``trl_stock``   — TRL's GRPOTrainer head as it runs on CPU: ``add_fused_lm_head``'s
  ``trl.kernels.ChunkedLogProbFunction`` over every position of the padded batch (TRL scores only the
  completion tokens on Triton devices, every position elsewhere), then TRL's loss formula through autograd.
* ``trl_compact`` — the same TRL kernel over the completion tokens only (what TRL does on CUDA): TRL's own
  fused head at its best.
* ``dpo_fast``    — FastGRPOTrainer's fused route: old/ref through :func:`dpo_fast.token_logprobs` under
  no_grad (1 GEMM), the policy through :class:`dpo_fast.GRPOLoss` (log-probs, loss, gradient and the entropy
  metric in one pass: 3 GEMMs over completion tokens).
* ``dpo_fast_two_pass`` — FastGRPOTrainer's two-pass route (options GRPOLoss does not fuse): per-token log-probs
  and entropies from one engine pass, TRL's loss formula through autograd.

Timing: wall clock, median of ``--reps`` steps after one warm-up step, in one process per method. Memory: the
growth of the peak resident set during the timed steps in that fresh process (``/proc/self/clear_refs``),
with glibc's mmap threshold at 64 KiB so freed blocks leave the resident set. Gradients w.r.t. hidden and
weight are included; every method's loss and gradients are compared with ``trl_stock``'s.

On CUDA (``--device cuda``): CUDA-synchronised wall clock and ``torch.cuda.max_memory_allocated`` above the inputs;
``trl_stock`` then equals ``trl_compact``'s token set only if TRL's Triton path is taken (TRL scores completion
tokens only on Triton devices), so read ``trl_compact`` as TRL's GPU path. Not yet run on a GPU.

Usage: ``python benches/bench_grpo.py [--B 8 --P 128 --C 384 --H 256 --V 32000 --reps 5] [--device cuda]
[--json out.json]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("trl_stock", "trl_compact", "dpo_fast", "dpo_fast_two_pass")
BETA, EPS_LO, EPS_HI, TEMP = 0.04, 0.2, 0.28, 0.9


def make_inputs(B, P, C, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = P + C
    hidden = (torch.randn(B, T, H, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(C // 2, C + 1, (B,), generator=g)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()  # (B, C), padded after EOS
    attention_mask = torch.cat([torch.ones(B, P, dtype=torch.long), completion_mask], 1)
    advantages = torch.randn(B, generator=g)
    return hidden, weight, ids, attention_mask, completion_mask, advantages


def trl_loss(logps, entropies, old, ref, mask, adv, num_items):
    """TRL 1.16 GRPOTrainer._compute_loss for loss_type="dapo", token-level IS, beta > 0 (no bias correction)."""
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - EPS_LO, 1 + EPS_HI)
    A = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * A, coef_2 * A)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    per_token = per_token + BETA * kl
    loss = (per_token * mask).sum() / num_items
    entropy = (entropies * mask).sum() / mask.sum()  # the logged metric
    return loss, entropy.item()


def _trl_head(hidden, weight, ids, attention_mask, C, compact, outputs):
    """add_fused_lm_head's forward after the backbone: (B, C) log-probs (and entropies) of the completion."""
    from trl.kernels import ChunkedLogProbFunction

    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-C] = -100
    h, lab = hidden[:, :-1], labels[:, 1:]
    mask = lab != -100
    if compact:
        res = ChunkedLogProbFunction.apply(h[mask], weight, None, lab[mask], TEMP, 32768, None, 1.0, outputs)
        res = [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in res]
    else:
        res = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), weight, None, lab.clamp(min=0).reshape(-1),
                                           TEMP, 32768, None, 1.0, outputs)
        res = [None if x is None else x.view(mask.shape).masked_fill(~mask, 0) for x in res]
    lp, ent = res[0][:, -C:], (None if res[1] is None else res[1][:, -C:])
    return lp, ent


def step(method, hidden, weight, ids, attention_mask, completion_mask, adv, C):
    """One head step; returns (loss, entropy metric). Gradients land in hidden.grad / weight.grad."""
    mask = completion_mask.float()
    num_items = mask.sum()
    if method.startswith("trl"):
        compact = method == "trl_compact"
        with torch.no_grad():
            old, _ = _trl_head(hidden, weight, ids, attention_mask, C, compact, ("log_probs",))
            ref, _ = _trl_head(hidden.detach() * 0.999, weight, ids, attention_mask, C, compact, ("log_probs",))
        lp, ent = _trl_head(hidden, weight, ids, attention_mask, C, compact, ("log_probs", "entropy"))
        loss, entropy = trl_loss(lp, ent, old, ref, mask, adv, num_items)
        loss.backward()
        return loss.item(), entropy
    import dpo_fast
    from dpo_fast.logprobs import token_logprobs_and_entropy

    labels = ids[:, -C:].masked_fill(completion_mask == 0, -100)
    hc = hidden[:, -C - 1:-1]
    with torch.no_grad():
        old = dpo_fast.token_logprobs(hc, weight, labels, temperature=TEMP)
        ref = dpo_fast.token_logprobs(hidden.detach()[:, -C - 1:-1] * 0.999, weight, labels, temperature=TEMP)
    if method == "dpo_fast":
        fn = dpo_fast.GRPOLoss(BETA, EPS_LO, EPS_HI, loss_type="dapo", temperature=TEMP, token_metrics=True)
        out = fn(hc, weight, labels, adv, old, ref, num_items_in_batch=num_items)
        out.loss.backward()
        return out.loss.item(), out.metrics["entropy"]
    lp, ent = token_logprobs_and_entropy(hc, weight, labels, temperature=TEMP)
    loss, entropy = trl_loss(lp, ent, old, ref, mask, adv, num_items)
    loss.backward()
    return loss.item(), entropy


def _status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def measure(method, B, P, C, H, V, reps, device="cpu"):
    """In a fresh process: {"ms", "peak_bytes", "loss", "entropy", "gh", "gw"} (the warm-up step's gradients).

    CPU: wall clock and the growth of the peak resident set. CUDA: wall clock after a synchronize and the peak
    of ``torch.cuda.max_memory_allocated`` above what the inputs hold.
    """
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    inputs = make_inputs(B, P, C, H, V)
    if cuda:
        inputs = tuple(t.detach().to(device).requires_grad_(t.requires_grad) for t in inputs)
    hidden, weight, ids, am, cm, adv = inputs
    step(method, hidden, weight, ids, am, cm, adv, C)  # warm-up (and the gradients compared below)
    gh, gw = hidden.grad.cpu().clone(), weight.grad.cpu().clone()
    loss = entropy = None
    times = []
    hidden.grad = weight.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
    for _ in range(reps):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        loss, entropy = step(method, hidden, weight, ids, am, cm, adv, C)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - base
    return {"ms": 1e3 * statistics.median(times), "peak_bytes": peak, "loss": loss, "entropy": entropy,
            "gh": gh, "gw": gw}


def _child(args):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "0")) or torch.get_num_threads())
    r = measure(args.child, args.B, args.P, args.C, args.H, args.V, args.reps, args.device)
    torch.save({"gh": r.pop("gh"), "gw": r.pop("gw")}, args.grads)
    print("RESULT " + json.dumps(r))


def environment():
    import trl

    import dpo_fast

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "trl": trl.__version__,
            "dpo_fast": dpo_fast.__version__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--P", type=int, default=128)
    ap.add_argument("--C", type=int, default=384)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--grads", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    import tempfile

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TQDM_DISABLE="1")
    results, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods.split(","):
            gpath = os.path.join(tmp, f"{m}.pt")
            cmd = [sys.executable, __file__, "--child", m, "--grads", gpath, "--reps", str(args.reps),
                   "--device", args.device]
            for k in ("B", "P", "C", "H", "V"):
                cmd += [f"--{k}", str(getattr(args, k))]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                results[m] = {"error": (p.stderr or p.stdout)[-800:]}
                print(f"{m}: failed\n{results[m]['error']}", file=sys.stderr)
                continue
            results[m] = json.loads(line[0][7:])
            grads[m] = torch.load(gpath)
    base = results.get("trl_stock", {})
    print(f"GRPO step head work on {args.device}: B {args.B} completions x C {args.C} tokens after P {args.P} "
          f"prompt tokens, H {args.H}, V {args.V}, float32, dapo, beta {BETA}, median of {args.reps}")
    print("| method | ms / step | x trl_stock time | peak MiB | x trl_stock memory | loss diff | max |dh| diff | "
          "max |dW| diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        if "error" in r:
            print(f"| {m} | failed | | | | | | |")
            continue
        rt = r["ms"] / base["ms"] if base.get("ms") else float("nan")
        rm = r["peak_bytes"] / base["peak_bytes"] if base.get("peak_bytes") else float("nan")
        dl = abs(r["loss"] - base["loss"]) if "loss" in base else float("nan")
        if "trl_stock" in grads:
            dh = (grads[m]["gh"] - grads["trl_stock"]["gh"]).abs().max().item()
            dw = (grads[m]["gw"] - grads["trl_stock"]["gw"]).abs().max().item()
        else:
            dh = dw = float("nan")
        r.update(x_time=rt, x_memory=rm, loss_diff=dl, dh_diff=dh, dw_diff=dw)
        print(f"| {m} | {r['ms']:.1f} | {rt:.2f} | {r['peak_bytes'] / 2**20:.1f} | {rm:.3f} | {dl:.1e} | {dh:.1e} | "
              f"{dw:.1e} |")
    info = environment()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": info, "args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
