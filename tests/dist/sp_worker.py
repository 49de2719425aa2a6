"""Hidden states sharded over tokens (sequence / context parallelism): ``torchrun --nproc-per-node N sp_worker.py a,b``.

Every scenario runs the entry points on this rank's token shard and compares with the single-process run of
the whole batch (fp32, 1e-5): per-sequence values equal on every rank, per-token values equal to this rank's
slice, d hidden equal to this rank's slice, dW / db summed over the sequence group equal to the full ones.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import H, V, expect_error, main, max_err, record  # noqa: E402

import dpo_fast  # noqa: E402
from dpo_fast.distributed import DistributedHeadError, sequence_parallel, vocab_parallel  # noqa: E402

B, T = 6, 12  # T divisible by 2 and 4: equal padded shards
CU = [0, 5, 5, 17, 30, 48, 72]  # packed N = 72: sequences cross every shard boundary, one empty


def _data(seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.7
    b = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100
    labels[1] = -100  # a fully masked row
    labels[4, 7:] = -100  # padding
    return hidden, W, b, labels


def _bounds(n, world, rank, uneven=False):
    if not uneven:
        per = n // world
        return rank * per, (rank + 1) * per
    cuts = [0] + [round(n * (i + 1) / world) + (3 if i % 2 == 0 else -2) for i in range(world - 1)] + [n]
    return cuts[rank], cuts[rank + 1]


def _sum_over(t, group):
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


def _run(fn, hidden, W, b, labels, *, packed=False, kind="seq", mode="marker", group=None, uneven=False,
         wslice=None):
    """errors of fn on this rank's token shard vs the full batch.

    fn(h, w, bb, labels, cu) -> tensor (per-sequence values, or per-token values when kind == "tok").
    mode: "marker" (sequence_parallel) or "dtensor" (Shard on the token dim of a 1-D mesh over ``group``).
    wslice: (s, e, tp_group) to run the head vocabulary-parallel too (2-D: sequence x vocabulary).
    """
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if packed:
        hidden, labels = hidden.reshape(-1, H), labels.reshape(-1)
    d = 0 if packed else 1
    n = hidden.shape[d]
    s0, e0 = _bounds(n, world, rank, uneven)
    cu = torch.tensor(CU) if packed else None
    outs = []
    for part in (False, True):
        h = hidden.clone()
        lab = labels
        w, bb = W.clone(), b.clone()
        if part and wslice is not None:
            vs, ve, tpg = wslice
            w, bb = W[vs:ve].clone(), b[vs:ve].clone()
        w.requires_grad_(True)
        bb.requires_grad_(True)
        if part and wslice is not None:
            vocab_parallel(w, tpg, vocab_start=wslice[0])
        if part and mode == "marker":
            h = h.narrow(d, s0, e0 - s0).clone().requires_grad_(True)
            lab = lab.narrow(d, s0, e0 - s0)
            hin = sequence_parallel(h, group)
        elif part:
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.tensor import Shard, distribute_tensor
            mesh = DeviceMesh.from_group(group, "cpu")
            hin = distribute_tensor(h, mesh, [Shard(d)]).requires_grad_(True)
            lab = distribute_tensor(lab, mesh, [Shard(d)])
            h = hin
        else:
            h.requires_grad_(True)
            hin = h
        val = fn(hin, w, bb, lab, cu)
        if not val.requires_grad:  # metrics: values only
            outs.append((val.detach(), None, None, None))
            continue
        val.sum().backward()
        hg = h.grad.to_local() if part and mode == "dtensor" else h.grad
        outs.append((val.detach(), hg, w.grad, bb.grad))
    (v0, h0, w0, b0), (v1, h1, w1, b1) = outs
    if kind == "tok":
        v0 = v0.narrow(d, s0, e0 - s0)
    if h0 is None:
        return [(max_err(v1, v0), "value")]
    errs = [(max_err(v1, v0), "value"), (max_err(h1, h0.narrow(d, s0, e0 - s0)), "d hidden")]
    if wslice is not None:
        w0, b0 = w0[wslice[0]:wslice[1]], b0[wslice[0]:wslice[1]]
    errs += [(max_err(_sum_over(w1, group), w0), "dW summed"), (max_err(_sum_over(b1, group), b0), "db summed")]
    return errs


KL_T = 8  # the KL batch: padded (B, 8) rows, or packed N = 40 with its own boundaries (crossing every shard's)
KL_CU = [0, 9, 20, 20, 31, 40]


def _kl_inputs(h, cu):
    """KTOLoss's KL batch (mismatched pairs: other hidden states, labels, layout) for a call on ``h``: the whole
    batch when ``h`` is not sharded over tokens, else this rank's token slice on ``h``'s group (marker or DTensor)."""
    from dpo_fast.distributed.sequence_parallel import _SEQ_MARK, is_token_sharded
    g = torch.Generator().manual_seed(13)
    kh = torch.randn(B, KL_T, H, generator=g)
    kl = torch.randint(0, V, (B, KL_T), generator=g)
    kl[:, :2] = -100
    kl[3, 5:] = -100
    kl[5] = -100  # a KL sequence without scored tokens
    packed = cu is not None
    if packed:
        kh, kl = kh.reshape(-1, H)[:KL_CU[-1]], kl.reshape(-1)[:KL_CU[-1]]
    S = len(KL_CU) - 1 if packed else B
    ref = -40.0 - 5.0 * torch.rand(S, generator=g)  # below the policy's sums: z > 0
    out = dict(kl_labels=kl, ref_kl_logps=ref, kl_cu_seqlens=torch.tensor(KL_CU) if packed else None)
    if is_token_sharded(h):
        d = 0 if packed else 1
        if not hasattr(h, _SEQ_MARK):  # a DTensor hidden: the KL batch as DTensors on its mesh
            from torch.distributed.tensor import Shard, distribute_tensor
            out["kl_labels"] = distribute_tensor(kl, h.device_mesh, [Shard(d)])
            kh = distribute_tensor(kh, h.device_mesh, [Shard(d)])
        else:
            group = getattr(h, _SEQ_MARK).group
            s0, e0 = _bounds(kh.shape[d], dist.get_world_size(group), dist.get_rank(group))
            out["kl_labels"] = kl.narrow(d, s0, e0 - s0)
            kh = sequence_parallel(kh.narrow(d, s0, e0 - s0).clone(), group)
    out["kl_hidden"] = kh
    return out


def _with_metrics(out):
    """(1 + metrics + token sums,): the loss (differentiable), then every metric and token sum (values)."""
    vals = [float(v) for v in out.metrics.values()] + [float(v) for v in (out.token_sums or {}).values()]
    return torch.cat([out.loss.reshape(1), torch.tensor(vals, dtype=out.loss.dtype)])


def _ld_pairs(cu):
    """LD-DPO pairs: padded rows (0, 4) (9 vs 4 scored: row 0 cut at column 7), packed sequences (2, 5) / (4, 0)
    (seq 5 cut at its 8th scored token, behind 3 on an earlier rank with 4 ranks; seq 4's tokens past its 2nd, 6
    of them before the 2-rank boundary); one pair with an empty sequence (all α)."""
    return torch.tensor([[0, 4], [2, 3], [5, 1]] if cu is None else [[2, 5], [4, 0], [3, 1]])


def _losses():
    g = torch.Generator().manual_seed(5)
    P = B // 2
    ref_c, ref_r = -torch.rand(P, generator=g) * 30, -torch.rand(P, generator=g) * 30
    desirable = torch.tensor([True, False, True, True, False, False])
    kto_ref = -torch.rand(B, generator=g) * 30
    return {
        "DPOLoss": lambda h, w, bb, lab, cu: dpo_fast.DPOLoss(beta=0.1)(h, w, lab, ref_c, ref_r, bias=bb, cu_seqlens=cu).loss,
        "DPOLoss ipo": lambda h, w, bb, lab, cu: dpo_fast.DPOLoss(beta=0.1, loss_type="ipo")(
            h, w, lab, ref_c, ref_r, bias=bb, cu_seqlens=cu).loss,
        "DPOLoss wpo": lambda h, w, bb, lab, cu: dpo_fast.DPOLoss(beta=0.1, use_weighting=True)(
            h, w, lab, ref_c, ref_r, bias=bb, cu_seqlens=cu).loss,
        "DPOLoss ref_hidden": lambda h, w, bb, lab, cu: dpo_fast.DPOLoss(beta=0.1)(
            h, w, lab, bias=bb, cu_seqlens=cu, ref_hidden=h.detach() * 0.9).loss,
        "DPOLoss metrics": lambda h, w, bb, lab, cu: torch.tensor([
            float(v) for v in dpo_fast.DPOLoss(beta=0.1)(h, w, lab, ref_c, ref_r, bias=bb, cu_seqlens=cu).metrics.values()]),
        # LD-DPO: pairs whose shorter sequence ends mid-way through the longer one's tokens, the cut on a later
        # rank than the longer sequence's first scored token (the offset comes from the counts' all-gather)
        "DPOLoss ld_alpha": lambda h, w, bb, lab, cu: dpo_fast.DPOLoss(beta=0.1, ld_alpha=0.5)(
            h, w, lab, ref_c, ref_r, bias=bb, cu_seqlens=cu, pairs=_ld_pairs(cu)).loss,
        "DPOLoss ld_alpha sft ref_hidden": lambda h, w, bb, lab, cu: dpo_fast.DPOLoss(
            beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.3)(
            h, w, lab, bias=bb, cu_seqlens=cu, pairs=_ld_pairs(cu), ref_hidden=h.detach() * 0.9).loss,
        "DPOLoss ld_alpha metrics": lambda h, w, bb, lab, cu: torch.tensor([float(v) for v in dpo_fast.DPOLoss(
            beta=0.1, ld_alpha=0.5)(h, w, lab, ref_c, ref_r, bias=bb, cu_seqlens=cu, pairs=_ld_pairs(cu)).metrics.values()]),
        "pair_logprobs ld_alpha": lambda h, w, bb, lab, cu: torch.cat(dpo_fast.pair_logprobs(
            h, w, lab, bias=bb, cu_seqlens=cu, pairs=_ld_pairs(cu), ld_alpha=0.5)),
        # token_metrics: loss, every metric and every token sum (the sums ride in the first per-sequence all-reduce)
        "DPOLoss wpo ld_alpha token_metrics": lambda h, w, bb, lab, cu: _with_metrics(dpo_fast.DPOLoss(
            beta=0.1, use_weighting=True, ld_alpha=0.5, token_metrics=True)(
            h, w, lab, ref_c, ref_r, bias=bb, cu_seqlens=cu, pairs=_ld_pairs(cu))),
        "CPOLoss simpo token_metrics": lambda h, w, bb, lab, cu: _with_metrics(dpo_fast.CPOLoss(
            loss_type="simpo", token_metrics=True)(h, w, lab, bias=bb, cu_seqlens=cu)),
        "ORPOLoss token_metrics": lambda h, w, bb, lab, cu: _with_metrics(dpo_fast.ORPOLoss(token_metrics=True)(
            h, w, lab, bias=bb, cu_seqlens=cu)),
        "KTOLoss token_metrics": lambda h, w, bb, lab, cu: _with_metrics(dpo_fast.KTOLoss(token_metrics=True)(
            h, w, lab, desirable, kto_ref, bias=bb, cu_seqlens=cu)),
        "KTOLoss token_metrics no compute_metrics": lambda h, w, bb, lab, cu: _with_metrics(dpo_fast.KTOLoss(
            token_metrics=True, compute_metrics=False)(h, w, lab, desirable, kto_ref, bias=bb, cu_seqlens=cu)),
        # kl_hidden: the KL batch sharded over tokens in its own layout (other row length / packing)
        "KTOLoss kl_hidden": lambda h, w, bb, lab, cu: _with_metrics(dpo_fast.KTOLoss()(
            h, w, lab, desirable, kto_ref, bias=bb, cu_seqlens=cu, **_kl_inputs(h, cu))),
        "KTOLoss kl_hidden token_metrics": lambda h, w, bb, lab, cu: _with_metrics(dpo_fast.KTOLoss(
            token_metrics=True)(h, w, lab, desirable, kto_ref, bias=bb, cu_seqlens=cu, **_kl_inputs(h, cu))),
        "CPOLoss simpo": lambda h, w, bb, lab, cu: dpo_fast.CPOLoss(loss_type="simpo")(h, w, lab, bias=bb, cu_seqlens=cu).loss,
        "CPOLoss": lambda h, w, bb, lab, cu: dpo_fast.CPOLoss()(h, w, lab, bias=bb, cu_seqlens=cu).loss,
        "ORPOLoss": lambda h, w, bb, lab, cu: dpo_fast.ORPOLoss()(h, w, lab, bias=bb, cu_seqlens=cu).loss,
        "KTOLoss": lambda h, w, bb, lab, cu: dpo_fast.KTOLoss()(h, w, lab, desirable, kto_ref, bias=bb, cu_seqlens=cu).loss,
    }


def _entry_fns():
    kw = dict(temperature=0.7, softcap=5.0)
    return {
        "sequence_logprobs": ("seq", lambda h, w, bb, lab, cu: dpo_fast.sequence_logprobs(h, w, lab, bias=bb, cu_seqlens=cu, **kw)),
        "sequence_logprobs average": ("seq", lambda h, w, bb, lab, cu: dpo_fast.sequence_logprobs(
            h, w, lab, bias=bb, cu_seqlens=cu, average=True)),
        "token_logprobs": ("tok", lambda h, w, bb, lab, cu: dpo_fast.token_logprobs(h, w, lab, bias=bb, **kw)),
    }


def _all_cases(group=None, wslice=None, modes=("marker", "dtensor")):
    hidden, W, b, labels = _data()
    errs = []
    for name, (kind, fn) in _entry_fns().items():
        for packed in (False, True):
            for mode in modes:
                errs += [(e, f"{name} {'packed' if packed else 'padded'} {mode} {d}") for e, d in _run(
                    fn, hidden, W, b, labels, packed=packed, kind=kind, mode=mode, group=group, wslice=wslice)]
    for name, fn in _losses().items():
        for packed in (False, True):
            errs += [(e, f"{name} {'packed' if packed else 'padded'} {d}") for e, d in _run(
                fn, hidden, W, b, labels, packed=packed, group=group, wslice=wslice)]
    return errs


# ---------------------------------------------------------------------------------------------------------- GRPO

#: (name, GRPOLoss options, inputs): old / ref / samp per-token log-probs, adv "seq" | "tok", isr "seq" | "tok",
#: num_items, entropy_coef (forward's per-step value), token_metrics
GRPO_CASES = [
    ("grpo", dict(), dict()),
    ("grpo old beta", dict(beta=0.04), dict(old=True, ref=True)),
    ("bnpo seq-IS delta", dict(loss_type="bnpo", importance_sampling_level="sequence", delta=1.2), dict(old=True)),
    ("dr_grpo seq-IS beta bias-corrected KL", dict(loss_type="dr_grpo", importance_sampling_level="sequence",
                                                   beta=0.05, use_bias_correction_kl=True), dict(old=True, ref=True)),
    ("dapo entropy_coef num_items", dict(loss_type="dapo", epsilon_high=0.28, entropy_coef=0.01),
     dict(old=True, num_items=37)),
    ("cispo", dict(loss_type="cispo", epsilon_high=1.05), dict(old=True)),
    ("sapo seq-IS per-token adv", dict(loss_type="sapo", importance_sampling_level="sequence"),
     dict(old=True, adv="tok")),
    ("luspo seq-IS off-policy mask", dict(loss_type="luspo", importance_sampling_level="sequence",
                                          off_policy_mask_threshold=0.02), dict(old=True, samp=True)),
    ("vespo vllm token_truncate", dict(loss_type="vespo", vllm_importance_sampling_mode="token_truncate",
                                       vllm_importance_sampling_clip_min=1.02), dict(old=True, samp=True)),
    ("vespo isr per sequence", dict(loss_type="vespo"), dict(old=True, isr="seq")),
    ("grpo vllm sequence_mask per-token adv token_metrics",
     dict(vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=0.3,
          vllm_importance_sampling_clip_max=2.5), dict(old=True, samp=True, adv="tok", token_metrics=True)),
    ("dapo isr per token entropy_coef token_metrics", dict(loss_type="dapo", entropy_coef=0.02),
     dict(old=True, isr="tok", token_metrics=True)),
    ("grpo seq-IS entropy_coef per step", dict(importance_sampling_level="sequence"),
     dict(old=True, ref=True, entropy_coef=0.03)),
]
GRPO_SMALL = [1, 3, 8, 10]  # the cases of the uneven and sequence x vocabulary runs (no entropy bonus: a
#                               vocabulary-parallel head has no entropy gradient)


def _grpo_inputs(hidden, W, b, labels):
    """Per-token inputs near the policy's log-probs (ratios around 1, some clipped), per-sequence ones."""
    g = torch.Generator().manual_seed(11)
    lp = dpo_fast.token_logprobs(hidden, W, labels, bias=b).detach()
    old = lp + 0.25 * torch.randn(B, T, generator=g) + 0.3 * torch.randn(B, 1, generator=g)  # some sequences clip
    return {"old": old, "ref": lp + 0.3 * torch.randn(B, T, generator=g),
            "samp": old + 0.2 * torch.randn(B, T, generator=g), "adv_seq": torch.randn(B, generator=g),
            "adv_tok": torch.randn(B, T, generator=g), "isr_seq": torch.rand(B, 1, generator=g) + 0.5,
            "isr_tok": torch.rand(B, T, generator=g) + 0.5}


def _grpo_values(case, h, w, bb, lab, cu, tok, local):
    """GRPOLoss on (h, lab) with the case's inputs; ``tok`` maps a (B, T) per-token input to this call's layout."""
    _, opts, inp = case
    m = dpo_fast.GRPOLoss(**opts, token_metrics=inp.get("token_metrics", False))
    adv = tok(local["adv_tok"]) if inp.get("adv") == "tok" else local["adv_seq"]
    isr = {"seq": local["isr_seq"], "tok": tok(local["isr_tok"]) if inp.get("isr") else None}.get(inp.get("isr"))
    out = m(h, w, lab, adv, tok(local["old"]) if inp.get("old") else None,
            tok(local["ref"]) if inp.get("ref") else None, bias=bb, cu_seqlens=cu,
            num_items_in_batch=inp.get("num_items"), sampling_logps=tok(local["samp"]) if inp.get("samp") else None,
            importance_sampling_ratio=isr, entropy_coef=inp.get("entropy_coef"))
    sums = out.token_sums or {}
    metrics = torch.tensor([out.metrics[k] for k in sorted(out.metrics)] + [float(sums[k]) for k in sorted(sums)],
                           dtype=torch.float64)
    return out, metrics, sorted(out.metrics) + sorted(sums)


def _grpo_run(case, hidden, W, b, labels, inputs, *, packed=False, mode="marker", group=None, uneven=False,
              wslice=None, dtensor_inputs=False):
    """errors of GRPOLoss on this rank's token shard vs the whole batch on one process: loss, every metric (and
    token sum), per_token_loss / token_logps on this rank's slice, d hidden, dW / db summed over the group."""
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    d = 0 if packed else 1
    if packed:
        hidden, labels = hidden.reshape(-1, H), labels.reshape(-1)
    s0, e0 = _bounds(hidden.shape[d], world, rank, uneven)
    cu = torch.tensor(CU) if packed else None
    res = []
    for part in (False, True):
        h = hidden.clone()
        w, bb = W.clone(), b.clone()
        if part and wslice is not None:
            w, bb = W[wslice[0]:wslice[1]].clone(), b[wslice[0]:wslice[1]].clone()
        w.requires_grad_(True)
        bb.requires_grad_(True)
        if part and wslice is not None:
            vocab_parallel(w, wslice[2], vocab_start=wslice[0])

        def tok(t, part=part):
            t = t.reshape(-1) if packed else t
            return t.narrow(d, s0, e0 - s0).clone() if part else t

        if part and mode == "dtensor":
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.tensor import Shard, distribute_tensor
            mesh = DeviceMesh.from_group(group, "cpu")
            hin = distribute_tensor(h, mesh, [Shard(d)]).requires_grad_(True)
            lab = distribute_tensor(labels, mesh, [Shard(d)])
            h = hin
            if dtensor_inputs:  # per-token inputs as DTensors sharded like hidden
                def tok(t):  # noqa: F811
                    return distribute_tensor(t.reshape(-1) if packed else t, mesh, [Shard(d)])
        elif part:
            h = h.narrow(d, s0, e0 - s0).clone().requires_grad_(True)
            lab = labels.narrow(d, s0, e0 - s0)
            hin = sequence_parallel(h, group)
        else:
            hin, lab = h.requires_grad_(True), labels
        out, metrics, names = _grpo_values(case, hin, w, bb, lab, cu, tok, inputs)
        out.loss.backward()
        hg = h.grad.to_local() if part and mode == "dtensor" else h.grad
        res.append((out.loss.detach(), metrics, names, out.per_token_loss.detach(), out.token_logps, hg, w.grad,
                    bb.grad))
    (l0, m0, n0, p0, t0, h0, w0, b0), (l1, m1, n1, p1, t1, h1, w1, b1) = res
    sl = (lambda x: x.narrow(d, s0, e0 - s0))
    if wslice is not None:
        w0, b0 = w0[wslice[0]:wslice[1]], b0[wslice[0]:wslice[1]]
    return [(max_err(l1, l0), "loss"), (max_err(m1, m0) if n1 == n0 else float("inf"), f"metrics {n1}"),
            (max_err(p1, sl(p0)), "per_token_loss"), (max_err(t1, sl(t0)), "token_logps"),
            (max_err(h1, sl(h0)), "d hidden"), (max_err(_sum_over(w1, group), w0), "dW summed"),
            (max_err(_sum_over(b1, group), b0), "db summed")]


def _grpo_cases(cases=None, *, layouts=(False, True), **kw):
    hidden, W, b, labels = _data()
    inputs = _grpo_inputs(hidden, W, b, labels)
    errs = []
    for i in (range(len(GRPO_CASES)) if cases is None else cases):
        for packed in layouts:
            errs += [(e, f"GRPOLoss {GRPO_CASES[i][0]} {'packed' if packed else 'padded'} {d}") for e, d in _grpo_run(
                GRPO_CASES[i], hidden, W, b, labels, inputs, packed=packed, **kw)]
    return errs


def sp_grpo(rank, world):
    """GRPOLoss over the loss types, token / sequence IS, β, the sampler IS ratio, the entropy bonus and token
    metrics; padded and packed (sequences crossing every boundary); DTensor hidden and per-token inputs too."""
    errs = _grpo_cases()
    errs += [(e, f"dtensor {d}") for e, d in _grpo_cases([3, 11], mode="dtensor", dtensor_inputs=True)]
    # under no_grad: the loss value (sequence-level ratio, entropy bonus, two gathers)
    hidden, W, b, labels = _data()
    inputs = _grpo_inputs(hidden, W, b, labels)
    rank, world = dist.get_rank(), dist.get_world_size()
    s0, e0 = _bounds(T, world, rank)
    with torch.no_grad():
        vals = [_grpo_values(GRPO_CASES[12], h, W, b, lab, None, tok, inputs)[0].loss for h, lab, tok in (
            (hidden, labels, lambda t: t),
            (sequence_parallel(hidden[:, s0:e0].clone()), labels[:, s0:e0], lambda t: t[:, s0:e0].clone()))]
    errs.append((max_err(vals[1], vals[0]), "no_grad loss"))
    return _rec(errs)


def _rec(errs):
    bad = [d for e, d in errs if e > 1e-5]
    return record(errs, extra=f" ({len(errs)} checks; failing: {bad})" if bad else f" ({len(errs)} checks)")


def sp_cases(rank, world):
    """Every entry point and fused loss, padded and packed, marker and DTensor, on all ranks of the world."""
    errs = _all_cases()
    hidden, W, b, labels = _data()
    for packed in (False, True):  # the KL batch as DTensors (Shard on the token dim of hidden's mesh)
        errs += [(e, f"KTOLoss kl_hidden dtensor {'packed' if packed else 'padded'} {d}") for e, d in _run(
            _losses()["KTOLoss kl_hidden"], hidden, W, b, labels, packed=packed, mode="dtensor")]
    return _rec(errs)


def sp_uneven(rank, world):
    """Packed tokens in unequal shards (the global cu_seqlens says where they are)."""
    hidden, W, b, labels = _data()
    errs = []
    for name, (kind, fn) in _entry_fns().items():
        errs += [(e, f"{name} uneven {d}") for e, d in _run(fn, hidden, W, b, labels, packed=True, kind=kind,
                                                            uneven=True)]
    for name in ("DPOLoss", "DPOLoss ld_alpha"):
        errs += [(e, f"{name} uneven {d}") for e, d in _run(_losses()[name], hidden, W, b, labels, packed=True,
                                                            uneven=True)]
    errs += [(e, f"uneven {d}") for e, d in _grpo_cases(GRPO_SMALL, layouts=(True,), uneven=True)]
    return _rec(errs)


def sp_x_vocab(rank, world):
    """2-D: tokens over the "sp" dimension, the vocabulary over the "tp" dimension of a (2, 2) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("sp", "tp"))
    sp_g, tp_g = mesh.get_group("sp"), mesh.get_group("tp")
    tr = dist.get_rank(tp_g)
    vs, ve = (0, 34) if tr == 0 else (34, V)
    errs = _all_cases(group=sp_g, wslice=(vs, ve, tp_g), modes=("marker",))
    errs += _grpo_cases(GRPO_SMALL, group=sp_g, wslice=(vs, ve, tp_g))
    return _rec(errs)


def sp_repeat(rank, world):
    """Two identical runs: loss, d hidden and dW bit for bit equal."""
    hidden, W, b, labels = _data()
    s0, e0 = _bounds(T, world, rank)
    res = []
    for _ in range(2):
        h = hidden[:, s0:e0].clone().requires_grad_(True)
        w = W.clone().requires_grad_(True)
        out = dpo_fast.DPOLoss(beta=0.1, ld_alpha=0.5, token_metrics=True)(
            sequence_parallel(h), w, labels[:, s0:e0], torch.zeros(3), torch.zeros(3), pairs=_ld_pairs(None))
        out.loss.backward()
        lp = dpo_fast.sequence_logprobs(sequence_parallel(hidden[:, s0:e0]), W, labels[:, s0:e0])
        res.append((out.loss.detach(), h.grad, w.grad, lp, _with_metrics(out).detach()))
        # GRPOLoss, sequence-level ratio (two gathers) with the entropy bonus
        h = hidden[:, s0:e0].clone().requires_grad_(True)
        w = W.clone().requires_grad_(True)
        old = torch.linspace(-5.0, -3.0, B * T).view(B, T)[:, s0:e0]
        out = dpo_fast.GRPOLoss(importance_sampling_level="sequence", beta=0.04, entropy_coef=0.01)(
            sequence_parallel(h), w, labels[:, s0:e0], torch.linspace(-1.0, 1.0, B), old, old + 0.1)
        out.loss.backward()
        res.append((out.loss.detach(), h.grad, w.grad, out.per_token_loss,
                    torch.tensor(list(out.metrics.values()), dtype=torch.float64)))
    same = all(torch.equal(a, c) for a, c in zip(res[0] + res[1], res[2] + res[3]))
    return record([(0.0 if same else 1.0, f"bitwise repeat {same}")])


def sp_bad_input(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hidden, W, b, labels = _data()
    s0, e0 = _bounds(T, world, rank)
    checks = []
    h = sequence_parallel(hidden[:, s0:e0].clone())
    # labels not sharded like hidden (the full labels)
    checks.append(expect_error(lambda: dpo_fast.sequence_logprobs(h, W, labels), DistributedHeadError,
                               "shard of the tokens"))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    hd = distribute_tensor(hidden, mesh, [Shard(1)])
    # DTensor labels sharded over another dimension
    checks.append(expect_error(lambda: dpo_fast.sequence_logprobs(hd, W, distribute_tensor(labels, mesh, [Replicate()])),
                               DistributedHeadError, "sharded differently from hidden"))
    # a group that is not the DTensor's mesh group
    g2 = dist.new_group(list(range(world)))
    checks.append(expect_error(lambda: sequence_parallel(distribute_tensor(hidden, mesh, [Shard(1)]), g2),
                               DistributedHeadError, "does not match the hidden states' device mesh"))
    # unequal padded shards
    cut = T // world + (1 if rank == 0 else 0) if world == 2 else T // world + (1 if rank == 0 else -1 if rank == 1 else 0)
    checks.append(expect_error(lambda: sequence_parallel(hidden[:, :cut].clone()), DistributedHeadError,
                               "unequal token shards"))
    # packed shards whose cu_seqlens does not cover them
    n = B * T
    ps, pe = _bounds(n, world, rank)
    hp = sequence_parallel(hidden.reshape(-1, H)[ps:pe].clone())
    checks.append(expect_error(lambda: dpo_fast.sequence_logprobs(hp, W, labels.reshape(-1)[ps:pe],
                                                                  cu_seqlens=torch.tensor([0, 10, n - 4])),
                               DistributedHeadError, "global coordinates"))
    # vocabulary split on the same group as the tokens
    vs, ve = (0, 34) if rank % 2 == 0 else (34, V)
    if world == 2:
        wl = vocab_parallel(W[vs:ve].clone(), vocab_start=vs)
        checks.append(expect_error(lambda: dpo_fast.sequence_logprobs(h, wl, labels[:, s0:e0]), DistributedHeadError,
                                   "same process group"))
    # GRPOLoss: per-sequence inputs must be replicated, per-token ones sharded like labels
    lab = labels[:, s0:e0]
    adv = torch.linspace(-1.0, 1.0, B)
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss()(h, W, lab, adv + rank), DistributedHeadError,
                               "advantages: differs across the sequence-parallel group (ranks"))
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss(loss_type="dapo")(h, W, lab, adv,
                                                                           num_items_in_batch=10 + rank),
                               DistributedHeadError, "num_items_in_batch: differs"))
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss()(h, W, lab, adv, entropy_coef=0.01 * rank),
                               DistributedHeadError, "entropy_coef: differs"))
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss(beta=0.01 * (rank + 1))(h, W, lab, adv,
                                                                                 ref_logps=lab * 0.0),
                               DistributedHeadError, "GRPOLoss options: differs"))
    isr = torch.ones(B, 1) + rank
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss(importance_sampling_level="sequence")(
        h, W, lab, adv, importance_sampling_ratio=isr), DistributedHeadError, "importance_sampling_ratio: differs"))
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss()(h, W, lab, adv, old_logps=torch.zeros(B, T)), ValueError,
                               "this rank's token shard"))
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss()(h, W, lab, torch.zeros(B, T)), ValueError,
                               "this rank's token shard"))
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss(top_entropy_quantile=0.5)(h, W, lab, adv),
                               DistributedHeadError, "top_entropy_quantile"))
    old_r = distribute_tensor(torch.zeros(B, T), mesh, [Shard(0)])
    lab_d = distribute_tensor(labels, mesh, [Shard(1)])
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss()(hd, W, lab_d, adv, old_r), DistributedHeadError,
                               "old_logps: sharded differently"))
    # packed: a shard of exactly S tokens reads a (S,) tensor as per-token, the others as per-sequence
    S = len(CU) - 1
    cut = [0] + [S + (n - S) * k // (world - 1) for k in range(world)]  # rank 0: S tokens
    hq = sequence_parallel(hidden.reshape(-1, H)[cut[rank]:cut[rank + 1]].clone())
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss()(hq, W, labels.reshape(-1)[cut[rank]:cut[rank + 1]],
                                                           adv, cu_seqlens=torch.tensor(CU)),
                               DistributedHeadError, "per-token advantages / importance_sampling_ratio: differs"))
    # not supported yet: a clear error that says why
    # LD-DPO: pairs still validated against the (global) number of sequences
    checks.append(expect_error(lambda: dpo_fast.DPOLoss(ld_alpha=0.5)(h, W, labels[:, s0:e0], torch.zeros(1),
                                                                      torch.zeros(1), pairs=torch.tensor([[0, B]])),
                               ValueError, "outside [0, 6)"))
    # KTOLoss's KL batch: sharded over tokens like hidden (on its group), kl_labels like it, a global kl_cu_seqlens
    des = torch.ones(B, dtype=torch.bool)
    kto = dpo_fast.KTOLoss()
    checks.append(expect_error(lambda: kto(h, W, labels[:, s0:e0], des, kl_hidden=hidden[:, s0:e0].clone(),
                                           kl_labels=labels[:, s0:e0], ref_kl_logps=torch.zeros(B)),
                               DistributedHeadError, "the KL batch must be sharded over tokens on the same group"))
    hk = sequence_parallel(hidden[:, s0:e0].clone())
    checks.append(expect_error(lambda: kto(hidden, W, labels, des, kl_hidden=hk, kl_labels=labels[:, s0:e0],
                                           ref_kl_logps=torch.zeros(B)),
                               DistributedHeadError, "kl_hidden: sharded over tokens (sequence_parallel"))
    checks.append(expect_error(lambda: kto(h, W, labels[:, s0:e0], des, kl_hidden=hk, kl_labels=labels,
                                           ref_kl_logps=torch.zeros(B)),
                               DistributedHeadError, "kl_labels: expected this rank's shard of the tokens"))
    checks.append(expect_error(lambda: kto(hp, W, labels.reshape(-1)[ps:pe], des, cu_seqlens=torch.tensor(
        [0, 10, 20, 30, 40, 50, n]), kl_hidden=hp, kl_labels=labels.reshape(-1)[ps:pe],
        kl_cu_seqlens=torch.tensor([0, 10, n - 4]), ref_kl_logps=torch.zeros(2)),
                               DistributedHeadError, "kl_cu_seqlens: ends at"))
    if world == 4:  # the KL batch sharded over another group (halves of the world) than hidden
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        hg = halves[rank // 2]
        ks, ke = _bounds(T, 2, rank % 2)
        hk2 = sequence_parallel(hidden[:, ks:ke].clone(), hg)
        checks.append(expect_error(lambda: kto(h, W, labels[:, s0:e0], des, kl_hidden=hk2, kl_labels=labels[:, ks:ke],
                                               ref_kl_logps=torch.zeros(B)),
                                   DistributedHeadError, "kl_hidden: sharded over tokens on another process group"))
    errs = [(0.0 if ok else 1.0, msg) for ok, msg in checks]
    return record(errs)


SCENARIOS = {f.__name__: f for f in (sp_cases, sp_uneven, sp_x_vocab, sp_repeat, sp_bad_input, sp_grpo)}

if __name__ == "__main__":
    main(SCENARIOS)
