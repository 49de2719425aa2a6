"""Pure-Python reference of the packers in ``rust/src/pack.rs`` (pairs: :func:`pack_reference`; single sequences:
:func:`pack_sequences_reference`): the test oracle and the speed baseline.

Same algorithm, same order of data checks (raising the same exception types), byte-identical output. The
options come validated (:class:`dpo_fast.packing.PackOptions`); nothing here checks them again. It is written
for clarity: Python lists and the stdlib ``array`` module (4-byte output buffers that numpy wraps
without a copy); no numpy in the hot loop. Read ``rust/src/pack.rs``'s module docs for the layout,
the label rule and the truncation rule; the comments here only point at the twin functions.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Sequence

import numpy as np

from .options import PackOptions

IGNORE_INDEX = -100
ID_LIMIT = 1 << 31  # token ids are stored as int32


def validate_offsets(arg: str, n_values: int, offsets: Sequence[int]) -> int:
    """Twin of ``Ragged::validate_offsets``: returns the number of sequences."""
    if len(offsets) == 0:
        raise ValueError(f"{arg}: offsets must have P + 1 >= 1 entries, got an empty array")
    if offsets[0] < 0:
        raise ValueError(f"{arg}: offsets[0] = {offsets[0]} is negative")
    for k in range(1, len(offsets)):
        if offsets[k] < offsets[k - 1]:
            raise ValueError(
                f"{arg}: offsets must be non-decreasing, got offsets[{k - 1}] = {offsets[k - 1]} > "
                f"offsets[{k}] = {offsets[k]}"
            )
    if offsets[-1] > n_values:
        raise ValueError(f"{arg}: offsets[-1] = {offsets[-1]} exceeds the {n_values} values")
    return len(offsets) - 1


def shrink_completions(lc: int, lr: int, budget: int) -> tuple[int, int]:
    """Twin of ``shrink_completions``."""
    if lc + lr <= budget:
        return lc, lr
    if budget < 2:
        return 1, 1
    short = min(lc, lr)
    if 2 * short <= budget:
        cap = budget - short
        return min(lc, cap), min(lr, cap)
    return budget // 2, budget // 2


def fit_pair(lp: int, lc: int, lr: int, max_tokens: int, policy: str) -> tuple[int, int, int, int]:
    """Twin of ``fit_pair``: (prompt_start, prompt_len, chosen_len, rejected_len)."""
    m = max_tokens
    if policy == "error" or 2 * lp + lc + lr <= m:
        return 0, lp, lc, lr
    if policy == "keep_start":
        c, r = shrink_completions(lc, lr, max(m - 2 * lp, 0))
        p = min(lp, (m - c - r) // 2)
        return 0, p, c, r
    # keep_end
    floor = min(lp, 1)
    p = max(floor, min(lp, max(m - lc - lr, 0) // 2))
    c, r = shrink_completions(lc, lr, max(m - 2 * p, 0))
    p = min(p, (m - c - r) // 2)
    return lp - p, p, c, r


def _check_ids(arg: str, pair: int, seq: Sequence[int], opts: PackOptions) -> None:
    limit = opts.id_limit
    if seq and (min(seq) < 0 or max(seq) >= limit):
        for j, v in enumerate(seq):
            if v < 0 or v >= limit:
                raise ValueError(f"{arg}[{pair}][{j}] = {v} is out of range: token ids must be in "
                                 f"[0, {opts.id_bound_name()})")


def _plan_padded(cost_lens: list[tuple[int, int]]) -> tuple[list[tuple[int, bool]], list[int], int]:
    p = len(cost_lens)
    order = [(i, False) for i in range(p)] + [(i, True) for i in range(p)]
    row_starts = list(range(2 * p + 1))
    row_len = max((cost_lens[i][1] if rej else cost_lens[i][0] for i, rej in order), default=0)
    return order, row_starts, row_len


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> tuple[list[int], list[int]]:
    """Twin of ``best_fit_decreasing``: (items in output order, bin_starts). Largest first, ties by original
    index; each item into the open bin with the least room that fits it, ties by the older bin; else a new bin.
    Rooms below the smallest item are not kept (no item can use them)."""
    by_size = sorted(range(len(sizes)), key=lambda i: -sizes[i])  # stable: equal sizes keep index order
    smallest = min(sizes, default=0)
    open_bins: list[tuple[int, int]] = []  # sorted (room, bin)
    fill: list[int] = []
    bins: list[list[int]] = []
    for i in by_size:
        size = sizes[i]
        at = bisect.bisect_left(open_bins, (size, 0))
        if at < len(open_bins):
            _, b = open_bins.pop(at)
        else:
            b = len(fill)
            fill.append(0)
            bins.append([])
        fill[b] += size
        room = capacity - fill[b]
        if room >= smallest:
            bisect.insort(open_bins, (room, b))
        bins[b].append(i)
    items = [i for members in bins for i in members]
    starts = [0]
    for members in bins:
        starts.append(starts[-1] + len(members))
    return items, starts


def _plan_packed(costs: list[int], max_tokens: int) -> tuple[list[tuple[int, bool]], list[int], int]:
    """Twin of ``plan_packed``: best-fit-decreasing over pair costs; each pair gives (chosen, rejected)."""
    items, starts = best_fit_decreasing(costs, max_tokens)
    order = [(i, rej) for i in items for rej in (False, True)]
    row_starts = [2 * s for s in starts]
    row_len = max((sum(costs[i] for i in items[a:z]) for a, z in zip(starts, starts[1:])), default=0)
    return order, row_starts, row_len


def pack_reference(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    opts: PackOptions,
) -> dict:
    """Pack lists of int lists with validated options; returns the dict ``dpo_fast._native.pack_flat`` returns."""
    mode, truncation, pad_token_id = opts.mode, opts.truncation, opts.pad_token_id
    pad_to_multiple_of = opts.pad_to_multiple_of
    n = len(prompt_ids)
    if len(chosen_ids) != n or len(rejected_ids) != n:
        raise ValueError(
            "prompt_ids, chosen_ids and rejected_ids must hold the same number of sequences, "
            f"got {n}, {len(chosen_ids)} and {len(rejected_ids)}"
        )
    if n >= ID_LIMIT // 2:
        raise ValueError(f"too many pairs for int32 cu_seqlens: {n}")

    m = opts.max_tokens
    kept: list[tuple[int, int, int, int]] = []
    num_truncated = 0  # pairs the policy shortened
    for i in range(n):
        p, c, r = prompt_ids[i], chosen_ids[i], rejected_ids[i]
        if len(c) == 0:
            raise ValueError(f"chosen_ids[{i}] is empty: every completion needs at least one token")
        if len(r) == 0:
            raise ValueError(f"rejected_ids[{i}] is empty: every completion needs at least one token")
        _check_ids("prompt_ids", i, p, opts)
        _check_ids("chosen_ids", i, c, opts)
        _check_ids("rejected_ids", i, r, opts)
        k = fit_pair(len(p), len(c), len(r), m, truncation)
        cost = 2 * k[1] + k[2] + k[3]
        if cost > m:
            raise ValueError(
                f"pair {i} needs {cost} tokens (prompt {len(p)} counted twice, chosen {len(c)}, rejected {len(r)}) "
                f"but max_tokens is {m}; use truncation='keep_start' or 'keep_end', or raise max_tokens"
            )
        num_truncated += (k[1], k[2], k[3]) != (len(p), len(c), len(r))
        kept.append(k)

    if mode == "padded":
        order, row_starts, row_len = _plan_padded([(k[1] + k[2], k[1] + k[3]) for k in kept])
    else:
        order, row_starts, row_len = _plan_packed([2 * k[1] + k[2] + k[3] for k in kept], m)
    if pad_to_multiple_of is not None:
        row_len = -(-row_len // pad_to_multiple_of) * pad_to_multiple_of
    num_rows = len(row_starts) - 1
    slots = num_rows * row_len
    if slots >= ID_LIMIT:
        raise ValueError(
            f"the batch would hold {slots} token slots ({num_rows} rows x {row_len}), more than int32 "
            "cu_seqlens can address (2147483647); pack fewer pairs per call"
        )

    ids, labels, positions, mask = array("i"), array("i"), array("i"), array("b")
    cu, seq_lens, completion_lens = array("i"), array("i"), array("i")
    for row in range(num_rows):
        at = 0
        n_last = 0
        for i, rej in order[row_starts[row] : row_starts[row + 1]]:
            start, lp, lc, lr = kept[i]
            seq = list(prompt_ids[i][start : start + lp]) + list((rejected_ids[i][:lr] if rej else chosen_ids[i][:lc]))
            ln = len(seq)
            first = max(lp, 1) - 1  # labels[t] = seq[t + 1] for first <= t < ln - 1
            ids.extend(seq)
            labels.extend([IGNORE_INDEX] * first)
            labels.extend(seq[first + 1 :])
            labels.append(IGNORE_INDEX)
            positions.extend(range(ln))
            mask.frombytes(b"\x01" * ln)
            cu.append(row * row_len + at)
            seq_lens.append(ln)
            completion_lens.append(ln - max(lp, 1))
            at += ln
            n_last = ln
        pad = row_len - at
        ids.extend([pad_token_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        positions.extend(range(n_last, n_last + pad))  # padding continues the last segment
        mask.frombytes(bytes(pad))
    cu.append(slots)

    max_seqlen = max((cu[s + 1] - cu[s] for s in range(len(cu) - 1)), default=0)
    if mode == "padded":
        pairs = [(i, n + i) for i in range(n)]
        example_index = list(range(n))
    else:
        pairs = [(2 * j, 2 * j + 1) for j in range(n)]
        example_index = [order[2 * j][0] for j in range(n)]

    def two_d(a: array, dtype) -> np.ndarray:
        return np.frombuffer(a, dtype=dtype).reshape(num_rows, row_len) if len(a) else np.zeros((num_rows, row_len), dtype)

    def one_d(a: array) -> np.ndarray:
        return np.frombuffer(a, dtype=np.int32) if len(a) else np.zeros(0, np.int32)

    return {
        "input_ids": two_d(ids, np.int32),
        "labels": two_d(labels, np.int32),
        "position_ids": two_d(positions, np.int32),
        "attention_mask": two_d(mask, np.int8),
        "cu_seqlens": one_d(cu),
        "pairs": np.array(pairs, dtype=np.int64).reshape(n, 2),
        "example_index": np.array(example_index, dtype=np.int64),
        "seq_lens": one_d(seq_lens),
        "completion_lens": one_d(completion_lens),
        "max_seqlen": int(max_seqlen),
        "num_truncated": num_truncated,
    }


def fit_sequence(n: int, max_tokens: int, policy: str) -> tuple[int, int]:
    """Twin of ``fit_sequence``: (start, kept length) of a sequence of ``n`` tokens."""
    if policy == "error" or n <= max_tokens:
        return 0, n
    return (0, max_tokens) if policy == "keep_start" else (n - max_tokens, max_tokens)


def pack_sequences_reference(sequences: Sequence[Sequence[int]], opts: PackOptions) -> dict:
    """Twin of ``pack_sequences``: lists of int lists with validated options; returns the dict
    ``dpo_fast._native.pack_sequences_flat`` returns."""
    n = len(sequences)
    if n >= ID_LIMIT:
        raise ValueError(f"too many sequences for int32 cu_seqlens: {n}")
    m = opts.max_tokens
    kept: list[tuple[int, int]] = []
    num_truncated = 0
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError(f"sequences[{i}] is empty: every sequence needs at least one token")
        _check_ids("sequences", i, seq, opts)
        start, ln = fit_sequence(len(seq), m, opts.truncation)
        if ln > m:
            raise ValueError(f"sequences[{i}] has {ln} tokens but max_tokens is {m}; use truncation='keep_start' or "
                             "'keep_end', or raise max_tokens")
        num_truncated += ln != len(seq)
        kept.append((start, ln))
    lens = [ln for _, ln in kept]
    if opts.mode == "padded":
        order, row_starts = list(range(n)), list(range(n + 1))
    else:
        order, row_starts = best_fit_decreasing(lens, m)
    num_rows = len(row_starts) - 1
    row_len = max((sum(lens[i] for i in order[a:z]) for a, z in zip(row_starts, row_starts[1:])), default=0)
    if opts.pad_to_multiple_of is not None:
        row_len = -(-row_len // opts.pad_to_multiple_of) * opts.pad_to_multiple_of
    slots = num_rows * row_len
    if slots >= ID_LIMIT:
        raise ValueError(
            f"the batch would hold {slots} token slots ({num_rows} rows x {row_len}), more than int32 "
            "cu_seqlens can address (2147483647); pack fewer sequences per call"
        )

    ids, positions, mask, cu = array("i"), array("i"), array("b"), array("i")
    for row in range(num_rows):
        at = n_last = 0
        for i in order[row_starts[row] : row_starts[row + 1]]:
            start, ln = kept[i]
            ids.extend(sequences[i][start : start + ln])
            positions.extend(range(ln))
            mask.frombytes(b"\x01" * ln)
            cu.append(row * row_len + at)
            at += ln
            n_last = ln
        pad = row_len - at
        ids.extend([opts.pad_token_id] * pad)
        positions.extend(range(n_last, n_last + pad))  # padding continues the row's last sequence
        mask.frombytes(bytes(pad))
    cu.append(slots)
    max_seqlen = max((cu[s + 1] - cu[s] for s in range(len(cu) - 1)), default=0)

    def two_d(a: array, dtype) -> np.ndarray:
        return np.frombuffer(a, dtype=dtype).reshape(num_rows, row_len) if len(a) else np.zeros((num_rows, row_len), dtype)

    return {
        "input_ids": two_d(ids, np.int32),
        "position_ids": two_d(positions, np.int32),
        "attention_mask": two_d(mask, np.int8),
        "cu_seqlens": np.frombuffer(cu, dtype=np.int32),
        "example_index": np.array(order, dtype=np.int64),
        "seq_lens": np.array([lens[i] for i in order], dtype=np.int32),
        "max_seqlen": int(max_seqlen),
        "num_truncated": num_truncated,
    }
