"""Shared pieces of the distributed test workers (run under torchrun; gloo on CPU).

Each scenario returns a dict ``{"ok": bool, "err": float, "detail": str}``; :func:`main` runs the named
scenarios, gathers every rank's record, and rank 0 prints one ``DPO_FAST_RESULT {json}`` line per scenario
(``ok`` only when it held on all ranks).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

V, H, T = 67, 16, 9  # odd vocabulary: uneven vocabulary shards over 2 ranks (34 + 33)
P_GLOBAL = 4  # preference pairs in the global batch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the support package
from support import TOL as TOLERANCES  # noqa: E402  (the one tolerance table; the float32 bound is used here)


def tiny_llama(tied: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
                      attn_implementation="eager")
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # larger head so the log-probs are not all ~ -log V
        m.get_output_embeddings().weight.mul_(20.0)
    return m


def pair_batch(seed: int = 1):
    """Global padded DPO batch in TRL's layout: ids/mask/labels (2P, T), ref_c/ref_r (P,)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2 * P_GLOBAL, T), generator=g)
    lengths = torch.tensor([T, T - 2, T - 1, T - 3, T, T - 1, T - 4, T - 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[:, :2] = -100  # prompt
    labels[mask == 0] = -100
    labels[torch.arange(2 * P_GLOBAL), lengths - 1] = -100  # last real position predicts nothing
    ids = ids.masked_fill(mask == 0, 0)
    ref_c = -torch.rand(P_GLOBAL, generator=g) * 20
    ref_r = -torch.rand(P_GLOBAL, generator=g) * 20
    return ids, mask, labels, ref_c, ref_r


def local_pairs(batch, rank: int, world: int):
    """This rank's pairs of the global batch (pairs are split evenly; rows keep TRL's layout)."""
    ids, mask, labels, ref_c, ref_r = batch
    P = ref_c.numel()
    per = P // world
    sel = torch.arange(rank * per, (rank + 1) * per)
    rows = torch.cat([sel, sel + P])
    return ids[rows], mask[rows], labels[rows], ref_c[sel], ref_r[sel]


def dpo_loss_through_model(model, batch, loss_fn):
    """DPOLoss inside the model's forward (dpo_fast.hf.call_with_hidden_states)."""
    from dpo_fast.hf import call_with_hidden_states

    ids, mask, labels, ref_c, ref_r = batch

    def fn(hidden, head):
        h, w, b = head.operands(hidden)
        return loss_fn(h, w, labels, ref_c, ref_r, bias=b)

    return call_with_hidden_states(model, fn, ids, attention_mask=mask)


def reference_run(model, batch, loss_fn=None, lr: float = 0.1):
    """Single-process loss, gradients and SGD-stepped parameters of the whole global batch."""
    import dpo_fast

    ref = copy.deepcopy(model)
    loss_fn = loss_fn or dpo_fast.DPOLoss(beta=0.1)
    out = dpo_loss_through_model(ref, batch, loss_fn)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
    with torch.no_grad():
        stepped = {n: (p - lr * p.grad).detach().clone() if p.grad is not None else p.detach().clone()
                   for n, p in ref.named_parameters()}
    return out, grads, stepped


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, |b|) elementwise (fp32 bar: 1e-5)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max())


def compare_dicts(got: dict, want: dict, what: str):
    """(worst error, detail) over the keys of ``want``; a missing key counts as infinite."""
    worst, name = 0.0, ""
    for k, w in want.items():
        e = max_err(got[k], w) if k in got else float("inf")
        if e > worst:
            worst, name = e, k
    return worst, f"{what}: worst {worst:.2e} at {name}" if name else f"{what}: exact"


def record(errs: list[tuple[float, str]], extra: str = "") -> dict:
    worst = max((e for e, _ in errs), default=0.0)
    ok = worst <= TOLERANCES[torch.float32]["rtol"]
    return {"ok": ok, "err": worst, "detail": "; ".join(d for _, d in errs) + extra}


def expect_error(fn, exc_type, needle: str) -> tuple[bool, str]:
    try:
        fn()
    except exc_type as e:
        return needle in str(e), f"{type(e).__name__}: {str(e)[:160]}"
    except Exception as e:  # noqa: BLE001 - the wrong kind of error is a failure
        return False, f"wrong error {type(e).__name__}: {str(e)[:160]}"
    return False, "no error raised"


def main(scenarios: dict, init=None) -> None:
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(scenarios)
    if init is not None:
        init()
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for name in names:
        try:
            rec = scenarios[name](rank, world)
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            rec = {"ok": False, "err": float("inf"), "detail": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"}
        recs = [None] * world
        dist.all_gather_object(recs, rec)
        if rank == 0:
            merged = {"name": name, "ok": all(r["ok"] for r in recs), "err": max(r["err"] for r in recs),
                      "detail": " | ".join(f"rank{i}: {r['detail']}" for i, r in enumerate(recs))}
            print("DPO_FAST_RESULT " + json.dumps(merged), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
