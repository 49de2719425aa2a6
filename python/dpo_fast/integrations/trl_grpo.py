"""TRL: ``FastGRPOTrainer`` / ``patch_grpo_trainer`` (and RLOO) — TRL's GRPOTrainer with the policy head fused.

One-line change::

    from dpo_fast.integrations.trl_grpo import FastGRPOTrainer as GRPOTrainer   # instead of trl's
    # or, for a trainer you already built:
    trainer = patch_grpo_trainer(trainer)

What changes, per optimisation step:

* **Policy log-probs and loss** (``_compute_loss``): TRL runs the decoder, then its chunked LM head over the
  batch (every prompt and completion position on CPU, the completion tokens on CUDA), keeps per-token
  log-probs and entropies, and builds the loss through autograd, whose backward runs the head again. Here
  the decoder's last hidden states at the completion positions go to the fused :class:`dpo_fast.GRPOLoss`:
  per-token log-probs, the clipped-ratio loss and its gradient in one pass over the logits (3 GEMMs over
  completion tokens), the entropy metric from the same pass.
* **Old-policy and reference log-probs** (``num_iterations > 1``, ``beta > 0``): the 1-GEMM no-grad forward
  over the completion tokens (:func:`dpo_fast.integrations._trainer_common.no_grad_token_logprobs`).
* **Generation** (HF ``generate`` or vLLM), rewards, advantages, datasets, PEFT, checkpoints: TRL's, untouched.
  A reward function returning the wrong number of rewards raises TRL's own error.

Every metric TRL's ``_compute_loss`` logs is logged under TRL's name with TRL's definition (``kl``,
``entropy``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
``clip_ratio/low_min``, ``clip_ratio/high_max``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``); the rest
(``reward``, ``completions/*``, ``num_tokens`` ...) come from TRL's generation step.

Routes (the route of the last step is ``trainer.dpo_fast_route``; steps per route ``trainer.dpo_fast_routes``):

* ``"fused"`` — everything :class:`dpo_fast.GRPOLoss` computes in one pass: every TRL loss type
  (:data:`FUSED_LOSS_TYPES`: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo), token- or sequence-level
  importance sampling, ``num_iterations``, ``beta`` with or without ``use_bias_correction_kl``, ``delta``,
  ``off_policy_mask_threshold``, ``epsilon``/``epsilon_high``, the SAPO / VESPO parameters,
  ``max_completion_length``.
* ``"two_pass"`` — ``top_entropy_quantile < 1`` (TRL takes the entropy quantile over every process's tokens),
  vLLM importance-sampling correction (TRL's own ratio, applied as TRL applies it; vLLM cannot be exercised
  in this repository's CPU tests) and per-token advantages: dpo_fast's engine gives the policy's per-token
  log-probs (differentiable) and entropies (from the same pass), then TRL's own ``_compute_loss`` formula runs
  on them.
* ``"trl"`` — the entropy bonus (``entropy_coef != 0`` or ``use_adaptive_entropy``), which differentiates the
  entropy: TRL's head and loss.

Options off the fused route are logged with a warning naming them — never silently ignored. A loss type
or importance-sampling level TRL does not have raises ``ValueError`` at construction.

``FastRLOOTrainer`` / ``patch_rloo_trainer`` (``trl.RLOOTrainer``) share the log-prob hook but not the loss
(RLOO clips a ratio of summed sequence log-probs, with the KL folded into the reward, which ``GRPOLoss`` does
not compute): old/reference log-probs through the no-grad forward, the policy's through the engine (route
``"two_pass"``), TRL's RLOO loss and metrics on them.

Not supported (clear errors): vision-language models, the MoE router aux loss, ``cast_lm_head_to_fp32``.
Supported TRL releases: :data:`SUPPORTED_TRL`.
"""

from __future__ import annotations

import collections
import logging

import torch

from ..hf import call_with_hidden_states, install_fused_forward
from ._trainer_common import (SUPPORTED_TRL, UnsupportedTRLVersion, check_trl_version, no_grad_token_logprobs,
                              patch_instance, reduced_mean, reject_multimodal, token_logprobs_and_entropy)

try:
    from trl import GRPOTrainer, RLOOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("dpo_fast.integrations.trl_grpo needs TRL: pip install 'trl>=1.16,<1.17'") from e

__all__ = ["FastGRPOTrainer", "patch_grpo_trainer", "FastRLOOTrainer", "patch_rloo_trainer", "FUSED_LOSS_TYPES",
           "TRL_LOSS_TYPES", "SUPPORTED_TRL", "UnsupportedTRLVersion"]

logger = logging.getLogger(__name__)

#: TRL 1.16's GRPO loss types.
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# loss types whose logged metrics are the clip ratios
_CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _grpo_loss_accepts(loss_type: str) -> bool:
    from .. import GRPOLoss

    try:
        GRPOLoss(loss_type=loss_type)
    except ValueError:
        return False
    return True


#: loss types that take the fused route (the TRL loss types :class:`dpo_fast.GRPOLoss` computes).
FUSED_LOSS_TYPES = tuple(t for t in TRL_LOSS_TYPES if _grpo_loss_accepts(t))

# loss types TRL normalises by num_items_in_batch (already per accumulation window): no division by the steps
_ITEM_NORMALISED = ("dapo", "cispo", "vespo")

_MODALITY_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                  "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images")


def _masked_mean(acc, x: torch.Tensor, mask: torch.Tensor) -> float:
    """TRL's ``global_masked_mean``: over completion tokens, or over sequences when ``x`` is (B, 1)."""
    if x.shape[1] == 1:
        return reduced_mean(acc, x.sum(), torch.tensor(float(x.shape[0]), device=x.device))
    return reduced_mean(acc, (x * mask).sum(), mask.sum())


def _seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's ``masked_seq_mean``: (B,) per-sequence mean (NaN for a sequence with no tokens)."""
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * mask).sum(-1) / mask.sum(-1)


class _HiddenStateLogpsMixin:
    """TRL's per-token log-prob hook (shared by GRPOTrainer and RLOOTrainer) through dpo_fast's engine."""

    _dpo_fast_trl_loss = False  # True: the policy's log-probs inside TRL's loss come from TRL's head

    # TRL hook: per-token log-probs (old policy / reference under no_grad; the policy inside TRL's own loss)
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **modality):
        grad = torch.is_grad_enabled()
        if compute_aux_loss or any(v is not None for v in modality.values()) or (grad and self._dpo_fast_trl_loss):
            # multimodal inputs, or TRL's own loss with the entropy bonus (entropy needs its gradient): TRL's head
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **modality)
        if not grad:
            logps = no_grad_token_logprobs(model, input_ids, attention_mask, logits_to_keep,
                                           temperature=self.temperature, batch_size=batch_size,
                                           autocast=self.accelerator.autocast)
            return logps, None, None
        # two-pass route: the policy's log-probs (differentiable) and entropies (no gradient) from one engine pass,
        # then TRL's own loss formula on them
        C = int(logits_to_keep)
        labels = input_ids[:, -C:].masked_fill(attention_mask[:, -C:] == 0, -100)

        def fn(hidden, head):
            h, w, b = head.operands(hidden[:, -C - 1:-1])
            return token_logprobs_and_entropy(h, w, labels.to(h.device), bias=b, **head.engine_kwargs(self.temperature))

        with self.accelerator.autocast():
            logps, ent = call_with_hidden_states(model, fn, input_ids, attention_mask=attention_mask)
        return logps, (ent if compute_entropy else None), None


def _check_common(self) -> None:
    """Options neither trainer integration supports: clear errors."""
    who = type(self).__name__
    if getattr(self, "_is_vlm", False):
        raise NotImplementedError(f"{who}: vision-language models are not supported; use TRL's trainer")
    if getattr(self, "aux_loss_enabled", False):
        raise NotImplementedError(f"{who}: the MoE router aux loss is not supported; set router_aux_loss_coef=0.0 "
                                  "or use TRL's trainer")
    if getattr(self.args, "cast_lm_head_to_fp32", False):
        raise NotImplementedError(f"{who}: cast_lm_head_to_fp32=True is not supported (dpo_fast already "
                                  "accumulates the head in float32); unset it or use TRL's trainer")


class _FastGRPOMixin(_HiddenStateLogpsMixin):
    """The methods FastGRPOTrainer overrides; mixed into a GRPOTrainer (sub)class."""

    def _dpo_fast_init(self) -> None:
        check_trl_version()
        who = type(self).__name__
        _check_common(self)
        if self.loss_type not in TRL_LOSS_TYPES:
            raise ValueError(f"loss_type: {self.loss_type!r} is not a TRL GRPO loss type; expected one of "
                             f"{list(TRL_LOSS_TYPES)}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level: expected 'token' or 'sequence', got "
                             f"{self.importance_sampling_level!r}")
        reasons = []
        if self.loss_type not in FUSED_LOSS_TYPES:
            reasons.append(f"loss_type={self.loss_type!r}")
        if self.top_entropy_quantile < 1.0:  # TRL's threshold is a quantile over every process's tokens
            reasons.append(f"top_entropy_quantile={self.top_entropy_quantile}")
        if getattr(self, "_entropy_bonus_enabled", False):
            reasons.append("the entropy bonus (entropy_coef / use_adaptive_entropy)")
        if self.use_vllm and self.vllm_importance_sampling_correction:  # TRL's ratio kept as TRL applies it
            reasons.append("vllm_importance_sampling_correction")
        self.dpo_fast_fallback_reasons = reasons
        # TRL differentiates the entropy only for its entropy bonus: then TRL's head computes the policy's log-probs
        self._dpo_fast_trl_loss = bool(getattr(self, "_entropy_bonus_enabled", False))
        self.dpo_fast_route: str | None = None
        self.dpo_fast_routes: collections.Counter = collections.Counter()
        if reasons:
            route = ("'trl': TRL's head and loss" if self._dpo_fast_trl_loss else
                     "'two_pass': dpo_fast's log-probs and entropies, then TRL's loss formula")
            logger.warning("%s: %s not fused by dpo_fast; the loss runs TRL's own _compute_loss (route %s). Old "
                           "and reference log-probs still use the fused no-grad forward.", who, ", ".join(reasons),
                           route)
        else:
            from .. import GRPOLoss

            GRPOLoss(**self._dpo_fast_loss_options())  # validate now, not at the first step
        # the fused entry point goes in before accelerate wraps forward, so its autocast covers our path too
        install_fused_forward(self.model)
        if getattr(self, "ref_model", None) is not None:
            install_fused_forward(self.ref_model)

    def _dpo_fast_loss_options(self) -> dict:
        args = self.args
        return dict(beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                    importance_sampling_level=self.importance_sampling_level, loss_type=self.loss_type,
                    max_completion_length=self.max_completion_length, delta=args.delta,
                    sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
                    vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
                    vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg,
                    use_bias_correction_kl=bool(args.use_bias_correction_kl),
                    off_policy_mask_threshold=self.off_policy_mask_threshold)

    # TRL hook: the loss and the metrics of one micro-batch
    def _compute_loss(self, model, inputs):
        if self.dpo_fast_fallback_reasons or inputs["advantages"].dim() != 1:
            self._dpo_fast_record("trl" if self._dpo_fast_trl_loss else "two_pass")
            return super()._compute_loss(model, inputs)
        reject_multimodal(type(self).__name__, inputs, _MODALITY_KEYS)
        from .. import GRPOLoss

        mode = "train" if self.model.training else "eval"
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        C = completion_ids.size(1)
        labels = completion_ids.masked_fill(mask == 0, -100)  # (B, C), scored from hidden[P-1 .. P+C-2]
        advantages = inputs["advantages"]  # (B,)
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        sampling = inputs.get("sampling_per_token_logps") if self.off_policy_mask_threshold is not None else None
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        n_items = None
        if self.loss_type in _ITEM_NORMALISED:  # TRL's normaliser: the batch's tokens, per accumulation window
            n_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                n_items = n_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        opts = self._dpo_fast_loss_options()

        def fn(hidden, head):
            h, w, b = head.operands(hidden[:, -C - 1:-1])
            loss_fn = GRPOLoss(**opts, **head.engine_kwargs(self.temperature), token_metrics=True)
            out = loss_fn(h, w, labels.to(h.device), advantages, old, ref, bias=b, num_items_in_batch=n_items,
                          sampling_logps=sampling)
            return out, loss_fn

        out, loss_fn = call_with_hidden_states(model, fn, input_ids, attention_mask=attention_mask)
        self._dpo_fast_record(out.route)
        loss = out.loss if self.loss_type in _ITEM_NORMALISED else out.loss / accum
        with torch.no_grad():  # out.token_logps: (B, C) detached policy log-probs from the same pass
            self._dpo_fast_log(mode, out.token_logps, old, ref, mask, advantages, out)
        return loss

    def _dpo_fast_record(self, route: str) -> None:
        self.dpo_fast_route = route
        self.dpo_fast_routes[route] += 1

    def _dpo_fast_log(self, mode, logps, old, ref, mask, advantages, out) -> None:
        """Append the metrics TRL's _compute_loss logs, with TRL's definitions, from detached tensors."""
        acc, m = self.accelerator, self._metrics[mode]
        mask = mask.to(logps.dtype)
        lp = logps.to(torch.float32)
        old = lp if old is None else old.to(lp.dtype)
        A = advantages.to(lp.dtype).unsqueeze(1)  # (B, 1)
        tok_log_ratio = lp - old
        log_ratio = tok_log_ratio
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)
        if self.beta != 0.0:
            d = ref.to(lp.dtype) - lp
            kl = torch.exp(d) - d - 1
            if self.args.use_bias_correction_kl:
                kl = kl * coef_1
            m["kl"].append(_masked_mean(acc, kl, mask))
        # per-process sums from the loss's own pass, summed over processes
        m["entropy"].append(reduced_mean(acc, out.token_sums["entropy_sum"], out.token_sums["tokens"]))
        if self.loss_type in _CLIPPED_TYPES:
            if self.args.delta is not None:  # TRL logs the ratio after the two-sided clip
                coef_1 = torch.clamp(coef_1, max=self.args.delta)
            low = ((coef_1 < 1 - self.epsilon_low) & (A < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (A > 0)).float()
            m["clip_ratio/low_mean"].append(_masked_mean(acc, low, mask))
            m["clip_ratio/high_mean"].append(_masked_mean(acc, high, mask))
            m["clip_ratio/region_mean"].append(_masked_mean(acc, (low.bool() | high.bool()).float(), mask))
            m["clip_ratio/low_min"].append(nanmin(acc.gather(_seq_mean(low, mask))).item())
            m["clip_ratio/high_max"].append(nanmax(acc.gather(_seq_mean(high, mask))).item())
        elif self.loss_type == "cispo":
            m["cispo_clip_ratio"].append(_masked_mean(acc, ((coef_1 > self.epsilon_high) & (A > 0)).float(), mask))
        elif self.loss_type == "vespo":
            a = self.args
            phi = self.get_gamma_weights(advantages=A, log_ratio_per_token=tok_log_ratio, mask=mask,
                                         importance_sampling_ratio=None, k_pos=a.vespo_k_pos,
                                         lambda_pos=a.vespo_lambda_pos, k_neg=a.vespo_k_neg,
                                         lambda_neg=a.vespo_lambda_neg)
            m["vespo/phi_seq_mean"].append(_masked_mean(acc, phi, mask))


class _FastRLOOMixin(_HiddenStateLogpsMixin):
    """FastRLOOTrainer's methods: TRL's RLOO loss on dpo_fast's log-probs (see :class:`FastRLOOTrainer`)."""

    def _dpo_fast_init(self) -> None:
        check_trl_version()
        _check_common(self)
        self.dpo_fast_route = "two_pass"
        install_fused_forward(self.model)
        if getattr(self, "ref_model", None) is not None:
            install_fused_forward(self.ref_model)


class FastGRPOTrainer(_FastGRPOMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with the policy's log-probs and loss computed by the fused :class:`dpo_fast.GRPOLoss`.

    Same constructor as ``trl.GRPOTrainer``. See the module docstring for the routes.

    Raises:
        UnsupportedTRLVersion: the installed TRL is outside :data:`SUPPORTED_TRL`.
        ValueError: a ``loss_type`` / ``importance_sampling_level`` TRL does not have.
        NotImplementedError: vision-language models, MoE aux loss, ``cast_lm_head_to_fp32``.
    """

    def __init__(self, *args, **kwargs):
        check_trl_version()
        super().__init__(*args, **kwargs)
        self._dpo_fast_init()


class FastRLOOTrainer(_FastRLOOMixin, RLOOTrainer):
    """``trl.RLOOTrainer`` with the policy's, old-policy and reference log-probs from dpo_fast's engine.

    RLOO shares GRPO's generation and log-prob hook but not its loss: a clipped ratio of *summed* sequence
    log-probs (KL folded into the reward), which :class:`dpo_fast.GRPOLoss` does not compute. So the policy's
    per-token log-probs and entropies come from one engine pass (differentiable log-probs, no logits tensor) and
    TRL's own RLOO loss runs on them (route ``"two_pass"``); old and reference log-probs use the 1-GEMM no-grad
    forward. Same constructor as ``trl.RLOOTrainer``; errors as :class:`FastGRPOTrainer`.
    """

    def __init__(self, *args, **kwargs):
        check_trl_version()
        super().__init__(*args, **kwargs)
        self._dpo_fast_init()


def patch_rloo_trainer(trainer: RLOOTrainer) -> RLOOTrainer:
    """Make an existing ``trl.RLOOTrainer`` instance use :class:`FastRLOOTrainer`'s methods (state kept)."""
    return patch_instance(trainer, RLOOTrainer, _FastRLOOMixin, _FastRLOOMixin._dpo_fast_init)


def patch_grpo_trainer(trainer: GRPOTrainer) -> GRPOTrainer:
    """Make an existing ``trl.GRPOTrainer`` (or subclass) instance use :class:`FastGRPOTrainer`'s methods.

    The instance's class is swapped for a subclass; its state is kept. Call it before ``trainer.train()``.

    Returns:
        The same trainer object.
    """
    return patch_instance(trainer, GRPOTrainer, _FastGRPOMixin, _FastGRPOMixin._dpo_fast_init)
