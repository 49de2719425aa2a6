"""DeepSpeed ZeRO-3 scenarios on CPU (``DS_ACCELERATOR=cpu``, gloo):
``torchrun --nproc-per-node 2 tests/dist/zero3_worker.py a,b``.

The model is partitioned by ``deepspeed.initialize`` (parameter persistence threshold 0, so even the tiny
head is a 0-element partition outside its module's forward). Gradients are read with
``deepspeed.utils.safe_get_full_grad`` after ``engine.backward`` and compared with the single-process run of
the global batch; after ``engine.step`` the gathered parameters must equal the single-process SGD step.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import (compare_dicts, dpo_loss_through_model, local_pairs, main, max_err, pair_batch,  # noqa: E402
                    record, reference_run, tiny_llama)

import dpo_fast  # noqa: E402
from dpo_fast.hf import call_with_hidden_states  # noqa: E402

LR = 0.1


def _engine(model):
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
           "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 by default; the reference does not clip
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _run(rank, world, *, tied=False, fused=True, direct=False):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    model, batch = tiny_llama(tied=tied), pair_batch()
    make = lambda: dpo_fast.DPOLoss(beta=0.1, fused=fused)  # noqa: E731
    ref_out, ref_grads, ref_stepped = reference_run(model, batch, make(), lr=LR)
    engine = _engine(model)
    w = engine.module.lm_head.weight
    partitioned = w.numel() == 0 and hasattr(w, "ds_id")
    local = local_pairs(batch, rank, world)
    if direct:  # the ZeRO-3 parameter passed to the loss outside the model's forward
        ids, mask, labels, ref_c, ref_r = local
        hidden = call_with_hidden_states(engine, lambda h, head: h, ids, attention_mask=mask)
        out = make()(hidden, engine.module.lm_head.weight, labels, ref_c, ref_r)
    else:
        out = dpo_loss_through_model(engine, local, make())
    route = getattr(out, "route", "?")
    engine.backward(out.loss)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    errs = [(max_err(loss / world, ref_out.loss), "loss")]
    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
    errs.append(compare_dicts({n: g for n, g in grads.items() if g is not None}, ref_grads, "grads"))
    engine.step()
    params = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    errs.append(compare_dicts(params, ref_stepped, "stepped params"))
    released = w.numel() == 0  # gathered copies and re-gathers are released again, none kept between steps
    errs.append((0.0 if partitioned and released else 1.0,
                 f"head partitioned before: {partitioned}, after the step: {released}"))
    errs.append((0.0, f"route {route}"))
    return record(errs)


def z3_fused(rank, world):
    return _run(rank, world)


def z3_two_pass(rank, world):
    """The two-pass engine recomputes logits in backward: the head is gathered again there."""
    return _run(rank, world, fused=False)


def z3_tied(rank, world):
    return _run(rank, world, tied=True)


def z3_direct(rank, world):
    return _run(rank, world, fused=False, direct=True)


def _init():
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")


SCENARIOS = {f.__name__: f for f in (z3_fused, z3_two_pass, z3_tied, z3_direct)}

if __name__ == "__main__":
    main(SCENARIOS, init=_init)
