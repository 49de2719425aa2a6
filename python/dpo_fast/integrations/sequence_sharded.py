"""FastDPOTrainer under DeepSpeed Ulysses sequence parallelism: ``ParallelismConfig(sp_size>1, sp_backend=
"deepspeed")``.

accelerate (``Accelerator.prepare``) registers DeepSpeed's Ulysses attention with transformers and wraps the train
dataloader in ``UlyssesSPDataLoaderAdapter``: every rank of a sequence-parallel group collates its own batch, the
adapter all-gathers them and yields, one after the other, each rank's batch cut into ``sp`` equal token blocks --
rank ``r`` gets block ``r`` of every row (and ``shift_labels``, the labels already shifted, cut the same way). The
decoder's attention all-to-alls heads and tokens, so rank ``r``'s last hidden states are exactly the whole-row
forward's hidden states at its tokens. dpo_fast's head takes them marked with
:func:`dpo_fast.distributed.sequence_parallel`: the per-sequence log-prob sums are all-reduced once over the group
and every rank gets the global loss; each rank's dW / dh are its own tokens' share (DeepSpeed reduces them over the
group). This module holds what that needs and TRL 1.16 does not provide:

* :class:`UlyssesPreferenceCollator` -- TRL's ``DataCollatorForPreference`` output plus ``position_ids`` and
  ``labels`` (both required by the adapter), padded on the right to one fixed length: ``max_length`` rounded up to
  a multiple of ``sp`` (the adapter all-gathers the ranks' batches, and gloo's all-gather needs equal shapes);
* :func:`setup` -- the checks (what is refused and why), the collator, the Ulysses attention's batch size (DPO rows
  are 2 x ``per_device_train_batch_size``: chosen and rejected) and ``deepspeed.comm`` on CPU;
* :func:`dpo_step` -- the training loss of one sharded batch: reference and policy forwards through Ulysses, hidden
  states marked, TRL's metrics;
* :func:`backward_scale` -- ZeRO-3 on deepspeed < 0.20.2 averages the gradients over the sequence group instead of
  summing them (transformers' ``deepspeed_sp_compute_loss`` says the same): the backward loss is scaled by ``sp``,
  the logged value is not.

Ulysses attends causally over the gathered rows without a padding mask: exact for TRL's right-padded rows (a real
token never sees a pad after it), not for left padding or packing, so ``padding_free`` is refused. Context
parallelism (``cp_size`` > 1) is not wired: see :data:`dpo_fast.integrations.adapter.SEQUENCE_PARALLEL_RECIPE`.
Imports deepspeed, accelerate and TRL only inside functions.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ulysses_sp_size", "UlyssesPreferenceCollator", "setup", "sp_group", "backward_scale", "dpo_step"]

_KEYS = ("input_ids", "attention_mask", "completion_mask")

#: Why evaluation is refused under sequence parallelism (measured: Trainer.evaluate under accelerate's Ulysses
#: setup, transformers 5.25 / accelerate 1.16, ran no eval batch and returned no eval_loss).
EVAL_REFUSED = ("evaluation is not wired: under accelerate's Ulysses setup Trainer.evaluate runs no eval batch (no "
                "eval_loss, no metrics); evaluate in a separate run without parallelism_config")


def ulysses_sp_size(args: Any) -> int:
    """``sp_size`` when a TRL config's ``parallelism_config`` shards the sequence with DeepSpeed Ulysses only
    (``sp_size`` > 1, ``sp_backend="deepspeed"``, ``cp_size`` 1), else 0."""
    pc = getattr(args, "parallelism_config", None)
    if pc is None:
        return 0
    sp, cp = int(getattr(pc, "sp_size", 1) or 1), int(getattr(pc, "cp_size", 1) or 1)
    return sp if sp > 1 and cp == 1 and getattr(pc, "sp_backend", None) == "deepspeed" else 0


class UlyssesPreferenceCollator:
    """TRL's preference collator, then what DeepSpeed's ``UlyssesSPDataLoaderAdapter`` needs.

    Adds ``position_ids`` (``arange(T)`` in every row) and ``labels`` (``input_ids`` on completion tokens, -100
    elsewhere: the adapter turns them into ``shift_labels``, the token predicted from each position, which is
    dpo_fast's label convention), and pads the rows on the right to ``length`` (pad token, masks 0): one length
    for every batch of every rank, a multiple of ``sp_size``.

    Raises:
        ValueError: a batch with other keys than input_ids / attention_mask / completion_mask (precomputed reference
            log-probs or vision inputs: 1-D or image tensors cannot be cut into token blocks), or left-padded rows.
    """

    def __init__(self, collator, sp_size: int, pad_token_id: int, length: int):
        if length % sp_size:
            raise ValueError(f"length: {length} is not a multiple of sp_size={sp_size}")
        self.collator, self.sp_size, self.pad_token_id, self.length = collator, int(sp_size), int(pad_token_id), \
            int(length)

    def __call__(self, examples):
        batch = self.collator(examples)
        extra = sorted(set(batch) - set(_KEYS))
        if extra:
            raise ValueError(f"sequence parallelism: the preference batch has {extra} besides {list(_KEYS)}; only "
                             "token tensors can be cut into the Ulysses token blocks")
        ids, am, cm = (batch[k] for k in _KEYS)
        if bool((am[:, 1:] > am[:, :-1]).any()):
            raise ValueError("sequence parallelism: left-padded rows; Ulysses attends causally without a padding "
                             "mask, which is exact only for right-padded rows")
        pad = self.length - ids.shape[1]
        if pad < 0:
            raise ValueError(f"sequence parallelism: rows of {ids.shape[1]} tokens exceed the padded length "
                             f"{self.length} (max_length rounded up to a multiple of sp_size)")
        if pad:
            right = torch.nn.functional.pad
            ids, am, cm = right(ids, (0, pad), value=self.pad_token_id), right(am, (0, pad)), right(cm, (0, pad))
        rows, t = ids.shape
        return {"input_ids": ids, "attention_mask": am, "completion_mask": cm,
                "position_ids": torch.arange(t, device=ids.device).expand(rows, t).contiguous(),
                "labels": ids.masked_fill(cm == 0, -100)}


def _refuse(trainer, sp: int) -> None:
    """Raise for what is not wired (or not tested) under Ulysses sequence parallelism."""
    who, args = type(trainer).__name__, trainer.args
    pre = f"{who}: sequence parallelism (sp_size={sp}, DeepSpeed Ulysses)"
    if not getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError(f"{pre} needs DeepSpeed (accelerate launch with distributed_type: DEEPSPEED, ZeRO-3)")
    stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
    if stage != 3:
        raise NotImplementedError(f"{pre}: tested with ZeRO-3 only (how DeepSpeed reduces the sequence group's "
                                  f"gradients depends on the stage and version); got zero_stage={stage}")
    if str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no":
        raise NotImplementedError(f"{pre}: {EVAL_REFUSED}; set eval_strategy='no'")
    refused = [
        (bool(getattr(args, "padding_free", False)),
         "padding_free=True: Ulysses attends causally over whole gathered rows, which mixes packed sequences"),
        (bool(getattr(trainer, "precompute_ref_logps", False)),
         "precompute_ref_log_probs=True: 1-D per-example tensors cannot ride in the token-sharded batches; compute "
         "the reference in the step (precompute_ref_log_probs=False)"),
        (bool(getattr(trainer, "_is_vlm", False) or getattr(trainer, "_is_vision_dataset", False)),
         "vision-language models/datasets: image inputs cannot be cut into token blocks"),
        (getattr(trainer, "ld_alpha", None) is not None,
         "ld_alpha (LD-DPO): this step's reference pass sums plain log-probs (sequence_logprobs), not LD-DPO's "
         "weighted ones, and is untested with it"),
    ]
    for bad, why in refused:
        if bad:
            raise NotImplementedError(f"{pre}: {why}")
    if args.max_length is None:
        raise ValueError(f"{pre}: set max_length: every batch is padded to it (rounded up to a multiple of sp_size), "
                         "since DeepSpeed's adapter all-gathers the ranks' batches and gloo needs equal shapes")
    if not args.dataloader_drop_last:
        raise ValueError(f"{pre}: set dataloader_drop_last=True: the Ulysses attention is built for a fixed number of "
                         "rows per batch, and a short last batch would fail in the attention")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    if not isinstance(trainer.data_collator, DataCollatorForPreference):
        raise ValueError(f"{pre}: needs TRL's DataCollatorForPreference (right-padded rows), got "
                         f"{type(trainer.data_collator).__name__}")


def setup(trainer) -> int:
    """Prepare ``trainer`` (a FastDPOTrainer after TRL's ``__init__``) for Ulysses sequence parallelism; returns
    ``sp_size``, or 0 when its config does not ask for it (nothing done).

    Checks (:class:`NotImplementedError` / :class:`ValueError` naming the option), wraps the collator
    (:class:`UlyssesPreferenceCollator`, to ``max_length`` rounded up to a multiple of ``sp``), sets DeepSpeed's
    ``train_micro_batch_size_per_gpu`` to the batch's rows (2 x ``per_device_train_batch_size``: the Ulysses
    attention checks the rows it gets against it), and initialises ``deepspeed.comm`` over accelerate's process
    group when nothing has yet (accelerate skips it on CPU). The token metrics stay on: DPOLoss reduces its token
    sums over the sequence group, and the trainer's ratios of sums over all processes are unchanged by it.
    """
    sp = ulysses_sp_size(trainer.args)
    if not sp:
        return 0
    _refuse(trainer, sp)
    dc = trainer.data_collator
    length = -(-int(trainer.args.max_length) // sp) * sp
    trainer.data_collator = UlyssesPreferenceCollator(dc, sp, dc.pad_token_id, length)
    rows = 2 * int(trainer.args.per_device_train_batch_size)
    trainer.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = rows
    import deepspeed
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
    return sp


def sp_group():
    """The sequence-parallel process group DeepSpeed registered (after ``Accelerator.prepare``)."""
    from deepspeed.utils import groups

    return groups._get_sequence_parallel_group()


def backward_scale(trainer, sp: int) -> int:
    """The factor the backward loss is scaled by so that the sequence group's gradients are summed: ``sp`` under
    ZeRO-3 on deepspeed < 0.20.2 (which averages them over the group), else 1."""
    import importlib.metadata

    from packaging.version import Version

    zero3 = trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    return sp if zero3 and Version(importlib.metadata.version("deepspeed")) < Version("0.20.2") else 1


def dpo_step(trainer, model, inputs, sp: int) -> torch.Tensor:
    """The training loss of one token-sharded batch (this rank's block of every row); logs TRL's metrics.

    The reference (``ref_model``, or the policy with its adapter off) and the policy run through the Ulysses
    attention with ``position_ids`` and no padding mask; both hidden states are marked as this rank's token block
    and scored with ``inputs["shift_labels"]`` (already this rank's and shifted). Returns the global loss, its
    gradient scaled by :func:`backward_scale`.
    """
    from ..distributed import sequence_parallel
    from ..hf import call_with_hidden_states
    from ..logprobs import sequence_logprobs

    group = sp_group()
    input_ids = inputs["input_ids"]
    labels = inputs["shift_labels"]
    fwd = {"attention_mask": None, "position_ids": inputs["position_ids"]}
    pairs = input_ids.shape[0] // 2  # TRL's rows: the chosen completions, then the rejected ones

    def ref_fn(hidden, head):
        h, w, b = head.operands(hidden)
        h = sequence_parallel(h, group)
        logps = sequence_logprobs(h, w, labels.to(h.device), bias=b, **head.engine_kwargs())
        return logps[:pairs], logps[pairs:]

    with trainer._dpo_fast_reference() as run, trainer.accelerator.autocast():
        ref_c, ref_r = call_with_hidden_states(run, ref_fn, input_ids, **fwd)

    def fn(hidden, head):
        h, w, b = head.operands(hidden)
        return trainer._dpo_fast_loss_for(head)(sequence_parallel(h, group), w, labels.to(h.device), ref_c.float(),
                                                ref_r.float(), bias=b)

    out = call_with_hidden_states(model, fn, input_ids, **fwd)
    trainer._dpo_fast_record(out.route)
    trainer._dpo_fast_log_step("train", inputs, out, out.token_sums)
    k = backward_scale(trainer, sp)
    loss = out.loss
    return loss if k == 1 else loss * k - loss.detach() * (k - 1)  # value: the loss; gradient: k x
