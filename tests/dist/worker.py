"""DDP, FSDP2 and tensor-parallel scenarios: ``torchrun --nproc-per-node 2 tests/dist/worker.py a,b,c``.

Every scenario compares against the single-process run of the same global batch (fp32, 1e-5).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import (H, P_GLOBAL, V, compare_dicts, dpo_loss_through_model, expect_error, local_pairs,  # noqa: E402
                    main, max_err, pair_batch, record, reference_run, tiny_llama)

import dpo_fast  # noqa: E402
from dpo_fast.distributed import DistributedHeadError, vocab_parallel  # noqa: E402
from dpo_fast.hf import call_with_hidden_states  # noqa: E402


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _full(t):
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _drift(model) -> float:
    """Largest difference of any parameter between the ranks (0.0: no drift)."""
    flat = torch.cat([_full(p.detach()).reshape(-1) for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return float((hi - lo).abs().max())


def _dp_step_check(model, batch, ref_out, ref_grads, ref_stepped, rank, world, loss_on_rank):
    out = loss_on_rank(model, local_pairs(batch, rank, world))
    out.loss.backward()
    errs = [(max_err(_mean_over_ranks(out.loss), ref_out.loss), "loss")]
    named = list(getattr(model, "module", model).named_parameters())  # DDP: the wrapped module's names
    grads = {n: _full(p.grad) for n, p in named if p.grad is not None}
    errs.append(compare_dicts(grads, ref_grads, "grads"))
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.1)
    params = {n: _full(p.detach()) for n, p in named}
    errs.append(compare_dicts(params, ref_stepped, "stepped params"))
    d = _drift(model)
    errs.append((d, f"drift {d:.1e}"))
    return record(errs)


def _plain_dpo(model, b):
    return dpo_loss_through_model(model, b, dpo_fast.DPOLoss(beta=0.1))


# ----------------------------------------------------------------------------------------------------------


def ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, batch = tiny_llama(), pair_batch()
    ref = reference_run(model, batch)
    return _dp_step_check(DDP(model), batch, *ref, rank, world, _plain_dpo)


def _fsdp(rank, world, *, head_unit: bool, reshard: bool, tied: bool, direct: bool = False, peft: bool = False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, batch = tiny_llama(tied=tied), pair_batch()
    if peft:  # LoRA on the attention projections; the head (and everything else) frozen
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(7)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    ref = reference_run(model, batch)
    mesh = init_device_mesh("cpu", (world,))
    if peft:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        return _dp_step_check(model, batch, *ref, rank, world, _plain_dpo)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    if head_unit:
        fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)

    def loss_on_rank(m, b):
        if not direct:
            return _plain_dpo(m, b)
        ids, mask, labels, ref_c, ref_r = b
        hidden = call_with_hidden_states(m, lambda h, head: h, ids, attention_mask=mask)  # (B, T, H)
        w = m.lm_head.weight  # the sharded DTensor parameter, passed outside the model's forward
        assert type(w).__name__ == "DTensor", type(w)
        return dpo_fast.DPOLoss(beta=0.1)(hidden, w, labels, ref_c, ref_r)

    return _dp_step_check(model, batch, *ref, rank, world, loss_on_rank)


def fsdp_root(rank, world):
    return _fsdp(rank, world, head_unit=False, reshard=True, tied=False)


def fsdp_head_unit(rank, world):
    return _fsdp(rank, world, head_unit=True, reshard=True, tied=False)


def fsdp_noreshard_tied(rank, world):
    return _fsdp(rank, world, head_unit=False, reshard=False, tied=True)


def fsdp_direct(rank, world):
    return _fsdp(rank, world, head_unit=True, reshard=True, tied=False, direct=True)


# ----------------------------------------------------------------------------------------------------------
# tensor parallelism: every rank holds the whole batch; the head is split over the vocabulary


def _tp_mesh(world):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))


def _shard_rows(world, rank):
    chunk = -(-V // world)
    start = min(V, rank * chunk)
    return start, min(V, start + chunk)


def fsdp_peft(rank, world):
    return _fsdp(rank, world, head_unit=False, reshard=True, tied=False, peft=True)


def tp_dtensor(rank, world):
    """lm_head ColwiseParallel(use_local_output=False): DPOLoss (with token metrics) inside the forward."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    model, batch = tiny_llama(), pair_batch()
    make = lambda: dpo_fast.DPOLoss(beta=0.1, token_metrics=True)  # noqa: E731
    ref_out, ref_grads, _ = reference_run(model, batch, make())
    parallelize_module(model, _tp_mesh(world), {"lm_head": ColwiseParallel(use_local_output=False)})
    runs = []
    for _ in range(2):  # twice: deterministic, bit for bit
        model.zero_grad(set_to_none=True)
        out = dpo_loss_through_model(model, batch, make())
        out.loss.backward()
        runs.append((out, {n: _full(p.grad) for n, p in model.named_parameters()}))
    out, grads = runs[0]
    errs = [(max_err(out.loss, ref_out.loss), "loss"), compare_dicts(grads, ref_grads, "grads")]
    met = {k: torch.tensor(v) for k, v in out.metrics.items()}
    errs.append(compare_dicts(met, {k: torch.tensor(v) for k, v in ref_out.metrics.items()}, "metrics"))
    same = bool(torch.equal(runs[0][0].loss, runs[1][0].loss)) and all(
        torch.equal(runs[0][1][k], runs[1][1][k]) for k in grads)
    errs.append((0.0 if same else 1.0, "deterministic" if same else "NOT deterministic"))
    local = model.lm_head.weight.to_local().shape[0]
    errs.append((0.0 if local == _shard_rows(world, rank)[1] - _shard_rows(world, rank)[0] else 1.0,
                 f"local head rows {local} of {V}"))
    return record(errs)


def tp_dp(rank, world):
    """TP x DP on a (dp=world/2, tp=2) mesh: lm_head ColwiseParallel on the "tp" sub-mesh, pairs split over "dp",
    gradients averaged over "dp" by hand (what DDP/FSDP would do over that dimension)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    model, batch = tiny_llama(), pair_batch()
    ref_out, ref_grads, _ = reference_run(model, batch)
    parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel(use_local_output=False)})
    dp = mesh["dp"]
    out = dpo_loss_through_model(model, local_pairs(batch, dp.get_local_rank(), dp.size()), dpo_fast.DPOLoss(beta=0.1))
    out.loss.backward()
    dp_group = dp.get_group()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=dp_group)
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.to_local().clone() if isinstance(p.grad, DTensor) else p.grad.clone()
        dist.all_reduce(g, group=dp_group)
        g /= dp.size()
        if isinstance(p.grad, DTensor):  # the dp-averaged slice back into the (unevenly sharded) DTensor
            p.grad.to_local().copy_(g)
            g = p.grad.full_tensor()
        grads[n] = g
    errs = [(max_err(loss / dp.size(), ref_out.loss), "loss"), compare_dicts(grads, ref_grads, "grads")]
    return record(errs, extra=f" (dp rank {dp.get_local_rank()}, tp rank {mesh['tp'].get_local_rank()})")


def tp_explicit(rank, world):
    """Megatron style: a plain local slice marked with vocab_parallel(weight, group, vocab_start)."""
    model, batch = tiny_llama(), pair_batch()
    ref_out, ref_grads, _ = reference_run(model, batch)
    s, e = _shard_rows(world, rank)
    w_local = torch.nn.Parameter(model.lm_head.weight.detach()[s:e].clone())
    vocab_parallel(w_local, dist.group.WORLD, vocab_start=s)
    ids, mask, labels, ref_c, ref_r = batch
    hidden = call_with_hidden_states(model, lambda h, head: h, ids, attention_mask=mask)
    out = dpo_fast.DPOLoss(beta=0.1)(hidden, w_local, labels, ref_c, ref_r)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {n: g for n, g in ref_grads.items() if n != "lm_head.weight"}
    errs = [(max_err(out.loss, ref_out.loss), "loss"), compare_dicts(grads, want, "decoder grads"),
            (max_err(w_local.grad, ref_grads["lm_head.weight"][s:e]), "head grad slice")]
    return record(errs)


def _random_head(seed=3, B=6, Tn=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, Tn, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.7
    b = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (B, Tn), generator=g)
    labels[:, :3] = -100
    labels[1] = -100  # a fully masked row
    return hidden, W, b, labels


def _run_both(fn, hidden, W, b, rank, world, marked=True):
    """(value, grads) of fn(hidden, weight, bias) on the full head and on this rank's marked slice."""
    s, e = _shard_rows(world, rank)
    outs = []
    for part in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = (W[s:e] if part else W).clone().requires_grad_(True)
        bb = (b[s:e] if part else b).clone().requires_grad_(True)
        if part and marked:
            vocab_parallel(w, vocab_start=s)
        val = fn(h, w, bb)
        val.sum().backward() if val.requires_grad else None
        outs.append((val.detach(), h.grad, w.grad, bb.grad))
    (v0, h0, w0, b0), (v1, h1, w1, b1) = outs
    errs = [(max_err(v1, v0), "value")]
    if h0 is not None:
        errs += [(max_err(h1, h0), "d hidden"), (max_err(w1, w0[s:e]), "dW slice"), (max_err(b1, b0[s:e]), "db slice")]
    return errs


def tp_modules(rank, world):
    """Log-probs (temperature + softcap, padded and packed), token stats and every fused loss on a split head."""
    from dpo_fast.distributed.state import VocabShard
    from dpo_fast.distributed.vocab_parallel import forward_tokens_vp
    from dpo_fast.engine import TorchRows, forward_tokens

    hidden, W, b, labels = _random_head()
    B = hidden.shape[0]
    errs = []
    kw = dict(temperature=0.7, softcap=5.0)
    errs += [(e, f"sequence_logprobs {d}") for e, d in _run_both(
        lambda h, w, bb: dpo_fast.sequence_logprobs(h, w, labels, bias=bb, **kw), hidden, W, b, rank, world)]
    errs += [(e, f"token_logprobs {d}") for e, d in _run_both(
        lambda h, w, bb: dpo_fast.token_logprobs(h, w, labels, bias=bb, **kw), hidden, W, b, rank, world)]
    cu = torch.tensor([0, 7, 7, 30, 66])  # packed: an empty sequence too
    errs += [(e, f"packed {d}") for e, d in _run_both(
        lambda h, w, bb: dpo_fast.sequence_logprobs(h.reshape(-1, H), w, labels.reshape(-1), bias=bb,
                                                    cu_seqlens=cu, average=True), hidden, W, b, rank, world)]
    # NaN in one sequence's hidden states stays in that sequence (forward values and hidden-state gradients)
    hn = hidden.clone()
    hn[2, 5, 0] = float("nan")
    s, e = _shard_rows(world, rank)
    wl = vocab_parallel(W[s:e].clone(), vocab_start=s)
    for name, w_ in (("full", W), ("split", wl)):
        h_ = hn.clone().requires_grad_(True)
        v = dpo_fast.sequence_logprobs(h_, w_, labels, bias=b if name == "full" else b[s:e])
        v.sum().backward()
        if name == "full":
            want_v, want_g = v.detach(), h_.grad
        else:
            ok_nan = bool(torch.isnan(v[2])) and bool(torch.isfinite(v[[0, 1, 3, 4, 5]]).all())
            ok_g = bool(torch.isfinite(h_.grad[[0, 1, 3, 4, 5]]).all())
            errs.append((0.0 if ok_nan and ok_g else 1.0, f"NaN isolated (values {ok_nan}, dh {ok_g})"))
            keep = [0, 1, 3, 4, 5]
            errs.append((max_err(v[keep], want_v[keep]), "NaN batch: other sequences"))
            errs.append((max_err(h_.grad[keep], want_g[keep]), "NaN batch: other sequences' dh"))
    # token statistics straight from the shard's partial reductions vs the single-process row pass
    s, e = _shard_rows(world, rank)
    shard = VocabShard(dist.group.WORLD, s, e - s, V, rank, world)
    idx = torch.nonzero(labels.reshape(-1) != -100).squeeze(1)
    lab = labels.reshape(-1)[idx]
    rows = TorchRows(0.7, 5.0)
    full = forward_tokens(hidden.reshape(-1, H), W, b, idx, lab, rows, 1 << 20, stats=True)
    part = forward_tokens_vp(hidden.reshape(-1, H), W[s:e], b[s:e], idx, lab, rows, 4096, True, shard)
    for k in ("entropy", "hit", "zmean", "lse2"):
        errs.append((max_err(getattr(part.stats, k), getattr(full.stats, k)), f"stat {k}"))
    errs.append((max_err(part.logp, full.logp), "stat logp"))
    # every fused loss, on the two-pass route over the split head
    P = B // 2
    g = torch.Generator().manual_seed(5)
    ref_c, ref_r = -torch.rand(P, generator=g) * 30, -torch.rand(P, generator=g) * 30
    adv = torch.randn(B, generator=g)
    desirable = torch.tensor([True, False, True, True, False, False])
    kto_ref = -torch.rand(B, generator=g) * 30
    losses = {
        "DPOLoss": lambda h, w, bb: dpo_fast.DPOLoss(beta=0.1, token_metrics=True)(h, w, labels, ref_c, ref_r, bias=bb),
        "DPOLoss wpo+ld": lambda h, w, bb: dpo_fast.DPOLoss(beta=0.1, use_weighting=True, ld_alpha=0.5)(
            h, w, labels, ref_c, ref_r, bias=bb),
        "DPOLoss ref_hidden": lambda h, w, bb: dpo_fast.DPOLoss(beta=0.1)(h, w, labels, bias=bb, ref_hidden=h.detach() * 0.9),
        "CPOLoss simpo": lambda h, w, bb: dpo_fast.CPOLoss(loss_type="simpo", token_metrics=True)(h, w, labels, bias=bb),
        "ORPOLoss": lambda h, w, bb: dpo_fast.ORPOLoss()(h, w, labels, bias=bb),
        "KTOLoss": lambda h, w, bb: dpo_fast.KTOLoss()(h, w, labels, desirable, kto_ref, bias=bb),
        "GRPOLoss": lambda h, w, bb: dpo_fast.GRPOLoss()(h, w, labels, adv, bias=bb),
    }
    for name, fn in losses.items():
        errs += [(e, f"{name} {d}") for e, d in _run_both(lambda h, w, bb: fn(h, w, bb).loss, hidden, W, b, rank, world)]
    bad = [d for e, d in errs if e > 1e-5]
    return record(errs, extra=f" ({len(errs)} checks; failing: {bad})" if bad else f" ({len(errs)} checks)")


def bad_input(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hidden, W, b, labels = _random_head()
    tp = _tp_mesh(world)
    other = init_device_mesh("cpu", (world,), mesh_dim_names=("tp2",))
    checks = []
    h_sharded = distribute_tensor(hidden, tp, [Shard(0)])
    checks.append(expect_error(lambda: dpo_fast.sequence_logprobs(h_sharded, W, labels), DistributedHeadError,
                               "sharded hidden"))
    w_tp = distribute_tensor(W, tp, [Shard(0)])
    h_other = distribute_tensor(hidden, other, [Replicate()])
    checks.append(expect_error(lambda: dpo_fast.sequence_logprobs(h_other, w_tp, labels), DistributedHeadError,
                               "does not match the weight"))
    s, e = _shard_rows(world, rank)
    checks.append(expect_error(lambda: vocab_parallel(W[s:e].clone()), DistributedHeadError, "unequal vocabulary shards"))
    g2 = dist.new_group(list(range(world)))
    checks.append(expect_error(lambda: vocab_parallel(distribute_tensor(W, tp, [Shard(0)]), g2), DistributedHeadError,
                               "does not match the weight's device mesh"))
    checks.append(expect_error(lambda: dpo_fast.sequence_logprobs(hidden, w_tp, labels, bias=b), DistributedHeadError,
                               "sharded like the weight"))
    wl = vocab_parallel(W[s:e].clone(), vocab_start=s)
    bad_labels = labels.clone()
    bad_labels[0, 5] = V  # out of the *global* range
    checks.append(expect_error(lambda: dpo_fast.sequence_logprobs(hidden, wl, bad_labels), ValueError, f"[0, {V})"))
    errs = [(0.0 if ok else 1.0, msg) for ok, msg in checks]
    return record(errs)


SCENARIOS = {f.__name__: f for f in (ddp, fsdp_root, fsdp_head_unit, fsdp_noreshard_tied, fsdp_direct, fsdp_peft, tp_dtensor,
                                     tp_dp, tp_explicit, tp_modules, bad_input)}

if __name__ == "__main__":
    main(SCENARIOS)
