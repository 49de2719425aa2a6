"""Tests of the single-sequence packers: dpo_fast.pack_sequences (Rust == the pure-Python twin, layout invariants,
input forms, bad input) and dpo_fast.pack_padded_rows (against a plain-loop reference, unpack and its gradient,
bad input)."""

from __future__ import annotations

import copy
import doctest
import warnings

import numpy as np
import pytest
import torch

from dpo_fast.packing import PackedRows, PackedSequences, PackOptions, pack_padded_rows, pack_sequences
from dpo_fast.packing import _reference
from dpo_fast.packing import sequences as sequences_module
from support import seed_of

FIELDS = ("input_ids", "position_ids", "attention_mask", "cu_seqlens", "example_index", "seq_lens")
BACKENDS = ("rust", "python")


def assert_same(a: PackedSequences, b: PackedSequences) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, (f, x.dtype, y.dtype, x.shape, y.shape)
        np.testing.assert_array_equal(x, y, err_msg=f)
    assert (a.max_seqlen, a.mode, a.num_truncated) == (b.max_seqlen, b.mode, b.num_truncated)


def check_sequences(b: PackedSequences, seqs, *, max_tokens, mode="packed", truncation="keep_start", pad_token_id=0,
                    pad_to_multiple_of=None) -> None:
    """Every invariant of the layout, from the inputs alone."""
    n = len(seqs)
    R, L = b.input_ids.shape
    assert b.input_ids.dtype == np.int32 and b.position_ids.dtype == np.int32 and b.attention_mask.dtype == np.int8
    assert b.cu_seqlens.dtype == np.int32 and b.seq_lens.dtype == np.int32 and b.example_index.dtype == np.int64
    assert b.cu_seqlens.shape == (n + 1,) and b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == R * L
    assert b.example_index.shape == b.seq_lens.shape == (n,)
    if pad_to_multiple_of:
        assert L % pad_to_multiple_of == 0
    assert sorted(b.example_index.tolist()) == list(range(n))  # every sequence once
    ids, pos, mask = (a.reshape(-1) for a in (b.input_ids, b.position_ids, b.attention_mask))
    covered = np.zeros(R * L, dtype=bool)
    for k in range(n):
        s = list(seqs[int(b.example_index[k])])
        kept = s if len(s) <= max_tokens else (s[:max_tokens] if truncation == "keep_start" else s[-max_tokens:])
        a, z, ln = int(b.cu_seqlens[k]), int(b.cu_seqlens[k + 1]), len(kept)
        assert b.seq_lens[k] == ln and z - a >= ln
        assert ids[a : a + ln].tolist() == kept  # every kept token once, in order
        assert pos[a:z].tolist() == list(range(z - a))  # positions restart, padding continues the sequence
        assert mask[a : a + ln].all() and not mask[a + ln : z].any()
        assert (ids[a + ln : z] == pad_token_id).all()
        assert a // L == (z - 1) // L  # never crosses a row; padding only at a row's end
        if z - a > ln:
            assert z % L == 0
        covered[a:z] = True
    assert covered.all()
    assert b.max_seqlen == (int(np.diff(b.cu_seqlens).max()) if n else 0)
    assert b.num_truncated == sum(len(s) > max_tokens for s in seqs)
    assert b.num_tokens == int(mask.sum()) and b.num_sequences == n
    if mode == "padded":
        assert R == n and b.example_index.tolist() == list(range(n))
        assert L == (pad_to_multiple_of or 1) * -(-max(b.seq_lens, default=0) // (pad_to_multiple_of or 1))
    else:
        fills = b.attention_mask.sum(axis=1, dtype=np.int64)
        assert R <= n and (fills <= max_tokens).all() and (R == 0 or fills.min() > 0)  # never worse than padded
        # any-fit: a row is opened only when its first sequence fits no earlier row, so any two rows overflow
        # max_tokens together (at most one row is half empty)
        for r in range(R):
            assert (fills[r] + fills[r + 1 :] > max_tokens).all()


def random_sequences(rng: np.random.Generator, max_tokens: int) -> list[list[int]]:
    n = int(rng.integers(0, 13))
    out = []
    for _ in range(n):
        kind = rng.integers(0, 4)
        ln = {0: 1, 1: max_tokens, 2: int(rng.integers(1, max_tokens + 1))}.get(int(kind), int(rng.integers(1, 2 * max_tokens + 3)))
        out.append(rng.integers(0, 1000, ln).tolist())
    return out


@pytest.mark.parametrize("mode", ["packed", "padded"])
@pytest.mark.parametrize("truncation", ["keep_start", "keep_end", "error"])
def test_rust_equals_python_twin_on_random_inputs(mode, truncation):
    rng = np.random.default_rng(seed_of("pack_sequences", mode, truncation))
    errors = 0
    for _ in range(60):
        m = int(rng.integers(2, 40))
        seqs = random_sequences(rng, m)
        opts = dict(max_tokens=m, mode=mode, truncation=truncation, pad_token_id=int(rng.integers(0, 7)),
                    pad_to_multiple_of=None if rng.random() < 0.5 else int(rng.integers(1, 9)),
                    vocab_size=None if rng.random() < 0.5 else 1000)
        if truncation == "error" and any(len(s) > m for s in seqs):
            for backend in BACKENDS:
                with pytest.raises(ValueError, match=r"sequences\[\d+\] has \d+ tokens but max_tokens is"):
                    pack_sequences(seqs, backend=backend, **opts)
            errors += 1
            continue
        b = pack_sequences(seqs, **opts)
        check_sequences(b, seqs, **{k: v for k, v in opts.items() if k != "vocab_size"})
        assert_same(b, pack_sequences(seqs, backend="python", **opts))
        # the options object gives the same batch
        assert_same(b, pack_sequences(seqs, options=PackOptions(**opts)))
    assert truncation != "error" or errors > 0


def test_edge_cases():
    for backend in BACKENDS:
        for mode in ("packed", "padded"):
            e = pack_sequences([], max_tokens=8, mode=mode, backend=backend)
            assert e.input_ids.shape == (0, 0) and e.input_ids.dtype == np.int32
            assert e.cu_seqlens.tolist() == [0] and e.example_index.shape == (0,) and e.max_seqlen == 0
            assert e.efficiency == 1.0
        # single tokens fill rooms of one: three 1-token sequences in rows of 2 take 2 rows, not 3
        b = pack_sequences([[5], [6], [7]], max_tokens=2, backend=backend)
        assert b.input_ids.tolist() == [[5, 6], [7, 0]] and b.cu_seqlens.tolist() == [0, 1, 2, 4]
        assert b.position_ids.tolist() == [[0, 0], [0, 1]]
        # a sequence of exactly max_tokens fills a row; a 1-token one is packed after the 3-token one
        b = pack_sequences([[1, 2, 3, 4], [5, 6, 7], [8]], max_tokens=4, backend=backend)
        assert b.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and b.num_truncated == 0
        assert b.example_index.tolist() == [0, 1, 2] and b.efficiency == 1.0
        # padded: TRL-style right padding, one row each
        b = pack_sequences([[1, 2], [3]], max_tokens=4, mode="padded", pad_token_id=9, pad_to_multiple_of=4,
                           backend=backend)
        assert b.input_ids.tolist() == [[1, 2, 9, 9], [3, 9, 9, 9]] and b.cu_seqlens.tolist() == [0, 4, 8]
        assert b.attention_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
        # truncation per sequence
        b = pack_sequences([[1, 2, 3, 4, 5]], max_tokens=3, truncation="keep_end", backend=backend)
        assert b.input_ids.tolist() == [[3, 4, 5]] and b.num_truncated == 1


def test_input_forms_agree():
    seqs = [[3, 1, 4], [1], [5, 9, 2, 6, 5], [3, 5]]
    want = pack_sequences(seqs, max_tokens=6)
    values = np.array([7, 7] + sum(seqs, []), dtype=np.int64)
    offsets = np.cumsum([2] + [len(s) for s in seqs]).astype(np.int64)
    offsets = np.concatenate([[2], offsets[1:]])  # a sliced Arrow array: offsets start at 2
    forms = [
        tuple(tuple(s) for s in seqs),
        [np.array(s, dtype=np.int32) for s in seqs],
        [np.array(s, dtype=np.uint16) for s in seqs],
        [torch.tensor(s) for s in seqs],
        np.array([np.array(s) for s in seqs], dtype=object),
        (values, offsets),
        (values.astype(np.int32), offsets),
    ]
    for form in forms:
        for backend in BACKENDS:
            assert_same(want, pack_sequences(form, max_tokens=6, backend=backend))


def test_outputs_are_writable_owned_arrays_and_to_torch():
    b = pack_sequences([[1, 2, 3], [4, 5]], max_tokens=4, pad_token_id=7)
    for f in FIELDS:
        a = getattr(b, f)
        assert a.flags.c_contiguous and a.flags.writeable, f
    t = b.to_torch()
    for name in ("input_ids", "position_ids", "attention_mask"):
        assert t[name].dtype == torch.int64 and t[name].shape == b.input_ids.shape
        assert t[name].tolist() == getattr(b, name).tolist()
    assert t["cu_seqlens"].dtype == torch.int32 and t["cu_seqlens"].tolist() == b.cu_seqlens.tolist()
    assert t["example_index"].dtype == t["seq_lens"].dtype == torch.int64 and t["max_seqlen"] == b.max_seqlen
    # cu_seqlens is exactly the segmentation that position_ids restarting at 0 give
    starts = torch.nonzero(t["position_ids"].reshape(-1) == 0).flatten()
    assert starts.tolist() == t["cu_seqlens"][:-1].tolist()


def test_truncation_is_counted_and_warned_once_under_the_default():
    seqs = [[1] * 9, [2] * 3, [3] * 12]
    with pytest.warns(UserWarning, match=r"pack_sequences: 2 of 3 sequences were truncated"):
        b = pack_sequences(seqs, max_tokens=8)
    assert b.num_truncated == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pack_sequences(seqs, max_tokens=8, truncation="keep_start").num_truncated == 2
        assert pack_sequences(seqs, options=PackOptions(max_tokens=8)).num_truncated == 2
        assert pack_sequences(seqs, max_tokens=12).num_truncated == 0


BAD_SEQUENCES = [
    ([[1, 2], [3, 4, 5, 6, 7, -2]], ValueError, r"^sequences\[1\]\[5\] = -2 is out of range: token ids must be in "
                                                 r"\[0, 2147483648\)"),
    ([[1], []], ValueError, r"^sequences\[1\] is empty: every sequence needs at least one token"),
    ([[1], [2, 2.5]], TypeError, r"^sequences\[1\]\[1\] must be an int token id, got float"),
    ([[1], "ab"], TypeError, r"^sequences\[1\] must be a sequence of int token ids, got str"),
    ([[1], 3], TypeError, r"^sequences\[1\] must be a sequence of int token ids, got int"),
    ([np.array([1.0])], TypeError, r"^sequences\[0\] must be integers, got dtype float64"),
    ([np.array([[1, 2]])], ValueError, r"^sequences\[0\] must be 1-D"),
    (np.array([[1, 2], [3, 4]]), TypeError, r"^sequences must be a list of token-id sequences"),
    (5, TypeError, r"^sequences must be a list of token-id sequences"),
    ((np.array([1, 2]), np.array([0, 3])), ValueError, r"^sequences: offsets\[-1\] = 3 exceeds the 2 values"),
    ((np.array([1, 2]), np.array([0, 2, 1])), ValueError, r"^sequences: offsets must be non-decreasing"),
    ([np.array([1, 2**63 + 5], dtype=np.uint64)], ValueError, r"^sequences\[0\]\[1\] = 9223372036854775813 is out"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,exc,msg", BAD_SEQUENCES, ids=[f"bad{i}" for i in range(len(BAD_SEQUENCES))])
def test_bad_input_names_the_argument_and_the_entry(backend, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        pack_sequences(bad, max_tokens=16, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_options(backend):
    with pytest.raises(ValueError, match=r"^sequences\[0\]\[1\] = 10 is out of range: token ids must be in "
                                         r"\[0, vocab_size=10\)"):
        pack_sequences([[1, 10]], max_tokens=4, vocab_size=10, backend=backend)
    with pytest.raises(ValueError, match=r"^sequences\[0\] has 5 tokens but max_tokens is 4"):
        pack_sequences([[1] * 5], max_tokens=4, truncation="error", backend=backend)
    with pytest.raises(ValueError, match=r"^max_tokens must be >= 2"):
        pack_sequences([[1]], max_tokens=1, backend=backend)
    with pytest.raises(TypeError, match=r"^max_tokens must be an int"):
        pack_sequences([[1]], backend=backend)
    with pytest.raises(ValueError, match=r"^mode must be one of"):
        pack_sequences([[1]], max_tokens=4, mode="ragged", backend=backend)
    with pytest.raises(TypeError, match=r"^pass either options= or the separate options \['mode'\]"):
        pack_sequences([[1]], options=PackOptions(max_tokens=4), mode="padded", backend=backend)
    with pytest.raises(TypeError, match=r"^options must be a dpo_fast.packing.PackOptions"):
        pack_sequences([[1]], options={"max_tokens": 4}, backend=backend)
    with pytest.raises(ValueError, match=r"^backend must be 'rust' or 'python'"):
        pack_sequences([[1]], max_tokens=4, backend="c")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    seqs = [[5, 1, 4], [2], [9, 9, 9, 9, 9, 9, 9]]
    arrays = [np.array(s, dtype=np.int32) for s in seqs]
    values, offsets = np.concatenate(arrays), np.array([0, 3, 4, 11], dtype=np.int64)
    before = (copy.deepcopy(seqs), [a.copy() for a in arrays], values.copy(), offsets.copy())
    for form in (seqs, arrays, (values, offsets)):
        b = pack_sequences(form, max_tokens=5, truncation="keep_end", backend=backend)
        b.input_ids[...] = -1  # the outputs share no memory with the inputs
    assert seqs == before[0]
    for a, w in zip(arrays, before[1]):
        np.testing.assert_array_equal(a, w)
    np.testing.assert_array_equal(values, before[2])
    np.testing.assert_array_equal(offsets, before[3])


def test_docstring_examples():
    res = doctest.testmod(sequences_module, globs=dict(vars(sequences_module)), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0 and res.attempted > 0


# ---------------------------------------------------------------------------------------------- pack_padded_rows


def padded_rows_reference(input_ids, attention_mask, row_tokens=None, pad_token_id=0, pad_to_multiple_of=None):
    """Plain loops over the padded batch; the plan from the pure-Python best-fit twin."""
    ids, m = input_ids.tolist(), (attention_mask != 0).tolist()
    B, T = input_ids.shape
    lengths = [sum(row) for row in m]
    first = [row.index(True) if any(row) else 0 for row in m]
    capacity = {None: max(lengths), "one_row": sum(lengths)}.get(row_tokens, row_tokens)
    items, starts = _reference.best_fit_decreasing(lengths, capacity)
    rows = [items[starts[r] : starts[r + 1]] for r in range(len(starts) - 1)]
    R = len(rows)
    L = max(sum(lengths[b] for b in row) for row in rows)
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    out_ids = [[pad_token_id] * L for _ in range(R)]
    pos = [[0] * L for _ in range(R)]
    index = [[R * L] * T for _ in range(B)]
    cu = []
    for r, row in enumerate(rows):
        at = 0
        for k, b in enumerate(row):
            cu.append(r * L + at)
            for t in range(T):
                if m[b][t]:
                    j = at + t - first[b]
                    out_ids[r][j] = ids[b][t]
                    index[b][t] = r * L + j
            end = L if k == len(row) - 1 else at + lengths[b]  # the row's padding: in its last sequence
            for j in range(at, end):
                pos[r][j] = j - at
            at += lengths[b]
    cu.append(R * L)
    return dict(input_ids=out_ids, position_ids=pos, cu_seqlens=cu, index=index, order=items, lengths=lengths,
                real_tokens=sum(lengths), max_seqlen=max(z - a for a, z in zip(cu, cu[1:])))


def random_padded_batch(rng: np.random.Generator):
    B, T = int(rng.integers(1, 7)), int(rng.integers(1, 11))
    mask = np.zeros((B, T), dtype=np.int64)
    style = rng.choice(["left", "right", "both", "none"])
    for b in range(B):
        n = int(rng.integers(0, T + 1)) if style != "none" else T
        lead = {"left": T - n, "right": 0}.get(str(style), int(rng.integers(0, T - n + 1)))
        mask[b, lead : lead + n] = 1
    if not mask.any():
        mask[int(rng.integers(0, B)), int(rng.integers(0, T))] = 1
    ids = torch.from_numpy(rng.integers(1, 500, (B, T)))
    return ids, torch.from_numpy(mask)


def assert_rows_equal(got: PackedRows, want: dict) -> None:
    assert got.input_ids.dtype == got.position_ids.dtype == got.index.dtype == torch.int64
    assert got.cu_seqlens.dtype == torch.int32
    for name in ("input_ids", "position_ids", "cu_seqlens", "index", "order", "lengths"):
        assert getattr(got, name).tolist() == want[name], name
    assert (got.max_seqlen, got.real_tokens) == (want["max_seqlen"], want["real_tokens"])


def test_pack_padded_rows_matches_the_loop_reference():
    rng = np.random.default_rng(seed_of("pack_padded_rows"))
    for case in range(150):
        ids, mask = random_padded_batch(rng)
        longest = int(mask.sum(1).max())
        row_tokens = [None, "one_row", longest, longest + int(rng.integers(1, 6))][case % 4]
        mult = None if rng.random() < 0.5 else int(rng.integers(1, 6))
        mask_in = mask.bool() if case % 3 == 0 else mask.to(torch.int32) if case % 3 == 1 else mask
        got = pack_padded_rows(ids, mask_in, row_tokens=row_tokens, pad_token_id=3, pad_to_multiple_of=mult)
        assert_rows_equal(got, padded_rows_reference(ids, mask, row_tokens, 3, mult))
        R, L = got.input_ids.shape
        if row_tokens == "one_row":
            assert R == 1
        fills = (got.index.reshape(-1)[mask.reshape(-1) != 0] // L).bincount(minlength=R)
        assert R <= ids.shape[0] and (fills > 0).all()  # never more rows than the padded batch, none empty
        if mult:
            assert L % mult == 0
        # unpack is the exact inverse on real tokens and zero at padding
        back = got.unpack(got.input_ids)
        assert torch.equal(back, torch.where(mask != 0, ids, 0))
        assert torch.equal(got.unpack(got.input_ids[..., None].expand(R, L, 2))[..., 1], back)


def test_pack_padded_rows_small_cases():
    # one row; a left- and right-padded row
    p = pack_padded_rows(torch.tensor([[0, 7, 8, 9, 0]]), torch.tensor([[0, 1, 1, 1, 0]]))
    assert p.input_ids.tolist() == [[7, 8, 9]] and p.position_ids.tolist() == [[0, 1, 2]]
    assert p.cu_seqlens.tolist() == [0, 3] and p.index.tolist() == [[3, 0, 1, 2, 3]]
    # 1-token sequences share a row of 2 (rooms of one are used); an empty row adds no row
    p = pack_padded_rows(torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([[1, 0], [0, 1], [0, 0]]), row_tokens=2)
    assert p.input_ids.tolist() == [[1, 4]] and p.order.tolist() == [0, 1, 2]
    assert p.cu_seqlens.tolist() == [0, 1, 2, 2] and p.lengths.tolist() == [1, 1, 0]
    assert p.unpack(torch.tensor([[10.0, 20.0]])).tolist() == [[10.0, 0.0], [0.0, 20.0], [0.0, 0.0]]
    assert p.padding_share == 0.0


def test_pack_padded_rows_unpack_gradient():
    rng = np.random.default_rng(seed_of("pack_padded_rows", "grad"))
    for _ in range(5):
        ids, mask = random_padded_batch(rng)
        p = pack_padded_rows(ids, mask, row_tokens="one_row" if rng.random() < 0.5 else None)
        R, L = p.input_ids.shape
        x = torch.randn(R, L, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(p.unpack, (x,))
        # against the padded layout: the gradient of any loss over the unpacked values, scattered to the slots
        w = torch.randn(*ids.shape, 3, dtype=torch.float64)
        (p.unpack(x) * w).sum().backward()
        want = torch.zeros(R * L + 1, 3, dtype=torch.float64)
        want.index_add_(0, p.index.reshape(-1), w.reshape(-1, 3))
        torch.testing.assert_close(x.grad.reshape(-1, 3), want[:-1], rtol=0, atol=0)


def test_pack_padded_rows_inputs_are_not_modified():
    rng = np.random.default_rng(seed_of("pack_padded_rows", "inputs"))
    ids, mask = random_padded_batch(rng)
    before = (ids.clone(), mask.clone())
    p = pack_padded_rows(ids, mask, pad_to_multiple_of=4)
    p.input_ids.fill_(-1)
    assert torch.equal(ids, before[0]) and torch.equal(mask, before[1])


BAD_ROWS = [
    (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 1]]), {}, ValueError, r"row 0's real tokens are not contiguous"),
    (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 1], [2, 1]]), {}, ValueError,
     r"^attention_mask: expected 0/1 values, row 1 has others"),
    (torch.tensor([[1, 2]]), torch.tensor([[0, 0]]), {}, ValueError, r"^attention_mask: no real token"),
    (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 1], [1, 0]]), {"row_tokens": 1}, ValueError,
     r"^row_tokens: 1 cannot hold row 0 with 2 real tokens"),
    (torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), {"row_tokens": "rows"}, ValueError, r"^row_tokens: expected"),
    (torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), {"row_tokens": True}, ValueError, r"^row_tokens: expected"),
    (torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), {"pad_to_multiple_of": 0}, ValueError,
     r"^pad_to_multiple_of: expected an int >= 1"),
    (torch.tensor([1, 2]), torch.tensor([1, 1]), {}, ValueError, r"^input_ids: expected a 2-D \(B, T\) tensor"),
    (torch.tensor([[1, 2]]), torch.tensor([[1, 1, 1]]), {}, ValueError, r"^attention_mask: expected shape \(1, 2\)"),
    (torch.tensor([[1, 2]]), [[1, 1]], {}, ValueError, r"^attention_mask: expected shape \(1, 2\)"),
    (torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 1]]), {}, TypeError, r"^input_ids: expected an integer dtype"),
    (torch.tensor([[True, False]]), torch.tensor([[1, 1]]), {}, TypeError, r"^input_ids: expected an integer dtype"),
]


@pytest.mark.parametrize("ids,mask,kw,exc,msg", BAD_ROWS, ids=[f"bad{i}" for i in range(len(BAD_ROWS))])
def test_pack_padded_rows_bad_input(ids, mask, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        pack_padded_rows(ids, mask, **kw)


def test_readme_example_runs_as_written():
    """The README's pack_sequences / pack_padded_rows block runs, and its comments state what it gives."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (block,) = [b for b in blocks if "dpo_fast.pack_sequences(" in b]
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    b, rows = ns["b"], ns["rows"]
    assert b.input_ids.tolist() == [[9, 10, 11, 12, 8], [5, 6, 7, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 3, 4]]
    assert b.cu_seqlens.tolist() == [0, 4, 5, 10] and b.example_index.tolist() == [2, 1, 0]
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9]] and rows.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert rows.cu_seqlens.tolist() == [0, 3, 5] and rows.unpack(ns["hidden"]).shape == (2, 5, 16)


def test_pack_padded_rows_needed_positions_must_be_real_tokens():
    """``needed`` (the hidden positions a caller reads) is checked in the packing's one readback: a padding
    position raises PaddedPositionError (a ValueError) naming the row and position; real positions pack as without."""
    from dpo_fast.packing import PaddedPositionError

    ids = torch.arange(1, 13).view(2, 6)
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])  # row 1 left-padded
    ok = am.bool()
    plain, checked = pack_padded_rows(ids, am), pack_padded_rows(ids, am, needed=ok)
    assert torch.equal(plain.input_ids, checked.input_ids) and torch.equal(plain.index, checked.index)
    bad = ok.clone()
    bad[1, 1] = True  # a scored token's predecessor that is padding
    with pytest.raises(PaddedPositionError, match=r"^needed: row 1 reads position 1, whose attention_mask is 0"):
        pack_padded_rows(ids, am, needed=bad)
    assert issubclass(PaddedPositionError, ValueError)
    with pytest.raises(ValueError, match=r"needed: expected a bool tensor of shape \(2, 6\)"):
        pack_padded_rows(ids, am, needed=ok[:, :3])
