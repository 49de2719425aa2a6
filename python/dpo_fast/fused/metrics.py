"""Token metrics (TRL's entropy / mean_token_accuracy / logits/*) from the logits pass's TokenStats."""

from __future__ import annotations

import torch

from .plan import Values

Tensor = torch.Tensor


def token_sums(values: Values, slot_names: tuple[str, ...]) -> dict[str, Tensor]:
    """0-d tensor sums over the units' scored tokens: ``entropy_sum``, ``tokens`` and, per slot name s,
    ``{s}_tokens``, ``{s}_hits`` (label is the arg-max), ``{s}_logits_sum`` (vocab-mean logit).

    On sequence-sharded hidden states whose route registered them (:func:`pend_token_sums`) the sums over the
    sequence-parallel group (they rode in its per-sequence all-reduce)."""
    sums = _local_token_sums(values, slot_names)
    over = getattr(values, "global_token_sums", None)  # dpo_fast.distributed.sequence_parallel's SeqValues
    return sums if over is None else over(sums)


def pend_token_sums(values) -> None:
    """Sequence parallel (``values`` a SeqValues): register this rank's token sums so that the loss's first
    per-sequence all-reduce carries them (no collective of their own)."""
    sums = _local_token_sums(values, tuple(str(j) for j in range(values.slots.shape[1])))
    values.pend_token_sums(torch.stack([t.to(torch.float64) for t in sums.values()]))


def _local_token_sums(values: Values, slot_names: tuple[str, ...]) -> dict[str, Tensor]:
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
