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


def _rec(errs):
    bad = [d for e, d in errs if e > 1e-5]
    return record(errs, extra=f" ({len(errs)} checks; failing: {bad})" if bad else f" ({len(errs)} checks)")


def sp_cases(rank, world):
    """Every entry point and fused loss, padded and packed, marker and DTensor, on all ranks of the world."""
    return _rec(_all_cases())


def sp_uneven(rank, world):
    """Packed tokens in unequal shards (the global cu_seqlens says where they are)."""
    hidden, W, b, labels = _data()
    errs = []
    for name, (kind, fn) in _entry_fns().items():
        errs += [(e, f"{name} uneven {d}") for e, d in _run(fn, hidden, W, b, labels, packed=True, kind=kind,
                                                            uneven=True)]
    errs += [(e, f"DPOLoss uneven {d}") for e, d in _run(_losses()["DPOLoss"], hidden, W, b, labels, packed=True,
                                                         uneven=True)]
    return _rec(errs)


def sp_x_vocab(rank, world):
    """2-D: tokens over the "sp" dimension, the vocabulary over the "tp" dimension of a (2, 2) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("sp", "tp"))
    sp_g, tp_g = mesh.get_group("sp"), mesh.get_group("tp")
    tr = dist.get_rank(tp_g)
    vs, ve = (0, 34) if tr == 0 else (34, V)
    return _rec(_all_cases(group=sp_g, wslice=(vs, ve, tp_g), modes=("marker",)))


def sp_repeat(rank, world):
    """Two identical runs: loss, d hidden and dW bit for bit equal."""
    hidden, W, b, labels = _data()
    s0, e0 = _bounds(T, world, rank)
    res = []
    for _ in range(2):
        h = hidden[:, s0:e0].clone().requires_grad_(True)
        w = W.clone().requires_grad_(True)
        out = dpo_fast.DPOLoss(beta=0.1)(sequence_parallel(h), w, labels[:, s0:e0], torch.zeros(3), torch.zeros(3))
        out.loss.backward()
        lp = dpo_fast.sequence_logprobs(sequence_parallel(hidden[:, s0:e0]), W, labels[:, s0:e0])
        res.append((out.loss.detach(), h.grad, w.grad, lp))
    same = all(torch.equal(a, c) for a, c in zip(res[0], res[1]))
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
    # losses not supported yet: a clear error
    checks.append(expect_error(lambda: dpo_fast.GRPOLoss()(h, W, labels[:, s0:e0], torch.randn(B)),
                               DistributedHeadError, "GRPOLoss"))
    checks.append(expect_error(lambda: dpo_fast.DPOLoss(ld_alpha=0.5)(h, W, labels[:, s0:e0], torch.zeros(3),
                                                                      torch.zeros(3)), DistributedHeadError, "ld_alpha"))
    checks.append(expect_error(lambda: dpo_fast.DPOLoss(token_metrics=True)(h, W, labels[:, s0:e0], torch.zeros(3),
                                                                            torch.zeros(3)),
                               DistributedHeadError, "token_metrics"))
    errs = [(0.0 if ok else 1.0, msg) for ok, msg in checks]
    return record(errs)


SCENARIOS = {f.__name__: f for f in (sp_cases, sp_uneven, sp_x_vocab, sp_repeat, sp_bad_input)}

if __name__ == "__main__":
    main(SCENARIOS)
