"""The one-pass fused route shared by the loss modules (DPOLoss, CPOLoss, ORPOLoss, GRPOLoss).

A loss whose gradient w.r.t. each scored token's log-prob depends only on a small *unit* of sequences (a
preference pair, or one sampled completion) can be computed in a single pass over the logits: for a group
of whole units whose logits fit the workspace,

    z = h W^T (+b)          GEMM 1   (n x V tile, kept)
    logp, lse = rows(z)     row pass: per-token log-probs (+ token stats)
    g = dL/dlogp per token  the loss's callback, from the group's log-probs and batch constants
    dz = g (onehot - softmax(z)) in place on the tile
    dh = dz W               GEMM 2      dW += dz^T h   GEMM 3

Three GEMM-equivalents over scored tokens instead of the generic engine's four; the gradients are produced
in forward and scaled by grad_output in backward. The forward returns a 0-valued scalar that carries the
gradient; callers add it to the (detached) loss value they compute from the sums.
"""

from __future__ import annotations

import torch
from torch import nn

from .engine import (STAT_KEYS, RowResult, Scored, TokenStats, acc_dtype, get_workspace_bytes, linear_into,
                     make_rows, per_elem_bytes, prepare, tile, tile_dtype)


class FusedLogitsPass(torch.autograd.Function):
    """One pass over the logits of ``groups`` of scored tokens; the gradient comes from ``group_grad``.

    Args (forward):
        hidden2 (M, H), weight (V, H), bias (V,) | None: the head's operands (one dtype).
        sc: the prepared batch (:class:`dpo_fast.engine.Scored`).
        groups: list of dicts with at least ``tok`` (n,) int64 indices into the scored arrays.
        rows: backend row ops (``fwd_for_grad`` / ``grad_after_fwd``).
        group_grad: ``(group, res) -> g_tok (n,)``, with ``res`` the group's :class:`dpo_fast.engine.RowResult`.
        want_stats: also compute per-token stats (:data:`STAT_KEYS`) into ``aux``.
        aux: dict the pass fills with the per-token stats, (N,) each.
    Returns:
        a 0-valued scalar (float32/float64) whose backward scales the gradients computed here.
    """

    @staticmethod
    def forward(ctx, hidden2, weight, bias, sc: Scored, groups, rows, group_grad, want_stats, aux):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        V = weight.shape[0]
        dev, dt = hidden2.device, hidden2.dtype
        acc = acc_dtype(dt)
        dh = torch.zeros_like(hidden2, memory_format=torch.contiguous_format) if need_dh else None
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_dw else None
        db = torch.zeros(V, dtype=acc, device=dev) if need_db else None
        max_tok = max((g["tok"].numel() for g in groups), default=0)
        buf = torch.empty(max_tok * V, dtype=tile_dtype(dt), device=dev)  # fp32 for fp16 inputs
        if want_stats:
            for k in STAT_KEYS:
                aux[k] = torch.zeros(sc.idx.numel(), dtype=acc, device=dev)
        first_dw = True
        for g in groups:
            tok = g["tok"]
            n = tok.numel()
            if n == 0:
                empty = torch.zeros(0, dtype=acc, device=dev)
                group_grad(g, RowResult(empty, empty, TokenStats(*(empty,) * 4) if want_stats else None))
                continue
            rows_idx = sc.idx.index_select(0, tok)  # (n,) flat positions
            lab = sc.labels.index_select(0, tok)
            hc = hidden2.index_select(0, rows_idx)  # (n, H)
            z = linear_into(tile(buf, n, V), hc, weight, bias)  # (n, V), GEMM 1
            res, state = rows.fwd_for_grad(z, lab, stats=want_stats)  # keeps what the gradient needs
            if want_stats:
                for k, v in zip(STAT_KEYS, res.stats):
                    aux[k][tok] = v
            g_tok = group_grad(g, res).to(acc).contiguous()  # (n,)
            if not (need_dh or need_dw or need_db):
                continue
            dz = rows.grad_after_fwd(z, lab, res.lse, g_tok, state)  # (n, V), in place in the tile
            dz = dz.to(dt)  # the GEMMs read the inputs' dtype (a copy only for a float32 tile of 16-bit inputs)
            if need_dh:
                dh.index_copy_(0, rows_idx, torch.mm(dz, weight))  # GEMM 2
            if need_dw:  # GEMM 3; later groups add into the weight-dtype gradient (one rounding each)
                if first_dw:
                    torch.mm(dz.t(), hc, out=dw)
                else:
                    dw.addmm_(dz.t(), hc)
                first_dw = False
            if need_db:
                db += dz.to(acc).sum(0)
        ctx.save_for_backward(dh, dw, None if db is None else db.to(bias.dtype))
        ctx.used = False
        return torch.zeros((), dtype=acc, device=dev)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError("fused preference loss: backward can run once per forward (no retain_graph)")
        ctx.used = True
        dh, dw, db = ctx.saved_tensors
        # in place: the gradients were made by this forward and are used once
        dh = None if dh is None else dh.mul_(grad_out.to(dh.dtype))
        dw = None if dw is None else dw.mul_(grad_out.to(dw.dtype))
        db = None if db is None else db.mul_(grad_out.to(db.dtype))
        return dh, dw, db, None, None, None, None, None, None


def plan_groups(sc: Scored, counts: torch.Tensor, units: torch.Tensor, V: int, per_elem: int, budget: int):
    """Greedy groups of consecutive *units* (rows of ``units``: sequence indices) whose logits fit ``budget``.

    Args:
        counts: (S,) scored tokens per sequence. units: (U, k) int64 sequence indices (pairs: k = 2).
        per_elem: workspace bytes per logits element; budget: bytes for one group's logits.
    Returns:
        None if a single unit's logits exceed the budget; else a list of dicts with ``tok`` (n,) indices into
        the scored arrays, ``local`` (n,) position of each token's sequence in the group's flattened
        ``units[group]`` (unit-major: [u0s0, u0s1, u1s0, ...]), and ``units`` (G,) the group's unit ids.
    """
    cnt = counts.to("cpu", torch.int64)
    units_cpu = units.to("cpu", torch.int64)
    per_unit = cnt[units_cpu].sum(1).tolist()
    max_tokens = budget // (V * per_elem)
    if per_unit and max(per_unit) > max_tokens:
        return None
    start = torch.cumsum(cnt, 0) - cnt
    groups, cur, cur_tok = [], [], 0
    for i, t in enumerate(per_unit):
        if cur and cur_tok + t > max_tokens:
            groups.append(cur)
            cur, cur_tok = [], 0
        cur.append(i)
        cur_tok += t
    if cur:
        groups.append(cur)
    dev = sc.idx.device
    out = []
    for uids in groups:
        uid = torch.tensor(uids, dtype=torch.int64)
        seqs = units_cpu[uid].reshape(-1)  # (G*k,) unit-major
        lens = cnt[seqs]
        total = int(lens.sum())
        local = torch.repeat_interleave(torch.arange(seqs.numel()), lens)  # (n,)
        offs = torch.cumsum(lens, 0) - lens
        tok = start[seqs][local] + (torch.arange(total) - offs[local])  # (n,) index into scored arrays
        out.append({"tok": tok.to(dev), "local": local.to(dev), "units": uid.to(dev)})
    return out


def grads_at(total_fn, base: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """d total_fn(x) / dx[pos], where x = ``base`` with ``x[pos] = values`` (no grad into ``values``).

    The fused modules' ``group_grad``: the group's log-probs go into a full-batch vector whose other entries
    are placeholders (``base``), and autograd gives dL/d(the group's entries). Exact whenever the loss
    decomposes over units given batch constants (counts, normalisers): the placeholders do not enter these
    derivatives. ``pos`` indexes ``base``'s first dimension; the result has ``values``' shape.
    """
    with torch.enable_grad():
        x = base.clone()
        x[pos] = values.detach().to(base.dtype)
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(total_fn(x), x, allow_unused=True)
    return torch.zeros_like(values, dtype=base.dtype) if g is None else g[pos]


class FusedLossModule(nn.Module):
    """Configuration and route selection shared by the fused loss modules.

    Subclasses call :meth:`_prepare` (validation, scored positions, row ops), :meth:`_plan` (the groups of
    the one-pass route, or None for the two-pass route) and :meth:`_fused_pass`.
    """

    def __init__(self, *, ignore_index: int, temperature: float, softcap: float | None, backend: str, fused: bool,
                 workspace_bytes: int | None, compute_metrics: bool):
        super().__init__()
        if workspace_bytes is not None and (not isinstance(workspace_bytes, int) or workspace_bytes < 1024):
            raise ValueError(f"workspace_bytes: expected None or an int >= 1024, got {workspace_bytes!r}")
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap
        self.backend, self.fused, self.workspace_bytes = backend, bool(fused), workspace_bytes
        self.compute_metrics = compute_metrics
        #: which route the last forward took: "fused" or "two_pass" (for tests and logging)
        self.last_route: str | None = None

    def _prepare(self, hidden, weight, labels, bias, cu_seqlens=None):
        """(Scored batch, row ops) for this module's options."""
        sc = prepare(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ignore_index=self.ignore_index,
                     temperature=self.temperature, softcap=self.softcap)
        rows = make_rows(self.backend, sc.hidden2.device, sc.hidden2.dtype, self.temperature, self.softcap)
        return sc, rows

    def _plan(self, sc: Scored, rows, weight, units, counts, params, decomposable: bool = True):
        """Groups of whole ``units`` for the one-pass route, or None: the two-pass route then runs.

        None when the module is not ``fused``, the loss does not decompose, nothing in ``params`` needs a
        gradient, or one unit's logits exceed the workspace (default 8 x the engine workspace).
        """
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
        self.last_route = "two_pass"
        if not (self.fused and decomposable and needs_grad):
            return None
        budget = self.workspace_bytes or 8 * get_workspace_bytes(sc.idx.device)
        groups = plan_groups(sc, counts, units, weight.shape[0], per_elem_bytes(rows, sc.hidden2.dtype, grad=True), budget)
        if groups is not None:
            self.last_route = "fused"
        return groups

    @staticmethod
    def _fused_pass(sc: Scored, weight, bias, groups, rows, group_grad, want_stats: bool, aux: dict):
        """Run :class:`FusedLogitsPass`; returns the 0-valued gradient carrier to add to the loss value."""
        return FusedLogitsPass.apply(sc.hidden2, weight, bias, sc, groups, rows, group_grad, want_stats, aux)

    @staticmethod
    def _with_gradient(out, carrier):
        """The detached loss value plus the carrier: same value, and the fused pass's gradient path."""
        out.loss = out.loss.detach() + carrier.to(out.loss.dtype)
        return out
