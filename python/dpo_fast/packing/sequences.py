"""Single sequences packed without padding: token lists (:func:`pack_sequences`) and the padded rows of a
trainer's batch (:func:`pack_padded_rows`), both best-fit-decreasing.

:func:`pack_sequences` is the single-sequence entry beside :func:`dpo_fast.pack_pairs`: S token-id sequences
(lists of ints, 1-D integer arrays, or the flat Arrow layout ``(values, offsets)``), the same
:class:`~dpo_fast.packing.PackOptions`, the same Rust core (``rust/src/pack.rs``, ``pack_sequences``, the GIL
released) and its pure-Python twin (``backend="python"``, :mod:`dpo_fast.packing._reference`). ``packed`` mode
places whole sequences in rows of at most ``max_tokens`` tokens by the rule ``pack_pairs`` uses for pairs;
``padded`` mode gives one row per sequence. Output: :class:`PackedSequences` (numpy, no copy).

:func:`pack_padded_rows` takes a padded batch as a trainer holds it -- ``input_ids`` (B, T) with a 0/1
``attention_mask`` (B, T) whose ones are one contiguous run per row (left-padded prompts followed by
right-padded completions, as TRL's GRPO/RLOO/KTO/CPO/ORPO batches are) -- and lays the real tokens of every row
into packed rows: whole sequences, best-fit-decreasing (the Rust planner ``dpo_fast._native.best_fit_bins``,
the rule :func:`dpo_fast.pack_pairs` uses for pairs), ``position_ids`` restarting at 0 per sequence, and
``cu_seqlens``. Only the lengths go to the host (one readback); the tokens are moved on their device.

:meth:`PackedRows.unpack` maps any per-token tensor of the packed layout (the decoder's hidden states) back to
the padded (B, T) layout, zeros at padding, so code written for the padded batch (labels, the loss, metrics)
runs unchanged on the packed forward. Gradients flow through it.

Positions: a padded row's real tokens get positions 0, 1, ... Models with rotary or relative positions (Llama,
Qwen, Mistral, Gemma, ...) give the same hidden states as in the padded batch, whose left padding only shifts
every position by a constant; a model with absolute position embeddings does not (its padded forward sees
positions shifted by the left padding) -- use padded batches there.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from . import _reference as _ref
from .batch import _check_wide_ids, _common_dtype, _PackedRows, _to_flat, _to_lists
from .options import PackOptions

__all__ = ["PackedSequences", "pack_sequences", "pack_sequences_reference", "PackedRows", "pack_padded_rows",
           "PaddedPositionError", "check_row_tokens"]


@dataclasses.dataclass(frozen=True, eq=False)
class PackedSequences(_PackedRows):
    """Output of :func:`pack_sequences`. Numpy arrays, handed over from Rust without a copy.

    Shape legend: R rows, L row length, S sequences.

    Attributes:
        input_ids: (R, L) int32. Token ids; ``pad_token_id`` at padding.
        position_ids: (R, L) int32. 0, 1, ... restarting at each sequence; a row's padding continues its last
            sequence, so ``position_ids == 0`` marks exactly the starts in ``cu_seqlens``.
        attention_mask: (R, L) int8. 1 on real tokens, 0 on padding. In ``packed`` mode a padding mask only:
            attention between the sequences of a row must be cut with ``cu_seqlens`` or ``position_ids``.
        cu_seqlens: (S + 1,) int32. Sequence boundaries in the flattened ``R * L`` layout; starts at 0, ends at
            ``R * L``; a row's trailing padding is counted in the row's last sequence.
        example_index: (S,) int64. Original index (position in the input) of each packed sequence, in packed
            order (``arange(S)`` in ``padded`` mode).
        seq_lens: (S,) int32. Real tokens of each packed sequence (after truncation).
        max_seqlen: int. Longest segment of ``cu_seqlens`` (padding included), for varlen attention.
        mode: ``"packed"`` or ``"padded"``.
        num_truncated: int. Sequences the ``truncation`` policy shortened to ``max_tokens``.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    attention_mask: np.ndarray
    cu_seqlens: np.ndarray
    example_index: np.ndarray
    seq_lens: np.ndarray
    max_seqlen: int
    mode: str
    num_truncated: int = 0

    _ROW_ARRAYS = ("input_ids", "position_ids", "attention_mask")
    _INDEX_ARRAYS = ("example_index", "seq_lens")

    @property
    def num_sequences(self) -> int:
        return int(self.example_index.shape[0])

    def to_torch(self, device: Any = None, *, non_blocking: bool = False) -> dict[str, Any]:
        """The batch as torch tensors. Arrays cross to ``device`` in their narrow dtype and are widened there.

        Returns:
            dict with ``input_ids``, ``position_ids``, ``attention_mask`` (R, L) int64; ``cu_seqlens``
            (S + 1,) int32; ``example_index`` (S,), ``seq_lens`` (S,) int64; ``max_seqlen`` int.
        """
        return self._torch(device, non_blocking)


def pack_sequences(
    sequences: Any,
    *,
    max_tokens: int | None = None,
    mode: str | None = None,
    pad_token_id: int | None = None,
    truncation: str | None = None,
    pad_to_multiple_of: int | None = None,
    vocab_size: int | None = None,
    options: PackOptions | None = None,
    backend: str = "rust",
) -> PackedSequences:
    r"""Pack tokenized single sequences into rows: best-fit-decreasing packed rows or one padded row each.

    The single-sequence entry beside :func:`dpo_fast.pack_pairs` (same options, input forms and error style;
    no prompt/completion split, so no labels: derive them from ``input_ids`` and ``cu_seqlens`` as the task
    needs).

    Args:
        sequences: S token-id sequences, as a list of lists of ints, a list of 1-D integer numpy arrays (or
            tensors), or the flat Arrow layout ``(values, offsets)`` -- a 2-tuple of 1-D integer numpy arrays
            where sequence ``i`` is ``values[offsets[i]:offsets[i + 1]]``. Every sequence needs at least one
            token.
        max_tokens: the most tokens of one sequence (longer ones are truncated, see ``truncation``) and of one
            row in ``packed`` mode. >= 2 (the :class:`~dpo_fast.packing.PackOptions` rule).
        mode: ``"packed"`` (rows of <= ``max_tokens`` tokens holding whole sequences, best-fit-decreasing:
            longest first, ties by input index, each into the open row with the least room that fits it, ties
            by the older row; deterministic) or ``"padded"`` (S rows in input order, right-padded to the
            longest sequence).
        pad_token_id: id written at padding.
        truncation: a sequence longer than ``max_tokens``: ``"keep_start"`` keeps its first ``max_tokens``
            tokens, ``"keep_end"`` its last, ``"error"`` raises ValueError. Applied per sequence, so both modes
            hold the same sequences. As in ``pack_pairs``, ``num_truncated`` counts the shortened sequences and a
            call that shortened any under the default policy (neither ``truncation`` nor ``options`` given)
            warns once.
        pad_to_multiple_of: round the row length L up to a multiple of this.
        vocab_size: when given, every id (and ``pad_token_id``) must be in ``[0, vocab_size)``; ids must always
            be in ``[0, 2**31)``.
        options: a :class:`~dpo_fast.packing.PackOptions` holding all of the above (then pass none of them
            separately). The keywords build one: ``mode="packed"``, ``pad_token_id=0`` and
            ``truncation="keep_start"`` when omitted.
        backend: ``"rust"`` (default) or ``"python"`` (the pure-Python twin; same output).

    Returns:
        :class:`PackedSequences`. Zero sequences give a valid empty batch: (0, 0) arrays, ``cu_seqlens == [0]``.

    Shape:
        ``input_ids``, ``position_ids``, ``attention_mask``: :math:`(R, L)`; ``cu_seqlens``: :math:`(S + 1,)`;
        ``example_index``, ``seq_lens``: :math:`(S,)`; :math:`R = S`, :math:`L` = the longest sequence in
        ``padded`` mode; :math:`R` = rows opened by best-fit, :math:`L \le` ``max_tokens`` = the fullest row in
        ``packed`` mode (both before ``pad_to_multiple_of``).

    Raises:
        TypeError: a non-integer input or option; options given both ways.
        ValueError: an option out of range, an id out of range (``sequences[i][j] = v ...``), an empty sequence,
            broken offsets, a sequence over ``max_tokens`` with ``truncation="error"``, or a batch of ``2**31``
            slots or more.
        MemoryError: the output buffers cannot be allocated.

    Examples::

        >>> b = pack_sequences([[1, 2, 3], [4], [5, 6, 7, 8]], max_tokens=5)
        >>> b.input_ids
        array([[5, 6, 7, 8, 4],
               [1, 2, 3, 0, 0]], dtype=int32)
        >>> b.position_ids
        array([[0, 1, 2, 3, 0],
               [0, 1, 2, 3, 4]], dtype=int32)
        >>> b.cu_seqlens, b.example_index
        (array([ 0,  4,  5, 10], dtype=int32), array([2, 1, 0]))
    """
    implicit_truncation = options is None and truncation is None
    given = dict(max_tokens=max_tokens, mode=mode, pad_token_id=pad_token_id, truncation=truncation,
                 pad_to_multiple_of=pad_to_multiple_of, vocab_size=vocab_size)
    if options is None:
        options = PackOptions(**{k: v for k, v in given.items() if v is not None or k == "max_tokens"})
    elif not isinstance(options, PackOptions):
        raise TypeError(f"options must be a dpo_fast.packing.PackOptions, got {type(options).__name__}")
    elif any(v is not None for v in given.values()):
        raise TypeError(f"pass either options= or the separate options {sorted(k for k, v in given.items() if v is not None)}, "
                        "not both")
    if not isinstance(backend, str) or backend not in ("rust", "python"):
        raise ValueError(f"backend must be 'rust' or 'python', got {backend!r}")
    if backend == "python":
        out = _ref.pack_sequences_reference(_to_lists("sequences", sequences), options)
    else:
        from dpo_fast import _native

        values, offsets = _to_flat("sequences", sequences)
        _check_wide_ids("sequences", values, offsets, options)
        (values,) = _common_dtype([values])
        out = _native.pack_sequences_flat(values, np.ascontiguousarray(offsets, dtype=np.int64), **options.native())
    batch = PackedSequences(mode=options.mode, **out)
    if batch.num_truncated and implicit_truncation:
        warnings.warn(
            f"pack_sequences: {batch.num_truncated} of {batch.num_sequences} sequences were truncated to "
            f"max_tokens={options.max_tokens} (truncation={options.truncation!r}, the default); see "
            "batch.num_truncated. Pass truncation='error' to raise instead, a larger max_tokens, or name the "
            "truncation policy to silence this", UserWarning, stacklevel=2)
    return batch


def pack_sequences_reference(sequences: Sequence, **kwargs: Any) -> PackedSequences:
    """:func:`pack_sequences` with ``backend="python"``."""
    return pack_sequences(sequences, backend="python", **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedRows:
    """Output of :func:`pack_padded_rows`. Shape legend: B padded rows of length T; R packed rows of length L;
    S = B sequences (one per padded row, in packed order).

    Attributes:
        input_ids: (R, L) int64 token ids; ``pad_token_id`` at row padding.
        position_ids: (R, L) int64, 0, 1, ... restarting at each sequence; a row's trailing padding continues
            its last sequence (so ``position_ids == 0`` marks exactly the sequence starts).
        cu_seqlens: (S + 1,) int32 boundaries in the flattened ``R * L`` layout (a row's trailing padding is
            counted in its last sequence).
        max_seqlen: longest span in ``cu_seqlens`` (int).
        index: (B, T) int64: where each real token of the padded batch sits in the flattened packed layout;
            ``R * L`` at padding.
        order: (S,) int64: the padded row of each packed sequence.
        lengths: (B,) int64 real tokens per padded row.
        real_tokens: sum of ``lengths`` (int).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    index: torch.Tensor
    order: torch.Tensor
    lengths: torch.Tensor
    real_tokens: int

    @property
    def padding_share(self) -> float:
        """Share of the packed rows' slots that hold padding: ``1 - real_tokens / (R * L)``."""
        return 1.0 - self.real_tokens / max(self.input_ids.numel(), 1)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(R, L, *F) values of the packed layout -> (B, T, *F) in the padded layout, 0 at padding.

        Differentiable (a gather; its backward scatters each real token's gradient back to its one packed slot).
        """
        R, L = self.input_ids.shape
        if packed.shape[:2] != (R, L):
            raise ValueError(f"packed: expected leading dims ({R}, {L}) (the packed rows), got {tuple(packed.shape)}")
        flat = packed.reshape(R * L, *packed.shape[2:])
        flat = torch.cat([flat, flat.new_zeros((1, *flat.shape[1:]))])  # slot R * L: the padding value
        B, T = self.index.shape
        return flat.index_select(0, self.index.reshape(-1).to(flat.device)).view(B, T, *packed.shape[2:])


def check_row_tokens(value: int | str | None, name: str = "row_tokens") -> int | str | None:
    """A packed-row capacity: None, ``"one_row"`` or an int >= 1 (returned as given); ``ValueError`` naming ``name``
    otherwise. Whether it holds the longest sequence is known only with the batch (:func:`pack_padded_rows`)."""
    if value is None or value == "one_row":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected None, 'one_row' or an int >= 1, got {value!r}")
    return value


class PaddedPositionError(ValueError):
    """:func:`pack_padded_rows`: a position the caller reads (``needed``) is padding, where a packed forward computes
    no hidden state (e.g. a left-padded row whose first real token is scored from the position before it)."""


def pack_padded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, row_tokens: int | str | None = None,
                     pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
                     needed: torch.Tensor | None = None) -> PackedRows:
    """Pack the real tokens of a padded batch into rows of whole sequences (best-fit-decreasing, Rust planner).

    Args:
        input_ids: (B, T) integer token ids.
        attention_mask: (B, T) 0/1 (bool or integer); the ones of each row one contiguous run (a row may be all
            zeros: an empty sequence).
        row_tokens: capacity of a packed row. None: the longest sequence of the batch (short rows keep dense
            sdpa/eager attention cheap); ``"one_row"``: every sequence in one row (flash-attention varlen); an
            int: at least the longest sequence (raises otherwise).
        pad_token_id: id at row padding (never attended to by a real token: it comes after the row's last one).
        pad_to_multiple_of: round the row length L up to a multiple of this.
        needed: optional (B, T) bool, the positions whose hidden states the caller will read (e.g. ``labels !=
            -100`` for shifted labels); each must be a real token. Checked in the same readback.

    Returns:
        :class:`PackedRows`, on ``input_ids``' device.

    Raises:
        ValueError: shapes differ, a mask value other than 0/1, a row whose real tokens are not contiguous, no
            real token at all, or ``row_tokens`` below the longest sequence.
        PaddedPositionError: (a ValueError) a ``needed`` position is padding.
        TypeError: non-integer ``input_ids``.
    """
    from dpo_fast import _native

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a 2-D (B, T) tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (like input_ids), got "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    check_row_tokens(row_tokens)
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or not isinstance(
            pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of: expected an int >= 1 or None, got {pad_to_multiple_of!r}")
    dev = input_ids.device
    B, T = input_ids.shape
    am = attention_mask.to(dev)
    m = am != 0
    t = torch.arange(T, device=dev)
    big = torch.full_like(t, T)
    first = torch.where(m, t, big).amin(1) if T else torch.zeros(B, dtype=torch.int64, device=dev)
    last = torch.where(m, t, -1).amax(1) if T else torch.full((B,), -1, dtype=torch.int64, device=dev)
    bad = ((am != 0) & (am != 1)).any(1).to(torch.int64) if am.dtype != torch.bool else torch.zeros_like(first)
    if needed is None:
        unread = torch.full_like(first, T)
    elif not isinstance(needed, torch.Tensor) or needed.shape != input_ids.shape:
        raise ValueError(f"needed: expected a bool tensor of shape {tuple(input_ids.shape)} (like input_ids), got "
                         f"{tuple(getattr(needed, 'shape', ()))}")
    else:  # the first padding position the caller reads, T where none
        unread = torch.where(needed.to(dev).bool() & ~m, t, big).amin(1) if T else torch.full_like(first, T)
    # the one host readback: lengths, first/last real position, bad mask values, padding positions read
    stats = torch.stack([m.sum(1), first, last, bad, unread]).cpu().numpy().astype(np.int64)
    lengths, first_np, last_np, bad_np, unread_np = stats
    if bad_np.any():
        raise ValueError(f"attention_mask: expected 0/1 values, row {int(np.argmax(bad_np))} has others")
    if (unread_np < T).any():
        b = int(np.argmax(unread_np < T))
        raise PaddedPositionError(f"needed: row {b} reads position {unread_np[b]}, whose attention_mask is 0: a "
                                  "packed forward computes hidden states at real tokens only")
    nonempty = lengths > 0
    holes = nonempty & (last_np - first_np + 1 != lengths)
    if holes.any():
        b = int(np.argmax(holes))
        raise ValueError(f"attention_mask: row {b}'s real tokens are not contiguous (positions {first_np[b]}.."
                         f"{last_np[b]} hold {lengths[b]} ones); packing would change their relative positions. "
                         "Use padded batches for this data.")
    total = int(lengths.sum())
    if total == 0:
        raise ValueError("attention_mask: no real token in the batch (all zeros); nothing to pack")
    longest = int(lengths.max())
    if row_tokens == "one_row":
        capacity = total
    elif row_tokens is None:
        capacity = longest
    elif row_tokens < longest:
        raise ValueError(f"row_tokens: {row_tokens} cannot hold row {int(np.argmax(lengths))} with {longest} real "
                         "tokens; raise row_tokens or pass None (the longest sequence)")
    else:
        capacity = int(row_tokens)
    items, starts = _native.best_fit_bins(np.ascontiguousarray(lengths), capacity)
    R = len(starts) - 1
    seq_len = lengths[items]  # (S,) in packed order
    row_of = np.repeat(np.arange(R), np.diff(starts))
    fills = np.add.reduceat(seq_len, starts[:-1]) if R else np.zeros(0, np.int64)
    L = int(fills.max())
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    # offset of each sequence in its row, and its start in the flattened layout
    cum = np.cumsum(seq_len) - seq_len
    offset = cum - cum[starts[:-1]][row_of]
    flat_start = row_of * L + offset
    # cu_seqlens: each sequence's start; a row's trailing padding belongs to its last sequence
    ends = flat_start + seq_len
    row_last = starts[1:] - 1
    ends[row_last] = (np.arange(R) + 1) * L
    cu = np.concatenate([[0], ends]).astype(np.int32)
    spans = np.diff(cu)
    start_of_row = np.zeros(B, np.int64)
    start_of_row[items] = flat_start
    # device side: every real token's flat slot (R * L at padding), then one scatter of ids and positions
    start_d = torch.from_numpy(start_of_row).to(dev)
    first_d = torch.from_numpy(np.where(nonempty, first_np, 0)).to(dev)
    index = torch.where(m, start_d[:, None] + (t[None, :] - first_d[:, None]), torch.full_like(input_ids, R * L,
                                                                                              dtype=torch.int64))
    ids = torch.full((R * L + 1,), int(pad_token_id), dtype=torch.int64, device=dev)
    ids.scatter_(0, index.reshape(-1), input_ids.reshape(-1).to(torch.int64))
    cu_d = torch.from_numpy(cu).to(dev)
    span_starts = torch.repeat_interleave(cu_d[:-1].to(torch.int64), torch.from_numpy(spans.astype(np.int64)).to(dev))
    pos = torch.arange(R * L, device=dev) - span_starts
    return PackedRows(input_ids=ids[:-1].view(R, L), position_ids=pos.view(R, L), cu_seqlens=cu_d,
                      max_seqlen=int(spans.max()), index=index, order=torch.from_numpy(items.astype(np.int64)),
                      lengths=torch.from_numpy(lengths), real_tokens=total)
