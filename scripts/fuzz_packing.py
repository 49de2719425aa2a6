"""Fuzz dpo_fast.pack_pairs: random pairs, budgets, policies, modes, input forms and garbage inputs.

Each case must either return the same arrays from Rust and the pure-Python reference, or raise the
same exception type (ValueError/TypeError) from both -- the texts are each backend's own; anything else
(another exception, a crash) fails the run. The test
suite runs 10,000 small cases (tests/packing/test_packing.py); this script runs more and larger ones.

Usage: python scripts/fuzz_packing.py [--cases 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np

from dpo_fast.packing import pack_pairs

FIELDS = ("input_ids", "labels", "position_ids", "attention_mask", "cu_seqlens", "pairs", "example_index",
          "seq_lens", "completion_lens")


def rand_form(rng: random.Random, seqs: list[list[int]]):
    """The same sequences as lists, numpy arrays, or flat (values, offsets)."""
    k = rng.randrange(4)
    if k == 0 or any(v < 0 or v >= 2**31 for s in seqs for v in s):
        return seqs
    if k == 1:
        return [np.array(s, dtype=rng.choice([np.int32, np.int64])) for s in seqs]
    base = rng.randrange(3)
    offsets = np.cumsum([base] + [len(s) for s in seqs]).astype(np.int64)
    values = np.array([7] * base + [v for s in seqs for v in s], dtype=rng.choice([np.int32, np.int64]))
    return values, offsets


def garbage(rng: random.Random):
    return rng.choice([None, 3, "abc", [[1.5]], [["x"]], [None], [[True, 2]], (np.array([1.0]), np.array([0, 1])),
                       np.zeros((2, 2)), [[1, 2]], [[1], [2]]])


def one_case(rng: random.Random) -> str:
    n = rng.choice([0, 1, 2, 5, 20, 60])
    hi = rng.choice([4, 40, 300])

    def seq(lo: int) -> list[int]:
        return [rng.randrange(200) for _ in range(rng.randint(lo, hi))]

    p = [seq(0) for _ in range(n)]
    c = [seq(0 if rng.random() < 0.01 else 1) for _ in range(n)]
    r = [seq(1) for _ in range(n)]
    if n and rng.random() < 0.02:
        rng.choice([p, c, r])[rng.randrange(n)].append(rng.choice([-1, 200, 2**31, 2**40]))
    args = [rand_form(rng, x) for x in (p, c, r)]
    if rng.random() < 0.02:
        args[rng.randrange(3)] = garbage(rng)
    kw = dict(
        max_tokens=rng.choice([rng.randint(-2, 8), rng.randint(2, 700)]),
        mode=rng.choice(["packed", "padded"]),
        truncation=rng.choice(["keep_start", "keep_end", "error"]),
        pad_to_multiple_of=rng.choice([None, None, 1, 8, 64]),
        vocab_size=rng.choice([None, None, 200, 5000]),
        pad_token_id=rng.choice([0, 1, 199]),
    )
    out = []
    for backend in ("rust", "python"):
        try:
            out.append(pack_pairs(*args, backend=backend, **kw))
        except (ValueError, TypeError) as e:
            out.append((type(e).__name__, str(e)))
    a, b = out
    if isinstance(a, tuple) or isinstance(b, tuple):
        if not (isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0]):
            raise AssertionError(f"backends disagree:\n  rust:   {a}\n  python: {b}")
        return "error"
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        if x.dtype != y.dtype or not np.array_equal(x, y):
            raise AssertionError(f"field {f} differs")
    if a.max_seqlen != b.max_seqlen:
        raise AssertionError("max_seqlen differs")
    if a.mode == "packed" and a.num_pairs and (a.attention_mask.sum(axis=1) > kw["max_tokens"]).any():
        raise AssertionError("row over budget")
    return "ok"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    counts = {"ok": 0, "error": 0}
    t0 = time.perf_counter()
    for case in range(args.cases):
        state = rng.getstate()
        try:
            counts[one_case(rng)] += 1
        except AssertionError as e:
            rng.setstate(state)
            print(f"case {case} (seed {args.seed}) failed: {e}", file=sys.stderr)
            return 1
    print(f"{args.cases} cases in {time.perf_counter() - t0:.1f} s: {counts['ok']} packed identically, "
          f"{counts['error']} rejected identically")
    return 0


if __name__ == "__main__":
    sys.exit(main())
