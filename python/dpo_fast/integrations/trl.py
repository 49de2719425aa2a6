"""TRL: ``FastDPOTrainer`` and ``patch_trainer`` — TRL's DPOTrainer with the loss computed by ``DPOLoss``.

One-line change::

    from dpo_fast.integrations.trl import FastDPOTrainer as DPOTrainer    # instead of trl's
    # or, for a trainer you already built:
    trainer = patch_trainer(trainer)

What changes: TRL's ``_compute_loss`` runs the decoder, then its chunked LM head for per-token log-probs
(plus entropy / mean logit / top-1 per token, over every position of the padded batch on non-Triton
devices), then the loss through autograd. Here the decoder's last hidden states go straight to the fused
:class:`dpo_fast.DPOLoss`: scored tokens only, loss and gradients in one pass over the logits (3 GEMMs),
and the token metrics (entropy, mean_token_accuracy, logits/*) from that same pass (disable with
``token_metrics=False``). The reference log-probs come from TRL's precomputed columns
(``precompute_ref_log_probs=True``) or from the reference model (or the PEFT model with its adapter
disabled) through the 1-GEMM no-grad forward.

Everything else is TRL's: datasets, collator, config options (``beta``, ``loss_type`` lists with
``loss_weights``, ``label_smoothing``, ``f_divergence_type``, ``ld_alpha``, ``use_weighting``,
``discopop_tau``), the metrics it logs and their names, PEFT, checkpoints.

Supported TRL releases: :data:`SUPPORTED_TRL` (tested in this repository's tests). Others raise
:class:`UnsupportedTRLVersion` — the hooks used here (``_compute_loss``, ``compute_ref_log_probs``, the
``_metrics`` store) are private TRL API. Not supported (clear errors): vision-language datasets, MoE
router aux loss (``router_aux_loss_coef`` != 0 on MoE models), prompt-learning PEFT, a PEFT adapter on
``lm_head``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..fused import DPOLoss, pair_logprobs
from ..hf import call_with_hidden_states, install_fused_forward
from ._trainer_common import SUPPORTED_TRL, UnsupportedTRLVersion, check_trl_version

try:
    from trl import DPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("dpo_fast.integrations.trl needs TRL: pip install 'trl>=1.16,<1.17'") from e

__all__ = ["FastDPOTrainer", "patch_trainer", "SUPPORTED_TRL", "UnsupportedTRLVersion", "check_trl_version"]


# loss types whose TRL formula uses label_smoothing (TRL's "sigmoid" does not, unlike dpo_fast's cDPO)
_SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}


def _shifted_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """(2P, T) labels for the engine: labels[t] = input_ids[t+1] where t+1 is a completion token, else -100.

    TRL scores position t+1 of ``input_ids.masked_fill(completion_mask == 0, -100)`` from hidden[t]; this is
    the same set of tokens, already shifted.
    """
    lab = torch.full_like(input_ids, -100)
    lab[:, :-1] = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    return lab


class _FastDPOMixin:
    """The methods FastDPOTrainer overrides; mixed into a DPOTrainer (sub)class."""

    def _dpo_fast_init(self, token_metrics: bool = True) -> None:
        check_trl_version()
        self.dpo_fast_token_metrics = bool(token_metrics)
        if getattr(self, "_is_vision_dataset", False) or getattr(self, "_is_vlm", False):
            raise NotImplementedError("FastDPOTrainer: vision-language models/datasets are not supported; use "
                                      "trl.DPOTrainer")
        if getattr(self, "aux_loss_enabled", False):
            raise NotImplementedError("FastDPOTrainer: the MoE router aux loss is not supported; set "
                                      "router_aux_loss_coef=0.0 or use trl.DPOTrainer")
        types = list(self.loss_types)
        eps = float(self.label_smoothing)
        if eps and "sigmoid" in types:
            if set(types) & _SMOOTHED:
                raise NotImplementedError(
                    f"FastDPOTrainer: TRL applies label_smoothing to {sorted(set(types) & _SMOOTHED)} but not to "
                    "'sigmoid'; dpo_fast has one label_smoothing for all losses of a list. Split the losses or "
                    "set label_smoothing=0.")
            eps = 0.0  # TRL's sigmoid ignores it
        self._dpo_fast_options = dict(
            beta=self.beta, loss_type=types, loss_weights=list(self.loss_weights), label_smoothing=eps,
            f_divergence_type=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.args.discopop_tau, use_weighting=bool(self.use_weighting), ld_alpha=self.ld_alpha,
            compute_metrics=False)
        DPOLoss(**self._dpo_fast_options)  # validate now, not at the first step
        # Install the fused entry point before accelerate wraps forward (mixed precision), so its autocast
        # applies to our path too.
        install_fused_forward(self.model)
        if getattr(self, "ref_model", None) is not None:
            install_fused_forward(self.ref_model)

    # ------------------------------------------------------------------------------------------------------
    def _dpo_fast_ref_context(self, model):
        """(model to run, adapter context) for the reference: ref_model, or the PEFT model without adapter."""
        from accelerate.utils import is_peft_model

        if self.ref_model is None and is_peft_model(self.model):
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            name = "ref" if "ref" in unwrapped.peft_config else None
            return self.model, use_adapter(unwrapped, adapter_name=name)
        return (model if model is not None else (self.ref_model or self.model)), contextlib.nullcontext()

    def _dpo_fast_reference(self, model, inputs, labels):
        """(ref_chosen_logps, ref_rejected_logps), each (P,), through the 1-GEMM no-grad forward."""
        from trl.models.utils import disable_gradient_checkpointing

        run, adapter = self._dpo_fast_ref_context(model)
        ld_alpha = self.ld_alpha

        def fn(hidden, head):
            h, w, b = head.operands(hidden)  # summed exactly as DPOLoss sums the policy (LD-DPO included)
            return pair_logprobs(h, w, labels, bias=b, ld_alpha=ld_alpha, **head.engine_kwargs())

        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              adapter, self.accelerator.autocast()):
            return call_with_hidden_states(run, fn, inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                           **self._dpo_fast_model_kwargs(inputs))

    @staticmethod
    def _dpo_fast_model_kwargs(inputs) -> dict[str, Any]:
        skip = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        return {k: v for k, v in inputs.items() if k not in skip}

    # TRL hook: reference log-probs of one padded batch (precompute_ref_log_probs and evaluation)
    def compute_ref_log_probs(self, model, inputs):
        labels = _shifted_labels(inputs["input_ids"], inputs["completion_mask"])
        return self._dpo_fast_reference(model, inputs, labels)

    # TRL hook: the loss and the metrics of one batch
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
        labels = _shifted_labels(input_ids, completion_mask)  # (2P, T)
        if self.precompute_ref_logps:
            ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_c, ref_r = self._dpo_fast_reference(None, inputs, labels)
        opts, want_stats = self._dpo_fast_options, self.dpo_fast_token_metrics

        def fn(hidden, head):
            h, w, b = head.operands(hidden)
            kw = head.engine_kwargs()
            loss_fn = DPOLoss(**opts, **kw, token_metrics=want_stats)  # token stats from the same pass
            out = loss_fn(h, w, labels, ref_c.float(), ref_r.float(), bias=b)
            return out, out.token_sums

        out, stats = call_with_hidden_states(model, fn, input_ids, attention_mask=inputs.get("attention_mask"),
                                             **self._dpo_fast_model_kwargs(inputs))
        self._dpo_fast_log(mode, inputs, labels, out, stats)
        loss = out.loss
        if return_outputs:  # deprecated in TRL too: logits for compute_metrics need a plain forward
            with torch.no_grad():
                outputs = model(input_ids=input_ids, attention_mask=inputs.get("attention_mask"), use_cache=False)
            return loss, outputs
        return loss

    def _dpo_fast_log(self, mode, inputs, labels, out, stats) -> None:
        """Append the metrics TRL logs, under TRL's names, gathered across processes as TRL does."""
        acc, m = self.accelerator, self._metrics[mode]
        def total(name):  # a per-process sum, summed over processes
            return acc.gather_for_metrics(stats[name]).sum().item()

        if stats is not None:
            n_tok = total("tokens")
            m["entropy"].append(total("entropy_sum") / n_tok if n_tok > 0 else 0.0)
        if mode == "train":
            n = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        if stats is not None:
            nc, nr = total("chosen_tokens"), total("rejected_tokens")
            m["logits/chosen"].append(total("chosen_logits_sum") / nc if nc > 0 else 0.0)
            m["logits/rejected"].append(total("rejected_logits_sum") / nr if nr > 0 else 0.0)
            m["mean_token_accuracy"].append(total("chosen_hits") / nc if nc > 0 else 0.0)
        cr, rr = acc.gather(out.chosen_rewards.detach()), acc.gather(out.rejected_rewards.detach())
        m["rewards/chosen"].append(cr.mean().item())
        m["rewards/rejected"].append(rr.mean().item())
        m["rewards/accuracies"].append((cr > rr).float().mean().item())
        m["rewards/margins"].append((cr - rr).mean().item())
        m["logps/chosen"].append(acc.gather(out.chosen_logps.detach()).mean().item())
        m["logps/rejected"].append(acc.gather(out.rejected_logps.detach()).mean().item())


class FastDPOTrainer(_FastDPOMixin, DPOTrainer):
    """``trl.DPOTrainer`` with the loss computed by the fused :class:`dpo_fast.DPOLoss`.

    Same constructor as ``trl.DPOTrainer``, plus:

    Args:
        token_metrics: log ``entropy``, ``mean_token_accuracy`` and ``logits/*`` like TRL (default True);
            computed in the loss's own logits pass (no extra GEMM). False skips them.

    Raises:
        UnsupportedTRLVersion: the installed TRL is outside :data:`SUPPORTED_TRL`.
    """

    def __init__(self, *args, token_metrics: bool = True, **kwargs):
        check_trl_version()
        self.dpo_fast_token_metrics = bool(token_metrics)
        super().__init__(*args, **kwargs)
        self._dpo_fast_init(token_metrics)


_PATCHED_CLASSES: dict[type, type] = {}


def patch_trainer(trainer: DPOTrainer, *, token_metrics: bool = True) -> DPOTrainer:
    """Make an existing ``trl.DPOTrainer`` (or subclass) instance compute its loss with ``DPOLoss``.

    The instance's class is swapped for a subclass that adds :class:`FastDPOTrainer`'s methods; its
    state (model, datasets, optimizer, callbacks) is kept. Call it before ``trainer.train()``.

    Returns:
        The same trainer object.
    """
    check_trl_version()
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"trainer: expected a trl.DPOTrainer instance, got {type(trainer).__name__}")
    if isinstance(trainer, _FastDPOMixin):
        return trainer
    cls = type(trainer)
    new = _PATCHED_CLASSES.get(cls)
    if new is None:
        new = type(f"Fast{cls.__name__}", (_FastDPOMixin, cls), {"__module__": __name__})
        _PATCHED_CLASSES[cls] = new
    trainer.__class__ = new
    trainer._dpo_fast_init(token_metrics)
    return trainer
