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
``rewards/margins``. Not supported (clear errors): vision datasets, the MoE router aux loss, soft-capped heads
(the mean logit does not commute with the cap), prompt-learning PEFT. Supported TRL: :data:`SUPPORTED_TRL`.
"""

from __future__ import annotations

import contextlib

import torch

from ..hf import call_with_hidden_states, install_fused_forward, output_head
from ..packing import shifted_labels
from ._trainer_common import SUPPORTED_TRL, UnsupportedTRLVersion, check_trl_version, patch_instance

try:
    from trl import KTOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("dpo_fast.integrations.trl_kto needs TRL: pip install 'trl>=1.16,<1.17'") from e

__all__ = ["FastKTOTrainer", "patch_kto_trainer", "SUPPORTED_TRL", "UnsupportedTRLVersion"]

_LOSS_TYPES = ("kto", "apo_zero_unpaired")


class _FastKTOMixin:
    """The methods FastKTOTrainer overrides; mixed into a KTOTrainer (sub)class."""

    def _dpo_fast_init(self) -> None:
        check_trl_version()
        who = type(self).__name__
        if getattr(self, "_is_vision_dataset", False):
            raise NotImplementedError(f"{who}: vision datasets are not supported; use trl.KTOTrainer")
        if getattr(self, "aux_loss_enabled", False):
            raise NotImplementedError(f"{who}: the MoE router aux loss is not supported; set router_aux_loss_coef=0.0 "
                                      "or use trl.KTOTrainer")
        if self.loss_type not in _LOSS_TYPES:
            raise ValueError(f"loss_type: {self.loss_type!r} is not a TRL KTO loss type; expected one of "
                             f"{list(_LOSS_TYPES)}")
        if output_head(self.model).softcap is not None:
            raise NotImplementedError(f"{who}: soft-capped output heads are not supported (TRL's logits/* metric "
                                      "needs every logit); use trl.KTOTrainer")
        from .. import KTOLoss

        self._dpo_fast_options = dict(beta=self.beta, desirable_weight=self.desirable_weight,
                                      undesirable_weight=self.undesirable_weight)
        KTOLoss(**self._dpo_fast_options)  # validate now
        self.dpo_fast_route: str | None = None
        install_fused_forward(self.model)
        if getattr(self, "ref_model", None) is not None:
            install_fused_forward(self.ref_model)

    # ------------------------------------------------------------------------------------------------------
    def _dpo_fast_seq_logps(self, model, ids, am, cm) -> torch.Tensor:
        """(B,) completion log-probs through the 1-GEMM no-grad forward."""
        from .. import sequence_logprobs

        labels = shifted_labels(ids, cm)

        def fn(hidden, head):
            h, w, b = head.operands(hidden)
            return sequence_logprobs(h, w, labels.to(h.device), bias=b, **head.engine_kwargs())

        with torch.no_grad(), self.accelerator.autocast():
            return call_with_hidden_states(model, fn, ids, attention_mask=am)

    def _dpo_fast_ref_context(self):
        """(model to run, adapter context) for the reference: ref_model, or the PEFT model without adapter."""
        from accelerate.utils import is_peft_model

        if self.ref_model is None and is_peft_model(self.model):
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            return self.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return (self.ref_model if self.ref_model is not None else self.model), contextlib.nullcontext()

    # TRL hook: the KL pass (policy or reference), no-grad
    def _compute_kl_logps(self, model, batch):
        if not self.calculate_KL:
            return None
        return self._dpo_fast_seq_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"],
                                        batch["KL_completion_mask"])

    # TRL hook: reference log-probs of one padded batch (precompute_ref_log_probs and evaluation)
    def compute_ref_log_probs(self, model, inputs):
        from trl.models.utils import disable_gradient_checkpointing

        _, adapter = self._dpo_fast_ref_context()  # TRL: the given model, adapter disabled for PEFT without ref
        inputs = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter:
            logps = self._dpo_fast_seq_logps(model, inputs["input_ids"], inputs["attention_mask"],
                                             inputs["completion_mask"])
            kl = self._compute_kl_logps(model, inputs)
        return logps, kl

    # TRL hook: the loss and the metrics of one batch
    def _compute_loss(self, model, inputs, return_outputs):
        from trl.models.utils import disable_gradient_checkpointing

        from .. import KTOLoss

        mode = "train" if self.model.training else "eval"
        acc = self.accelerator
        batch = {k: (v.to(acc.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=acc.device)
        ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        kl_logps = self._compute_kl_logps(model, batch)
        if self.precompute_ref_logps:
            ref = batch["ref_logps"]
            ref_kl = batch["ref_KL_logps"] if self.calculate_KL else None
        else:
            run, adapter = self._dpo_fast_ref_context()
            with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter:
                ref_kl = self._compute_kl_logps(run, batch)
                ref = self._dpo_fast_seq_logps(run, ids, am, cm)
        if self.calculate_KL:
            kl = acc.gather_for_metrics((kl_logps - ref_kl).mean().detach()).mean().clamp(min=0)
        else:
            kl = torch.zeros((), device=acc.device)
        labels = shifted_labels(ids, cm)
        opts = self._dpo_fast_options

        def fn(hidden, head):
            h, w, b = head.operands(hidden)
            out = KTOLoss(**opts, **head.engine_kwargs(), token_metrics=True)(
                h, w, labels.to(h.device), desirable, ref.float(), bias=b, kl=kl.float())
            # per-token vocabulary-mean logit at the scored positions (a GEMV: the mean commutes with h W^T + b)
            w_mean = head.weight.detach().float().mean(0)
            b_mean = 0.0 if head.bias is None else head.bias.detach().float().mean()
            zmean = (hidden.detach().float() @ w_mean + b_mean) / head.temperature  # (B, T)
            return out, zmean

        out, zmean = call_with_hidden_states(model, fn, ids, attention_mask=am)
        self.dpo_fast_route = out.route
        self._dpo_fast_log(mode, batch, desirable, labels, ref, kl, out, zmean)
        loss = out.loss
        if return_outputs:  # deprecated in TRL too: logits for compute_metrics need a plain forward
            with torch.no_grad():
                outputs = model(input_ids=ids, attention_mask=am, use_cache=False)
            return loss, outputs
        return loss

    def _dpo_fast_log(self, mode, batch, desirable, labels, ref, kl, out, zmean) -> None:
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

    Same constructor as ``trl.KTOTrainer``.

    Raises:
        UnsupportedTRLVersion: the installed TRL is outside :data:`SUPPORTED_TRL`.
        NotImplementedError: vision datasets, MoE aux loss, soft-capped heads.
    """

    def __init__(self, *args, **kwargs):
        check_trl_version()
        super().__init__(*args, **kwargs)
        self._dpo_fast_init()


def patch_kto_trainer(trainer: KTOTrainer) -> KTOTrainer:
    """Make an existing ``trl.KTOTrainer`` (or subclass) instance compute its loss with ``KTOLoss``.

    The instance's class is swapped for a subclass (state kept). Call it before ``trainer.train()``.
    """
    return patch_instance(trainer, KTOTrainer, _FastKTOMixin, _FastKTOMixin._dpo_fast_init)
