"""One GPU slot, one script: correctness against float64, then timings, as JSON lines written as it goes.

Recommended command (on the lent GPU machine, from the repository root; no wheel, no internet — the Rust
``_native`` extension is not needed by anything checked here):

    PYTHONPATH=python PYTHONUNBUFFERED=1 python benches/gpu_check.py --out $OUT --budget-s 360

It writes ``$OUT/gpu_check.jsonl``: one JSON record per line, flushed as soon as it exists, so a crash or a
time-out loses nothing already measured. Records (``kind``):

- ``env``: versions, device, whether ``dpo_fast._native`` imports, the backend that runs;
- ``plan``: the correctness cases and timing methods this run will try, in order;
- ``check``: one correctness case against a float64 reference (values *and* gradients), in bfloat16 unless
  named otherwise: ``ok``, the relative errors, and the same errors of plain PyTorch at the input precision
  (a case passes at ``err <= max(tol, 2 x torch_err)``, the tests' idiom); ``error`` when it raised;
- ``gemm_path``: which fp32-output / fp32-accumulate GEMM path the engine took;
- ``time``: one method at one head shape: ``ms`` (5 reps after a warm-up), ``peak_mib`` (growth of the peak
  allocated memory over the inputs), or ``skipped`` with the reason (package not importable) or ``error``;
- ``profile``: at llama3-8b, device time split into GEMM / Triton / copy / other for dpo_fast's methods;
- ``budget``: work left out because ``--budget-s`` ran out (nothing new starts after it);
- ``summary``: counts and the timing table (also printed at the end).

Cases, in order (most likely to break first): vocabulary slices with non-zero offsets (small workspace), fused
DPO groups (dW accumulated across groups), token stats (kernel rows and DPOLoss token metrics), softcap with
temperature and bias, float16, exact logits, N*V > 2^31 (GPU only). Timings in priority order at llama3-8b
(H 4096, V 128256, 8 x 2048 tokens, 25% prompt, bf16): naive, TRL's fused head (trl.kernels) with DPO on top,
Liger's LigerFusedLinearDPOLoss, Cut-Cross-Entropy, sequence_logprobs, no-grad, DPOLoss, GRPOLoss; then
qwen2.5-7b and gemma2-2b while the budget lasts.

CPU dry run (tests/cli/test_gpu_check.py): ``python benches/gpu_check.py --device cpu --quick --out DIR`` runs every
code path at tiny shapes on the torch backend, plus small float32 Triton cases in the interpreter
(TRITON_INTERPRET=1, set here before the kernels are imported).

Needs only APIs of Python 3.12 / torch 2.11 / triton 3.6 (the GPU image) and later.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

#: head shapes for the timings: (B sequences, T tokens, H, V); 25% of each sequence is prompt
SHAPES = {
    "llama3-8b": (8, 2048, 4096, 128256),
    "qwen2.5-7b": (8, 2048, 3584, 152064),
    "gemma2-2b": (8, 2048, 2304, 256000),
    "tiny": (2, 16, 32, 1000),
}

#: timing methods in priority order: name -> (package that must import, or None)
METHODS = {
    "naive": None,
    "trl_chunked_dpo": "trl.kernels",
    "liger_dpo": "liger_kernel.chunked_loss",
    "cce": "cut_cross_entropy",
    "sequence_logprobs": None,
    "sequence_logprobs_nograd": None,
    "DPOLoss": None,
    "GRPOLoss": None,
}


class Log:
    """JSON lines, flushed (and fsynced) one by one; every record also printed."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "a", buffering=1)
        self.records: list[dict] = []

    def write(self, rec: dict) -> dict:
        rec = {"t": round(time.time(), 3), **rec}
        line = json.dumps(rec, default=str)
        self.f.write(line + "\n")
        self.f.flush()
        try:
            os.fsync(self.f.fileno())
        except OSError:
            pass
        self.records.append(rec)
        print(line, flush=True)
        return rec


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def over(self) -> bool:
        return self.left() <= 0


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rel(a, r) -> float:
    a, r = a.detach().double(), r.detach().double()
    return ((a - r).abs().max() / r.abs().max().clamp_min(1.0)).item()


def _free(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# inputs and float64 references (inputs are made on the device)

def make_problem(B, T, H, V, dtype, device, seed, bias=False, prompt=0.25):
    """hidden (B, T, H), weight (V, H), bias (V,) or None, labels (B, T) with the first 25% prompt (-100)."""
    torch.manual_seed(seed)
    h = torch.randn(B, T, H, device=device, dtype=F32).to(dtype)
    w = (torch.randn(V, H, device=device, dtype=F32) / math.sqrt(H)).to(dtype)
    b = (torch.randn(V, device=device, dtype=F32) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T), device=device)
    labels[:, : int(T * prompt)] = -100
    return h, w, b, labels


def _zc(z, temperature, softcap):
    if softcap is not None:  # the model's cap first, then the sampling temperature
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def seq_logps_chunked(h, w, b, labels, temperature=1.0, softcap=None, upcast=F64):
    """Per-sequence log-prob sums, one sequence at a time (bounded memory), differentiable.

    ``upcast=F64``: the float64 reference. ``upcast=None``: plain PyTorch at the input precision (logits in the
    input dtype, then float32 log_softmax) — the error budget a 16-bit run is held to.
    """
    out = []
    for i in range(h.shape[0]):
        if upcast is None:
            z = h[i] @ w.t()
            if b is not None:
                z = z + b
            z = z.float()
        else:
            z = h[i].to(upcast) @ w.to(upcast).t()
            if b is not None:
                z = z + b.to(upcast)
        z = _zc(z, temperature, softcap)
        m = labels[i] != -100
        tok = torch.log_softmax(z, -1).gather(-1, labels[i].clamp_min(0)[:, None]).squeeze(-1)
        out.append((tok * m).sum())
    return torch.stack(out)


def _grads(fn, leaves, gout=None):
    """(value, grads) of fn(*leaves) with fresh leaf copies; ``gout`` weights a vector output."""
    xs = [None if x is None else x.detach().clone().requires_grad_() for x in leaves]
    y = fn(*xs)
    g = torch.autograd.grad(y if gout is None else (y * gout).sum(), [x for x in xs if x is not None])
    return y.detach(), list(g)


class Spy:
    """Counts calls of some functions/methods (and keeps their arguments) while active; restores them after."""

    def __init__(self, *targets):
        self.targets, self.calls, self._orig = targets, [], []

    def __enter__(self):
        for obj, attr in self.targets:
            orig = getattr(obj, attr)
            self._orig.append((obj, attr, orig))

            def wrapper(*a, _orig=orig, _attr=attr, **k):
                self.calls.append((_attr, a, k))
                return _orig(*a, **k)

            setattr(obj, attr, wrapper)
        return self

    def __exit__(self, *exc):
        for obj, attr, orig in reversed(self._orig):
            setattr(obj, attr, orig)
        return False


def _bwd_offsets(spy) -> list[int]:
    """v_offset of every RowOps.bwd call seen (the vocabulary slice each backward tile starts at)."""
    out = []
    for _, a, k in spy.calls:
        v = k.get("v_offset", a[6] if len(a) > 6 else None)
        out.append(int(v))
    return sorted(set(out))


def _verdict(rec, keys, tol):
    rec["ok"] = all(rec[f"err_{k}"] <= max(tol, 2 * rec[f"torch_err_{k}"] + 1e-7) for k in keys)
    return rec


def _compare_seq(name, dtype, device, backend, B, T, H, V, *, bias=False, temperature=1.0, softcap=None,
                 workspace=None, exact=False, seed=0):
    """sequence_logprobs (values, dh, dW, db) vs float64, and plain PyTorch at the input precision."""
    import dpo_fast

    h, w, b, labels = make_problem(B, T, H, V, dtype, device, seed, bias=bias)
    gout = torch.linspace(-1.0, 2.0, B, device=device)
    kw = dict(temperature=temperature, softcap=softcap)
    old_exact = dpo_fast.get_exact_logits()
    try:
        dpo_fast.set_workspace_bytes(workspace)
        dpo_fast.set_exact_logits(exact)
        t0 = time.perf_counter()
        from dpo_fast.engine import rows as rows_mod

        with Spy((rows_mod.TorchRows, "bwd"), (rows_mod.TritonRows, "bwd")) as spy:
            lp, g = _grads(lambda hh, ww, bb=None: dpo_fast.sequence_logprobs(hh, ww, labels, bias=bb,
                                                                              backend=backend, **kw), [h, w, b], gout)
        _sync(device)
        secs = time.perf_counter() - t0
    finally:
        dpo_fast.set_workspace_bytes(None)
        dpo_fast.set_exact_logits(old_exact)
    ref, rg = _grads(lambda hh, ww, bb=None: seq_logps_chunked(hh, ww, bb, labels, upcast=F64, **kw),
                     [h, w, b], gout.double())
    base, bg = _grads(lambda hh, ww, bb=None: seq_logps_chunked(hh, ww, bb, labels, upcast=None, **kw),
                      [h, w, b], gout)
    names = ["dh", "dw"] + (["db"] if bias else [])
    rec = dict(kind="check", case=name, dtype=str(dtype), backend=backend, shape=[B, T, H, V], bias=bias,
               temperature=temperature, softcap=softcap, workspace_bytes=workspace, exact_logits=exact,
               seconds=round(secs, 4), bwd_tiles=len(spy.calls), bwd_slice_offsets=_bwd_offsets(spy)[:64],
               err_logps=_rel(lp, ref), torch_err_logps=_rel(base, ref))
    for n_, a, r, p in zip(names, g, rg, bg):
        rec[f"err_{n_}"], rec[f"torch_err_{n_}"] = _rel(a, r), _rel(p, r)
    rec["finite"] = bool(all(torch.isfinite(x).all() for x in g))
    _verdict(rec, ["logps"] + names, 1e-5 if dtype == F32 else 1e-2)
    rec["ok"] = rec["ok"] and rec["finite"]
    if name == "vocab_slices":  # the point of the case: several slices, non-zero offsets
        rec["ok"] = rec["ok"] and len(rec["bwd_slice_offsets"]) >= 2
    return rec


# --------------------------------------------------------------------------------------------------------------
# correctness cases: name -> fn(ctx) -> record (ctx: device, backend, quick, dtype)

def case_vocab_slices(c):
    """A workspace that holds all scored tokens x ~V/4 columns: the backward walks several vocabulary slices
    with non-zero offsets (the engine slices at >= 1024 columns, so V > 4096 even in the dry run)."""
    from dpo_fast.engine import make_rows, per_elem_bytes

    B, T, H, V = (2, 12, 24, 4099) if c["quick"] else (4, 512, 2048, 128256)
    n = B * (T - int(T * 0.25))
    try:
        per = per_elem_bytes(make_rows(c["backend"], torch.device(c["device"]), c["dtype"], 1.0, None), c["dtype"],
                             grad=True)
    except Exception:
        per = 8
    ws = max(1024, n * per * max(1152, V // 4))
    return _compare_seq("vocab_slices", c["dtype"], c["device"], c["backend"], B, T, H, V, workspace=ws, seed=1)


def case_fused_groups(c):
    """DPOLoss on the fused route with a workspace of about one pair: several groups, dW accumulated."""
    import dpo_fast

    device, dtype, backend = c["device"], c["dtype"], c["backend"]
    P, T, H, V = (2, 10, 16, 301) if c["quick"] else (4, 512, 2048, 128256)
    h, w, _, labels = make_problem(2 * P, T, H, V, dtype, device, seed=2)
    rc = torch.randn(P, device=device) - 50
    rr = torch.randn(P, device=device) - 50
    ws = 3 * T * V * 4  # about one pair's logits (plus row temporaries)
    mod = dpo_fast.DPOLoss(beta=0.1, backend=backend, workspace_bytes=ws, compute_metrics=False)
    route = {}

    def ours(hh, ww):
        o = mod(hh, ww, labels, rc, rr)
        route["route"] = o.route
        return o.loss

    def dpo_ref(upcast):
        def f(hh, ww):
            lp = seq_logps_chunked(hh, ww, None, labels, upcast=upcast)
            m = (lp[:P] - rc) - (lp[P:] - rr)
            return -torch.nn.functional.logsigmoid(0.1 * m).mean()
        return f

    from dpo_fast.fused import logits_pass as pass_mod

    with Spy((pass_mod, "group_values")) as spy:
        loss, g = _grads(ours, [h, w])
    ref, rg = _grads(dpo_ref(F64), [h, w])
    base, bg = _grads(dpo_ref(None), [h, w])
    rec = dict(kind="check", case="fused_groups", dtype=str(dtype), backend=backend, shape=[2 * P, T, H, V],
               workspace_bytes=ws, route=route.get("route"), groups=len(spy.calls), err_loss=_rel(loss, ref), torch_err_loss=_rel(base, ref),
               err_dh=_rel(g[0], rg[0]), torch_err_dh=_rel(bg[0], rg[0]), err_dw=_rel(g[1], rg[1]),
               torch_err_dw=_rel(bg[1], rg[1]))
    _verdict(rec, ["loss", "dh", "dw"], 1e-2)
    rec["ok"] = rec["ok"] and rec["route"] == "fused" and rec["groups"] >= 2
    return rec


def case_token_stats(c):
    """Row kernels' token stats (entropy, hit, vocab-mean, lse(2z)) on a tile with softcap + temperature, and
    DPOLoss's token metrics (entropy sum), against float64."""
    import dpo_fast
    from dpo_fast.engine import make_rows

    device, dtype, backend = c["device"], c["dtype"], c["backend"]
    n, V = (7, 1001) if c["quick"] else (256, 128256)
    torch.manual_seed(3)
    z = (torch.randn(n, V, device=device) * 4).to(dtype)
    y = torch.randint(0, V, (n,), device=device)
    y[0] = z[0].float().argmax()  # at least one top-1 hit
    T_, cap = 0.7, 30.0
    rows = make_rows(backend, torch.device(device), dtype, T_, cap)
    r = rows.fwd(z.clone(), y, scratch=False, stats=True)
    zc = _zc(z.double(), T_, cap)
    lse = torch.logsumexp(zc, 1)
    p = torch.softmax(zc, 1)
    zy = zc.gather(1, y[:, None]).squeeze(1)
    ref = dict(logp=zy - lse, lse=lse, entropy=lse - (p * zc).sum(1), zmean=zc.mean(1),
               lse2=torch.logsumexp(2 * zc, 1))
    got = dict(logp=r.logp, lse=r.lse, entropy=r.stats.entropy, zmean=r.stats.zmean, lse2=r.stats.lse2)
    rec = dict(kind="check", case="token_stats", dtype=str(dtype), backend=backend, shape=[n, V], rows=rows.name,
               temperature=T_, softcap=cap)
    for k in ref:  # the tile is given (no GEMM rounding): the kernels' own float32 error
        rec[f"err_{k}"] = ((got[k].double() - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1.0)).item()
    hit_ref = (zy >= zc.amax(1)).double()
    rec["hit_mismatches"] = int((r.stats.hit.double() != hit_ref).sum().item())
    ok = all(rec[f"err_{k}"] <= 2e-5 for k in ref) and rec["hit_mismatches"] == 0
    # DPOLoss token metrics: entropy sum over scored tokens vs float64
    P, T, H, V2 = (2, 10, 16, 301) if c["quick"] else (2, 512, 2048, 128256)
    h, w, _, labels = make_problem(2 * P, T, H, V2, dtype, device, seed=4)
    o = dpo_fast.DPOLoss(beta=0.1, backend=backend, token_metrics=True)(h, w, labels, torch.zeros(P, device=device),
                                                                       torch.zeros(P, device=device))
    ent = 0.0
    ent_base = 0.0
    for i in range(2 * P):
        m = labels[i] != -100
        z64 = h[i][m].double() @ w.double().t()
        zb = (h[i][m] @ w.t()).float()
        for zz, acc in ((z64, "r"), (zb, "b")):
            lz = torch.log_softmax(zz, -1)
            e = -(lz.exp() * lz).sum().item()
            if acc == "r":
                ent += e
            else:
                ent_base += e
    got_ent = float(o.token_sums["entropy_sum"])
    rec.update(entropy_sum=got_ent, entropy_sum_ref=ent, err_entropy_sum=abs(got_ent - ent) / max(1.0, abs(ent)),
               torch_err_entropy_sum=abs(ent_base - ent) / max(1.0, abs(ent)), route=o.route)
    rec["ok"] = ok and rec["err_entropy_sum"] <= max(1e-2 if dtype != F32 else 1e-5,
                                                     2 * rec["torch_err_entropy_sum"] + 1e-7)
    return rec


def case_softcap_temperature_bias(c):
    B, T, H, V = (2, 12, 24, 997) if c["quick"] else (2, 512, 2304, 256000)
    return _compare_seq("softcap_temperature_bias", c["dtype"], c["device"], c["backend"], B, T, H, V, bias=True,
                        temperature=0.7, softcap=30.0, seed=5)


def case_fp16(c):
    B, T, H, V = (2, 12, 24, 1001) if c["quick"] else (4, 512, 2048, 128256)
    return _compare_seq("fp16", F16, c["device"], c["backend"], B, T, H, V, seed=6)


def case_exact_logits(c):
    B, T, H, V = (2, 12, 24, 1001) if c["quick"] else (4, 512, 2048, 128256)
    return _compare_seq("exact_logits", c["dtype"], c["device"], c["backend"], B, T, H, V, exact=True, seed=7)


def case_large_nv(c):
    """N * V > 2^31: logprobs_from_logits on (N, V) bf16 logits (row offsets past 2^31), values and gradient, and
    token_logprobs from hidden states (the engine's tiles), values, dh and dW, against float64 in row chunks."""
    import dpo_fast

    if torch.device(c["device"]).type != "cuda":
        return dict(kind="check", case="large_nv", ok=True, skipped="GPU only (N*V > 2^31 elements)")
    device, dtype = c["device"], c["dtype"]
    V = 128256
    N = (1 << 31) // V + 1024  # 17768 rows: 2.28e9 elements
    torch.manual_seed(8)
    logits = (torch.randn(N, V, device=device, dtype=F32) * 2).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    out = dpo_fast.logprobs_from_logits(logits, y, reduction="none")
    (dz,) = torch.autograd.grad((out * g).sum(), logits)
    e_val = e_grad = 0.0
    for s in range(0, N, 2048):
        z = logits[s:s + 2048].detach().double()
        ls = torch.log_softmax(z, -1)
        ref = ls.gather(1, y[s:s + 2048, None]).squeeze(1)
        e_val = max(e_val, (out[s:s + 2048].double() - ref).abs().max().item())
        gr = -ls.exp() * g[s:s + 2048, None].double()
        gr.scatter_add_(1, y[s:s + 2048, None], g[s:s + 2048, None].double())
        e_grad = max(e_grad, ((dz[s:s + 2048].double() - gr).abs().max() / gr.abs().max().clamp_min(1e-30)).item())
        del z, ls, gr
    del logits, dz
    _free(device)
    rec = dict(kind="check", case="large_nv", dtype=str(dtype), N=N, V=V, elements=N * V,
               err_logits_logps=e_val, err_logits_grad=e_grad)
    # from hidden states: the engine's tiles over the same N x V
    H = 1024
    h = torch.randn(N, H, device=device, dtype=F32).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device, dtype=F32) / math.sqrt(H)).to(dtype).requires_grad_()
    tok = dpo_fast.token_logprobs(h, w, y)
    dh, dw = torch.autograd.grad((tok * g).sum(), (h, w))
    w64 = w.detach().double()
    dw64 = torch.zeros_like(w64)
    e_tok = e_dh = 0.0
    for s in range(0, N, 2048):
        h64 = h[s:s + 2048].detach().double()
        ls = torch.log_softmax(h64 @ w64.t(), -1)
        e_tok = max(e_tok, (tok[s:s + 2048].double() - ls.gather(1, y[s:s + 2048, None]).squeeze(1)).abs().max().item())
        dzc = -ls.exp() * g[s:s + 2048, None].double()
        dzc.scatter_add_(1, y[s:s + 2048, None], g[s:s + 2048, None].double())
        rdh = dzc @ w64
        e_dh = max(e_dh, _rel(dh[s:s + 2048], rdh))
        dw64 += dzc.t() @ h64
        del h64, ls, dzc, rdh
    rec.update(err_hidden_logps=e_tok, err_dh=e_dh, err_dw=_rel(dw, dw64))
    rec["ok"] = e_val <= 2e-2 and e_grad <= 2e-2 and e_tok <= 5e-2 and e_dh <= 2e-2 and rec["err_dw"] <= 2e-2
    del h, w, w64, dw64, dh, dw
    _free(device)
    return rec


CASES = {
    "vocab_slices": case_vocab_slices,
    "fused_groups": case_fused_groups,
    "token_stats": case_token_stats,
    "softcap_temperature_bias": case_softcap_temperature_bias,
    "fp16": case_fp16,
    "exact_logits": case_exact_logits,
    "large_nv": case_large_nv,
}
#: cases also run on the Triton backend in the CPU interpreter (float32: the interpreter mishandles bfloat16)
INTERPRETED_CASES = ("vocab_slices", "token_stats", "softcap_temperature_bias")


def record_gemm_path(log, device):
    from dpo_fast import engine

    rec = dict(kind="gemm_path", device=str(device))
    fn = getattr(engine, "gemm_path", None)
    if fn is None:
        try:
            from dpo_fast.engine import tiles

            fn = getattr(tiles, "gemm_path", None)
        except Exception:  # pragma: no cover
            fn = None
    try:
        if fn is not None:
            rec["gemm_path"] = {str(dt): fn(device, dt) for dt in (BF16, F16)}
        rec["epilogue_probes"] = engine.epilogue_probe_results()
        rec["source"] = "engine.gemm_path" if fn is not None else "engine.epilogue_probe_results (no gemm_path)"
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    log.write(rec)


# --------------------------------------------------------------------------------------------------------------
# timings

def _dpo_from_logps(lp, P, ref):
    m = (lp[:P] - ref[0]) - (lp[P:] - ref[1])
    return -torch.nn.functional.logsigmoid(0.1 * m).mean()


def make_method(name, h, w, labels, ref, device):
    """A zero-argument callable running one step (forward + backward unless no-grad) of ``name``."""
    import dpo_fast

    B, T, H = h.shape
    P = B // 2
    mask = labels != -100

    def backward(loss):
        loss.backward()

    if name == "naive":
        def step():
            z = h @ w.t()
            lp = torch.log_softmax(z.float(), -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
            backward(_dpo_from_logps((lp * mask).sum(-1), P, ref))
        return step
    if name == "trl_chunked_dpo":
        from trl.kernels import ChunkedLogProbFunction

        flat_mask = mask.reshape(-1)
        idx = flat_mask.nonzero().squeeze(1)
        seq = torch.arange(B, device=h.device).repeat_interleave(T)[idx]
        yv = labels.reshape(-1)[idx]

        def step():
            hv = h.reshape(-1, H)[idx]  # TRL scores only the valid positions ("compact")
            tok = ChunkedLogProbFunction.apply(hv, w, None, yv, 1.0, 32768, None, 1.0, ())[0]
            lp = torch.zeros(B, device=h.device, dtype=tok.dtype).index_add(0, seq, tok)
            backward(_dpo_from_logps(lp.float(), P, ref))
        return step
    if name == "liger_dpo":
        import inspect

        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        kw = dict(beta=0.1, compute_nll_loss=False)
        if "use_ref_model" in inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters:
            kw["use_ref_model"] = False
        mod = LigerFusedLinearDPOLoss(**kw)
        params = inspect.signature(mod.forward).parameters
        extra = {"ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]} if "ref_chosen_logps" in params else {}

        def step():
            out = mod(w, h, labels, **extra)
            backward(out[0] if isinstance(out, tuple) else out)
        return step
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def step():
            tok = -linear_cross_entropy(h, w, labels, reduction="none", shift=False)
            backward(_dpo_from_logps(tok.float().sum(-1), P, ref))
        return step
    if name == "sequence_logprobs":
        def step():
            backward(_dpo_from_logps(dpo_fast.sequence_logprobs(h, w, labels), P, ref))
        return step
    if name == "sequence_logprobs_nograd":
        def step():
            with torch.no_grad():
                dpo_fast.sequence_logprobs(h, w, labels)
        return step
    if name == "DPOLoss":
        mod = dpo_fast.DPOLoss(beta=0.1, compute_metrics=False)

        def step():
            backward(mod(h, w, labels, ref[0], ref[1]).loss)
        return step
    if name == "GRPOLoss":
        mod = dpo_fast.GRPOLoss(loss_type="dapo")
        adv = torch.randn(B, device=h.device)

        def step():
            backward(mod(h, w, labels, adv).loss)
        return step
    raise KeyError(name)


def _importable(mod: str) -> str | None:
    import importlib

    try:
        importlib.import_module(mod)
        return None
    except Exception as e:
        return f"{mod} not importable ({type(e).__name__}: {e})"[:300]


def time_method(name, shape, device, dtype, reps, log):
    B, T, H, V = SHAPES[shape]
    need = METHODS[name]
    why = _importable(need) if need else None
    if why:
        return log.write(dict(kind="time", shape=shape, method=name, skipped=why))
    if name in ("liger_dpo", "cce") and torch.device(device).type != "cuda":
        return log.write(dict(kind="time", shape=shape, method=name, skipped="needs CUDA"))
    h, w, _, labels = make_problem(B, T, H, V, dtype, device, seed=11)
    h.requires_grad_()
    w.requires_grad_()
    ref = (torch.randn(B // 2, device=device) - 50, torch.randn(B // 2, device=device) - 50)
    cuda = torch.device(device).type == "cuda"
    rec = dict(kind="time", shape=shape, method=name, dtype=str(dtype), tokens=B * T, H=H, V=V, reps=reps)
    try:
        step = make_method(name, h, w, labels, ref, device)
        step()  # warm-up (compiles, probes, autotunes)
        _sync(device)
        h.grad = w.grad = None
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms = []
        for _ in range(reps):
            h.grad = w.grad = None
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            ms.append((time.perf_counter() - t0) * 1e3)
        rec.update(ms=[round(x, 3) for x in ms], ms_median=round(sorted(ms)[len(ms) // 2], 3))
        if cuda:
            rec["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        rec["step"] = step
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:1000]
    step_fn = rec.pop("step", None)
    log.write(rec)
    return rec, step_fn, (h, w)


def profile_split(name, shape, step, leaves, device, log):
    """One step under torch.profiler: device time of GEMM, Triton, copy and other kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for x in leaves:
        x.grad = None
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    split = {"gemm": 0.0, "triton": 0.0, "copy": 0.0, "other": 0.0}
    top = []
    for ev in prof.key_averages():
        n = ev.key
        if cuda:
            us = getattr(ev, "self_device_time_total", None)
            if us is None:
                us = getattr(ev, "self_cuda_time_total", 0.0)
            if not us or n.startswith(("aten::", "cuda")):  # kernels only, not ops or runtime calls
                continue
        else:
            if not n.startswith("aten::"):
                continue
            us = ev.self_cpu_time_total
        low = n.lower()
        if any(k in low for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm",
                                  "aten::bmm", "aten::matmul", "sm80_", "sm90_", "sm100_")):
            cat = "gemm"
        elif "_logprob" in low or "triton" in low:
            cat = "triton"
        elif any(k in low for k in ("copy", "memcpy", "memset", "fill", "cat", "index", "to_copy", "gather",
                                    "scatter")):
            cat = "copy"
        else:
            cat = "other"
        split[cat] += us / 1e3
        top.append((us / 1e3, cat, n[:80]))
    top.sort(reverse=True)
    log.write(dict(kind="profile", shape=shape, method=name, clock="device" if cuda else "cpu (aten ops)",
                   ms={k: round(v, 3) for k, v in split.items()},
                   top=[dict(ms=round(a, 3), cat=b, name=c) for a, b, c in top[:12]]))


# --------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the CPU dry run)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output folder")
    p.add_argument("--budget-s", type=float, default=360.0, help="start no new work after this many seconds")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    if not cuda:  # small Triton cases run in the interpreter; must be set before the kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.makedirs(a.out, exist_ok=True)
    log = Log(os.path.join(a.out, "gpu_check.jsonl"))
    budget = Budget(a.budget_s)

    import dpo_fast

    env = dict(kind="env", python=platform.python_version(), torch=torch.__version__, device=device,
               quick=a.quick, budget_s=a.budget_s, dpo_fast=getattr(dpo_fast, "__version__", "?"),
               dpo_fast_path=os.path.dirname(dpo_fast.__file__), argv=sys.argv[1:])
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"not importable: {e}"
    try:
        from dpo_fast import _native  # noqa: F401

        env["native"] = True
    except Exception as e:
        env["native"] = f"not importable ({type(e).__name__}); not needed here"
    if cuda:
        env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   cuda=torch.version.cuda)
    backend = "triton" if cuda else "torch"
    env["backend"] = backend
    log.write(env)

    shapes = ["tiny"] if a.quick else ["llama3-8b", "qwen2.5-7b", "gemma2-2b"]
    runs = [(name, backend, BF16) for name in CASES]
    if not cuda:
        runs += [(name, "triton", F32) for name in INTERPRETED_CASES]
    log.write(dict(kind="plan", cases=[f"{n}/{b}" for n, b, _ in runs], methods=list(METHODS), shapes=shapes))

    # 1. correctness
    for name, be, dt in runs:
        if budget.over():
            log.write(dict(kind="budget", skipped=f"check {name}/{be}"))
            continue
        t0 = time.perf_counter()
        try:
            rec = CASES[name](dict(device=device, backend=be, quick=a.quick, dtype=dt))
            rec.setdefault("kind", "check")
            rec.setdefault("case", name)
            rec["backend"] = be
        except Exception as e:
            rec = dict(kind="check", case=name, backend=be, ok=False, error=f"{type(e).__name__}: {e}"[:1000],
                       traceback=traceback.format_exc()[-3000:])
        rec["wall_s"] = round(time.perf_counter() - t0, 3)
        log.write(rec)
        _free(device)
    record_gemm_path(log, device)

    # 2. timings, in priority order; the profiler split at the first shape
    for si, shape in enumerate(shapes):
        for name in METHODS:
            if budget.over():
                log.write(dict(kind="budget", skipped=f"time {shape}/{name}"))
                continue
            res = time_method(name, shape, device, BF16, a.reps, log)
            if isinstance(res, tuple):
                rec, step, leaves = res
                if si == 0 and step is not None and name in ("sequence_logprobs", "DPOLoss", "naive") \
                        and not budget.over():
                    try:
                        profile_split(name, shape, step, leaves, device, log)
                    except Exception as e:
                        log.write(dict(kind="profile", shape=shape, method=name, error=f"{type(e).__name__}: {e}"))
                del res, step, leaves
            _free(device)

    # 3. summary
    checks = [r for r in log.records if r["kind"] == "check"]
    times = [r for r in log.records if r["kind"] == "time"]
    summary = dict(kind="summary", wall_s=round(time.perf_counter() - budget.t0, 1),
                   checks_ok=sum(bool(r.get("ok")) for r in checks), checks=len(checks),
                   failed=[f"{r['case']}/{r.get('backend')}" for r in checks if not r.get("ok")],
                   timed=sum("ms" in r for r in times),
                   skipped=[f"{r['shape']}/{r['method']}" for r in times if "skipped" in r],
                   errors=[f"{r['shape']}/{r['method']}" for r in times if "error" in r],
                   budget_cut=sum(r["kind"] == "budget" for r in log.records))
    log.write(summary)
    print("\n== gpu_check summary ==")
    print(f"correctness: {summary['checks_ok']}/{summary['checks']} ok"
          + (f"; FAILED: {', '.join(summary['failed'])}" if summary["failed"] else ""))
    print(f"{'shape':<12} {'method':<26} {'ms (median)':>12} {'peak MiB':>10}")
    for r in times:
        val = r.get("ms_median", "skipped" if "skipped" in r else "error")
        print(f"{r['shape']:<12} {r['method']:<26} {val!s:>12} {r.get('peak_mib', '-')!s:>10}")
    if summary["budget_cut"]:
        print(f"budget: {summary['budget_cut']} items not started (--budget-s {a.budget_s})")
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
