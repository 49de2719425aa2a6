"""The one packing configuration: :class:`PackOptions`, validated once, here.

Every packing entry point (:func:`dpo_fast.pack_pairs`, :class:`dpo_fast.PairCollator`, the reference
log-prob precompute, the padding-free trainer) builds or receives one ``PackOptions``. Its constructor is the
only place the options are checked and the only place their error messages are written. The Rust core
(``rust/src/pack.rs``, through ``PackOptions.native()``) and the pure-Python twin
(:mod:`dpo_fast.packing._reference`) receive the validated plain values and do not check them again for users
(the Rust core keeps its own invariant checks as a Rust API; Python never reaches them with bad options).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["PackOptions", "MODES", "TRUNCATIONS", "ID_LIMIT", "PAD_MULTIPLE_FLOOR", "check_budget"]

#: token ids, row lengths and every index into the flat layout are int32: all must be below this
ID_LIMIT = 1 << 31
#: ``pad_to_multiple_of`` may be at most ``max(max_tokens, PAD_MULTIPLE_FLOOR)`` (the Rust core's same constant)
PAD_MULTIPLE_FLOOR = 1 << 16
MODES = ("packed", "padded")
TRUNCATIONS = ("keep_start", "keep_end", "error")


def _int(name: str, value: Any, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        want = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {want}, got {type(value).__name__}")
    return int(value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_budget(name: str, value: Any) -> int:
    """A token budget (``max_tokens`` of a pair / a row / a micro-batch): an int in ``[2, 2**31)``.

    Raises:
        TypeError: not an int. ValueError: out of range (the message names ``name``).
    """
    v = _int(name, value)
    if v < 2:
        raise ValueError(f"{name} must be >= 2 (the smallest budget the packers take: a pair's one chosen and one "
                         f"rejected token), got {v}")
    if v >= ID_LIMIT:
        raise ValueError(f"{name} must be < 2**31 = {ID_LIMIT} (rows are int32-indexed), got {v}")
    return v


@dataclasses.dataclass(frozen=True)
class PackOptions:
    """How :func:`dpo_fast.pack_pairs` lays out a batch. Validated at construction (and only there).

    Attributes:
        max_tokens: token budget of one pair (chosen + rejected sequences, so the prompt counts twice), and of
            one row in ``packed`` mode. An int in ``[2, 2**31)``.
        mode: ``"packed"`` (rows of <= ``max_tokens`` holding whole pairs, best-fit-decreasing) or
            ``"padded"`` (TRL's 2P rows ``[chosen..., rejected...]``).
        pad_token_id: id written at padding (labels there are -100 regardless); in ``[0, vocab_size)``.
        truncation: a pair over ``max_tokens``: ``"keep_start"``, ``"keep_end"`` or ``"error"`` (see
            :func:`dpo_fast.pack_pairs`).
        pad_to_multiple_of: round the row length up to a multiple of this, in
            ``[1, max(max_tokens, 65536)]`` (tensor-core rounding, or ``max_tokens`` for a static shape), or None.
        vocab_size: when given (in ``[1, 2**31]``), every id must be in ``[0, vocab_size)``.

    Raises:
        TypeError: an option of the wrong type. ValueError: an option out of range.
    """

    max_tokens: int
    mode: str = "packed"
    pad_token_id: int = 0
    truncation: str = "keep_start"
    pad_to_multiple_of: int | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise in place once)
        set_("max_tokens", check_budget("max_tokens", self.max_tokens))
        set_("mode", _choice("mode", self.mode, MODES))
        set_("truncation", _choice("truncation", self.truncation, TRUNCATIONS))
        pad, mult, vocab = (_int("pad_token_id", self.pad_token_id),
                            _int("pad_to_multiple_of", self.pad_to_multiple_of, optional=True),
                            _int("vocab_size", self.vocab_size, optional=True))
        if mult is not None:
            hi = max(self.max_tokens, PAD_MULTIPLE_FLOOR)
            if not 1 <= mult <= hi:
                raise ValueError(f"pad_to_multiple_of must be in [1, max(max_tokens, {PAD_MULTIPLE_FLOOR})] = "
                                 f"[1, {hi}] (a larger multiple only adds padding), got {mult}")
        if vocab is not None and not 1 <= vocab <= ID_LIMIT:
            raise ValueError(f"vocab_size must be in [1, 2**31 = {ID_LIMIT}], got {vocab}")
        set_("pad_to_multiple_of", mult)
        set_("vocab_size", vocab)
        if not 0 <= pad < self.id_limit:
            raise ValueError(f"pad_token_id = {pad} is out of range: it must be in [0, {self.id_bound_name()})")
        set_("pad_token_id", pad)

    @property
    def id_limit(self) -> int:
        """Exclusive upper bound of token ids: ``vocab_size`` or 2**31."""
        return ID_LIMIT if self.vocab_size is None else self.vocab_size

    def id_bound_name(self) -> str:
        """How error messages spell the id bound: ``vocab_size=V`` or ``2147483648``."""
        return f"vocab_size={self.vocab_size}" if self.vocab_size is not None else str(ID_LIMIT)

    def replace(self, **changes: Any) -> "PackOptions":
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def native(self) -> dict[str, Any]:
        """The validated options as the plain keyword values ``dpo_fast._native.pack_flat`` takes."""
        return dataclasses.asdict(self)
