"""Packing of tokenized (prompt, chosen, rejected) triples into model-ready batches.

The work happens in Rust (``dpo_fast._native.pack_flat``, the GIL released); this module brings the three
inputs to the flat Arrow layout (values + offsets) and wraps the result. The options are one
:class:`~dpo_fast.packing.PackOptions`, validated once when it is built. ``backend="python"`` runs the
pure-Python twin in :mod:`dpo_fast.packing._reference` instead: identical output (and the same exception
types on bad data), used as the test oracle and the speed baseline.

Layout (see ``rust/src/pack.rs`` for the full rule):

- a pair ``i`` gives two sequences, ``prompt_i + chosen_i`` and ``prompt_i + rejected_i``;
- ``padded``: TRL's layout, 2P rows ``[chosen_0 .. chosen_{P-1}, rejected_0 .. rejected_{P-1}]``,
  right-padded to the longest sequence;
- ``packed``: rows of at most ``max_tokens`` real tokens, each holding whole pairs (chosen then
  rejected, adjacent), filled best-fit-decreasing, deterministic;
- ``cu_seqlens`` segments the *flattened* ``rows * L`` layout into exactly S = 2P sequences: a row's
  trailing padding belongs to the row's last sequence (its labels are -100, so it scores nothing), so
  ``sequence_logprobs(hidden.view(-1, H), W, labels.view(-1), cu_seqlens=cu_seqlens)`` returns S values
  and ``pairs`` indexes them directly.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np

from . import _reference as _ref
from .options import PackOptions

IGNORE_INDEX = -100

__all__ = ["pack_pairs", "pack_pairs_reference", "PackedBatch", "IGNORE_INDEX"]


class _PackedRows:
    """What every packed layout (:class:`PackedBatch`, :class:`~dpo_fast.packing.sequences.PackedSequences`) shares:
    token counts over its (R, L) rows and the hand-over to torch. A subclass names its (R, L) arrays in
    ``_ROW_ARRAYS`` and its per-pair / per-sequence index arrays in ``_INDEX_ARRAYS`` (both widened to int64);
    ``cu_seqlens`` stays int32."""

    _ROW_ARRAYS: tuple[str, ...] = ()
    _INDEX_ARRAYS: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.seq_lens.sum(dtype=np.int64))

    @property
    def num_slots(self) -> int:
        """Token slots of the (R, L) layout, padding included."""
        return int(self.input_ids.size)

    @property
    def efficiency(self) -> float:
        """Real tokens / slots (1.0 for an empty batch)."""
        return self.num_tokens / self.num_slots if self.num_slots else 1.0

    def _torch(self, device: Any, non_blocking: bool) -> dict[str, Any]:
        import torch

        def move(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            t = torch.from_numpy(a)
            if device is not None:
                t = t.to(device, non_blocking=non_blocking)
            return t.to(dtype)  # no copy when already of that dtype

        out: dict[str, Any] = {name: move(getattr(self, name), torch.int64) for name in self._ROW_ARRAYS}
        out["cu_seqlens"] = move(self.cu_seqlens, torch.int32)
        for name in self._INDEX_ARRAYS:
            out[name] = move(getattr(self, name), torch.int64)
        out["max_seqlen"] = int(self.max_seqlen)
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class PackedBatch(_PackedRows):
    """Output of :func:`pack_pairs`. Numpy arrays, handed over from Rust without a copy.

    Shape legend: R rows, L row length, P pairs, S = 2P sequences.

    Attributes:
        input_ids: (R, L) int32. Token ids; ``pad_token_id`` at padding.
        labels: (R, L) int32, already shifted: ``labels[t] = input_ids[t + 1]`` when ``t + 1`` is a
            completion token of the same sequence, else -100 (prompt positions except the last one,
            each sequence's last position, padding).
        position_ids: (R, L) int32. 0, 1, ... restarting at each sequence; a row's padding continues
            its last sequence, so ``position_ids == 0`` marks exactly the starts in ``cu_seqlens``.
        attention_mask: (R, L) int8. 1 on real tokens, 0 on padding. In ``packed`` mode this is a
            padding mask only: attention between sequences of a row must be cut with ``cu_seqlens`` or
            ``position_ids`` (flash-attention varlen / Hugging Face packed-sequence support), not with
            this mask.
        cu_seqlens: (S + 1,) int32. Sequence boundaries in the flattened ``R * L`` layout; starts at 0,
            ends at ``R * L``; trailing padding of a row is counted in the row's last sequence.
        pairs: (P, 2) int64. (chosen, rejected) sequence index of every pair, in batch order.
        example_index: (P,) int64. Original index (position in the inputs) of every pair.
        seq_lens: (S,) int32. Real tokens of each sequence (after truncation).
        completion_lens: (S,) int32. Scored tokens of each sequence (``labels != -100``): the
            completion length, one fewer when the prompt is empty. Use it for length-normalised losses.
        max_seqlen: int. Longest segment of ``cu_seqlens`` (padding included), for varlen attention.
        mode: ``"packed"`` or ``"padded"``.
        num_truncated: int. Pairs the ``truncation`` policy shortened to fit ``max_tokens`` (0 with
            ``truncation="error"``); :func:`pack_pairs` also warns when it is > 0.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    attention_mask: np.ndarray
    cu_seqlens: np.ndarray
    pairs: np.ndarray
    example_index: np.ndarray
    seq_lens: np.ndarray
    completion_lens: np.ndarray
    max_seqlen: int
    mode: str
    num_truncated: int = 0

    _ROW_ARRAYS = ("input_ids", "labels", "position_ids", "attention_mask")
    _INDEX_ARRAYS = ("pairs", "example_index", "seq_lens", "completion_lens")

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.shape[0])

    def to_torch(self, device: Any = None, *, non_blocking: bool = False) -> dict[str, Any]:
        """The batch as torch tensors, ready for a model and ``dpo_fast.sequence_logprobs``.

        Arrays cross to ``device`` in their narrow dtype and are widened there (an int32 upload is half
        the bytes of an int64 one).

        Returns:
            dict with ``input_ids``, ``labels``, ``position_ids``, ``attention_mask`` (R, L) int64;
            ``cu_seqlens`` (S + 1,) int32; ``pairs`` (P, 2), ``example_index`` (P,), ``seq_lens`` (S,),
            ``completion_lens`` (S,) int64; ``max_seqlen`` int.
        """
        return self._torch(device, non_blocking)


# ------------------------------------------------------------------------------------------------
# argument normalisation


def _int_array(arg: str, what: str, a: Any) -> np.ndarray:
    arr = np.asarray(a)
    name = f"{arg} {what}" if what else arg
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _is_flat(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(a, np.ndarray) for a in x)


def _is_array_like(x: Any) -> bool:
    return isinstance(x, np.ndarray) or (hasattr(x, "__array__") and not isinstance(x, (list, tuple)))


def _to_flat(arg: str, x: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values 1-D int array, offsets int64) from any accepted input form."""
    if _is_flat(x):
        values = _int_array(arg, "values", x[0])
        offsets = _int_array(arg, "offsets", x[1])
        return values, offsets.astype(np.int64, copy=False)
    if isinstance(x, np.ndarray) and x.dtype != object:
        raise TypeError(
            f"{arg} must be a list of token-id sequences or a (values, offsets) tuple, got a {x.ndim}-D "
            f"{x.dtype} array; pass list(array) for equal-length rows"
        )
    if not isinstance(x, (list, tuple, np.ndarray)):
        raise TypeError(f"{arg} must be a list of token-id sequences or a (values, offsets) tuple, got {type(x).__name__}")
    seqs = list(x) if isinstance(x, np.ndarray) else x
    if len(seqs) and all(_is_array_like(s) for s in seqs):
        arrays = [_int_array(f"{arg}[{i}]", "", s) for i, s in enumerate(seqs)]
        lens = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        return np.concatenate(arrays), offsets
    from dpo_fast import _native

    return _native.flatten_int_seqs(seqs, arg)


def _to_lists(arg: str, x: Any) -> list[list[int]]:
    """Python lists of ints (what the pure-Python reference consumes)."""
    if _is_flat(x) or (isinstance(x, np.ndarray) and x.dtype != object):
        values, offsets = _to_flat(arg, x)
        _ref.validate_offsets(arg, values.shape[0], offsets.tolist())
        vals, offs = values.tolist(), offsets.tolist()
        return [vals[offs[i] : offs[i + 1]] for i in range(len(offs) - 1)]
    if not isinstance(x, (list, tuple, np.ndarray)):
        raise TypeError(f"{arg} must be a list of token-id sequences or a (values, offsets) tuple, got {type(x).__name__}")
    out = []
    for i, s in enumerate(x):
        if _is_array_like(s):
            out.append(_int_array(f"{arg}[{i}]", "", s).tolist())
            continue
        if isinstance(s, (str, bytes)) or not hasattr(s, "__iter__"):
            raise TypeError(f"{arg}[{i}] must be a sequence of int token ids, got {type(s).__name__}")
        s = list(s)
        for j, v in enumerate(s):
            if not isinstance(v, (int, np.integer)):
                raise TypeError(f"{arg}[{i}][{j}] must be an int token id, got {type(v).__name__}")
        out.append(s)
    return out


def _check_wide_ids(arg: str, values: np.ndarray, offsets: np.ndarray, opts: PackOptions) -> None:
    """Ids that int64 cannot hold (uint64 >= 2**63) are out of range; report the real value and its position.

    (A cast to int64 would wrap them to negative numbers and the core would report a different id.)
    """
    if values.dtype.kind == "u" and values.dtype.itemsize == 8 and values.size:
        big = np.flatnonzero(values > np.uint64(np.iinfo(np.int64).max))
        if big.size and offsets.size:  # only ids inside a sequence count (a sliced Arrow array has others)
            big = big[(big >= offsets[0]) & (big < offsets[-1])]
        if big.size and offsets.size:
            k = int(big[0])
            i = int(np.searchsorted(offsets, k, side="right")) - 1
            i = min(max(i, 0), offsets.shape[0] - 2)
            raise ValueError(f"{arg}[{i}][{k - int(offsets[i])}] = {int(values[k])} is out of range: token ids "
                             f"must be in [0, {opts.id_bound_name()})")


def _common_dtype(values: list[np.ndarray]) -> list[np.ndarray]:
    # The Rust core reads int32 or int64; all three share one dtype (one monomorphised copy each). Wide
    # unsigned ids were rejected by _check_wide_ids, so the cast below cannot wrap.
    if all(v.dtype == np.int32 for v in values):
        return [np.ascontiguousarray(v) for v in values]
    narrow = all(v.dtype.itemsize < 4 or v.dtype == np.int32 for v in values)
    target = np.int32 if narrow else np.int64
    return [np.ascontiguousarray(v, dtype=target) for v in values]


def pack_pairs(
    prompt_ids: Any,
    chosen_ids: Any,
    rejected_ids: Any,
    *,
    max_tokens: int | None = None,
    mode: str | None = None,
    pad_token_id: int | None = None,
    truncation: str | None = None,
    pad_to_multiple_of: int | None = None,
    vocab_size: int | None = None,
    options: PackOptions | None = None,
    backend: str = "rust",
) -> PackedBatch:
    r"""Pack tokenized preference pairs into a padded (TRL) or padding-free batch.

    Args:
        prompt_ids, chosen_ids, rejected_ids: P token-id sequences each, as a list of lists of ints, a
            list of 1-D integer numpy arrays (or tensors), or the flat Arrow layout
            ``(values, offsets)`` -- a 2-tuple of 1-D integer numpy arrays where sequence ``i`` is
            ``values[offsets[i]:offsets[i + 1]]`` (``offsets`` has P + 1 entries, need not start at 0).
            A 2-tuple of arrays is always read as the flat layout; pass sequences in a list.
            Completions must be non-empty; prompts may be empty.
        max_tokens: token budget of one pair (chosen + rejected sequences, so the prompt counts
            twice), and of one row in ``packed`` mode. >= 2.
        mode: ``"packed"`` (rows of <= max_tokens holding whole pairs, best-fit-decreasing) or
            ``"padded"`` (TRL's 2P rows ``[chosen..., rejected...]``).
        pad_token_id: id written at padding (labels there are -100 regardless).
        truncation: what to do with a pair over ``max_tokens``. ``"keep_start"``: cut completions at
            their end, the longer first, down to 1 token each, then the prompt's end. ``"keep_end"``:
            cut the prompt's start first (down to 1 token), then completions at their end as above
            (then, only if max_tokens < 4, the last prompt token). ``"error"``: raise ValueError.
            The rule depends on the pair alone, so both modes hold the same sequences. Truncation is
            never silent: the batch's ``num_truncated`` counts the shortened pairs, and when the policy
            was left to its default (neither ``truncation`` nor ``options`` passed) a call that shortened
            any issues one ``UserWarning`` saying how many. Naming the policy (``truncation=...`` or a
            :class:`~dpo_fast.packing.PackOptions`, as :class:`~dpo_fast.packing.PairCollator` does) is
            the explicit choice: no warning then, the count is still on the batch.
        pad_to_multiple_of: round the row length L up to a multiple of this (e.g. 8 for tensor
            cores, or ``max_tokens`` for a static row shape).
        vocab_size: when given, every id (and ``pad_token_id``) must be in ``[0, vocab_size)``.
            Ids must always be in ``[0, 2**31)``: outputs are int32.
        options: a :class:`~dpo_fast.packing.PackOptions` holding all of the above (then pass none of them
            separately). The keywords build one: ``mode="packed"``, ``pad_token_id=0`` and
            ``truncation="keep_start"`` when omitted.
        backend: ``"rust"`` (default) or ``"python"`` (the pure-Python reference; same output).

    Returns:
        :class:`PackedBatch`. Zero pairs give a valid empty batch: (0, 0) arrays, ``cu_seqlens == [0]``.

    Shape:
        - ``input_ids``, ``labels``, ``position_ids``, ``attention_mask``: :math:`(R, L)`
        - ``cu_seqlens``: :math:`(2P + 1,)`; ``pairs``: :math:`(P, 2)`; ``example_index``: :math:`(P,)`

        where :math:`R = 2P` and :math:`L` = the longest sequence in ``padded`` mode, and :math:`R` =
        rows opened by best-fit, :math:`L \le` ``max_tokens`` = the fullest row in ``packed`` mode
        (both before ``pad_to_multiple_of``).

    Raises:
        TypeError: a non-integer input or option; options given both ways.
        ValueError: an option out of range (see :class:`~dpo_fast.packing.PackOptions`), an id out of range,
            an empty completion, different numbers of prompts/chosen/rejected, broken offsets, a pair over
            budget with ``truncation="error"``, or a batch of ``2**31`` slots or more.
        MemoryError: the output buffers cannot be allocated (the message gives the bytes requested).

    Examples::

        >>> b = pack_pairs([[1, 2]], [[3, 4]], [[5]], max_tokens=16)
        >>> b.input_ids
        array([[1, 2, 3, 4, 1, 2, 5]], dtype=int32)
        >>> b.labels
        array([[-100,    3,    4, -100, -100,    5, -100]], dtype=int32)
        >>> b.cu_seqlens, b.pairs
        (array([0, 4, 7], dtype=int32), array([[0, 1]]))
    """
    implicit_truncation = options is None and truncation is None  # the default policy, not the caller's choice
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
    args = (("prompt_ids", prompt_ids), ("chosen_ids", chosen_ids), ("rejected_ids", rejected_ids))
    if backend == "python":
        out = _ref.pack_reference(*[_to_lists(name, x) for name, x in args], options)
    else:
        from dpo_fast import _native

        flat = [_to_flat(name, x) for name, x in args]
        for (name, _), (v, o) in zip(args, flat):
            _check_wide_ids(name, v, o, options)
        values = _common_dtype([v for v, _ in flat])
        offsets = [np.ascontiguousarray(o, dtype=np.int64) for _, o in flat]
        out = _native.pack_flat(values[0], offsets[0], values[1], offsets[1], values[2], offsets[2],
                                **options.native())
    batch = PackedBatch(mode=options.mode, **out)
    if batch.num_truncated and implicit_truncation:
        warnings.warn(
            f"pack_pairs: {batch.num_truncated} of {batch.num_pairs} pairs were truncated to fit "
            f"max_tokens={options.max_tokens} (truncation={options.truncation!r}, the default); see "
            "batch.num_truncated. Pass truncation='error' to raise instead, a larger max_tokens, or name the "
            "truncation policy to silence this", UserWarning, stacklevel=2)
    return batch


def pack_pairs_reference(prompt_ids: Sequence, chosen_ids: Sequence, rejected_ids: Sequence, **kwargs: Any) -> PackedBatch:
    """:func:`pack_pairs` with ``backend="python"``."""
    return pack_pairs(prompt_ids, chosen_ids, rejected_ids, backend="python", **kwargs)
