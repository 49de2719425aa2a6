"""How the output head's weight is held across processes, and what each entry point does about it.

:func:`resolve_head` classifies a (hidden, weight, bias) triple:

* **plain** tensors (single process, DDP, FSDP2 inside the model's forward where the head is already
  unsharded): used as they are.
* **DTensor, data-parallel** (FSDP2 ``Shard(0)`` / ``Replicate`` on a mesh that is not a tensor-parallel
  one; any multi-dimensional mesh): gathered once per call with ``full_tensor``; the gradient of the
  gathered copy is summed back onto the shards by autograd (reduce-scatter, or all-reduce for Replicate) and
  divided by the mesh size, which is FSDP2's own (mean) gradient reduction.
* **DTensor, vocabulary-parallel**: ``Shard(0)`` on a 1-D mesh whose dimension is named like a
  tensor-parallel one (``"tp"``, ``"tensor..."``), or any ``Shard(0)`` DTensor marked with
  :func:`vocab_parallel`. The weight is never gathered: its local slice runs in
  :mod:`dpo_fast.distributed.vocab_parallel`.
* **explicit shard** (Megatron style): a plain local slice marked with :func:`vocab_parallel` (group and
  vocabulary offset).
* **DeepSpeed ZeRO-3** partitioned parameters (``ds_id``): gathered for the call with
  ``deepspeed.zero.GatheredParameters`` (skipped for parameters already available); see
  :mod:`dpo_fast.distributed.zero3` for the backward.

:func:`resolve` turns the triple into ``(hidden, Head)``: the one place that decides what kind of head a call
runs on (:class:`dpo_fast.engine.Head`, with ``split`` set for a head split across processes).
:func:`distributed_head` is the decorator every public entry point carries: one line per entry point; it
calls :func:`resolve` and hands the Head down in the ``weight`` argument.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import torch

from ..engine.head import Head
import dpo_fast.distributed.sequence_parallel as _sp  # the module (the package exports the function)
from . import zero3
from .state import DistributedHeadError, VocabShard
from .vocab_parallel import VOCAB_PARALLEL

__all__ = ["DistributedHeadError", "VocabShard", "distributed_head", "resolve", "resolve_head", "vocab_parallel",
           "head_layout"]

_MARK = "_dpo_fast_vocab_shard"
_TP_NAMES = ("tp", "tensor")


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _placement_names(t) -> str:
    return "(" + ", ".join(type(p).__name__ + (f"({p.dim})" if hasattr(p, "dim") else "") for p in t.placements) + ")"


def _is_shard0(t) -> bool:
    from torch.distributed.tensor import Shard
    return len(t.placements) == 1 and isinstance(t.placements[0], Shard) and t.placements[0].dim == 0


def _tp_named(mesh) -> bool:
    names = mesh.mesh_dim_names or ()
    return len(names) == 1 and any(k in names[0].lower() for k in _TP_NAMES)


def head_layout(weight) -> str:
    """One of ``"plain"``, ``"zero3"``, ``"dtensor_gather"``, ``"vocab_parallel"`` (what an entry point will do)."""
    if weight is None:
        return "plain"
    if zero3.is_zero3_param(weight):
        return "zero3"
    if _is_dtensor(weight):
        if _is_shard0(weight) and (getattr(weight, _MARK, None) is not None or _tp_named(weight.device_mesh)):
            return "vocab_parallel"
        return "dtensor_gather"
    if isinstance(getattr(weight, _MARK, None), VocabShard):
        return "vocab_parallel"
    return "plain"


# ----------------------------------------------------------------------------------------------------------
# explicit vocabulary-parallel marking


def _all_gather_ints(values, group, device):
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [tuple(int(v) for v in o.tolist()) for o in out]


def _comm_device(group):
    import torch.distributed as dist
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def vocab_parallel(weight: torch.Tensor, group=None, *, vocab_start: int | None = None):
    """Mark a head weight as split over the vocabulary across ``group``; returns ``weight`` itself.

    Args:
        weight: this rank's ``(V_r, H)`` rows of the head (a plain tensor, Megatron style), or a ``Shard(0)``
            DTensor on a 1-D mesh whose dimension name does not say tensor-parallel.
        group: the tensor-parallel process group (default: the world). For a DTensor it must be the
            weight's mesh group.
        vocab_start: the first global row held here. None: the shards must be equal and rank r holds
            ``[r * V_r, (r + 1) * V_r)``.

    One all-gather of two integers per rank checks the layout: the shards must tile ``[0, V)`` in rank
    order without gaps or overlaps. The bias, if any, is this rank's ``(V_r,)`` slice, passed as usual.

    Raises:
        DistributedHeadError: unequal shards without ``vocab_start``, shards that do not tile the vocabulary,
            a group that is not the DTensor's mesh group, a DTensor that is not ``Shard(0)`` on a 1-D mesh.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise DistributedHeadError("vocab_parallel: torch.distributed is not initialised (init_process_group first)")
    if _is_dtensor(weight):
        mesh = weight.device_mesh
        if mesh.ndim != 1 or not _is_shard0(weight):
            raise DistributedHeadError(
                f"weight: expected a DTensor with placements (Shard(0),) on a 1-D mesh for vocab_parallel, got "
                f"{_placement_names(weight)} on a {mesh.ndim}-D mesh")
        if group is not None and group != mesh.get_group():
            raise DistributedHeadError(
                "group: does not match the weight's device mesh (the vocabulary shards live on "
                f"weight.device_mesh, ranks {mesh.mesh.flatten().tolist()}); pass group=None or the mesh's group")
        setattr(weight, _MARK, True)
        return weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise DistributedHeadError(f"weight: expected this rank's (V_r, H) slice of the head, got {type(weight).__name__}"
                                   f" {tuple(getattr(weight, 'shape', ()))}")
    if group is None:
        group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    Vr = int(weight.shape[0])
    given = -1 if vocab_start is None else int(vocab_start)
    layout = _all_gather_ints([given, Vr], group, _comm_device(group))
    if vocab_start is None:
        sizes = [s for _, s in layout]
        if any(s != sizes[0] for s in sizes):
            raise DistributedHeadError(
                f"weight: unequal vocabulary shards across the group (rows per rank {sizes}) need vocab_start; "
                "pass each rank's first global row, or pad the vocabulary to equal shards")
        starts = [r * sizes[0] for r in range(world)]
    else:
        if any(s < 0 for s, _ in layout):
            raise DistributedHeadError("vocab_start: pass it on every rank of the group or on none")
        starts = [s for s, _ in layout]
        pos = 0
        for r, (s, n) in enumerate(layout):
            if s != pos:
                raise DistributedHeadError(
                    f"vocab_start: the shards must tile [0, V) in rank order; rank {r} starts at {s}, expected {pos} "
                    f"(layout (start, rows) per rank: {layout})")
            pos += n
    V = sum(n for _, n in layout)
    setattr(weight, _MARK, VocabShard(group, starts[rank], Vr, V, rank, world))
    return weight


# ----------------------------------------------------------------------------------------------------------
# resolution


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def _gather_dtensor(t):
    """The full tensor of a DTensor; its gradient goes back to the shards as a mean over the mesh."""
    from torch.distributed.tensor import Partial
    full = t.full_tensor(grad_placements=[Partial()] * t.device_mesh.ndim)
    n = t.device_mesh.size()
    return full if n == 1 or not t.requires_grad else _ScaleGrad.apply(full, 1.0 / n)


def _dtensor_shard(weight) -> VocabShard:
    mesh = weight.device_mesh
    V, world = int(weight.shape[0]), mesh.size()
    rank = mesh.get_local_rank()
    chunk = -(-V // world)  # torch.chunk's split, which Shard(0) uses
    start = min(V, rank * chunk)
    local = int(weight.to_local().shape[0])
    if local != max(0, min(V, start + chunk) - start):
        raise DistributedHeadError(
            f"weight: local shard of {local} rows does not match Shard(0) of V={V} over {world} ranks")
    return VocabShard(mesh.get_group(), start, local, V, rank, world)


def _hidden_local(hidden, mesh, name: str):
    """A Replicate DTensor hidden -> its local tensor; a sharded one, or one on another mesh, raises."""
    from torch.distributed.tensor import Replicate
    if mesh is not None and hidden.device_mesh != mesh:
        raise DistributedHeadError(
            f"{name}: its device mesh {hidden.device_mesh} does not match the weight's {mesh}; the hidden states and "
            "the head must live on the same mesh")
    if not all(isinstance(p, Replicate) for p in hidden.placements):
        what = "the weight is not a DTensor" if mesh is None else "the head is computed per token on whole rows"
        raise DistributedHeadError(
            f"{name}: a sharded hidden state ({_placement_names(hidden)}) is not supported ({what}); redistribute it "
            "to Replicate() first (e.g. the last norm's output_layouts=Replicate())")
    return hidden.to_local()


def resolve_head(hidden, weight, bias, stack: contextlib.ExitStack | None = None, *, names=("hidden", "weight", "bias")):
    """(hidden, weight, bias, shard) ready for the engine.

    DTensors are gathered or turned into their local vocabulary slice (``shard`` is then the
    :class:`VocabShard`); ZeRO-3 parameters are gathered for as long as ``stack`` is open (required for them).

    Raises:
        DistributedHeadError: a sharded or mismatched hidden state, a bias laid out unlike the weight.
    """
    hn, wn, bn = names
    layout = head_layout(weight)
    shard = None
    if layout == "zero3" or zero3.is_zero3_param(bias):
        if stack is None:
            raise DistributedHeadError(f"{wn}: a ZeRO-3 partitioned parameter needs the distributed_head entry scope")
        stack.enter_context(zero3.saved_copies_regathered())
        weight, bias = zero3.gathered_copy(weight), zero3.gathered_copy(bias)
    elif layout == "dtensor_gather":
        if _is_dtensor(hidden):
            hidden = _hidden_local(hidden, weight.device_mesh, hn)
        weight = _gather_dtensor(weight)
        if _is_dtensor(bias):
            bias = _gather_dtensor(bias)
    elif layout == "vocab_parallel":
        if _is_dtensor(weight):
            mesh = weight.device_mesh
            if _is_dtensor(hidden):
                hidden = _hidden_local(hidden, mesh, hn)
            shard = _dtensor_shard(weight)
            if bias is not None:
                if not (_is_dtensor(bias) and bias.device_mesh == mesh and _is_shard0(bias)):
                    raise DistributedHeadError(
                        f"{bn}: expected a DTensor sharded like the weight (Shard(0) on its mesh), got "
                        f"{type(bias).__name__}" + (f" {_placement_names(bias)}" if _is_dtensor(bias) else ""))
                bias = bias.to_local()
            weight = weight.to_local()
        else:
            shard = getattr(weight, _MARK)
            if _is_dtensor(hidden):
                hidden = _hidden_local(hidden, None, hn)
            if bias is not None and (_is_dtensor(bias) or bias.shape != (shard.local_size,)):
                raise DistributedHeadError(
                    f"{bn}: expected this rank's ({shard.local_size},) slice of the bias, got "
                    f"{type(bias).__name__} {tuple(bias.shape)}")
    else:  # plain weight
        if _is_dtensor(hidden):
            hidden = _hidden_local(hidden, None, hn)
        if _is_dtensor(bias):
            raise DistributedHeadError(f"{bn}: a DTensor bias with a plain weight; pass both as DTensors or neither")
    return hidden, weight, bias, shard


def resolve(hidden, weight, bias, stack: contextlib.ExitStack | None = None, *,
            names=("hidden", "weight", "bias")) -> tuple[object, Head]:
    """``(hidden, Head)`` for the engine: :func:`resolve_head`, then the head as one explicit record.

    The kinds of head: whole rows here (``split=None``: plain, gathered DTensor, gathered ZeRO-3 copy) or
    split over the vocabulary (``shard`` and ``split=VOCAB_PARALLEL``). A new way of splitting a head adds its
    :class:`dpo_fast.engine.SplitHead` implementation and its branch here.
    """
    hidden, weight, bias, shard = resolve_head(hidden, weight, bias, stack, names=names)
    if shard is None:
        return hidden, Head(weight, bias)
    return hidden, Head(weight, bias, shard=shard, split=VOCAB_PARALLEL)


# ----------------------------------------------------------------------------------------------------------
# the entry-point decorator


def _needs_work(*tensors) -> bool:
    for t in tensors:
        if t is None:
            continue
        if _is_dtensor(t) or zero3.is_zero3_param(t) or getattr(t, _MARK, None) is not None \
                or getattr(t, _sp._SEQ_MARK, None) is not None:
            return True
    return False


def distributed_head(*triples: tuple[str, str, str]):
    """Decorator for the engine's public entry points: distributed heads handled before the body runs.

    Args:
        triples: argument names ``(hidden, weight, bias)`` of each head the entry point takes (default one
            triple with those names; DPOLoss adds ``("ref_hidden", "ref_weight", "ref_bias")``).

    Plain tensors pass straight through (one ``isinstance``/``hasattr`` check each). Otherwise each triple is
    resolved once (:func:`resolve`): the hidden argument receives the local hidden states, the weight argument
    the :class:`dpo_fast.engine.Head` (DTensors gathered or localised, ZeRO-3 parameters gathered and
    re-gathered for any backward that needs them, a vocabulary shard with its offset, size and group) and the
    bias argument None (the bias is inside the Head). The body hands the Head down explicitly
    (``dpo_fast.engine.as_head(weight, bias)`` accepts both forms). All heads of one call must share one
    vocabulary layout.

    Hidden states sharded over tokens (:func:`dpo_fast.distributed.sequence_parallel`, or a DTensor
    ``Shard`` on the token dimension) become this rank's local tokens, with ``labels`` and a global
    ``cu_seqlens`` localised the same way; the Head carries the :class:`dpo_fast.engine.SeqShard` (its
    ``seq``) and the body all-reduces its per-sequence sums (:mod:`.sequence_parallel`). KTOLoss's KL batch
    (``kl_hidden`` / ``kl_labels`` / ``kl_cu_seqlens``) must then be sharded over tokens on the same group and is
    localised the same way (its own layout).
    """
    triples = triples or (("hidden", "weight", "bias"),)

    def deco(fn):
        sig = inspect.signature(fn)
        cu_name = "cu_seqlens" if "cu_seqlens" in sig.parameters else None
        labels_name = "labels" if "labels" in sig.parameters else None

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            ba = sig.bind(*args, **kwargs)
            arg = ba.arguments
            if not _needs_work(*(arg.get(n) for tr in triples for n in tr)):
                if _sp.is_token_sharded(arg.get("kl_hidden")):
                    _localize_kl(arg, None)  # raises: hidden is not sharded over tokens
                return fn(*args, **kwargs)
            with contextlib.ExitStack() as stack:
                shards = []
                seq = None  # the token split of the call's first hidden (sequence / context parallelism)
                for i, (hn, wn, bn) in enumerate(triples):
                    if _sp.is_token_sharded(arg.get(hn)):
                        s_i = _sp.localize(arg, hn, labels=labels_name if i == 0 else None,
                                           cu=cu_name if i == 0 else None, like=seq)
                        seq = seq or s_i
                    elif i > 0 and seq is not None and _is_dtensor(arg.get(hn)):
                        raise DistributedHeadError(f"{hn}: a DTensor not sharded over tokens like hidden")
                    w = arg.get(wn)
                    if w is None:
                        continue
                    h, head = resolve(arg.get(hn), w, arg.get(bn), stack, names=(hn, wn, bn))
                    if seq is not None:
                        _sp.check_head(head, seq)
                        head = dataclasses.replace(head, seq=seq)
                    if hn in arg:
                        arg[hn] = h
                    arg[wn] = head
                    if bn in arg:
                        arg[bn] = None
                    shards.append((wn, head.shard))
                _check_same_layout(shards)
                if arg.get("kl_hidden") is not None:
                    _localize_kl(arg, seq)
                return fn(*ba.args, **ba.kwargs)

        return wrapper

    return deco


def _group_ranks(group) -> list[int]:
    import torch.distributed as dist
    return dist.get_process_group_ranks(group)


def _localize_kl(arg: dict, seq) -> None:
    """KTOLoss's KL batch (``kl_hidden`` / ``kl_labels`` / ``kl_cu_seqlens``) on sequence-sharded hidden states:
    sharded over tokens on the same group as ``hidden`` (its own layout: other rows, lengths, packing), turned
    into this rank's local tensors like ``labels``; its per-sequence sums are all-reduced over the group."""
    kl_sharded = _sp.is_token_sharded(arg["kl_hidden"])
    if seq is None:
        if kl_sharded:
            raise DistributedHeadError(
                "kl_hidden: sharded over tokens (sequence_parallel / a DTensor Shard on its token dim) while hidden is "
                "not; shard hidden the same way, or pass the whole KL batch as plain tensors")
        return
    if not kl_sharded:
        raise DistributedHeadError(
            "kl_hidden: with sequence-sharded hidden states the KL batch must be sharded over tokens on the same "
            "group too (this rank's slice marked with sequence_parallel(kl_hidden, group), or a DTensor Shard on its "
            "token dim), with kl_labels sharded like it and a global kl_cu_seqlens when packed; or pass kl=")
    s_kl = _sp.localize(arg, "kl_hidden", labels="kl_labels", cu="kl_cu_seqlens")
    if s_kl.group is not seq.group and _group_ranks(s_kl.group) != _group_ranks(seq.group):
        raise DistributedHeadError(
            "kl_hidden: sharded over tokens on another process group than hidden; shard both over the same "
            "sequence-parallel group")


def _check_same_layout(shards) -> None:
    first = next(((n, s) for n, s in shards if s is not None), None)
    if first is None:
        return
    for n, s in shards:
        key = None if s is None else (s.start, s.local_size, s.vocab_size, s.world)
        ref = (first[1].start, first[1].local_size, first[1].vocab_size, first[1].world)
        if key != ref:
            raise DistributedHeadError(
                f"{n}: its vocabulary layout {'(not split)' if s is None else key} differs from {first[0]}'s {ref} "
                "(start, rows, V, ranks); every head of one call must be split the same way")

