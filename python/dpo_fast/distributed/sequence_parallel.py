"""Hidden states sharded over tokens (context / sequence parallelism): local per-token work, global sums.

Ring attention / Ulysses shard a long sequence's tokens across a process group. The head needs nothing from
the other ranks per token (the weight is replicated, or vocabulary-parallel on another group): every token's
log-prob is computed where its hidden state lives. Only per-sequence quantities cross ranks:

* forward: each rank sums its tokens per sequence (the engine's deterministic segment sums over *its*
  tokens), then one all-reduce SUM of those S partial sums over the group (float64 on the wire; counts for
  means travel in the same collective). Every rank then holds the global sums and computes the same loss.
* backward: the all-reduce's backward is the identity. Each rank's loss is the (replicated) global loss L,
  so dL/d(partial sum on rank r) = dL/d(global sum): the gradient reaching each rank's tokens is exactly
  their share of the global gradient. Summing it over the ranks as well would count it ``world`` times.

A loss that needs more than per-sequence sums (GRPOLoss: batch totals, a sampler metric's maximum, a check that
its per-sequence inputs are the same on every rank) stacks its statistics in a :class:`SeqStats` and reduces
them with one all-gather (``world x K`` float64 values), summed / maxed locally in rank order: bit-identical on
every rank, and a rank whose replicated input differs raises on every rank instead of desynchronising them.

Who reduces dW: nobody here. Each rank's dW (and db) is its own tokens' contribution, like the gradient of
every decoder parameter under context parallelism; the gradient synchronisation that already runs over the
data-parallel x context-parallel group (DDP / FSDP2 over the flattened ``dp_cp`` mesh) adds them. See
docs/DISTRIBUTED.md ("Sequence-sharded hidden states") for the scaling of that reduction.

Public: :func:`sequence_parallel` (the explicit marker). A DTensor hidden with ``Shard(token dim)`` on a 1-D
mesh is recognised without it.
"""

from __future__ import annotations

import dataclasses

import torch

from ..engine.head import Head, SeqShard
from ..engine.scored import Scored
from .state import DistributedHeadError

__all__ = ["SeqShard", "SeqStats", "is_token_sharded", "localize", "local_input", "reduce_sums",
           "reduce_sums_counts", "seq_scored", "seq_values", "sequence_parallel", "check_task"]

_SEQ_MARK = "_dpo_fast_seq_shard"


def _dist():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedHeadError("sequence_parallel: torch.distributed is not initialised (init_process_group first)")
    return dist


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _token_dim(t) -> int:
    return 1 if t.dim() == 3 else 0


def _shard_dim(t):
    """The dim of a 1-D mesh DTensor's single Shard placement, else None."""
    from torch.distributed.tensor import Shard
    if t.device_mesh.ndim != 1 or len(t.placements) != 1 or not isinstance(t.placements[0], Shard):
        return None
    return t.placements[0].dim


def _all_gather_ints(values, group):
    dist = _dist()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=dev)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [tuple(int(v) for v in o.tolist()) for o in out]


# ----------------------------------------------------------------------------------------------------------
# the marker


def sequence_parallel(hidden: torch.Tensor, group=None) -> torch.Tensor:
    """Mark hidden states as this rank's shard of the tokens across ``group``; returns ``hidden`` itself.

    Args:
        hidden: this rank's ``(B, T_r, H)`` slice of padded rows (tokens ``[start_r, start_r + T_r)`` of every
            row) or ``(N_r, H)`` slice of packed tokens; ranks hold consecutive slices in rank order.
        group: the sequence / context-parallel process group (default: the world).

    Pass labels sharded the same way (this rank's ``(B, T_r)`` / ``(N_r,)``) and, for packed input, the
    *global* ``cu_seqlens`` (sequences may cross shard boundaries). Padded rows must be split into equal
    slices; packed slices may differ in length when ``cu_seqlens`` (whose last entry is the total) says so.
    Per-token outputs (:func:`dpo_fast.token_logprobs`) stay local; per-sequence results
    (:func:`dpo_fast.sequence_logprobs`, every fused loss) are the global ones on every rank.

    One all-gather of a few integers per rank checks the layout (ranks must agree on the batch and hidden
    size). A DTensor with ``Shard(1)`` (padded) / ``Shard(0)`` (packed) on a 1-D mesh needs no marker.

    Raises:
        DistributedHeadError: ranks whose shards disagree (batch rows, hidden size, layout), unequal padded
            slices, a group that is not a DTensor hidden's mesh group.
    """
    dist = _dist()
    if _is_dtensor(hidden):
        mesh = hidden.device_mesh
        if _shard_dim(hidden) != _token_dim(hidden):
            raise DistributedHeadError(
                f"hidden: expected a DTensor sharded over tokens (Shard({_token_dim(hidden)}) on a 1-D mesh), got "
                f"placements {tuple(hidden.placements)} on a {mesh.ndim}-D mesh")
        if group is not None and group != mesh.get_group():
            raise DistributedHeadError(
                "group: does not match the hidden states' device mesh; pass group=None or the mesh's group")
        setattr(hidden, _SEQ_MARK, True)
        return hidden
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise DistributedHeadError(f"hidden: expected this rank's (B, T_r, H) or (N_r, H) shard, got "
                                   f"{type(hidden).__name__} {tuple(getattr(hidden, 'shape', ()))}")
    if group is None:
        group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    d = _token_dim(hidden)
    lead = hidden.shape[0] if d == 1 else -1
    n = int(hidden.shape[d])
    layout = _all_gather_ints([hidden.dim(), lead, int(hidden.shape[-1]), n], group)
    if any(x[:3] != layout[0][:3] for x in layout):
        raise DistributedHeadError(
            "hidden: sharded differently across the group: (dims, batch rows, hidden size, tokens) per rank "
            f"{layout}; every rank must hold the same rows and a slice of their tokens")
    lens = [x[3] for x in layout]
    if d == 1 and any(x != lens[0] for x in lens):
        raise DistributedHeadError(
            f"hidden: unequal token shards of padded rows (tokens per rank {lens}); split T equally (pad it to a "
            "multiple of the group size), or pack the tokens and pass the global cu_seqlens")
    setattr(hidden, _SEQ_MARK, SeqShard(group, rank, world, d, sum(lens[:rank]), n, sum(lens)))
    return hidden


def is_token_sharded(hidden) -> bool:
    """Whether ``hidden`` is marked with :func:`sequence_parallel` or is a DTensor sharded over its tokens."""
    if hidden is None:
        return False
    if getattr(hidden, _SEQ_MARK, None) is not None:
        return True
    return _is_dtensor(hidden) and hidden.dim() in (2, 3) and _shard_dim(hidden) == _token_dim(hidden)


def _dtensor_seq(hidden) -> SeqShard:
    mesh = hidden.device_mesh
    d = _token_dim(hidden)
    total, world, rank = int(hidden.shape[d]), mesh.size(), mesh.get_local_rank()
    chunk = -(-total // world)  # torch.chunk's split, which Shard uses
    start = min(total, rank * chunk)
    return SeqShard(mesh.get_group(), rank, world, d, start, int(hidden.to_local().shape[d]), total)


def _local(t, name: str, seq: SeqShard, mesh, want_shape):
    """A per-token argument (labels, ref_hidden) -> this rank's shard, checked against the hidden states'."""
    if t is None:
        return None
    if _is_dtensor(t):
        if mesh is None or t.device_mesh != mesh or _shard_dim(t) != seq.dim:
            raise DistributedHeadError(
                f"{name}: sharded differently from hidden ({tuple(t.placements)} on {t.device_mesh}); shard it "
                f"over tokens like hidden (Shard({seq.dim}) on the same mesh), or pass this rank's local slice")
        t = t.to_local()
    elif getattr(t, _SEQ_MARK, None) is not None and isinstance(getattr(t, _SEQ_MARK), SeqShard):
        other = getattr(t, _SEQ_MARK)
        if other.group != seq.group or other.start != seq.start or other.local_len != seq.local_len:
            raise DistributedHeadError(f"{name}: marked with another group or token range than hidden")
    if want_shape is not None and tuple(t.shape[:len(want_shape)]) != tuple(want_shape):
        raise DistributedHeadError(
            f"{name}: expected this rank's shard of the tokens, shape {tuple(want_shape)} like the local hidden "
            f"states, got {tuple(t.shape)} (shard it over tokens the same way as hidden)")
    return t


def localize(arg: dict, hn: str, *, labels: str | None = "labels", cu: str | None = "cu_seqlens",
             like: SeqShard | None = None) -> SeqShard:
    """Turn the token-sharded hidden ``arg[hn]`` (and ``arg[labels]``, global ``arg[cu]``) into local tensors.

    Rewrites ``arg`` in place: local hidden, local labels, ``cu_seqlens`` in local coordinates (clamped to this
    rank's tokens: sequences outside them become empty, a crossing one keeps its local part). ``like``: the
    shard of the call's first hidden (a second hidden, e.g. ``ref_hidden``, must be sharded the same way).
    Returns this rank's :class:`SeqShard`.
    """
    h = arg[hn]
    mesh = None
    if _is_dtensor(h):
        seq = _dtensor_seq(h)
        mesh = h.device_mesh
        h = h.to_local()
    else:
        seq = getattr(h, _SEQ_MARK)
    if like is not None and (seq.group != like.group or seq.start != like.start or seq.local_len != like.local_len
                             or seq.dim != like.dim):
        raise DistributedHeadError(f"{hn}: sharded over tokens differently from hidden (group or token range)")
    arg[hn] = h
    if labels is not None and labels in arg:
        arg[labels] = _local(arg[labels], labels, seq, mesh, tuple(h.shape[:-1]))
    if cu is not None and arg.get(cu) is not None:
        if seq.dim != 0:
            raise DistributedHeadError(f"{cu}: given with padded (B, T, H) hidden states; pack them as (N, H)")
        from ..engine.checks import as_cu_seqlens
        c = as_cu_seqlens(arg[cu], h.device)
        end = int(c[-1])  # one small readback (the global boundaries are checked against the shards here)
        if end != seq.total_len:
            raise DistributedHeadError(
                f"{cu}: ends at {end}, but the token shards hold {seq.total_len} tokens in all (this rank: "
                f"[{seq.start}, {seq.start + seq.local_len})); with sequence-sharded hidden states cu_seqlens is in "
                "global coordinates and must cover every rank's tokens")
        arg[cu] = (c.to(torch.int64) - seq.start).clamp(0, seq.local_len)
    return seq


def check_head(head: Head, seq: SeqShard) -> None:
    """A vocabulary split must run over another group than the token split (2-D: sequence x vocabulary)."""
    if head.shard is not None and head.shard.group == seq.group and seq.world > 1:
        raise DistributedHeadError(
            "weight: split over the vocabulary on the same process group as the hidden states' tokens; with "
            "sequence x vocabulary parallelism the two groups must be different (orthogonal) groups")


# ----------------------------------------------------------------------------------------------------------
# the reductions


class _AllReduceSum(torch.autograd.Function):
    """Forward: the SUM of ``t`` over ``group`` (in float64). Backward: the identity (each rank's loss is the
    replicated global loss; its gradient w.r.t. this rank's partial sums is the gradient w.r.t. the sums)."""

    @staticmethod
    def forward(ctx, t, group):
        import torch.distributed as dist
        out = t.detach().to(torch.float64).clone()
        dist.all_reduce(out, group=group)
        return out.to(t.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


def reduce_sums(seq: SeqShard | None, sums: torch.Tensor) -> torch.Tensor:
    """Per-sequence partial sums -> the global ones (one all-reduce of S values); ``sums`` itself if ``seq`` is None."""
    return sums if seq is None else _AllReduceSum.apply(sums, seq.group)


def reduce_sums_counts(seq: SeqShard | None, sums: torch.Tensor, counts: torch.Tensor | None):
    """(sums, counts) global in one all-reduce of 2S values (counts may be None: S values)."""
    if seq is None:
        return sums, counts
    if counts is None:
        return reduce_sums(seq, sums), None
    S = sums.shape[0]
    both = reduce_sums(seq, torch.cat([sums, counts.detach().to(sums.dtype)]))
    return both[:S], both[S:].detach()


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """(world, K) float64: every rank's (K,) ``t``, in rank order (no autograd)."""
    import torch.distributed as dist
    x = t.detach().to(torch.float64).contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


@dataclasses.dataclass
class SeqScored(Scored):
    """A :class:`dpo_fast.engine.Scored` of this rank's tokens whose ``counts()`` are the global ones.

    One all-gather of the S local counts gives both the global counts (the sum over the ranks, exact: integers
    in float64) and :meth:`prior_counts`, the scored tokens of each sequence on earlier ranks (LD-DPO's offset).
    """

    shard: SeqShard | None = None
    _local: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    _prior: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def counts(self) -> torch.Tensor:
        if self._counts is None:
            from ..engine import segment_counts
            local = segment_counts(self.seq, self.num_seqs)
            g = _gather_rows(local, self.shard.group)  # (world, S), rank order
            self._local = local.to(torch.float32)
            self._prior = g[:self.shard.rank].sum(0).to(torch.float32)
            self._counts = g.sum(0).to(torch.float32)
        return self._counts

    def local_counts(self) -> torch.Tensor:
        """(S,) float32 scored tokens of each sequence on this rank."""
        self.counts()
        return self._local

    def prior_counts(self) -> torch.Tensor:
        """(S,) float32 scored tokens of each sequence on the ranks before this one (same collective as counts)."""
        self.counts()
        return self._prior


def seq_scored(sc: Scored, seq: SeqShard) -> SeqScored:
    return SeqScored(**{f.name: getattr(sc, f.name) for f in dataclasses.fields(Scored)}, shard=seq)


_VALUES_CLS: dict = {}


def _values_cls(base):
    """A subclass of the fused route's ``Values`` (``base``; not imported here: distributed sits below fused)
    whose per-sequence sums and means are the global ones."""
    cls = _VALUES_CLS.get(base)
    if cls is None:
        from ..engine import segment_counts, segment_sum

        def _reduce(self, local):
            """All-reduce ``local`` (K,); token sums registered by :meth:`pend_token_sums` ride along once."""
            pend = getattr(self, "_tok_pending", None)
            if pend is None:
                return reduce_sums(self.shard, local)
            self._tok_pending = None
            n = local.shape[0]
            both = reduce_sums(self.shard, torch.cat([local.to(torch.float64), pend.to(local.device)]))
            self._tok_global = both[n:].detach()
            return both[:n].to(local.dtype)

        def unit_sums(self, per_token=None, token_weights=None):
            v = self.logp if per_token is None else per_token
            if token_weights is not None:
                v = v * token_weights.index_select(0, self.tok)
            return _reduce(self, segment_sum(v, self.seg, self.num_segs))[self.slots]

        def unit_means(self, per_token):
            cnt = segment_counts(self.seg, self.num_segs)
            sums = segment_sum(per_token, self.seg, self.num_segs)
            S = sums.shape[0]
            both = _reduce(self, torch.cat([sums, cnt.detach().to(sums.dtype)]))  # (sums, counts): one collective
            s, c = both[:S], both[S:].detach()
            return (s / c.to(s.dtype).clamp_min(1.0))[self.slots]

        def pend_token_sums(self, vec):
            """Register this rank's token-metric sums (K,): the next per-sequence all-reduce carries them."""
            self._tok_pending, self._tok_global = vec.detach().to(torch.float64), None

        def global_token_sums(self, sums: dict) -> dict:
            """``sums`` (this rank's token sums, in :meth:`pend_token_sums`'s order) over the group: those the
            per-sequence all-reduce carried, else one all-reduce now; ``sums`` itself if none were registered
            (a task that reduces its own, GRPOLoss)."""
            if getattr(self, "_tok_pending", None) is None and getattr(self, "_tok_global", None) is None:
                return sums
            if self._tok_global is None:  # no per-sequence collective ran since: reduce them alone
                self._tok_global = reduce_sums(self.shard, self._tok_pending).detach()
                self._tok_pending = None
            return {k: self._tok_global[i].to(t.dtype) for i, (k, t) in enumerate(sums.items())}

        cls = type("SeqValues", (base,), {"unit_sums": unit_sums, "unit_means": unit_means,
                                          "pend_token_sums": pend_token_sums, "global_token_sums": global_token_sums,
                                          "__doc__": "Values with global per-sequence sums (sequence parallel)."})
        _VALUES_CLS[base] = cls
    return cls


def seq_values(values, seq: SeqShard):
    """The batch's ``Values`` (:class:`dpo_fast.fused.plan.Values`) whose :meth:`unit_sums` / :meth:`unit_means`
    are all-reduced over the sequence group (one collective of S (or 2S) values each)."""
    out = _values_cls(type(values))(**{f.name: getattr(values, f.name) for f in dataclasses.fields(values)})
    out.shard = seq
    return out


def check_task(task, token_metrics: bool) -> None:
    """Losses whose inputs are more than per-sequence sums of this rank's tokens are refused (clear error).

    Every fused loss's inputs are such sums now: ``token_metrics`` sums ride in the first per-sequence
    all-reduce (:meth:`SeqValues.pend_token_sums`; GRPOLoss, ``reduces_token_sums``, in its own gather), and
    LD-DPO's weights take their offsets from the counts' all-gather. Kept as the one place a new task's
    refusal goes.
    """


# ----------------------------------------------------------------------------------------------------------
# several statistics, one collective


class _GatherReduce(torch.autograd.Function):
    """Forward: all-gather ``t`` (K,) (float64) over ``group``, then per entry the sum over the ranks (in rank
    order, the same on every rank), the max, or rank 0's value. Returns (reduced (K,), gathered (world, K)).
    Backward: the identity on ``t`` (as :class:`_AllReduceSum`: every rank's loss is the replicated global one)."""

    @staticmethod
    def forward(ctx, t, group, how):
        import torch.distributed as dist
        x = t.detach().to(torch.float64).contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        g = torch.stack(parts)  # (world, K), rank order
        out = torch.where(how == SeqStats.MAX, g.amax(0), g.sum(0))
        out = torch.where(how == SeqStats.SAME, g[0], out)
        ctx.mark_non_differentiable(g)
        return out.to(t.dtype), g

    @staticmethod
    def backward(ctx, grad, _unused):
        return grad, None, None


class SeqStats:
    """Named statistics of this rank's tokens, reduced over the sequence group in **one** all-gather.

    ``add(name, t, how)``: ``t`` any shape (flattened; differentiable ones stay so), ``how``:

    * ``"sum"``: the sum over the ranks (per-sequence sums, counts, batch totals; backward: the identity);
    * ``"max"`` / ``"min"``: the extreme over the ranks (detached values; e.g. a metric's token maximum);
    * ``"same"``: a value every rank must hold identically (replicated per-sequence inputs, per-step scalars):
      compared bit for bit across the ranks; a difference raises :class:`DistributedHeadError` on every rank.

    :meth:`reduce` concatenates the columns (float64), all-gathers them once (``world x K`` values) and reduces
    each column locally, in rank order: bit-identical on every rank, whatever the backend's reduction order.
    Every rank must add the same columns with the same sizes (a collective of mismatched sizes aborts).
    """

    SUM, MAX, SAME = 0, 1, 2
    _HOW = {"sum": SUM, "max": MAX, "min": MAX, "same": SAME}

    def __init__(self):
        self._cols: list[tuple[str, torch.Tensor, str, torch.Size]] = []
        self._hints: dict[str, str] = {}

    def add(self, name: str, t, how: str = "sum", hint: str | None = None) -> None:
        """Add the column ``name`` (``hint``: what to do when a ``same`` column differs across the ranks)."""
        if how not in self._HOW:
            raise ValueError(f"how: expected one of {sorted(self._HOW)}, got {how!r}")
        if hint is not None:
            self._hints[name] = hint
        t = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64)
        v = t.reshape(-1).to(torch.float64)
        self._cols.append((name, -v if how == "min" else v, how, t.shape))

    def reduce(self, seq: SeqShard, *, read: tuple[str, ...] = ()) -> tuple[dict, dict]:
        """One all-gather of every column: ``({name: reduced tensor (float64, its shape)}, {name: host list})``.

        ``read``: columns whose reduced values come to the host (as lists of floats), in the readback that
        checks the ``"same"`` columns (one host sync in all, none when there is neither).
        """
        if not self._cols:
            return {}, {}
        dev = next((t.device for _, t, _, _ in self._cols if t.device.type != "cpu"), self._cols[0][1].device)
        vec = torch.cat([t.to(dev) for _, t, _, _ in self._cols])
        how = torch.cat([torch.full((t.numel(),), self._HOW[h], dtype=torch.int8) for _, t, h, _ in self._cols])
        red, g = _GatherReduce.apply(vec, seq.group, how.to(dev))
        out, spans, pos = {}, {}, 0
        for name, t, h, shape in self._cols:
            n = t.numel()
            r = red[pos:pos + n]
            out[name] = (-r if h == "min" else r).reshape(shape)
            spans[name] = (pos, n, h)
            pos += n
        same = [(name, a, n) for name, (a, n, h) in spans.items() if h == "same"]
        if not same and not read:
            return out, {}
        # bitwise: NaN == NaN here, -0.0 != 0.0 (a replicated input is the same tensor everywhere)
        flags = [((g[:, a:a + n].view(torch.int64) != g[0:1, a:a + n].view(torch.int64)).any(1)) for _, a, n in same]
        host = torch.cat([*(f.to(torch.float64) for f in flags), *(out[nm].reshape(-1) for nm in read)]).cpu().tolist()
        world = g.shape[0]
        for i, (name, _, _) in enumerate(same):
            bad = [r for r in range(world) if host[i * world + r]]
            if bad:
                hint = self._hints.get(name, "it is one value per sequence (or per batch) and every rank must pass the "
                                             "same one; only per-token inputs are sharded like labels")
                raise DistributedHeadError(
                    f"{name}: differs across the sequence-parallel group (ranks {bad} disagree with rank 0); {hint}")
        values, pos = {}, len(same) * world
        for nm in read:
            n = out[nm].numel()
            values[nm] = host[pos:pos + n]
            pos += n
        return out, values


def local_input(t, name: str, seq: SeqShard):
    """A per-token (or replicated) input of a loss on sequence-sharded hidden states -> this rank's tensor.

    A DTensor sharded over the hidden states' token dimension on their group becomes its local shard; a
    replicated DTensor its local (full) copy; a plain tensor passes as it is (the caller checks its shape).
    """
    if t is None or not _is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate
    if all(isinstance(p, Replicate) for p in t.placements):
        return t.to_local()
    if _shard_dim(t) != seq.dim or t.device_mesh.get_group() != seq.group:
        raise DistributedHeadError(
            f"{name}: sharded differently from hidden ({tuple(t.placements)} on {t.device_mesh}); shard it over "
            f"tokens like hidden (Shard({seq.dim}) on the same 1-D mesh), replicate it, or pass this rank's tensor")
    return t.to_local()
