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
  ``max_completion_length``, the entropy bonus (``entropy_coef``, and ``use_adaptive_entropy``: TRL's controller
  state is kept on the trainer as TRL keeps it, its per-step coefficient goes to the module's forward; logs
  ``policy_loss`` and ``entropy_coef`` as TRL does).
* ``"two_pass"`` — ``top_entropy_quantile < 1`` (TRL takes the entropy quantile over every process's tokens),
  vLLM importance-sampling correction (TRL's own ratio, applied as TRL applies it; vLLM cannot be exercised
  in this repository's CPU tests) and per-token advantages: dpo_fast's engine gives the policy's per-token
  log-probs (differentiable) and entropies (from the same pass), then TRL's own ``_compute_loss`` formula runs
  on them (its entropies carry their gradient, so the entropy bonus works there too).

Options off the fused route are logged with a warning naming them — never silently ignored. A loss type
or importance-sampling level TRL does not have raises ``ValueError`` at construction. The options table is
``_FastGRPOMixin._dpo_fast_options`` (:mod:`dpo_fast.integrations.adapter`).

``FastRLOOTrainer`` / ``patch_rloo_trainer`` (``trl.RLOOTrainer``) share the log-prob hook but not the loss
(RLOO clips a ratio of summed sequence log-probs, with the KL folded into the reward, which ``GRPOLoss`` does
not compute): old/reference log-probs through the no-grad forward, the policy's through the engine (route
``"two_pass"``), TRL's RLOO loss and metrics on them.

Padding-free (``FastGRPOTrainer(..., padding_free=True)``, ``FastRLOOTrainer`` likewise, or the patch functions'
keywords; TRL 1.16's GRPOConfig/RLOOConfig have no such field): TRL builds its padded generation batch as usual
(left-padded prompts, right-padded completions); every decoder call of dpo_fast's routes -- the policy's forward
and backward, the old-policy and reference forwards -- runs on the batch's real tokens only, packed into rows of
whole sequences by the Rust best-fit-decreasing planner (:func:`dpo_fast.packing.pack_padded_rows`: positions
restarting per sequence, ``cu_seqlens``; sdpa/eager block-diagonal masks from ``position_ids``, flash-attention
varlen arguments), and the hidden states come back in the padded layout for the unchanged loss and metrics
(:func:`dpo_fast.hf.call_without_padding`). ``packed_row_tokens``: the packed-row capacity (None: the longest
sequence of the forward; ``"one_row"``; an int). At construction a probe checks that the attention keeps packed
sequences apart; a vision-language model is refused (its image tokens and 3-D positions are not re-laid).
``trainer.dpo_fast_packing`` counts the real tokens, slots and rows the decoder saw, packed and padded. Route
``"trl"`` (MoE aux loss) runs TRL's padded forward. Every logged metric equals the padded path within 1e-4
(positions restart at 0 where the padded forward's left padding shifted them: models with rotary or relative
positions are unaffected, absolute position embeddings are not -- keep those padded).

Vision-language models (GRPO and RLOO): TRL's vision inputs (``pixel_values``, ``image_grid_thw``, ``num_images``,
``mm_token_type_ids`` ...) go to the model's forward, sliced per chunk as TRL slices them; the language model's
last hidden states go to the engine. Not supported (clear errors): the MoE router aux loss,
``cast_lm_head_to_fp32``.
Supported TRL releases: :data:`SUPPORTED_TRL`.
"""

from __future__ import annotations

import torch

from ..losses import grpo_terms as G
from ..losses import policy_gradient as PG
from ..losses.registry import GRPO_LOSS_TYPES, IS_LEVELS, TRL_GRPO_LOSS_TYPES
from ..logprobs import token_logprobs_and_entropy
from ._trainer_common import (SUPPORTED_TRL, UnsupportedTRLVersion, check_trl_version, no_grad_token_logprobs,
                              reduced_mean, vision_inputs)
from .adapter import (PADDING_FREE_KWARGS, VLM_HEAD_OPTION, Option, TrainerAdapter, moe_aux_option, options_from_trainer,
                      patch_instance)

try:
    from trl import GRPOTrainer, RLOOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("dpo_fast.integrations.trl_grpo needs TRL: pip install 'trl>=1.16,<1.17'") from e

__all__ = ["FastGRPOTrainer", "patch_grpo_trainer", "FastRLOOTrainer", "patch_rloo_trainer", "FUSED_LOSS_TYPES",
           "TRL_LOSS_TYPES", "SUPPORTED_TRL", "UnsupportedTRLVersion"]

#: TRL 1.16's GRPO loss types.
TRL_LOSS_TYPES = TRL_GRPO_LOSS_TYPES
#: loss types that take the fused route (the TRL loss types :class:`dpo_fast.GRPOLoss` computes).
FUSED_LOSS_TYPES = tuple(t for t in TRL_LOSS_TYPES if t in GRPO_LOSS_TYPES)

_MODALITY_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                  "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images")

# options neither GRPO nor RLOO supports
_COMMON_OPTIONS = (
    moe_aux_option(),
    VLM_HEAD_OPTION,
    Option("cast_lm_head_to_fp32", lambda t: bool(getattr(t.args, "cast_lm_head_to_fp32", False)), "error",
           "{who}: cast_lm_head_to_fp32=True is not supported (dpo_fast already accumulates the head in float32); "
           "unset it or use {stock}"),
)


def _masked_mean(acc, x: torch.Tensor, mask: torch.Tensor) -> float:
    """TRL's ``global_masked_mean`` over all processes: over completion tokens, or over sequences for (B, 1)."""
    if x.shape[1] == 1:
        return reduced_mean(acc, x.sum(), torch.tensor(float(x.shape[0]), device=x.device))
    return reduced_mean(acc, (x * mask).sum(), mask.sum())


class _HiddenStateLogpsMixin(TrainerAdapter):
    """TRL's per-token log-prob hook (shared by GRPOTrainer and RLOOTrainer) through dpo_fast's engine."""

    _dpo_fast_kwargs = PADDING_FREE_KWARGS

    def _dpo_fast_temperature(self) -> float:
        return self.temperature

    # TRL hook: per-token log-probs (old policy / reference under no_grad; the policy inside TRL's own loss)
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **modality):
        grad = torch.is_grad_enabled()
        trl_loss = getattr(self, "_dpo_fast_fallback_route", None) == "trl"
        if compute_aux_loss or (grad and trl_loss):
            # TRL's own loss with the entropy bonus (entropy needs its gradient), or the MoE aux loss: TRL's head
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **modality)
        if not grad:
            logps = no_grad_token_logprobs(model, input_ids, attention_mask, logits_to_keep,
                                           temperature=self.temperature, batch_size=batch_size,
                                           autocast=self.accelerator.autocast, call=self._dpo_fast_call,
                                           **modality)
            return logps, None, None
        # two-pass route: the policy's log-probs (differentiable) and entropies (no gradient) from one engine pass,
        # then TRL's own loss formula on them
        C = int(logits_to_keep)
        labels = input_ids[:, -C:].masked_fill(attention_mask[:, -C:] == 0, -100)

        def fn(hidden, head):
            h, w, b = head.operands(hidden[:, -C - 1:-1])
            return token_logprobs_and_entropy(h, w, labels.to(h.device), bias=b, **head.engine_kwargs(self.temperature))

        with self.accelerator.autocast():
            logps, ent = self._dpo_fast_call(model, fn, input_ids, attention_mask=attention_mask,
                                             **vision_inputs(modality, 0, len(input_ids), len(input_ids)))
        return logps, (ent if compute_entropy else None), None


class _FastGRPOMixin(_HiddenStateLogpsMixin):
    """The methods FastGRPOTrainer overrides; mixed into a GRPOTrainer (sub)class."""

    _dpo_fast_trl_class = GRPOTrainer
    _dpo_fast_stock = "trl.GRPOTrainer"
    _dpo_fast_options = _COMMON_OPTIONS + (
        Option("loss_type", lambda t: t.loss_type not in TRL_LOSS_TYPES, "error",
               "loss_type: {t.loss_type!r} is not a TRL GRPO loss type; expected one of " + str(list(TRL_LOSS_TYPES)),
               ValueError),
        Option("importance_sampling_level", lambda t: t.importance_sampling_level not in IS_LEVELS, "error",
               "importance_sampling_level: expected 'token' or 'sequence', got {t.importance_sampling_level!r}",
               ValueError),
        Option("loss_type", lambda t: t.loss_type not in FUSED_LOSS_TYPES, "two_pass", "loss_type={t.loss_type!r}"),
        # TRL's threshold is a quantile over every process's tokens
        Option("top_entropy_quantile", lambda t: t.top_entropy_quantile < 1.0, "two_pass",
               "top_entropy_quantile={t.top_entropy_quantile}"),
        # TRL's ratio, kept as TRL applies it
        Option("vllm_importance_sampling_correction",
               lambda t: bool(t.use_vllm and t.vllm_importance_sampling_correction), "two_pass",
               "vllm_importance_sampling_correction"),
    )

    def _dpo_fast_build_loss(self, temperature, softcap):
        from .. import GRPOLoss
        from .. import losses as L

        # every GRPOOptions field from the trainer / GRPOConfig under TRL's name; the entropy bonus is passed per
        # step (TRL's adaptive coefficient), the quantile and the vLLM correction run on the two-pass route
        self._dpo_fast_grpo = options_from_trainer(
            L.GRPOOptions, self, per_step=("entropy_coef", "top_entropy_quantile", "vllm_importance_sampling_mode",
                                           "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"),
            use_bias_correction_kl=bool(self.args.use_bias_correction_kl))
        return GRPOLoss(options=self._dpo_fast_grpo, temperature=temperature, softcap=softcap, token_metrics=True,
                        compute_metrics=False)

    # TRL hook: the loss and the metrics of one micro-batch
    def _compute_loss(self, model, inputs):
        if self.dpo_fast_fallback_reasons or inputs["advantages"].dim() != 1:
            self._dpo_fast_record(self._dpo_fast_fallback_route or "two_pass")
            return super()._compute_loss(model, inputs)
        mode = self._dpo_fast_mode()
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        # a vision-language model's inputs (pixel values, grid sizes, token types), passed to its forward as TRL does
        vision = vision_inputs({k: inputs.get(k) for k in _MODALITY_KEYS}, 0, len(input_ids), len(input_ids))
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
        item_normalised = self._dpo_fast_grpo.entry.token_normalised
        n_items = None
        if item_normalised:  # TRL's normaliser: the batch's tokens, per accumulation window
            n_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                n_items = n_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        bonus = bool(getattr(self, "_entropy_bonus_enabled", False))
        coef = 0.0
        if bonus:  # TRL's coefficient from the end of the previous optimizer step (adaptive: gated by the target)
            adaptive = self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target
            coef = 0.0 if adaptive else float(self.entropy_coef)
            coef = coef / accum if item_normalised else coef  # TRL scales the bonus for accumulation only
        out, _ = self._dpo_fast_fused(model, input_ids, labels, advantages, old, ref,
                                      forward=dict(attention_mask=attention_mask, **vision),
                                      rows=lambda hidden: hidden[:, -C - 1:-1], num_items_in_batch=n_items,
                                      sampling_logps=sampling, entropy_coef=coef)
        loss = out.loss if item_normalised else out.loss / accum
        with torch.no_grad():  # out.token_logps: (B, C) detached policy log-probs from the same pass
            self._dpo_fast_log_step(mode, out, advantages, old, ref, mask)
            if bonus:
                self._dpo_fast_entropy_control(mode, out, coef)
        return loss

    def _dpo_fast_entropy_control(self, mode, out, coef) -> None:
        """TRL's entropy-bonus bookkeeping after a step: the ``policy_loss`` metric, the adaptive controller's
        window statistics and update at the optimizer-step boundary, and the ``entropy_coef`` metric."""
        ent_sum, tokens = out.token_sums["entropy_sum"], out.token_sums["tokens"]
        policy_loss = out.loss.detach() + coef * ent_sum / tokens.clamp(min=1.0)  # the loss before the bonus
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            stats = torch.stack([ent_sum, tokens]).detach().to(torch.float32)
            self._entropy_window_stats = stats if self._entropy_window_stats is None else (
                self._entropy_window_stats + stats)
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                a = self.args
                if world_entropy <= a.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _dpo_fast_log_step(self, mode, out, advantages, old, ref, mask) -> None:
        """Append the metrics TRL's _compute_loss logs (kl, entropy, the loss type's clip statistics), each
        defined once in the loss layer and reduced over all processes as TRL reduces it."""
        acc = self.accelerator
        o = self._dpo_fast_grpo
        terms = PG.grpo_token_terms(out.token_logps.float(), advantages, mask, old, ref, options=o)
        m = terms.inputs.mask
        values = {}
        if terms.kl is not None:
            values["kl"] = _masked_mean(acc, terms.kl, m)
        # per-process sums from the loss's own pass, summed over processes
        values["entropy"] = reduced_mean(acc, out.token_sums["entropy_sum"], out.token_sums["tokens"])
        for name, p in o.entry.metrics.parts(terms.policy, terms.inputs).items():
            if p.reduce == "mean":
                values[name] = _masked_mean(acc, p.values, m)
            else:
                extreme = nanmin if p.reduce == "min" else nanmax
                values[name] = extreme(acc.gather(G.seq_mean(p.values, m))).item()
        self._dpo_fast_log(mode, values)


class _FastRLOOMixin(_HiddenStateLogpsMixin):
    """FastRLOOTrainer's methods: TRL's RLOO loss on dpo_fast's log-probs (see :class:`FastRLOOTrainer`)."""

    _dpo_fast_trl_class = RLOOTrainer
    _dpo_fast_stock = "trl.RLOOTrainer"
    _dpo_fast_options = _COMMON_OPTIONS

    def _dpo_fast_setup(self) -> None:
        self._dpo_fast_record("two_pass")  # always: TRL's RLOO loss on the engine's log-probs


class FastGRPOTrainer(_FastGRPOMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with the policy's log-probs and loss computed by the fused :class:`dpo_fast.GRPOLoss`.

    Same constructor as ``trl.GRPOTrainer``, plus:

    Args:
        padding_free: run the decoder on the batch's real tokens only, packed into rows of whole sequences
            (policy, old-policy and reference forwards); metrics equal the padded path. See the module docstring.
        packed_row_tokens: packed-row capacity with ``padding_free``: None (the longest sequence of the batch),
            ``"one_row"`` (flash-attention varlen) or an int >= the longest sequence.

    See the module docstring for the routes.

    Raises:
        UnsupportedTRLVersion: the installed TRL is outside :data:`SUPPORTED_TRL`.
        ValueError: a ``loss_type`` / ``importance_sampling_level`` TRL does not have.
        NotImplementedError: MoE aux loss, ``cast_lm_head_to_fp32``, ``padding_free`` with a vision-language model.
        TypeError / ValueError: bad ``padding_free`` / ``packed_row_tokens``; ``padding_free`` with an attention
            implementation that lets packed sequences see each other.
    """


class FastRLOOTrainer(_FastRLOOMixin, RLOOTrainer):
    """``trl.RLOOTrainer`` with the policy's, old-policy and reference log-probs from dpo_fast's engine.

    RLOO shares GRPO's generation and log-prob hook but not its loss: a clipped ratio of *summed* sequence
    log-probs (KL folded into the reward), which :class:`dpo_fast.GRPOLoss` does not compute. So the policy's
    per-token log-probs and entropies come from one engine pass (differentiable log-probs, no logits tensor) and
    TRL's own RLOO loss runs on them (route ``"two_pass"``); old and reference log-probs use the 1-GEMM no-grad
    forward. Same constructor as ``trl.RLOOTrainer`` plus ``padding_free`` / ``packed_row_tokens`` (as
    :class:`FastGRPOTrainer`); errors as :class:`FastGRPOTrainer`.
    """


def patch_rloo_trainer(trainer: RLOOTrainer, *, padding_free: bool = False,
                       packed_row_tokens: int | str | None = None) -> RLOOTrainer:
    """Make an existing ``trl.RLOOTrainer`` instance use :class:`FastRLOOTrainer`'s methods (state kept);
    ``padding_free`` / ``packed_row_tokens`` as :class:`FastRLOOTrainer`."""
    return patch_instance(trainer, _FastRLOOMixin, padding_free=padding_free, packed_row_tokens=packed_row_tokens)


def patch_grpo_trainer(trainer: GRPOTrainer, *, padding_free: bool = False,
                       packed_row_tokens: int | str | None = None) -> GRPOTrainer:
    """Make an existing ``trl.GRPOTrainer`` (or subclass) instance use :class:`FastGRPOTrainer`'s methods.

    The instance's class is swapped for a subclass; its state is kept. Call it before ``trainer.train()``.
    ``padding_free`` / ``packed_row_tokens``: as :class:`FastGRPOTrainer`.

    Returns:
        The same trainer object.
    """
    return patch_instance(trainer, _FastGRPOMixin, padding_free=padding_free, packed_row_tokens=packed_row_tokens)
