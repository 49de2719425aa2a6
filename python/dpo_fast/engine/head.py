"""The output head as the engine receives it: one explicit record, resolved once per call.

A :class:`Head` is what every pass, the fused route and the no-grad reference forward take instead of a bare
weight: the weight the GEMMs read (this process's rows of it), the bias, where those rows sit in the
vocabulary and over which process group it is split (:class:`VocabShard`), the master weight whose gradient
is made, and the dtype policy under ``torch.autocast``.

Who builds it:

* the public entry points, for a plain weight: :func:`as_head` ``(weight, bias)``;
* :func:`dpo_fast.distributed.distributed_head`, for a DTensor / ZeRO-3 / vocabulary-parallel weight: it
  resolves the weight once and hands the Head down in the ``weight`` argument (the ``bias`` argument is then
  None: the bias is inside the Head);
* the fused modules' ``autocast_entry``, for an fp32 master weight under autocast (``keep_master``).

Kinds of head. A head whose rows are all here has ``split=None`` and runs the engine's own passes. A head
split across processes carries ``split``, an object of the :class:`SplitHead` protocol that runs the passes
for that layout (today: :class:`dpo_fast.distributed.vocab_parallel.VocabParallel`, the vocabulary split
over a tensor-parallel group). A new way of splitting the *rows* is a new :class:`SplitHead` implementation
plus the line in :func:`dpo_fast.distributed.head.resolve` that builds its Head.

Hidden states sharded over *tokens* (context / sequence parallelism) are the other axis: every per-token pass
is unchanged and local, only the per-sequence sums cross processes. Such a call carries ``seq``, a
:class:`SeqShard` (which tokens are here, and the group); it composes with ``split`` (sequence x vocabulary),
turns off the one-pass route (``one_pass``: the loss's dL/dsum needs the global sums before any dz) and the
entry points all-reduce their per-sequence sums over ``seq.group``
(:mod:`dpo_fast.distributed.sequence_parallel`).

This module imports nothing from the rest of dpo_fast beyond the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .rows import RowOps, RowResult
    from .scored import Scored

Tensor = torch.Tensor

__all__ = ["Head", "SeqShard", "SplitHead", "VocabShard", "as_head"]


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows ``[start, start + local_size)`` of a ``(vocab_size, H)`` output head.

    Attributes:
        group: the process group over which the vocabulary is split (the TP group).
        start: first global vocabulary row held here. local_size: rows held here (may be 0 for uneven
            DTensor shards). vocab_size: the global V (sum of all ranks' local sizes).
        rank, world: this rank's index in ``group`` and the group's size.
    """

    group: Any
    start: int
    local_size: int
    vocab_size: int
    rank: int
    world: int

    def owns(self, weight: torch.Tensor) -> bool:
        return weight.dim() == 2 and weight.shape[0] == self.local_size


@dataclass(frozen=True)
class SeqShard:
    """This rank's tokens of hidden states sharded over the token dimension across ``group``.

    Attributes:
        group: the sequence-parallel (context-parallel) process group.
        rank, world: this rank's index in ``group`` and the group's size.
        dim: the token dimension of the caller's hidden states (1 for padded (B, T, H), 0 for packed (N, H)).
        start: the first global token (along ``dim``) held here. local_len: tokens held here.
        total_len: tokens along ``dim`` over the whole group (global ``cu_seqlens`` end there).
    """

    group: Any
    rank: int
    world: int
    dim: int
    start: int
    local_len: int
    total_len: int


class SplitHead(Protocol):
    """How the engine's passes run on a head whose rows are split across processes.

    Implementations live outside the engine (:mod:`dpo_fast.distributed`); the engine only calls them.
    """

    #: whether the fused one-pass route can run on this head (it needs whole logits rows on one process)
    one_pass: bool

    def forward_tokens(self, head: Head, hidden2: Tensor, idx: Tensor, labels_s: Tensor, rows: RowOps,
                       budget: int, stats: bool) -> RowResult:
        """:func:`dpo_fast.engine.forward_tokens` on this head: (N,) results for the global vocabulary."""
        ...

    def scored_logprobs(self, head: Head, sc: Scored, *, temperature: float, softcap: float | None,
                        stats_out: dict | None) -> Tensor:
        """:func:`dpo_fast.engine.scored_logprobs` on this head ((N,) log-probs, differentiable)."""
        ...

    def vocab_mean_row(self, head: Head) -> tuple[Tensor, Tensor | None]:
        """(mean of the head's rows (H,), mean of its bias or None) over the whole vocabulary."""
        ...


@dataclass(frozen=True)
class Head:
    """The output head of one call, as the engine uses it.

    Attributes:
        weight: ``(V_local, H)`` the rows held here, in the dtype the GEMMs read (for a split head, this
            process's slice; for a gathered DTensor / ZeRO-3 weight, the full gathered copy).
        bias: ``(V_local,)`` or None, laid out like ``weight``.
        shard: the vocabulary split (offset, global size, process group), or None when every row is here.
        seq: the token split of the hidden states (:class:`SeqShard`, sequence / context parallelism), or None.
        split: the passes for a split head (a :class:`SplitHead`), or None for the engine's own passes.
        master: the tensor whose gradient the fused pass makes when it differs from ``weight`` (an fp32
            master weight under autocast, ``weight`` a 16-bit copy of it); None: ``weight`` itself.
        keep_master: dtype policy — an fp32 weight under autocast stays the master: the GEMMs read a 16-bit
            copy made for the hidden states' dtype (:meth:`for_compute`) and dW accumulates in fp32.
    """

    weight: Tensor
    bias: Tensor | None = None
    shard: VocabShard | None = None
    split: SplitHead | None = None
    master: Tensor | None = None
    keep_master: bool = False
    seq: SeqShard | None = None

    # -- the vocabulary ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The global vocabulary size V (``weight.shape[0]`` unless the head is split)."""
        return self.weight.shape[0] if self.shard is None else self.shard.vocab_size

    @property
    def vocab_start(self) -> int:
        """The first global vocabulary row of ``weight``."""
        return 0 if self.shard is None else self.shard.start

    @property
    def group(self):
        """The process group the head is split over, or None."""
        return None if self.shard is None else self.shard.group

    @property
    def one_pass(self) -> bool:
        """Whether the fused one-pass route can run on this head (whole rows on this process, whole sequences:
        a sequence-sharded call needs the global per-sequence sums before any dz, so it runs two passes)."""
        return self.seq is None and (self.split is None or self.split.one_pass)

    # -- gradients and dtypes ------------------------------------------------------------------------------
    @property
    def grad_weight(self) -> Tensor:
        """The tensor whose gradient the passes produce: the master weight, else ``weight``."""
        return self.weight if self.master is None else self.master

    def for_compute(self, hidden) -> Head:
        """This head for GEMMs with ``hidden``: under the ``keep_master`` policy and 16-bit hidden states of
        another dtype, ``weight`` becomes a (differentiable) 16-bit copy and the fp32 weight the master."""
        w = self.weight
        if self.keep_master and isinstance(hidden, Tensor) and isinstance(w, Tensor) and hidden.dtype != w.dtype \
                and hidden.dtype in (torch.bfloat16, torch.float16):
            return dataclasses.replace(self, weight=w.to(hidden.dtype), master=w, keep_master=False)
        return self

    def cast(self, dtype: torch.dtype) -> Head:
        """``weight`` and ``bias`` cast to ``dtype`` (floating, not float64), as ``torch.autocast`` would."""
        def c(t):
            return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        return dataclasses.replace(self, weight=c(self.weight), bias=c(self.bias))

    def detach(self) -> Head:
        """The same head without autograd history (for no-grad passes)."""
        return dataclasses.replace(self, weight=self.weight.detach(),
                                   bias=None if self.bias is None else self.bias.detach(), master=None)


def as_head(weight, bias=None) -> Head:
    """``weight`` itself when it is already a :class:`Head` (``bias`` must then be None: it is inside the Head);
    else the plain head of ``(weight, bias)``. Arguments are not validated here (the engine's ``prepare`` does,
    naming ``weight`` / ``bias``)."""
    if isinstance(weight, Head):
        if bias is not None:
            raise ValueError("bias: pass it inside the Head (Head(weight, bias)), not next to it")
        return weight
    return Head(weight, bias)
