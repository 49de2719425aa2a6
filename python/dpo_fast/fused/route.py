"""The fused route: one implementation shared by every fused loss module.

A loss whose derivative w.r.t. each scored token's log-prob depends only on a small *unit* of sequences (a
preference pair, one KTO example, one sampled completion) plus batch constants known before the pass can be
computed in a single pass over the logits. For each group of whole units whose logits fit the workspace:

    z = h W^T (+b)          GEMM 1   (n x V tile, kept)
    logp, lse = rows(z)     row pass: per-token log-probs (+ TokenStats)
    g = dL/dlogp per token  one autograd call on the group's own units (the module's ``group_loss``)
    dz = g (onehot - softmax(z)) in place on the tile
    dh = dz W               GEMM 2      dW += dz^T h   GEMM 3

Three GEMM-equivalents over scored tokens instead of the generic engine's four. The gradients are made in
forward and scaled by grad_output in backward; the loss *value* is computed once, after the pass, from all
the log-probs (the module's ``batch_loss``), and a 0-valued carrier joins it to the gradients.

A module supplies a *task* (:class:`UnitTask`): which sequences form a unit, ``group_loss`` (the group's
share of the total loss, from its per-unit values and batch constants) and ``batch_loss`` (the whole loss and
its output record, used as the value on the fused route and through autograd on the two-pass route). The
two-pass route (generic engine + autograd) runs when the module is not ``fused``, the loss does not
decompose over units, nothing needs a gradient, or one unit's logits exceed the workspace.

dW across groups. With a 16-bit weight, the first group writes dW and later groups ``addmm_`` into it:
fp32 inside each GEMM, one 16-bit rounding of the running sum per group. Measured (CPU torch backend, bf16,
64 pairs x 2 x 32 tokens, H=64, V=2048; float64 reference from the same bf16 inputs; max |error| / max |dW|):
4.0e-3 with 1 group (the bf16 tiles and output alone), 1.1e-2 with 16 groups, 1.5e-2 with 64 groups.
An fp32 V x H buffer would remove it but costs 2 GiB at llama3-8b, so it is not used. With an fp32 weight —
including an fp32 master weight under ``torch.autocast`` — dW is accumulated directly in fp32 in the weight's
own gradient buffer (no 16-bit rounding between groups): 3.2e-3 / 3.6e-3 at 16 / 64 groups in the same
measurement, i.e. no growth with the group count (on CUDA cuBLAS's fp32 epilogue adds each group's product;
the CPU fallback rounds each group's product to bf16 once, never the running sum).

Non-finite data. Every per-token and per-unit value is row-local or unit-local: NaN/inf in one unit's hidden
states stays in that unit's log-probs, losses and hidden-state gradients. The scalar loss (a mean) and the
shared dW / db are necessarily non-finite then — they sum over every unit.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import nn

from .. import losses as L
from ..engine.autocast import autocast_aware, autocast_dtype
from ..engine.checks import check_ignore_index, check_scalars
from ..distributed import distributed_head
from ..engine import (BACKENDS, Head, Scored, TokenStats, as_head, acc_dtype, addmm_fp32_, get_workspace_bytes, linear_into,
                      make_rows, per_elem_bytes, prepare, scored_logprobs, segment_counts, segment_sum, tile,
                      tile_dtype)
from ..engine.passes import forbid_double_backward

Tensor = torch.Tensor

ROUTES = ("fused", "two_pass")


# ----------------------------------------------------------------------------------------------------------
# output records: the loss functions' records plus where the numbers came from


@dataclass
class FusedDPOOutput(L.DPOOutput):
    """:class:`dpo_fast.DPOOutput` of a fused module, plus ``route`` ("fused" | "two_pass") and ``token_sums``
    (with ``token_metrics``: the 0-d tensor sums behind the token metrics, for cross-process aggregation)."""

    route: str = "two_pass"
    token_sums: dict[str, Tensor] | None = None


@dataclass
class FusedUnpairedOutput(L.UnpairedOutput):
    """:class:`dpo_fast.losses.UnpairedOutput` plus ``route`` and ``token_sums`` (see :class:`FusedDPOOutput`)."""

    route: str = "two_pass"
    token_sums: dict[str, Tensor] | None = None


@dataclass
class FusedGRPOOutput(L.GRPOOutput):
    """:class:`dpo_fast.losses.GRPOOutput` plus ``route``, ``token_sums`` and ``token_logps``: the detached
    per-token policy log-probs shaped like ``labels`` (0 at unscored positions), e.g. for ratio metrics."""

    route: str = "two_pass"
    token_sums: dict[str, Tensor] | None = None
    token_logps: Tensor | None = None


_FUSED_RECORD = {L.DPOOutput: FusedDPOOutput, L.UnpairedOutput: FusedUnpairedOutput, L.GRPOOutput: FusedGRPOOutput}


def with_route(out, route: str, token_sums, **extra):
    """The fused record of ``out`` (a loss function's output) with ``route``, ``token_sums`` and ``extra``."""
    cls = _FUSED_RECORD[type(out)]
    return cls(**{f.name: getattr(out, f.name) for f in fields(out)}, route=route, token_sums=token_sums, **extra)


# ----------------------------------------------------------------------------------------------------------
# groups and the values a task sees


@dataclass(frozen=True)
class Group:
    """One group of whole units whose logits fit the workspace.

    tok: (n,) int64 indices into the scored arrays (``Scored.idx`` / ``labels`` / ``seq``), in scored order.
    seg: (n,) int64 position of each token's sequence in the group's segment list (non-decreasing).
    slots: (G, k) int64 segment of each unit's j-th sequence (units' sequences in order: [u0s0, u0s1, ...]).
    units: (G,) int64 unit ids (rows of the task's ``units``).
    """

    tok: Tensor
    seg: Tensor
    slots: Tensor
    units: Tensor


@dataclass
class Values:
    """Per-token values of some units, as a task's ``group_loss`` / ``batch_loss`` receives them.

    logp: (n,) token log-probs (inside ``group_loss``: an autograd leaf; on the two-pass route: the engine's
        differentiable output). lse: (n,) logsumexp of each token's (tempered, capped) logits, no grad.
    stats: :class:`dpo_fast.engine.TokenStats` of the tokens when the task asked for them.
    tok: (n,) indices into the scored arrays. seg, num_segs: each token's segment (sequence) in [0, num_segs).
    slots: (G, k) segment of each unit's sequences. units: (G,) unit ids.
    """

    logp: Tensor
    lse: Tensor
    stats: TokenStats | None
    tok: Tensor
    seg: Tensor
    num_segs: int
    slots: Tensor
    units: Tensor

    def unit_sums(self, per_token: Tensor | None = None, token_weights: Tensor | None = None) -> Tensor:
        """(G, k) per-sequence sums of ``per_token`` (n,) (default: logp), times ``token_weights`` (N,) if given."""
        v = self.logp if per_token is None else per_token
        if token_weights is not None:
            v = v * token_weights.index_select(0, self.tok)
        return segment_sum(v, self.seg, self.num_segs)[self.slots]

    def unit_means(self, per_token: Tensor) -> Tensor:
        """(G, k) per-sequence means of ``per_token`` (n,) over the sequence's scored tokens (0 for none)."""
        cnt = segment_counts(self.seg, self.num_segs).to(per_token.dtype)  # no bincount: no host sync
        return (segment_sum(per_token, self.seg, self.num_segs) / cnt.clamp_min(1.0))[self.slots]


def batch_values(sc: Scored, units: Tensor, logp: Tensor, lse: Tensor, stats: TokenStats | None) -> Values:
    """:class:`Values` of every unit of the batch (segments = the batch's sequences)."""
    dev = sc.idx.device
    return Values(logp, lse, stats, torch.arange(sc.idx.numel(), device=dev), sc.seq, sc.num_seqs, units,
                  torch.arange(units.shape[0], device=dev))


def group_values(group: Group, logp: Tensor, lse: Tensor, stats: TokenStats | None) -> Values:
    return Values(logp, lse, stats, group.tok, group.seg, group.slots.numel(), group.slots, group.units)


class UnitTask(Protocol):
    """What a fused module supplies for one forward (built from the batch; holds its batch constants).

    Attributes:
        units: (U, k) int64 sequence indices of each unit (pairs: k = 2, (chosen, rejected)).
        decomposable: whether ``group_loss`` summed over groups is the total loss (else: two-pass route).
        want_stats: the row pass must compute :class:`dpo_fast.engine.TokenStats`.
    """

    units: Tensor
    decomposable: bool
    want_stats: bool

    def group_loss(self, v: Values) -> Tensor:
        """The group's units' share of the total loss (a scalar), differentiable in ``v.logp``."""
        ...

    def batch_loss(self, v: Values, compute_metrics: bool) -> Any:
        """The total loss of all units (``v`` from :func:`batch_values`): a loss function's output record."""
        ...


def plan_groups(counts: Tensor, units: Tensor, max_tokens: int, device, *, counts_dev: Tensor | None = None,
                units_host: Tensor | None = None) -> list[Group] | None:
    """Greedy groups of consecutive units whose scored tokens number at most ``max_tokens``.

    The plan is made on the host from host counts; each group's index tensors are then built on ``device``
    from host-known sizes (``repeat_interleave`` with ``output_size``): no copy and no sync per group.

    Args:
        counts: (S,) scored tokens per sequence, on the host (``Scored.host_counts``; a device tensor costs a
            copy). units: (U, k) int64 sequence indices on ``device``. counts_dev: ``counts`` on ``device``
            (``Scored.counts``; else one copy). units_host: a host copy of ``units`` when the caller knows it
            without a copy (else one copy).
    Returns:
        None if one unit alone exceeds ``max_tokens``; else the :class:`Group` list (units with no scored
        token are in some group too).
    """
    cnt = counts.to("cpu", torch.int64)
    units_cpu = (units if units_host is None else units_host).to("cpu", torch.int64)
    per_unit = cnt[units_cpu].sum(1).tolist()
    if per_unit and max(per_unit) > max_tokens:
        return None
    spans, u0, cur_tok = [], 0, 0  # (first unit, end unit, tokens)
    for i, t in enumerate(per_unit):
        if i > u0 and cur_tok + t > max_tokens:
            spans.append((u0, i, cur_tok))
            u0, cur_tok = i, 0
        cur_tok += t
    if per_unit:
        spans.append((u0, len(per_unit), cur_tok))
    cnt_d = (counts if counts_dev is None else counts_dev).to(device=device, dtype=torch.int64)
    start_d = torch.cumsum(cnt_d, 0) - cnt_d
    units_d = units.to(device=device, dtype=torch.int64)
    k = units.shape[1]
    out = []
    for a, b, n in spans:
        seqs = units_d[a:b].reshape(-1)  # (G*k,) unit-major
        m = seqs.numel()
        lens = cnt_d.index_select(0, seqs)
        seg = torch.repeat_interleave(torch.arange(m, device=device), lens, output_size=n)  # (n,)
        offs = torch.cumsum(lens, 0) - lens
        tok = start_d.index_select(0, seqs)[seg] + (torch.arange(n, device=device) - offs[seg])  # (n,)
        out.append(Group(tok, seg, torch.arange(m, device=device).view(-1, k), torch.arange(a, b, device=device)))
    return out


def group_gradient(task: UnitTask, group: Group, logp: Tensor, lse: Tensor, stats: TokenStats | None) -> Tensor:
    """dL/dlogp (n,) of the group's tokens: one autograd call on ``task.group_loss`` over the group's units."""
    with torch.enable_grad():
        leaf = logp.detach().requires_grad_(True)
        loss = task.group_loss(group_values(group, leaf, lse, stats))
        if not loss.requires_grad:
            return torch.zeros_like(leaf)
        (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if g is None else g


# ----------------------------------------------------------------------------------------------------------
# the pass


@dataclass
class PassPlan:
    """Inputs of :class:`FusedLogitsPass` besides the differentiable operands."""

    sc: Scored
    rows: Any  # dpo_fast.engine.RowOps
    groups: list[Group]
    task: UnitTask
    compute_weight: Tensor  # (V, H) the weight in the tiles' dtype (the weight itself unless autocast cast it)


def _add_dw(dw: Tensor, dz: Tensor, hc: Tensor, first: bool) -> None:
    """dW (V, H) += dz^T (V, n) @ hc (n, H): GEMM 3. fp32 dW with 16-bit tiles accumulates in fp32."""
    if dw.dtype != dz.dtype:
        addmm_fp32_(dw, dz.t(), hc)
    elif first:
        torch.mm(dz.t(), hc, out=dw)  # the first group writes dW: no zero-fill, no addition
    else:
        dw.addmm_(dz.t(), hc)  # one rounding to dW's dtype per group (measured in the module docstring)


class FusedLogitsPass(torch.autograd.Function):
    """One pass over the logits of ``plan.groups``; gradients from the task's ``group_loss``, made in forward.

    Forward: ``(hidden2 (M, H), weight (V, H), bias (V,) | None, plan)`` -> ``(carrier, logp, lse, *stats)``:
    a 0-valued scalar whose backward scales the gradients computed here, then the (N,) per-token log-probs,
    lse and (with ``plan.task.want_stats``) the four :class:`TokenStats` fields, all non-differentiable.
    """

    @staticmethod
    def forward(ctx, hidden2, weight, bias, plan: PassPlan):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        sc, rows, wc = plan.sc, plan.rows, plan.compute_weight
        V, N = wc.shape[0], sc.idx.numel()
        dev, dt = hidden2.device, hidden2.dtype
        acc = acc_dtype(dt)
        want_stats = plan.task.want_stats
        logp_all = torch.zeros(N, dtype=acc, device=dev)
        lse_all = torch.zeros(N, dtype=acc, device=dev)
        stats_all = [torch.zeros(N, dtype=acc, device=dev) for _ in TokenStats._fields] if want_stats else []
        dh = torch.zeros_like(hidden2, memory_format=torch.contiguous_format) if need_dh else None
        # dW in the weight's own dtype: fp32 for an fp32 (master) weight, else one rounding per group
        dw = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_dw else None
        db = torch.zeros(V, dtype=acc, device=dev) if need_db else None
        max_tok = max((g.tok.numel() for g in plan.groups), default=0)
        buf = torch.empty(max_tok * V, dtype=tile_dtype(dt), device=dev)  # fp32 tiles for fp16 inputs
        first_dw = True
        for group in plan.groups:
            n = group.tok.numel()
            if n == 0:
                continue  # units without scored tokens: no logits, zero gradient
            rows_idx = sc.idx.index_select(0, group.tok)  # (n,) flat positions
            lab = sc.labels.index_select(0, group.tok)
            hc = hidden2.index_select(0, rows_idx)  # (n, H)
            z = linear_into(tile(buf, n, V), hc, wc, bias)  # (n, V), GEMM 1
            res, state = rows.fwd_for_grad(z, lab, stats=want_stats)  # keeps what the gradient needs
            logp_all[group.tok], lse_all[group.tok] = res.logp, res.lse
            for dst, src in zip(stats_all, res.stats or ()):
                dst[group.tok] = src
            g_tok = group_gradient(plan.task, group, res.logp, res.lse, res.stats).to(acc).contiguous()  # (n,)
            if not (need_dh or need_dw or need_db):
                continue
            dz = rows.grad_after_fwd(z, lab, res.lse, g_tok, state)  # (n, V), in place in the tile
            dz = dz.to(dt)  # the GEMMs read the inputs' dtype (a copy only for a float32 tile of 16-bit inputs)
            if need_dh:
                dh.index_copy_(0, rows_idx, torch.mm(dz, wc))  # GEMM 2
            if need_dw:
                _add_dw(dw, dz, hc, first_dw)  # GEMM 3
                first_dw = False
            if need_db:
                db += dz.to(acc).sum(0)
        ctx.save_for_backward(dh, dw, None if db is None else db.to(bias.dtype))
        ctx.used = False
        ctx.mark_non_differentiable(logp_all, lse_all, *stats_all)
        return (torch.zeros((), dtype=acc, device=dev), logp_all, lse_all, *stats_all)

    @staticmethod
    def backward(ctx, grad_out, *unused):
        forbid_double_backward("fused loss module (DPOLoss, KTOLoss, GRPOLoss, ...; fused route)")
        if ctx.used:
            raise RuntimeError("fused loss: backward can run once per forward (no retain_graph)")
        ctx.used = True
        dh, dw, db = ctx.saved_tensors
        # in place: the gradients were made by this forward and are used once
        dh = None if dh is None else dh.mul_(grad_out.to(dh.dtype))
        dw = None if dw is None else dw.mul_(grad_out.to(dw.dtype))
        db = None if db is None else db.mul_(grad_out.to(db.dtype))
        return dh, dw, db, None


# ----------------------------------------------------------------------------------------------------------
# autocast: an fp32 master weight stays fp32 so that dW accumulates in fp32


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t


def autocast_entry(*float_args: str):
    """:func:`dpo_fast.engine.autocast.autocast_aware` for a fused module's ``forward(self, hidden, weight, ...)``.

    Under autocast every named floating argument is cast to the autocast dtype, except ``weight``: an fp32
    weight reaches the route as the master of a :class:`dpo_fast.engine.Head` with the ``keep_master`` policy
    (its bias cast), the route casts a copy for the GEMMs and accumulates dW directly in fp32.
    """
    rest = tuple(a for a in float_args if a != "weight")
    cast_rest = autocast_aware(*rest)

    def deco(fn):
        inner = cast_rest(fn)

        @functools.wraps(fn)
        def wrapper(self, hidden, weight, *args, **kwargs):
            dtype = autocast_dtype(hidden)
            if dtype is not None:
                w = weight.weight if isinstance(weight, Head) else weight
                keep = isinstance(w, Tensor) and w.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)
                if keep or isinstance(weight, Head):  # the weight is never cast here; its bias is, as before
                    head = as_head(weight, kwargs.pop("bias", None))
                    weight = dataclasses.replace(head, bias=_cast(head.bias, dtype), keep_master=keep)
            return inner(self, hidden, weight, *args, **kwargs)

        # dpo_fast.distributed: DTensor / ZeRO-3 / vocabulary-parallel heads resolved before anything else
        heads = [("hidden", "weight", "bias")]
        if "ref_weight" in float_args:
            heads.append(("ref_hidden", "ref_weight", "ref_bias"))
        return distributed_head(*heads)(wrapper)

    return deco


# ----------------------------------------------------------------------------------------------------------
# the module base: configuration, validation, and the route itself


def check_module_options(*, ignore_index, temperature, softcap, backend, workspace_bytes) -> None:
    """Construction-time validation of the options every fused module shares."""
    check_ignore_index(ignore_index)
    check_scalars(temperature, softcap)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes < 1024):
        raise ValueError(f"workspace_bytes: expected None or an int >= 1024, got {workspace_bytes!r}")


@dataclass
class Prepared:
    """A validated batch: scored positions, row ops, and the head the GEMMs use (compute dtype)."""

    sc: Scored
    rows: Any
    head: Head  # weight in the compute dtype (a differentiable cast of an autocast master weight), master, bias


class FusedLossModule(nn.Module):
    """Options and the route shared by the fused loss modules (subclasses build a :class:`UnitTask`).

    Args (keyword-only): ignore_index (int), temperature (finite > 0), softcap (None or finite > 0),
    backend (``auto`` | ``torch`` | ``triton``), fused (bool), workspace_bytes (None or int >= 1024),
    compute_metrics (bool), token_metrics (bool) — all validated here, at construction.
    """

    def __init__(self, *, ignore_index: int, temperature: float, softcap: float | None, backend: str, fused: bool,
                 workspace_bytes: int | None, compute_metrics: bool, token_metrics: bool = False):
        super().__init__()
        check_module_options(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                             workspace_bytes=workspace_bytes)
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap
        self.backend, self.fused, self.workspace_bytes = backend, bool(fused), workspace_bytes
        self.compute_metrics, self.token_metrics = bool(compute_metrics), bool(token_metrics)

    def prepare(self, hidden, weight, labels, bias=None, cu_seqlens=None) -> Prepared:
        """Validate the batch and gather its scored positions (one host sync).

        ``weight``: the (V, H) tensor (with ``bias``) or the :class:`dpo_fast.engine.Head` the entry point
        resolved; under the autocast master policy the GEMMs get a 16-bit copy, dW goes to the fp32 master.
        """
        head = as_head(weight, bias).for_compute(hidden)
        sc = prepare(hidden, head, labels, cu_seqlens=cu_seqlens, ignore_index=self.ignore_index,
                     temperature=self.temperature, softcap=self.softcap)
        rows = make_rows(self.backend, sc.hidden2.device, sc.hidden2.dtype, self.temperature, self.softcap)
        return Prepared(sc, rows, head)

    def run(self, p: Prepared, task: UnitTask, hidden: Tensor):
        """The route: returns ``(output record, route, Values of all units)``."""
        sc, head = p.sc, p.head
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, head.grad_weight, head.bias))
        groups = None
        # a head split across processes (dpo_fast.distributed) takes the two-pass route
        if self.fused and task.decomposable and needs_grad and head.one_pass:
            budget = self.workspace_bytes or 8 * get_workspace_bytes(sc.idx.device)
            max_tokens = budget // (head.weight.shape[0] * per_elem_bytes(p.rows, sc.hidden2.dtype, grad=True))
            groups = plan_groups(sc.host_counts(), task.units, max_tokens, sc.idx.device, counts_dev=sc.counts(),
                                 units_host=getattr(task, "units_host", None))
        if groups is None:  # two-pass route: the generic engine + autograd through the loss
            st = {} if task.want_stats else None
            logp = scored_logprobs(sc, head, temperature=self.temperature, softcap=self.softcap,
                                   backend=self.backend, stats_out=st)
            stats = None if st is None else TokenStats(*(st[k] for k in TokenStats._fields))
            lse = st["lse"] if st is not None else torch.zeros_like(logp.detach())
            values = batch_values(sc, task.units, logp, lse, stats)
            return task.batch_loss(values, self.compute_metrics), "two_pass", values
        use_master = head.master is not None
        plan = PassPlan(sc, p.rows, groups, task, head.weight.detach() if use_master else head.weight)
        carrier, logp, lse, *st = FusedLogitsPass.apply(sc.hidden2, head.grad_weight, head.bias, plan)
        values = batch_values(sc, task.units, logp, lse, TokenStats(*st) if st else None)
        with torch.no_grad():
            out = task.batch_loss(values, self.compute_metrics)
        out.loss = out.loss.detach() + carrier.to(out.loss.dtype)
        return out, "fused", values


# ----------------------------------------------------------------------------------------------------------
# token metrics (TRL's entropy / mean_token_accuracy / logits/*) from the pass's TokenStats


def token_sums(values: Values, slot_names: tuple[str, ...]) -> dict[str, Tensor]:
    """0-d tensor sums over the units' scored tokens: ``entropy_sum``, ``tokens`` and, per slot name s,
    ``{s}_tokens``, ``{s}_hits`` (label is the arg-max), ``{s}_logits_sum`` (vocab-mean logit)."""
    st = values.stats
    role = torch.zeros(values.num_segs, dtype=torch.int64, device=values.seg.device)  # 0: in no unit
    for j in range(values.slots.shape[1]):
        role[values.slots[:, j]] = j + 1
    r = role[values.seg]  # (n,)
    in_unit = (r > 0).to(st.hit.dtype)
    sums = {"entropy_sum": (st.entropy * in_unit).sum(), "tokens": in_unit.sum()}
    for j, name in enumerate(slot_names):
        is_j = (r == j + 1).to(st.hit.dtype)
        sums[f"{name}_tokens"] = is_j.sum()
        sums[f"{name}_hits"] = (st.hit * is_j).sum()
        sums[f"{name}_logits_sum"] = (st.zmean * is_j).sum()
    return sums


def token_metrics(sums: dict[str, Tensor], slot_names: tuple[str, ...], accuracy: bool, logits: bool):
    """TRL's token metrics from :func:`token_sums` (one host sync): ``entropy``; with ``accuracy``,
    ``mean_token_accuracy`` over the first slot's tokens; with ``logits``, ``logits/{slot}``."""
    v = dict(zip(sums, torch.stack([t.to(torch.float64) for t in sums.values()]).tolist()))
    out = {"entropy": v["entropy_sum"] / max(v["tokens"], 1.0)}
    if accuracy:
        out["mean_token_accuracy"] = v[f"{slot_names[0]}_hits"] / max(v[f"{slot_names[0]}_tokens"], 1.0)
    if logits:
        for name in slot_names:
            out[f"logits/{name}"] = v[f"{name}_logits_sum"] / max(v[f"{name}_tokens"], 1.0)
    return out
