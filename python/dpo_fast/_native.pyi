"""Type stubs of the private native module ``dpo_fast._native`` (rust/src/py.rs). Hand-kept; the public API
with validation and docs is :mod:`dpo_fast.packing` (options validated once, by ``PackOptions``)."""

from typing import Any, Sequence, TypedDict

import numpy as np
import numpy.typing as npt

__version__: str
IGNORE_INDEX: int
ID_LIMIT: int  # == dpo_fast.packing.options.ID_LIMIT
PAD_MULTIPLE_FLOOR: int  # == dpo_fast.packing.options.PAD_MULTIPLE_FLOOR

def build_info() -> tuple[str, str]:
    """(crate version, Python ABI the module targets)."""

class _PackedDict(TypedDict):
    input_ids: npt.NDArray[np.int32]  # (R, L)
    labels: npt.NDArray[np.int32]  # (R, L)
    position_ids: npt.NDArray[np.int32]  # (R, L)
    attention_mask: npt.NDArray[np.int8]  # (R, L)
    cu_seqlens: npt.NDArray[np.int32]  # (2P + 1,)
    pairs: npt.NDArray[np.int64]  # (P, 2)
    example_index: npt.NDArray[np.int64]  # (P,)
    seq_lens: npt.NDArray[np.int32]  # (2P,)
    completion_lens: npt.NDArray[np.int32]  # (2P,)
    max_seqlen: int
    num_truncated: int  # pairs the truncation policy shortened

def pack_flat(
    prompt_values: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    prompt_offsets: npt.NDArray[np.int64],
    chosen_values: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    chosen_offsets: npt.NDArray[np.int64],
    rejected_values: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    rejected_offsets: npt.NDArray[np.int64],
    *,
    max_tokens: int,
    mode: str,
    pad_token_id: int,
    truncation: str,
    pad_to_multiple_of: int | None,
    vocab_size: int | None,
) -> _PackedDict:
    """Pack flat (values, offsets) inputs (C-contiguous; the three value arrays share one dtype) with the
    GIL released. The options are ``PackOptions.native()`` (validated). Arrays are returned without a copy.
    Raises ValueError on bad data, MemoryError when the outputs cannot be allocated, RuntimeError on an
    internal error (never an abort)."""

class _PackedSequencesDict(TypedDict):
    input_ids: npt.NDArray[np.int32]  # (R, L)
    position_ids: npt.NDArray[np.int32]  # (R, L)
    attention_mask: npt.NDArray[np.int8]  # (R, L)
    cu_seqlens: npt.NDArray[np.int32]  # (S + 1,)
    example_index: npt.NDArray[np.int64]  # (S,)
    seq_lens: npt.NDArray[np.int32]  # (S,)
    max_seqlen: int
    num_truncated: int  # sequences the truncation policy shortened

def pack_sequences_flat(
    values: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    *,
    max_tokens: int,
    mode: str,
    pad_token_id: int,
    truncation: str,
    pad_to_multiple_of: int | None,
    vocab_size: int | None,
) -> _PackedSequencesDict:
    """Pack S single sequences given flat (values, offsets) (C-contiguous) with the GIL released; the options
    are ``PackOptions.native()`` (validated). Arrays are returned without a copy. Raises ValueError on bad
    data, MemoryError when the outputs cannot be allocated, RuntimeError on an internal error (never an
    abort)."""

def flatten_int_seqs(
    seqs: Sequence[Sequence[int]] | Sequence[Any], arg: str
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(values, offsets) of a list/tuple of int sequences. TypeError naming ``arg`` on a non-int item."""

def best_fit_bins(sizes: npt.NDArray[np.int64], capacity: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Best-fit-decreasing bins: (item indices in bin order, B + 1 bin offsets). Sizes in [0, capacity]; a room
    is reused by any item that fits it (a 1-token item fills a room of 1; an empty item joins the fullest bin)."""
