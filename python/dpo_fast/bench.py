"""Benchmarks of the log-prob engine (and, when present, the fused DPO loss) against the usual ways.

Methods (forward + backward, gradients to hidden and weight, unless marked no-grad):

* ``naive``      — HF/TRL's plain path: logits = h W^T (B, T, V) -> float32 log_softmax -> gather ->
                   masked sum.
* ``trl_rowloop``— TRL's ``selective_log_softmax`` idea: logits materialised, log_softmax one row at a
                   time to avoid a second (B, T, V) float32 tensor.
* ``dpo_fast``   — :func:`dpo_fast.sequence_logprobs` (Triton on CUDA, chunked torch on CPU).
* ``dpo_fast_nograd`` — the same, forward only under ``torch.no_grad`` (reference log-probs).
* ``liger``, ``cce`` — Liger-Kernel's fused linear cross-entropy and Cut-Cross-Entropy with per-token
                   losses summed per sequence, when installed and on CUDA.
* DPO task (sigmoid DPO from hidden states): ``dpo_naive``, ``dpo_fast_twopass``, ``dpo_fast_fused``,
  ``liger_dpo`` (Liger's LigerFusedLinearDPOLoss, when installed); SimPO task: ``simpo_naive`` /
  ``simpo_fused`` (CPOLoss); GRPO task (DAPO aggregation): ``grpo_naive`` / ``grpo_fused`` (GRPOLoss).

Timing: CUDA events on CUDA, wall clock on CPU; ``reps`` timed steps after warm-up. Every method reports the
minimum over the reps (``ms``, also ``ms_min``: the headline, and what every "x naive" ratio uses, since load
only ever adds time) and the spread (``ms_median``, ``ms_max``, every rep in ``ms_reps``). Memory: peak bytes
above the inputs — ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the growth of the peak resident set
of a fresh process per method (so one method's high-water mark never hides another's), with glibc's mmap
threshold at 64 KiB so that freed blocks leave the resident set (repeatable to ~0.1 MiB). Results are printed as a
table and written as JSON and a PNG plot.

Load: times taken while other processes hold the cores are not the method's (one 2-core machine gave dpo_fast
2.79x naive's time under load, 0.84x idle). The run is judged by :func:`load_verdict`, a pure function of the
readings, and the verdict is printed under the table (a WARNING line when loaded) and written as the ``load``
record of results.json (load averages, cores, ratio, the readings, ``loaded`` and the rule). The rule — the
machine counts as loaded when any of these holds:

* run-queue wait: summed over the timed reps of every method, the process's threads spent at least
  ``RUNQ_WAIT_LIMIT`` (0.25) s per wall second runnable but waiting for a core (Linux
  ``/proc/self/task/*/schedstat``; the direct sign that something else is taking the cores);
* CPU time (CPU runs only): the process used less than ``CPU_PER_WALL_LIMIT`` (0.5) s of CPU time per wall second
  of the timed reps (a compute loop, even a serial one, keeps at least one core busy unless it is preempted);
* load average, only when neither reading above exists (no schedstat, and a CUDA run): the 1-minute load average
  sampled before the first method is at least ``LOAD_RATIO_LIMIT`` (0.5) per core of ``os.cpu_count()`` (it lags
  by a minute and counts a run that just ended, so the in-run readings take precedence when present).

The two in-run readings are judged only over at least ``MIN_WINDOW_S`` (0.2) s of timed reps. A GPU shared with
other processes is not detected.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

# name: (B rows, T positions, H hidden, V vocab). B counts sequences (chosen + rejected).
SHAPES = {
    "llama3-8b": (8, 2048, 4096, 128256),
    "qwen2.5-7b": (8, 1024, 3584, 152064),
    "gemma2-2b": (8, 1024, 2304, 256000),
    "cpu-small": (4, 512, 256, 32000),
    "tiny": (2, 32, 32, 1000),
}
PROMPT_FRACTION = 0.25


@dataclass
class Result:
    method: str
    shape: str
    device: str
    dtype: str
    ms: float | None = None  # the minimum over the timed reps (the same as ms_min)
    peak_bytes: int | None = None
    ms_min: float | None = None
    ms_median: float | None = None
    ms_max: float | None = None
    ms_reps: list = field(default_factory=list)
    max_abs_diff_vs_naive: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# inputs


def make_inputs(shape: str, device: str, dtype: torch.dtype, peaked: bool = False, seed: int = 0):
    """hidden (B, T, H), weight (V, H), labels (B, T) with the first 25% of each row as prompt (-100)."""
    B, T, H, V = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : int(T * PROMPT_FRACTION)] = -100
    w = torch.randn(V, H, generator=g) / math.sqrt(H)
    h = torch.randn(B, T, H, generator=g)
    if peaked:
        # LM-like: the label's logit stands ~12 nats above the rest (rows of w have norm ~1), so the
        # softmax is nearly one-hot, as in a trained model, instead of nearly uniform
        tgt = w[labels.clamp_min(0)]  # (B, T, H)
        h = 0.5 * h + 12.0 * tgt / tgt.square().sum(-1, keepdim=True).clamp_min(1e-6)
    return h.to(device, dtype), w.to(device, dtype), labels.to(device)


def make_reference(h, w, labels):
    """(P,) reference log-probs for the DPO methods: a uniform model's, -|y| log V, with 1% noise.

    Computed without touching the logits, so that no high-water mark of memory is left before a measurement.
    """
    V = w.shape[0]
    n = (labels != -100).sum(-1).float().cpu()  # (B,)
    g = torch.Generator(device="cpu").manual_seed(1)
    lp = -n * math.log(V) * (1 + 0.01 * torch.randn(n.shape, generator=g))
    P = lp.shape[0] // 2
    return lp[:P].to(h.device), lp[P:].to(h.device)


# ----------------------------------------------------------------------------------------------------------
# methods: each takes (h, w, labels, ref) and returns what is backpropagated: (B,) float32 sequence log-probs
# for the log-prob methods, the scalar loss for the DPO ones (ref = (ref_chosen, ref_rejected), (P,) each)


def _naive(h, w, labels, ref=None):
    logits = h @ w.t()  # (B, T, V) in the input dtype
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V) float32
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def _trl_rowloop(h, w, labels, ref=None):
    logits = h @ w.t()  # (B, T, V)
    mask = labels != -100
    safe = labels.clamp_min(0)
    rows = []
    for row_logits, row_labels in zip(logits, safe):  # one (T, V) float32 log_softmax at a time
        rows.append(torch.log_softmax(row_logits.float(), dim=-1).gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return (torch.stack(rows) * mask).sum(-1)


def _ours(h, w, labels, ref=None):
    import dpo_fast

    return dpo_fast.sequence_logprobs(h, w, labels)


def _liger(h, w, labels, ref=None):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    B, T, H = h.shape
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=-100)
    tok = -loss(w, h.reshape(-1, H), labels.reshape(-1))
    return tok.float().view(B, T).sum(-1)


def _cce(h, w, labels, ref=None):
    from cut_cross_entropy import linear_cross_entropy

    tok = -linear_cross_entropy(h, w, labels, reduction="none", shift=False)
    return tok.float().sum(-1)


def _dpo_from_logps(logps, ref, beta=0.1):
    P = logps.shape[0] // 2
    margin = (logps[:P] - ref[0]) - (logps[P:] - ref[1])
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


def _dpo_naive(h, w, labels, ref):
    return _dpo_from_logps(_naive(h, w, labels), ref)


def _dpo_twopass(h, w, labels, ref):
    import dpo_fast

    return dpo_fast.dpo_loss(*_ours(h, w, labels).chunk(2), *ref, beta=0.1, compute_metrics=False).loss


_MODULES: dict = {}  # loss modules built once per process, keyed by method


def _dpo_fused(h, w, labels, ref):
    import dpo_fast

    key = "fused"
    if key not in _MODULES:
        _MODULES[key] = dpo_fast.DPOLoss(beta=0.1, compute_metrics=False)
    return _MODULES[key](h, w, labels, *ref).loss


def _dpo_liger(h, w, labels, ref):
    import inspect

    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    if "liger" not in _MODULES:
        kw = dict(beta=0.1, compute_nll_loss=False)
        if "use_ref_model" in inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters:
            kw["use_ref_model"] = False
        _MODULES["liger"] = LigerFusedLinearDPOLoss(**kw)
    mod = _MODULES["liger"]
    params = inspect.signature(mod.forward).parameters
    extra = {"ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]} if "ref_chosen_logps" in params else {}
    out = mod(w, h, labels, **extra)
    return out[0] if isinstance(out, tuple) else out


def _token_naive(h, w, labels):
    logp = torch.log_softmax((h @ w.t()).float(), dim=-1)  # (B, T, V) float32
    return logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != -100)


def _advantages(labels):
    g = torch.Generator(device="cpu").manual_seed(2)
    return torch.randn(labels.shape[0], generator=g).to(labels.device)


def _grpo_naive(h, w, labels, ref):
    import dpo_fast

    return dpo_fast.grpo_loss(_token_naive(h, w, labels), _advantages(labels), labels != -100, loss_type="dapo",
                              compute_metrics=False).loss


def _grpo_fused(h, w, labels, ref):
    import dpo_fast

    if "grpo" not in _MODULES:
        _MODULES["grpo"] = dpo_fast.GRPOLoss(loss_type="dapo", compute_metrics=False)
    return _MODULES["grpo"](h, w, labels, _advantages(labels)).loss


def _simpo_from_logps(logps, labels):
    import dpo_fast

    P = logps.shape[0] // 2
    n = (labels != -100).sum(-1)
    return dpo_fast.cpo_loss(logps[:P], logps[P:], beta=2.0, loss_type="simpo", cpo_alpha=0.0,
                             chosen_lengths=n[:P], rejected_lengths=n[P:], compute_metrics=False).loss


def _simpo_naive(h, w, labels, ref):
    return _simpo_from_logps(_naive(h, w, labels), labels)


def _simpo_fused(h, w, labels, ref):
    import dpo_fast

    if "simpo" not in _MODULES:
        _MODULES["simpo"] = dpo_fast.CPOLoss(beta=2.0, loss_type="simpo", cpo_alpha=0.0, compute_metrics=False)
    return _MODULES["simpo"](h, w, labels).loss


METHODS = {
    # log-prob engine (task "logprobs")
    "naive": (_naive, True, "logprobs"),
    "trl_rowloop": (_trl_rowloop, True, "logprobs"),
    "dpo_fast": (_ours, True, "logprobs"),
    "dpo_fast_nograd": (_ours, False, "logprobs"),
    "liger": (_liger, True, "logprobs"),
    "cce": (_cce, True, "logprobs"),
    # sigmoid DPO loss from hidden states (task "dpo")
    "dpo_naive": (_dpo_naive, True, "dpo"),
    "dpo_fast_twopass": (_dpo_twopass, True, "dpo"),
    "dpo_fast_fused": (_dpo_fused, True, "dpo"),
    "liger_dpo": (_dpo_liger, True, "dpo"),
    # reference-free SimPO (task "simpo") and GRPO/DAPO (task "grpo") from hidden states
    "simpo_naive": (_simpo_naive, True, "simpo"),
    "simpo_fused": (_simpo_fused, True, "simpo"),
    "grpo_naive": (_grpo_naive, True, "grpo"),
    "grpo_fused": (_grpo_fused, True, "grpo"),
}
BASELINE = {"logprobs": "naive", "dpo": "dpo_naive", "simpo": "simpo_naive", "grpo": "grpo_naive"}


def _available(method: str, device: str) -> str | None:
    """None if the method can run, else the reason it is left out."""
    if method in ("liger", "liger_dpo"):
        if device != "cuda":
            return "CUDA only"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
    if method == "cce":
        if device != "cuda":
            return "CUDA only"
        try:
            import cut_cross_entropy  # noqa: F401
        except ImportError:
            return "cut-cross-entropy not installed"
    return None


# ----------------------------------------------------------------------------------------------------------
# measuring one method


def _step(fn, grad: bool, h, w, labels, ref):
    if grad:
        hh = h.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        out = fn(hh, ww, labels, ref)
        out.sum().backward()
        return out.detach().reshape(-1)
    with torch.no_grad():
        return fn(h, w, labels, ref).reshape(-1)


def measure(method: str, shape: str, device: str, dtype: torch.dtype, reps: int, peaked: bool = False) -> dict:
    """Time and peak memory of one method in this process. Returns {"ms", "peak_bytes", "out"}.

    CUDA: peak of ``max_memory_allocated`` above the inputs over the timed steps. CPU: call it in a fresh
    process (see :func:`_measure_cpu_subprocess`): the peak resident set above the inputs, including the
    first full-size step.
    """
    import resource

    fn, grad, _ = METHODS[method]
    h, w, labels = make_inputs(shape, device, dtype, peaked)
    ref = make_reference(h, w, labels)
    if device == "cuda":
        torch.cuda.synchronize()
        out = _step(fn, grad, h, w, labels, ref)  # warm-up (Triton compile, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # load BLAS and warm the allocator on a tiny slice, then take the baseline: ru_maxrss is a high-water
        # mark, so nothing before the first full-size step may allocate more than the inputs
        small = labels[:, :8].contiguous()
        small = torch.where(small >= 0, small % 64, small)
        _step(fn, grad, h[:, :8].contiguous(), w[:64].contiguous(), small, ref)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = _step(fn, grad, h, w, labels, ref)
    times = []
    cpu0, wall0, wait0 = time.process_time(), time.perf_counter(), runq_wait_s()
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = _step(fn, grad, h, w, labels, ref)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = _step(fn, grad, h, w, labels, ref)
            times.append((time.perf_counter() - t0) * 1e3)
    cpu1, wall1, wait1 = time.process_time(), time.perf_counter(), runq_wait_s()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"ms_reps": times, "peak_bytes": int(peak), "out": out.float().cpu().tolist(),
            "wall_s": wall1 - wall0, "cpu_s": cpu1 - cpu0,
            "runq_wait_s": None if wait0 is None or wait1 is None else wait1 - wait0,
            "threads": torch.get_num_threads()}


def runq_wait_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a core, summed over its live threads
    (Linux ``/proc/self/task/*/schedstat``, second field); None where the kernel does not expose it."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    total, seen = 0, False
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/schedstat") as f:
                total += int(f.read().split()[1])
            seen = True
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9 if seen else None


def _measure_cpu_subprocess(method, shape, dtype_name, reps, peaked):
    """Entry point of a fresh spawned process, so that one method's high-water mark never hides another's."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return measure(method, shape, "cpu", getattr(torch, dtype_name), reps, peaked)


def run(shapes, methods, device: str, dtype: torch.dtype, reps: int, peaked: bool = False, log=print):
    results: list[Result] = []
    dname = str(dtype).replace("torch.", "")
    for shape in shapes:
        ref: dict = {}
        for method in methods:
            why = _available(method, device)
            r = Result(method, shape + ("+peaked" if peaked else ""), device, dname)
            if why:
                r.note = why
                results.append(r)
                continue
            try:
                if device == "cpu":
                    import multiprocessing as mp

                    # glibc: serve every block >= 64 KiB by mmap and return it on free, so the resident set
                    # tracks live memory (a freed-but-cached heap would otherwise hide or inflate peaks)
                    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
                    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
                    try:
                        with mp.get_context("spawn").Pool(1) as pool:
                            m = pool.apply(_measure_cpu_subprocess, (method, shape, dname, reps, peaked))
                    finally:
                        if saved is None:
                            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
                        else:
                            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
                else:
                    m = measure(method, shape, device, dtype, reps, peaked)
                    torch.cuda.empty_cache()
            except torch.cuda.OutOfMemoryError:  # type: ignore[attr-defined]
                r.note = "out of memory"
                results.append(r)
                torch.cuda.empty_cache()
                continue
            times = m["ms_reps"]
            r.ms = r.ms_min = min(times)
            r.ms_median, r.ms_max, r.ms_reps = statistics.median(times), max(times), list(times)
            r.peak_bytes = m["peak_bytes"]
            r.extra.update({k: m[k] for k in ("wall_s", "cpu_s", "runq_wait_s", "threads")})
            out = torch.tensor(m["out"])
            task = METHODS[method][2]
            if method == BASELINE[task]:
                ref[task] = out
            if task in ref:
                r.max_abs_diff_vs_naive = float((out - ref[task]).abs().max())
            r.extra["task"] = task
            results.append(r)
            log(f"  {r.shape:<18} {method:<16} {r.ms:9.1f} ms min ({r.ms_median:.1f} median, {r.ms_max:.1f} max)  "
                f"{r.peak_bytes / 2**20:9.1f} MiB")
    return results


# ----------------------------------------------------------------------------------------------------------
# reporting


def environment(device: str) -> dict:
    import dpo_fast

    env = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dpo_fast": dpo_fast.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    from dpo_fast.engine import gemm_path  # which fp32-output GEMM path 16-bit inputs take on this device

    env["gemm_path"] = {str(dt).removeprefix("torch."): gemm_path(device, dt)
                        for dt in (torch.bfloat16, torch.float16)}
    return env


RUNQ_WAIT_LIMIT = 0.25  # s of run-queue wait per wall second of the timed reps
CPU_PER_WALL_LIMIT = 0.5  # s of process CPU time per wall second of the timed reps (CPU runs)
LOAD_RATIO_LIMIT = 0.5  # 1-minute load average per core, before the run (fallback only)
MIN_WINDOW_S = 0.2  # the in-run readings are judged over at least this much timed wall time
LOAD_RULE = (f"loaded if the process's threads waited >= {RUNQ_WAIT_LIMIT} s for a core per wall second of the "
             f"timed reps (Linux schedstat), or (CPU runs) it used < {CPU_PER_WALL_LIMIT} s of CPU time per wall "
             f"second of them (both judged over >= {MIN_WINDOW_S} s of timed reps); only when neither reading "
             f"exists: if the 1-minute load average before the run was >= {LOAD_RATIO_LIMIT} per core of "
             f"os.cpu_count()")


def cores_usable() -> int:
    """The CPUs this process may run on (its affinity where the OS has one), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_verdict(*, loadavg: tuple | None, cpu_count: int, wall_s: float | None = None,
                 cpu_s: float | None = None, runq_wait_s: float | None = None) -> dict:
    """Was the machine loaded? A pure function of the readings (see the module docstring and ``LOAD_RULE``).

    ``loadavg``: (1, 5, 15)-minute load averages before the run (None where unavailable); ``cpu_count``: the
    machine's CPUs, the load average's scale; ``wall_s``, ``cpu_s``, ``runq_wait_s``: the timed reps' wall time,
    the process's CPU time and its threads' run-queue wait over them (``cpu_s`` None on CUDA, where the host thread
    waits for the GPU; ``runq_wait_s`` None without schedstat). Returns the ratios, each criterion (None when not
    judged; the load average is reported whenever known, but decides only in the fallback), ``loaded`` and
    ``reasons`` (one phrase per criterion that decided it)."""
    cpu_count = max(1, int(cpu_count))
    ratio = loadavg[0] / cpu_count if loadavg else None
    window = wall_s is not None and wall_s >= MIN_WINDOW_S
    wait_pw = runq_wait_s / wall_s if runq_wait_s is not None and wall_s else None
    cpu_pw = cpu_s / wall_s if cpu_s is not None and wall_s else None
    crit: dict = {"run_queue_wait": None, "cpu_time": None, "load_average": None}
    reasons = []
    if window and wait_pw is not None:
        crit["run_queue_wait"] = wait_pw >= RUNQ_WAIT_LIMIT
        if crit["run_queue_wait"]:
            reasons.append(f"threads waited {wait_pw:.2f} s for a core per second of the timed reps")
    if window and cpu_pw is not None:
        crit["cpu_time"] = cpu_pw < CPU_PER_WALL_LIMIT
        if crit["cpu_time"]:
            reasons.append(f"the process got only {cpu_pw:.2f} s of CPU time per second of the timed reps")
    if ratio is not None:  # reported always; it decides only when neither in-run reading was judged
        crit["load_average"] = ratio >= LOAD_RATIO_LIMIT
        if crit["load_average"] and crit["run_queue_wait"] is None and crit["cpu_time"] is None:
            reasons.append(f"1-minute load average {loadavg[0]:.2f} on {cpu_count} cores before the run")
    return {"ratio": ratio, "runq_wait_per_wall": wait_pw, "cpu_per_wall": cpu_pw, "criteria": crit,
            "loaded": bool(reasons), "reasons": reasons}


def load_record(results: list[Result], device: str, loadavg_before: tuple | None,
                loadavg_after: tuple | None = None) -> dict:
    """The ``load`` record of results.json: the readings of this run (timed reps summed over the methods that ran)
    and :func:`load_verdict` on them."""
    ran = [r for r in results if r.ms is not None and "wall_s" in r.extra]
    wall = sum(r.extra["wall_s"] for r in ran) if ran else None
    cpu = sum(r.extra["cpu_s"] for r in ran) if ran and device == "cpu" else None
    waits = [r.extra["runq_wait_s"] for r in ran]
    wait = sum(waits) if ran and all(w is not None for w in waits) else None
    cpu_count = os.cpu_count() or 1
    v = load_verdict(loadavg=loadavg_before, cpu_count=cpu_count, wall_s=wall, cpu_s=cpu, runq_wait_s=wait)
    threads = max((r.extra.get("threads", 0) for r in ran), default=None)
    return {"loadavg_before": list(loadavg_before) if loadavg_before else None,
            "loadavg_after": list(loadavg_after) if loadavg_after else None,
            "cpu_count": cpu_count, "cores": cores_usable(), "threads": threads, "ratio": v["ratio"],
            "timed_wall_s": wall, "cpu_s": cpu, "runq_wait_s": wait,
            "cpu_per_wall": v["cpu_per_wall"], "runq_wait_per_wall": v["runq_wait_per_wall"],
            "criteria": v["criteria"], "loaded": v["loaded"], "reasons": v["reasons"], "rule": LOAD_RULE}


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def load_line(load: dict) -> str:
    """The line printed under the table: a WARNING naming what fired when loaded, else the readings."""
    readings = (f"1-min load {_fmt((load['loadavg_before'] or [None])[0], '.2f')} on {load['cpu_count']} cores "
                f"before the run, run-queue wait {_fmt(load['runq_wait_per_wall'], '.2f')} s/s and CPU "
                f"{_fmt(load['cpu_per_wall'], '.2f')} s/s over {_fmt(load['timed_wall_s'], '.1f')} s of timed reps")
    if load["loaded"]:
        return ("WARNING: the machine was loaded while timing (" + "; ".join(load["reasons"]) + "): the times and "
                "ratios above are not the methods' own; rerun on an idle machine. [" + readings + "]")
    return "load: idle by the rule in results.json (" + readings + ")"


def _ratio_text(x: float) -> str:
    return f"{x:.2f}x" if x >= 0.095 else f"{x:.3f}x"


def table(results: list[Result]) -> str:
    """The printed table: time as the minimum over the reps, then the median and maximum (the spread), peak memory,
    the ratios to the task's naive method (of the minima) and the difference of the results from it."""
    reps = max((len(r.ms_reps) for r in results), default=0)
    lines = [f"{'shape':<20} {'method':<16} {'min ms':>9} {'median':>9} {'max':>9} {'peak MiB':>10} "
             f"{'x naive time':>13} {'x naive mem':>12} {'|diff| vs naive':>16}  note",
             f"(time per step over {reps} timed reps: min, median, max; ratios and differences are against the "
             "naive method of the same task, measured in this run; the time ratio is of the minima)"]
    by_shape: dict[str, dict[str, Result]] = {}
    for r in results:
        by_shape.setdefault(r.shape, {})[r.method] = r
    tasks, order = list(BASELINE), list(METHODS)
    for shape, rs in by_shape.items():  # grouped by task, the naive baseline first
        for r in sorted(rs.values(), key=lambda r: (tasks.index(METHODS[r.method][2]),
                                                    r.method != BASELINE[METHODS[r.method][2]],
                                                    order.index(r.method))):
            naive = rs.get(BASELINE[METHODS[r.method][2]])
            if r.ms is None:
                lines.append(f"{shape:<20} {r.method:<16} {'-':>9} {'-':>9} {'-':>9} {'-':>10} {'':>13} {'':>12} "
                             f"{'':>16}  {r.note}")
                continue
            tr = f"{r.ms / naive.ms:.2f}" if naive and naive.ms else ""
            mr = f"{r.peak_bytes / naive.peak_bytes:.3f}" if naive and naive.peak_bytes else ""
            diff = f"{r.max_abs_diff_vs_naive:.2e}" if r.max_abs_diff_vs_naive is not None else ""
            med = _fmt(r.ms_median, "9.1f") if r.ms_median is not None else f"{'':>9}"
            mx = _fmt(r.ms_max, "9.1f") if r.ms_max is not None else f"{'':>9}"
            lines.append(f"{shape:<20} {r.method:<16} {r.ms:9.1f} {med} {mx} {r.peak_bytes / 2**20:10.1f} {tr:>13} "
                         f"{mr:>12} {diff:>16}  {r.note}")
    return "\n".join(lines)


def method_colors() -> dict:
    """A fixed, distinct colour per method in ``METHODS`` order (tab20: its ten dark hues, then the light ones)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    assert len(METHODS) <= len(order), "more methods than colours"
    return {m: cmap(order[i]) for i, m in enumerate(METHODS)}


def not_run_note(results: list[Result]) -> str:
    """``"not run: liger, cce, liger_dpo (CUDA only)"``: the methods left out, grouped by reason; a method that
    did run on another shape is named with the shape it missed."""
    ran = {r.method for r in results if r.ms is not None}
    by_reason: dict[str, list[str]] = {}
    for r in results:
        if r.ms is None:
            name = f"{r.method} on {r.shape}" if r.method in ran else r.method
            names = by_reason.setdefault(r.note or "not measured", [])
            if name not in names:
                names.append(name)
    return "not run: " + "; ".join(f"{', '.join(v)} ({k})" for k, v in by_reason.items()) if by_reason else ""


TASK_NAMES = {"logprobs": "sequence log-probs", "dpo": "DPO loss", "simpo": "SimPO loss", "grpo": "GRPO loss"}


def shape_text(shape: str) -> str:
    """``"cpu-small (B 4 x T 512, H 256, V 32000)"``; a ``+peaked`` suffix is kept."""
    name, _, suffix = shape.partition("+")
    if name not in SHAPES:
        return shape
    B, T, H, V = SHAPES[name]
    return f"{name} (B {B} x T {T}, H {H}, V {V}){' ' + suffix if suffix else ''}"


def plot_title(results: list[Result], env: dict, device: str, dtype) -> str:
    """The figure's title: what was measured, on which shapes, device and dtype, and when."""
    shapes = ", ".join(shape_text(s) for s in dict.fromkeys(r.shape for r in results))
    where = env.get("gpu", env.get("cpu", ""))
    return (f"dpo_fast vs naive PyTorch, fwd+bwd unless no-grad — {shapes}\n{device} ({where}), "
            f"{str(dtype).replace('torch.', '')}, {env.get('date', '')}")


def _group_positions(methods: list[str]) -> tuple[dict, list]:
    """x of each method's bar, grouped by task in ``BASELINE`` order (the naive baseline first, then its fast
    variants in ``METHODS`` order), a gap between groups; and (centre, task name) per group."""
    pos: dict[str, float] = {}
    centres = []
    x = 0.0
    for task, base in BASELINE.items():
        group = sorted((m for m in METHODS if METHODS[m][2] == task and m in methods), key=lambda m: m != base)
        if not group:
            continue
        start = x
        for m in group:
            pos[m] = x
            x += 1.0
        centres.append(((start + x - 1.0) / 2, TASK_NAMES.get(task, task)))
        x += 0.7
    return pos, centres


def figure(results: list[Result], title: str, load: dict | None = None):
    """The results plot as a matplotlib Figure: a row per shape, time (left) and peak memory (right); in each
    panel the bars grouped by task, each naive baseline beside its fast variants, every bar labelled with its ratio
    to that baseline ("0.42x"); on the time panel the bar is the minimum over the reps and a line runs up to the
    maximum, with a tick at the median. One fixed colour per method, one legend below the panels, a note naming
    the methods that were not run, and a warning when ``load`` says the machine was loaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ok = [r for r in results if r.ms is not None]
    shapes = list(dict.fromkeys(r.shape for r in ok)) or [""]
    methods = [m for m in METHODS if any(r.method == m for r in ok)]  # the fixed order
    colors = method_colors()
    legend_rows = -(-len(methods) // 5) or 1
    note = not_run_note(results)
    warn = bool(load and load.get("loaded"))
    height = 1.0 + 3.4 * len(shapes) + 0.22 * legend_rows + 0.22 * (bool(note) + warn)
    fig, axes = plt.subplots(len(shapes), 2, figsize=(13, height), squeeze=False)
    reps = max((len(r.ms_reps) for r in ok), default=0)
    for row, shape in enumerate(shapes):
        rs = {r.method: r for r in ok if r.shape == shape}
        pos, centres = _group_positions(list(rs))
        ax_t, ax_m = axes[row]
        for m in methods:
            r = rs.get(m)
            if r is None:
                continue
            base = rs.get(BASELINE[METHODS[m][2]])
            top_t = max(r.ms, r.ms_max or r.ms)
            for ax, val, bval, top in ((ax_t, r.ms, base.ms if base else None, top_t),
                                       (ax_m, r.peak_bytes / 2**20, base.peak_bytes / 2**20 if base else None,
                                        r.peak_bytes / 2**20)):
                ax.bar([pos[m]], [val], 0.85, label=m, color=colors[m])
                if bval:
                    ax.annotate(_ratio_text(val / bval), (pos[m], top), xytext=(0, 2), textcoords="offset points",
                                ha="center", va="bottom", fontsize=7)
            if r.ms_max is not None and r.ms_max > r.ms:  # the spread over the reps
                ax_t.plot([pos[m], pos[m]], [r.ms, r.ms_max], color="0.15", lw=1)
                ax_t.plot([pos[m]], [r.ms_median], marker="_", color="0.15", ms=8)
        for ax, what, unit in ((ax_t, f"time per step (bar: min of {reps} reps; line: to max; tick: median)", "ms"),
                               (ax_m, "peak memory above the inputs", "MiB")):
            ax.set_xticks([c for c, _ in centres])
            ax.set_xticklabels([t for _, t in centres], fontsize=9)
            ax.set_ylabel(unit, fontsize=8)
            prefix = f"{shape}: " if len(shapes) > 1 else ""
            ax.set_title(f"{prefix}{what}\nlabel: x the task's naive, lower is better", fontsize=8.5)
            ax.grid(axis="y", alpha=0.3)
            ax.margins(y=0.14)
            ax.set_ylim(bottom=0)
    # below the panels, bottom up: the not-run note, the load warning, the legend
    y = 0.08
    if note:
        fig.text(0.5, y / height, note, ha="center", fontsize=8, color="0.3")
        y += 0.22
    if warn:
        fig.text(0.5, y / height, "WARNING: measured on a loaded machine (" + "; ".join(load["reasons"])
                 + "): the times and ratios are not the methods' own", ha="center", fontsize=8, color="tab:red")
        y += 0.22
    handles = [Patch(facecolor=colors[m], label=m) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(methods), 5) or 1, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, (y + 0.05) / height))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, (y + 0.15 + 0.22 * legend_rows) / height, 1, 1))
    return fig


def plot(results: list[Result], path: str, title: str, load: dict | None = None) -> None:
    """Write :func:`figure` as a PNG to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(results, title, load)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="dpo-fast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--shapes", default=None, help="comma-separated from " + ", ".join(SHAPES) +
                   " (default: the three model heads on CUDA, cpu-small on CPU)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated from " + ", ".join(METHODS)
                   + " (default: all; those that cannot run here are listed with the reason)")
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10 CUDA, 3 CPU)")
    p.add_argument("--peaked", action="store_true", help="LM-like peaked logits instead of random ones")
    p.add_argument("--out", default="bench_out", help="directory for results.json and results.png")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        p.error(f"--device: expected cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    shapes = a.shapes.split(",") if a.shapes else (
        ["llama3-8b", "qwen2.5-7b", "gemma2-2b"] if device == "cuda" else ["cpu-small"])
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r}; expected one of {', '.join(SHAPES)}")
    methods = a.methods.split(",")
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; expected one of {', '.join(METHODS)}")
    # each task's naive baseline first: every ratio is against it, measured in this same run
    base = [m for m in BASELINE.values() if m in methods]
    methods = base + [m for m in methods if m not in base]
    dtype = getattr(torch, a.dtype or ("bfloat16" if device == "cuda" else "float32"))
    reps = a.reps or (10 if device == "cuda" else 3)
    env = environment(device)
    no_plot = _plot_unavailable()
    if no_plot:
        print(f"dpo-fast bench: {no_plot}; results.json is written, results.png is not", file=sys.stderr)
    print(f"dpo-fast bench on {env.get('gpu', env['cpu'])} ({device}, {dtype}), torch {env['torch']}, "
          f"triton {env['triton']}, shapes {shapes}, {reps} reps, 16-bit GEMM path {env['gemm_path']}")
    loadavg_before = _loadavg()
    results = run(shapes, methods, device, dtype, reps, a.peaked)
    load = load_record(results, device, loadavg_before, _loadavg())
    print()
    print(table(results))
    print(load_line(load))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"env": env, "load": load, "results": [asdict(r) for r in results]}, f, indent=1)
    if no_plot:
        print(f"\nwrote {a.out}/results.json (no results.png: {no_plot})")
        return 0
    plot(results, os.path.join(a.out, "results.png"), plot_title(results, env, device, dtype), load)
    print(f"\nwrote {a.out}/results.json and {a.out}/results.png")
    return 0


def _loadavg() -> tuple | None:
    try:
        return tuple(os.getloadavg())
    except (AttributeError, OSError):  # not on this platform
        return None


def _plot_unavailable() -> str | None:
    """None when matplotlib can be imported, else the one-line reason naming the extra to install."""
    from dpo_fast.extras import MissingExtraError, require

    try:
        require("matplotlib", "bench", feature="the plot")
    except MissingExtraError as e:
        return str(e)
    return None
