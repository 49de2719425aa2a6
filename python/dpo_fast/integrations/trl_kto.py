"""TRL: ``FastKTOTrainer`` and ``patch_kto_trainer`` — TRL's KTOTrainer with the loss computed by ``KTOLoss``.

One-line change::

    from dpo_fast.integrations.trl_kto import FastKTOTrainer as KTOTrainer   # instead of trl.KTOTrainer
    # or, for a trainer you already built:
    trainer = patch_kto_trainer(trainer)

In TRL 1.16 the KTO trainer is ``trl.KTOTrainer`` (``trl/trainer/kto_trainer.py``, not experimental). Per
batch it runs the policy's no-grad KL pass over the mismatched (prompt, completion) pairs, the reference model
over the completions and the KL pairs (or reads precomputed columns), then the policy through TRL's chunked LM
head with log-probs, entropies and mean logits per position, and the loss through autograd.

Here: the KL pass and every reference log-prob go through the 1-GEMM no-grad forward (decoder, then the fused
engine over the completion tokens only); the policy's last hidden states go to the fused
:class:`dpo_fast.KTOLoss` with TRL's reference point ``z = clamp(mean(KL_logps - ref_KL_logps), 0)`` (gathered
across processes as TRL does): loss and gradient in one pass over the completion tokens' logits (3 GEMMs), the
entropy metric from the same pass. ``loss_type="apo_zero_unpaired"`` is KTO with z = 0 (TRL computes no KL
for it), which is what ``KTOLoss`` gets.

Metrics, under TRL's names and definitions: ``kl``, ``entropy``, ``num_tokens``, ``logits/chosen``,
``logits/rejected`` (mean over the completion tokens of the vocabulary-mean logit: a GEMV with the head's
mean row, exact for a linear head), ``rewards/*``, ``logps/*`` (``logps`` = rewards / beta + reference),
``rewards/margins``. Vision-language models: every model input TRL passes (``pixel_values``,
``image_grid_thw``, ``mm_token_type_ids`` ..., the KL pass with TRL's ``KL_*token_type_ids``) goes to the model's
forward in every pass. Not supported (clear errors): the MoE router aux loss, soft-capped heads (the mean logit
does not commute with the cap), prompt-learning PEFT. Supported TRL: :data:`SUPPORTED_TRL`.

Padding-free (``FastKTOTrainer(..., padding_free=True)`` / ``patch_kto_trainer(trainer, padding_free=True)``; TRL
1.16's ``KTOConfig`` has no such field, so it is a keyword of the trainer): every decoder pass -- the policy's
loss pass, the KL pass over the mismatched pairs, the reference passes and ``precompute_ref_log_probs`` -- runs on
the batch's real tokens packed into rows (:func:`dpo_fast.hf.call_without_padding`; ``packed_row_tokens`` sets
the row capacity). TRL's collator right-pads each (prompt + completion) sequence, one contiguous run of real
tokens per row, and every metric is taken over real tokens (``logits/*`` over the scored completion tokens,
``num_tokens`` from the attention mask), so the packed batches log what the padded ones do. The attention
implementation is probed at construction (one whose packed sequences see each other raises ``ValueError``); a
vision-language model raises ``NotImplementedError`` (padded batches are supported). The deprecated
``return_outputs=True`` of ``compute_loss`` still returns a plain padded forward's outputs.
"""

from __future__ import annotations

import torch

from ..losses.registry import TRL_KTO_LOSS_TYPES
from ..packing import shifted_labels
from ._trainer_common import SUPPORTED_TRL, UnsupportedTRLVersion, check_trl_version  # noqa: F401 (re-export)
from .adapter import (PADDING_FREE_KWARGS, SOFTCAP_OPTION, VLM_HEAD_OPTION, Option, TrainerAdapter, moe_aux_option,
                      options_from_trainer, patch_instance)

try:
    from trl import KTOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("dpo_fast.integrations.trl_kto needs TRL: pip install 'trl>=1.16,<1.17'") from e

__all__ = ["FastKTOTrainer", "patch_kto_trainer", "SUPPORTED_TRL", "UnsupportedTRLVersion"]


#: batch keys TRL's KTOTrainer does not pass to the model (input_ids / attention_mask are passed by name)
_NOT_MODEL_INPUTS = frozenset({"input_ids", "attention_mask", "completion_mask", "KL_input_ids", "KL_attention_mask",
                               "KL_completion_mask", "KL_token_type_ids", "KL_mm_token_type_ids", "label", "ref_logps",
                               "ref_KL_logps"})


def _model_inputs(batch, kl: bool = False) -> dict:
    """The batch's further model inputs (a VLM's pixel values, grid sizes, token types), as TRL passes them; for
    the KL pass the token types are TRL's ``KL_*`` ones (the KL rows are laid out differently)."""
    out = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
    if kl:
        for k in ("token_type_ids", "mm_token_type_ids"):
            if f"KL_{k}" in batch:
                out[k] = batch[f"KL_{k}"]
    return out


class _FastKTOMixin(TrainerAdapter):
    """The methods FastKTOTrainer overrides; mixed into a KTOTrainer (sub)class."""

    _dpo_fast_trl_class = KTOTrainer
    _dpo_fast_stock = "trl.KTOTrainer"
    _dpo_fast_kwargs = PADDING_FREE_KWARGS
    _dpo_fast_options = (
        moe_aux_option(),
        VLM_HEAD_OPTION,
        Option("loss_type", lambda t: t.loss_type not in TRL_KTO_LOSS_TYPES, "error",
               "loss_type: {t.loss_type!r} is not a TRL KTO loss type; expected one of "
               + str(list(TRL_KTO_LOSS_TYPES)), ValueError),
        SOFTCAP_OPTION,
    )

    def _dpo_fast_build_loss(self, temperature, softcap):
        from .. import KTOLoss
        from ..losses import KTOOptions

        # loss_type keeps its default: for "apo_zero_unpaired" the trainer passes the reference point z = 0
        opts = options_from_trainer(KTOOptions, self, per_step=("loss_type",))
        return KTOLoss(options=opts, temperature=temperature, softcap=softcap, token_metrics=True)

    # ------------------------------------------------------------------------------------------------------
    def _dpo_fast_seq_logps(self, model, ids, am, cm, **vision) -> torch.Tensor:
        """(B,) completion log-probs through the 1-GEMM no-grad forward."""
        from .. import sequence_logprobs

        labels = shifted_labels(ids, cm)

        def fn(hidden, head):
            h, w, b = head.operands(hidden)
            return sequence_logprobs(h, w, labels.to(h.device), bias=b, **head.engine_kwargs())

        with torch.no_grad(), self.accelerator.autocast():
            return self._dpo_fast_call(model, fn, ids, attention_mask=am, needed=labels != -100, **vision)

    # TRL hook: the KL pass (policy or reference), no-grad
    def _compute_kl_logps(self, model, batch):
        if not self.calculate_KL:
            return None
        return self._dpo_fast_seq_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"],
                                        batch["KL_completion_mask"], **_model_inputs(batch, kl=True))

    # TRL hook: reference log-probs of one padded batch (precompute_ref_log_probs and evaluation)
    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        with self._dpo_fast_reference(model) as run:  # TRL: the given model, adapter disabled for PEFT without ref
            logps = self._dpo_fast_seq_logps(run, inputs["input_ids"], inputs["attention_mask"],
                                             inputs["completion_mask"], **_model_inputs(inputs))
            return logps, self._compute_kl_logps(run, inputs)

    def _dpo_fast_ref_logps(self, model, batch):
        """(reference log-probs, reference KL log-probs or None) of a training batch."""
        kl = self._compute_kl_logps(model, batch)
        return self._dpo_fast_seq_logps(model, batch["input_ids"], batch["attention_mask"],
                                        batch["completion_mask"], **_model_inputs(batch)), kl

    # TRL hook: the loss and the metrics of one batch
    def _compute_loss(self, model, inputs, return_outputs):
        mode = self._dpo_fast_mode()
        acc = self.accelerator
        batch = {k: (v.to(acc.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=acc.device)
        ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        kl_logps = self._compute_kl_logps(model, batch)
        ref, ref_kl = self._dpo_fast_ref_values(batch, ("ref_logps", "ref_KL_logps" if self.calculate_KL else None),
                                                lambda run: self._dpo_fast_ref_logps(run, batch))
        if self.calculate_KL:
            kl = acc.gather_for_metrics((kl_logps - ref_kl).mean().detach()).mean().clamp(min=0)
        else:
            kl = torch.zeros((), device=acc.device)
        labels = shifted_labels(ids, cm)

        def zmean(hidden, head):
            # per-token vocabulary-mean logit at the scored positions (a GEMV: the mean commutes with h W^T + b)
            w_mean = head.weight.detach().float().mean(0)
            b_mean = 0.0 if head.bias is None else head.bias.detach().float().mean()
            return (hidden.detach().float() @ w_mean + b_mean) / head.temperature  # (B, T)

        out, zm = self._dpo_fast_fused(model, ids, labels, desirable, ref.float(), kl=kl.float(),
                                       forward=dict(attention_mask=am, needed=labels != -100, **_model_inputs(batch)),
                                       extra=zmean)
        self._dpo_fast_log_step(mode, batch, desirable, labels, ref, kl, out, zm)
        loss = out.loss
        if return_outputs:  # deprecated in TRL too: logits for compute_metrics need a plain (padded) forward
            with torch.no_grad():
                outputs = model(input_ids=ids, attention_mask=am, **_model_inputs(batch), use_cache=False)
            return loss, outputs
        return loss

    def _dpo_fast_log_step(self, mode, batch, desirable, labels, ref, kl, out, zmean) -> None:
        acc, m = self.accelerator, self._metrics[mode]

        def total(x):  # a per-process sum, summed over processes
            return acc.gather_for_metrics(x.detach().reshape(())).sum().item()

        m["kl"].append(kl.item())
        n_tok = total(out.token_sums["tokens"])
        m["entropy"].append(total(out.token_sums["entropy_sum"]) / n_tok if n_tok > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += total(batch["attention_mask"].sum()) // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        scored = (labels != -100).to(zmean.dtype)
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            sel = scored * rows[:, None].to(zmean.dtype)
            n = total(sel.sum())
            if n > 0:
                m[f"logits/{name}"].append(total((zmean * sel).sum()) / n)
        rewards = out.rewards.detach().float()
        logps = rewards / self.beta + ref.detach().float()
        n_c, n_r = total(desirable.sum()), total((~desirable).sum())
        if n_c > 0:
            m["rewards/chosen"].append(total(rewards[desirable].nansum()) / n_c)
            m["logps/chosen"].append(total(logps[desirable].nansum()) / n_c)
        if n_r > 0:
            m["rewards/rejected"].append(total(rewards[~desirable].nansum()) / n_r)
            m["logps/rejected"].append(total(logps[~desirable].nansum()) / n_r)
        if n_c > 0 and n_r > 0:
            m["rewards/margins"].append(m["rewards/chosen"][-1] - m["rewards/rejected"][-1])


class FastKTOTrainer(_FastKTOMixin, KTOTrainer):
    """``trl.KTOTrainer`` with the loss computed by the fused :class:`dpo_fast.KTOLoss` (see the module docs).

    Same constructor as ``trl.KTOTrainer``, plus two keywords of its own.

    Args:
        padding_free: run every decoder pass (policy, KL pass, reference, ``precompute_ref_log_probs``) on the
            batch's real tokens packed into rows instead of the padded batch (default False). Every logged
            metric is the padded path's. ``trainer.dpo_fast_packing`` counts the real tokens, packed slots and
            rows against the padded batches'.
        packed_row_tokens: packed-row capacity with ``padding_free=True``: None (default: the batch's longest
            sequence), ``"one_row"`` (every sequence in one row, for flash-attention varlen) or an int (at least
            the longest sequence, else the step raises ``ValueError``).

    Raises:
        UnsupportedTRLVersion: the installed TRL is outside :data:`SUPPORTED_TRL`.
        NotImplementedError: MoE aux loss, soft-capped heads; ``padding_free=True`` with a vision-language model.
        TypeError: ``padding_free`` not a bool.
        ValueError: ``packed_row_tokens`` without ``padding_free=True`` or not None / ``"one_row"`` / an int >= 1;
            with ``padding_free=True``, an attention implementation that lets packed sequences see each other
            (probed at construction), or (at a step) a scored token after a padding position.
    """


def patch_kto_trainer(trainer: KTOTrainer, *, padding_free: bool = False,
                      packed_row_tokens: int | str | None = None) -> KTOTrainer:
    """Make an existing ``trl.KTOTrainer`` (or subclass) instance compute its loss with ``KTOLoss``.

    The instance's class is swapped for a subclass (state kept). Call it before ``trainer.train()``.
    ``padding_free`` / ``packed_row_tokens``: as :class:`FastKTOTrainer` (same errors).

    Returns:
        The same trainer object.
    """
    return patch_instance(trainer, _FastKTOMixin, padding_free=padding_free, packed_row_tokens=packed_row_tokens)
