"""One-shot GPU check: correctness against float64, then timings of every variant. Builds nothing.

Run on a lent GPU machine (see README "Benchmarks"), e.g.
    PYTHONUNBUFFERED=1 python benches/gpu_check.py --out $OUT
It (1) checks the Triton backend and the fused DPOLoss against float64 references on mid-size shapes in
float32 and bfloat16 (odd sizes, softcap, temperature, packed, frozen weight), then (2) runs the benchmark
(`dpo_fast.bench`) on the llama3-8b, qwen2.5-7b and gemma2-2b heads, random and peaked logits, and writes
check.json, results.json and results.png to --out. On CPU (`--device cpu`) it runs the same checks with
small shapes on the torch backend, to keep the script itself tested.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _rel(a, r):
    a, r = a.detach().double(), r.detach().double()
    return ((a - r).abs().max() / r.abs().max().clamp_min(1.0)).item()


def correctness(device: str, backend: str) -> list[dict]:
    import dpo_fast

    big = device == "cuda"
    cases = [
        # (B, T, H, V, options)
        (4, 333 if big else 17, 1024 if big else 32, 50_257 if big else 1001, {}),
        (2, 129 if big else 9, 2304 if big else 24, 256_000 if big else 70_001, dict(softcap=30.0)),
        (3, 200 if big else 11, 512 if big else 16, 32_003 if big else 503, dict(temperature=0.7, bias=True)),
    ]
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for B, T, H, V, opt in cases:
            g = torch.Generator(device="cpu").manual_seed(B * T + V)
            h = torch.randn(B, T, H, generator=g).to(device, dtype)
            w = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype)
            b = (torch.randn(V, generator=g) * 0.1).to(device, dtype) if opt.get("bias") else None
            labels = torch.randint(0, V, (B, T), generator=g)
            labels[:, : T // 4] = -100
            labels[-1] = -100  # a fully masked row
            labels = labels.to(device)
            kw = {k: v for k, v in opt.items() if k != "bias"}
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            t0 = time.perf_counter()
            lp = dpo_fast.sequence_logprobs(hh, ww, labels, bias=b, backend=backend, **kw)
            go = torch.randn(B, generator=g).to(device)
            dh, dw = torch.autograd.grad(lp, (hh, ww), go)
            if device == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            # float64 reference (on the device, one sequence at a time to bound memory)
            h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
            refs = []
            for i in range(B):
                z = h64[i] @ w64.t()
                if b is not None:
                    z = z + b.double()
                if "softcap" in kw:  # the cap first, then the temperature
                    z = kw["softcap"] * torch.tanh(z / kw["softcap"])
                z = z / kw.get("temperature", 1.0)
                m = labels[i] != -100
                tok = torch.log_softmax(z, -1).gather(-1, labels[i].clamp_min(0)[:, None]).squeeze(-1)
                refs.append((tok * m).sum())
            ref = torch.stack(refs)
            rdh, rdw = torch.autograd.grad(ref, (h64, w64), go.double())
            # plain PyTorch at the same precision: the error budget where a float32 sum over V terms cannot
            # reach the tolerance (the tests' idiom: within 2 x PyTorch's own error)
            hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
            base = []
            for i in range(B):
                z = hb[i] @ wb.t()
                if b is not None:
                    z = z + b
                z = z.float()
                if "softcap" in kw:
                    z = kw["softcap"] * torch.tanh(z / kw["softcap"])
                z = z / kw.get("temperature", 1.0)
                m = labels[i] != -100
                base.append((torch.log_softmax(z, -1).gather(-1, labels[i].clamp_min(0)[:, None]).squeeze(-1)
                             * m).sum())
            base = torch.stack(base)
            bdh, bdw = torch.autograd.grad(base, (hb, wb), go)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            rec = dict(dtype=str(dtype), shape=[B, T, H, V], options=kw, bias=b is not None, seconds=secs,
                       err_logps=_rel(lp, ref), err_dh=_rel(dh, rdh), err_dw=_rel(dw, rdw),
                       torch_err_logps=_rel(base, ref), torch_err_dh=_rel(bdh, rdh), torch_err_dw=_rel(bdw, rdw),
                       masked_row_zero=bool(lp[-1].item() == 0.0), finite=bool(torch.isfinite(dw).all()))
            rec["ok"] = all(rec[f"err_{k}"] <= max(tol, 2 * rec[f"torch_err_{k}"] + 1e-7)
                            for k in ("logps", "dh", "dw")) and rec["masked_row_zero"] and rec["finite"]
            out.append(rec)
            print(json.dumps(rec), flush=True)
            del h64, w64, ref, rdh, rdw, hb, wb, base, bdh, bdw
            if device == "cuda":
                torch.cuda.empty_cache()
    # every fused loss module == its two-pass route (bf16 and fp32)
    modules = {
        "DPOLoss": lambda f: (dpo_fast.DPOLoss(beta=0.1, fused=f, backend=backend), "pair_ref"),
        "CPOLoss(simpo)": lambda f: (dpo_fast.CPOLoss(beta=2.0, loss_type="simpo", cpo_alpha=0.0, fused=f,
                                                      backend=backend), "pair"),
        "ORPOLoss": lambda f: (dpo_fast.ORPOLoss(beta=0.1, fused=f, backend=backend), "pair"),
        "KTOLoss": lambda f: (dpo_fast.KTOLoss(beta=0.1, fused=f, backend=backend), "kto"),
        "GRPOLoss(dapo)": lambda f: (dpo_fast.GRPOLoss(loss_type="dapo", fused=f, backend=backend), "grpo"),
    }
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device="cpu").manual_seed(5)
        P, T, H, V = (4, 300, 1024, 32_000) if big else (2, 9, 16, 301)
        h = torch.randn(2 * P, T, H, generator=g).to(device, dtype)
        w = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype)
        labels = torch.randint(0, V, (2 * P, T), generator=g)
        labels[:, : T // 4] = -100
        labels = labels.to(device)
        rc, rr = (torch.randn(P, generator=g).to(device) - 50 for _ in range(2))
        des = (torch.arange(2 * P) % 2 == 0).to(device)
        ref_all = (torch.randn(2 * P, generator=g) - 50).to(device)
        adv = torch.randn(2 * P, generator=g).to(device)
        for name, make in modules.items():
            res = {}
            for fused in (True, False):
                hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                m, kind = make(fused)
                if kind == "pair_ref":
                    o = m(hh, ww, labels, rc, rr)
                elif kind == "pair":
                    o = m(hh, ww, labels)
                elif kind == "kto":
                    o = m(hh, ww, labels, des, ref_all, kl=torch.tensor(0.5, device=device))
                else:
                    o = m(hh, ww, labels, adv)
                o.loss.backward()
                res[fused] = (o.loss.detach(), hh.grad, ww.grad, o.route)
            rec = dict(check=f"{name} fused vs two-pass", dtype=str(dtype), route=res[True][3],
                       err_loss=_rel(res[True][0], res[False][0]), err_dh=_rel(res[True][1], res[False][1]),
                       err_dw=_rel(res[True][2], res[False][2]))
            rec["ok"] = rec["route"] == "fused" and max(rec["err_loss"], rec["err_dh"], rec["err_dw"]) <= (
                1e-5 if dtype == torch.float32 else 2e-2)
            out.append(rec)
            print(json.dumps(rec), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    backend = "triton" if a.device == "cuda" else "torch"
    checks = correctness(a.device, backend)
    from dpo_fast.engine import epilogue_probe_results

    checks.append({"check": "cuBLAS fp32-epilogue accumulation used", "ok": True,
                   "used": epilogue_probe_results()})
    with open(os.path.join(a.out, "check.json"), "w") as f:
        json.dump(checks, f, indent=1)
    ok = all(c["ok"] for c in checks)
    print(f"correctness: {'OK' if ok else 'FAILED'} ({sum(c['ok'] for c in checks)}/{len(checks)})", flush=True)
    if not a.skip_bench:
        from dpo_fast import bench

        shapes = "llama3-8b,qwen2.5-7b,gemma2-2b" if a.device == "cuda" else "tiny"
        bench.main(["--device", a.device, "--shapes", shapes, "--reps", str(a.reps), "--out", a.out])
        if a.device == "cuda":
            bench.main(["--device", a.device, "--shapes", "llama3-8b", "--peaked", "--reps", str(a.reps),
                        "--out", os.path.join(a.out, "peaked")])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
