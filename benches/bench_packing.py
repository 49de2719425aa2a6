"""Benchmark of ``dpo_fast.pack_pairs``: Rust vs the pure-Python reference, and token efficiency.

Workload: N tokenized preference pairs (default 100k) with a long-tailed length mix -- prompt lengths
log-normal clipped to [50, 600], completion lengths log-normal clipped to [20, 1500] (median ~150 and
~250 tokens) -- given in the flat Arrow layout (values + offsets, what ``datasets`` stores), int32 ids
from a 128k vocabulary, ``max_tokens`` 8192.

Reported:
- pairs/s of ``pack_pairs(mode="packed")`` for ``backend="rust"`` and ``backend="python"`` on the same
  input in the same run, and their ratio (target >= 30x). Times include input handling; both produce
  identical arrays (checked). Rust is the best of ``--repeat`` runs, Python a single run.
- token efficiency = real tokens / token slots of the output (target >= 98% packed), beside TRL-style
  padded micro-batches of ``--padded-batch`` pairs in dataset order.
- the list-of-lists input path: Rust's ``flatten_int_seqs`` vs ``numpy.fromiter(itertools.chain(...))``
  on a ``--list-pairs`` subset (the measurement behind converting lists in Rust).
- bytes written per second by the Rust packer: slots x 13 bytes (int32 ids, labels, positions + int8
  mask) / time.
- single sequences: ``pack_sequences(mode="packed")`` on the N chosen completions (flat layout), Rust (best of
  ``--repeat``) vs the pure-Python twin (one run) in the same run, their ratio, and its token efficiency.
- the 1-minute load average before and after the run (a loaded machine distorts every ratio).

Usage: ``python benches/bench_packing.py [--pairs 100000] [--out bench_out/packing.json] [--record]``
The JSON goes to the untracked ``bench_out/packing.json`` unless ``--out`` names another file (``--out
benches/packing.json`` refreshes the tracked record); ``--record`` appends the table to benches/RESULTS.md
under "## Packing".
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import time

import numpy as np

from dpo_fast import _native
from dpo_fast.packing import pack_pairs, pack_sequences


def make_workload(n_pairs: int, seed: int = 0, vocab: int = 128_256):
    """Flat (values int32, offsets int64) for prompts, chosen and rejected completions."""
    rng = np.random.default_rng(seed)

    def lengths(median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
        return np.clip(rng.lognormal(np.log(median), sigma, n_pairs), lo, hi).astype(np.int64)

    def ragged(lens: np.ndarray):
        offsets = np.zeros(n_pairs + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        values = rng.integers(0, vocab, int(offsets[-1]), dtype=np.int32)
        return values, offsets

    prompt = ragged(lengths(150, 0.7, 50, 600))
    chosen = ragged(lengths(250, 0.9, 20, 1500))
    rejected = ragged(lengths(250, 0.9, 20, 1500))
    return prompt, chosen, rejected


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def padded_efficiency(prompt, chosen, rejected, batch: int, max_tokens: int) -> tuple[float, float]:
    """TRL-style padded micro-batches of `batch` pairs in dataset order: (efficiency, seconds)."""
    n = prompt[1].shape[0] - 1
    real = slots = 0
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        e = min(n, s + batch)
        part = [(x[0], x[1][s : e + 1]) for x in (prompt, chosen, rejected)]
        b = pack_pairs(*part, max_tokens=max_tokens, mode="padded")
        real += b.num_tokens
        slots += b.num_slots
    return real / slots, time.perf_counter() - t0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--padded-batch", type=int, default=8)
    ap.add_argument("--list-pairs", type=int, default=10_000)
    ap.add_argument("--skip-python", action="store_true", help="skip the (slow) Python reference run")
    ap.add_argument("--out", "--json", dest="out", default=os.path.join("bench_out", "packing.json"),
                    help="JSON output file (default bench_out/packing.json, untracked); '' for none")
    ap.add_argument("--record", action="store_true", help="append the figures to benches/RESULTS.md")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    prompt, chosen, rejected = make_workload(args.pairs)
    n_in = sum(int(x[1][-1]) for x in (prompt, chosen, rejected))
    kw = dict(max_tokens=args.max_tokens, mode="packed")
    res: dict = {"pairs": args.pairs, "max_tokens": args.max_tokens, "input_tokens": n_in}

    t_rust, b_rust = timed(lambda: pack_pairs(prompt, chosen, rejected, **kw), args.repeat)
    res.update(
        rust_s=t_rust,
        rust_pairs_per_s=args.pairs / t_rust,
        rows=int(b_rust.input_ids.shape[0]),
        row_len=int(b_rust.input_ids.shape[1]),
        real_tokens=b_rust.num_tokens,
        packed_efficiency=b_rust.efficiency,
        rust_gb_per_s=b_rust.num_slots * 13 / t_rust / 1e9,
    )
    if not args.skip_python:
        t_py, b_py = timed(lambda: pack_pairs(prompt, chosen, rejected, backend="python", **kw))
        same = all(
            np.array_equal(getattr(b_rust, f), getattr(b_py, f))
            for f in ("input_ids", "labels", "position_ids", "attention_mask", "cu_seqlens", "pairs", "example_index")
        )
        res.update(python_s=t_py, python_pairs_per_s=args.pairs / t_py, speedup=t_py / t_rust, identical=same)
        del b_py
    del b_rust
    gc.collect()

    # single sequences: the chosen completions, packed alone
    t_seq, s_rust = timed(lambda: pack_sequences(chosen, **kw), args.repeat)
    res.update(seq_count=args.pairs, seq_tokens=s_rust.num_tokens, seq_rust_s=t_seq,
               seq_rust_per_s=args.pairs / t_seq, seq_efficiency=s_rust.efficiency,
               seq_rows=int(s_rust.input_ids.shape[0]))
    if not args.skip_python:
        t_seq_py, s_py = timed(lambda: pack_sequences(chosen, backend="python", **kw))
        same = all(np.array_equal(getattr(s_rust, f), getattr(s_py, f))
                   for f in ("input_ids", "position_ids", "attention_mask", "cu_seqlens", "example_index", "seq_lens"))
        res.update(seq_python_s=t_seq_py, seq_speedup=t_seq_py / t_seq, seq_identical=same)
        del s_py
    del s_rust
    gc.collect()

    eff_pad, t_pad = padded_efficiency(prompt, chosen, rejected, args.padded_batch, args.max_tokens)
    res.update(padded_batch=args.padded_batch, padded_efficiency=eff_pad, rust_padded_microbatch_s=t_pad)

    # list-of-lists input: conversion to the flat layout
    k = min(args.list_pairs, args.pairs)
    lists = [prompt[0][prompt[1][i] : prompt[1][i + 1]].tolist() for i in range(k)]
    n_list = sum(map(len, lists))
    t_flat_rust, _ = timed(lambda: _native.flatten_int_seqs(lists, "prompt_ids"), args.repeat)
    t_flat_np, _ = timed(
        lambda: np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=n_list), args.repeat
    )
    res.update(list_tokens=n_list, flatten_rust_ns_per_token=t_flat_rust / n_list * 1e9,
               flatten_numpy_ns_per_token=t_flat_np / n_list * 1e9)

    import torch

    res.update(
        date=datetime.date.today().isoformat(),
        cpu=cpu_name(),
        cores=os.cpu_count(),
        python=platform.python_version(),
        numpy=np.__version__,
        torch=torch.__version__,
        native=_native.__version__,
        load_avg_1m_before=load_before,
        load_avg_1m_after=os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
    )

    rows = [
        ("pairs", f"{args.pairs:,}"),
        ("input tokens", f"{n_in:,}"),
        ("rust packed", f"{t_rust * 1e3:,.0f} ms  {res['rust_pairs_per_s']:,.0f} pairs/s  ({res['rust_gb_per_s']:.2f} GB/s written)"),
    ]
    if "python_s" in res:
        rows += [
            ("python reference packed", f"{res['python_s'] * 1e3:,.0f} ms  {res['python_pairs_per_s']:,.0f} pairs/s"),
            ("speedup rust / python", f"{res['speedup']:.1f}x  (outputs identical: {res['identical']})"),
        ]
    rows += [("pack_sequences rust (chosen completions)",
              f"{t_seq * 1e3:,.0f} ms  {res['seq_rust_per_s']:,.0f} sequences/s  "
              f"({res['seq_efficiency'] * 100:.2f}% efficiency, {res['seq_rows']:,} rows)")]
    if "seq_python_s" in res:
        rows += [
            ("pack_sequences python twin", f"{res['seq_python_s'] * 1e3:,.0f} ms"),
            ("pack_sequences speedup rust / python",
             f"{res['seq_speedup']:.1f}x  (outputs identical: {res['seq_identical']})"),
        ]
    rows += [
        ("packed efficiency", f"{res['packed_efficiency'] * 100:.2f}%  ({res['rows']:,} rows x {res['row_len']})"),
        (f"padded efficiency (batches of {args.padded_batch})", f"{eff_pad * 100:.2f}%"),
        ("flatten lists: rust", f"{res['flatten_rust_ns_per_token']:.1f} ns/token"),
        ("flatten lists: numpy.fromiter", f"{res['flatten_numpy_ns_per_token']:.1f} ns/token"),
    ]
    width = max(len(a) for a, _ in rows)
    table = "\n".join(f"| {a:<{width}} | {b} |" for a, b in rows)
    print(table)
    print(f"({res['date']}, {res['cpu']}, {res['cores']} cores, Python {res['python']}, numpy {res['numpy']}, torch {res['torch']}; "
          f"1-min load average {res['load_avg_1m_before']:.2f} before, {res['load_avg_1m_after']:.2f} after)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.out}")
    if args.record:
        record(res, table)


def record(res: dict, table: str, path: str = "benches/RESULTS.md") -> None:
    """Append under the "## Packing" heading (created if absent); other sections are left alone."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    entry = (
        f"\n### {res['date']} -- {res['cpu']}, {res['cores']} cores, Python {res['python']}, numpy {res['numpy']}, "
        f"torch {res['torch']}, dpo_fast_native {res['native']}\n"
        f"`python benches/bench_packing.py --pairs {res['pairs']}` (max_tokens {res['max_tokens']})\n\n"
        f"| measure | value |\n|---|---|\n{table}\n"
    )
    if "\n## Packing\n" not in "\n" + text:
        text = text.rstrip("\n") + "\n\n## Packing\n"
        text += entry
    else:
        # insert at the end of the Packing section (before the next "## " heading, if any)
        head, tail = text.split("\n## Packing\n", 1)
        nxt = tail.find("\n## ")
        section, rest = (tail, "") if nxt < 0 else (tail[:nxt], tail[nxt:])
        text = head + "\n## Packing\n" + section.rstrip("\n") + "\n" + entry + rest
    with open(path, "w") as f:
        f.write(text)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
