"""Single sequences packed without padding: the padded rows of a trainer's batch, re-laid best-fit-decreasing.

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

import numpy as np
import torch

__all__ = ["PackedRows", "pack_padded_rows"]


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


def pack_padded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, row_tokens: int | str | None = None,
                     pad_token_id: int = 0, pad_to_multiple_of: int | None = None) -> PackedRows:
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

    Returns:
        :class:`PackedRows`, on ``input_ids``' device.

    Raises:
        ValueError: shapes differ, a mask value other than 0/1, a row whose real tokens are not contiguous, no
            real token at all, or ``row_tokens`` below the longest sequence.
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
    # the one host readback: lengths, first/last real position, bad mask values
    stats = torch.stack([m.sum(1), first, last, bad]).cpu().numpy().astype(np.int64)
    lengths, first_np, last_np, bad_np = stats
    if bad_np.any():
        raise ValueError(f"attention_mask: expected 0/1 values, row {int(np.argmax(bad_np))} has others")
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
    elif isinstance(row_tokens, bool) or not isinstance(row_tokens, int) or row_tokens < 1:
        raise ValueError(f"row_tokens: expected None, 'one_row' or an int >= 1, got {row_tokens!r}")
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
