"""The fused logits pass: one pass over the logits of whole units, gradients made in forward.

A loss whose derivative w.r.t. each scored token's log-prob depends only on a small *unit* of sequences (a
preference pair, one KTO example, one sampled completion) plus batch constants known before the pass can be
computed in a single pass over the logits. For each group of whole units whose logits fit the workspace:

    z = h W^T (+b)          GEMM 1   (n x V tile, kept)
    logp, lse = rows(z)     row pass: per-token log-probs (+ TokenStats)
    g = dL/dlogp per token  one autograd call on the group's own units (the module's ``group_loss``)
    dz = g (onehot - softmax(z)) in place on the tile
         (a task with ``entropy_grad`` gets g_H = dL/dH per token from the same call too, and
          dz -= g_H p (zc - lse + H) dzc/dz: the entropy's own logits gradient)
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

from dataclasses import dataclass
from typing import Any

import torch

from ..engine import Scored, TokenStats, acc_dtype, addmm_fp32_, linear_into, tile, tile_dtype
from ..engine.passes import forbid_double_backward
from .plan import Group, UnitTask, group_values

Tensor = torch.Tensor


def group_gradient(task: UnitTask, group: Group, logp: Tensor, lse: Tensor,
                   stats: TokenStats | None) -> tuple[Tensor, Tensor | None]:
    """(dL/dlogp, dL/dH) (n,) each of the group's tokens: one autograd call on ``task.group_loss`` over the
    group's units. dL/dH (the entropy's gradient) only when the task has ``entropy_grad`` (else None)."""
    want_ent = bool(getattr(task, "entropy_grad", False))
    with torch.enable_grad():
        leaf = logp.detach().requires_grad_(True)
        leaves = [leaf]
        if want_ent:
            ent = stats.entropy.detach().requires_grad_(True)
            stats = stats._replace(entropy=ent)
            leaves.append(ent)
        loss = task.group_loss(group_values(group, leaf, lse, stats))
        grads = (torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad
                 else (None,) * len(leaves))
    g, *rest = (torch.zeros_like(x) if gx is None else gx for x, gx in zip(leaves, grads))
    return g, (rest[0] if rest else None)


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
            g_tok, g_ent = group_gradient(plan.task, group, res.logp, res.lse, res.stats)  # (n,) each
            g_tok = g_tok.to(acc).contiguous()
            if not (need_dh or need_dw or need_db):
                continue
            ent_term = () if g_ent is None else (g_ent.to(acc).contiguous(), res.stats.entropy)
            dz = rows.grad_after_fwd(z, lab, res.lse, g_tok, state, *ent_term)  # (n, V), in place in the tile
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
