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
``_metrics`` store) are private TRL API.

Vision-language models (a processor as ``processing_class``: Qwen2-VL / Qwen2.5-VL, LLaVA-style, Gemma-3 ...):
every model input TRL's vision collator produces (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``,
``image_sizes``, ``token_type_ids`` ...) goes to the model's forward, policy and reference alike; the language
model's last hidden states go to the engine (image tokens are never scored: they are prompt tokens). The head is
TRL's fused LM head's: TRL 1.16 (``trl.trainer.utils.add_fused_lm_head``) scales the logits by the *text*
config's ``final_logit_softcapping`` / logit scale whatever the class, so a Gemma-3 VLM whose text config sets a
softcap is trained on capped log-probs although ``Gemma3ForConditionalGeneration``'s own forward (transformers
5.25) never caps its logits; this class trains on the capped ones too, to match TRL
(:func:`dpo_fast.hf.output_head` with ``scalings="text_config"``).

Not supported (clear errors): ``padding_free=True`` with a vision-language model (packing would have to carry
the image tokens and the model's own position ids, e.g. Qwen2-VL's 3-D M-RoPE positions), MoE router aux loss
(``router_aux_loss_coef`` != 0 on MoE models), prompt-learning PEFT, a PEFT adapter on ``lm_head``, a VLM whose text
config sets both a softcap and a logit scale (TRL's head applies the scale, then the cap). The options table is ``_FastDPOMixin._dpo_fast_options`` (:mod:`dpo_fast.integrations.adapter`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..fused import DPOLoss, pair_logprobs
from ..hf import call_with_hidden_states
from ..losses import DPOOptions
from ..losses.registry import TRL_SMOOTHED
from ..packing import shifted_labels
from ._trainer_common import SUPPORTED_TRL, UnsupportedTRLVersion, check_trl_version
from .adapter import (VLM_HEAD_OPTION, Kwarg, Option, TrainerAdapter, moe_aux_option, options_from_trainer,
                      patch_instance)
from . import sequence_sharded
from .padding_free import PaddingFreePreferenceCollator, check_packed_attention, token_budget_sampler

try:
    from trl import DPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("dpo_fast.integrations.trl needs TRL: pip install 'trl>=1.16,<1.17'") from e

__all__ = ["FastDPOTrainer", "patch_trainer", "SUPPORTED_TRL", "UnsupportedTRLVersion", "check_trl_version"]


def __getattr__(name: str) -> Any:
    """The other trainers from here too (``from dpo_fast.integrations.trl import FastGRPOTrainer``), imported on
    first use only (PEP 562): see :mod:`dpo_fast.integrations`."""
    from . import _resolve

    return _resolve(__name__, name)


def _smoothed(t) -> list[str]:
    """The configured loss types whose TRL formula uses label_smoothing (TRL's "sigmoid" does not, unlike
    dpo_fast's cDPO)."""
    return sorted(set(t.loss_types) & TRL_SMOOTHED)


def _packed_layout(inputs) -> dict[str, Any] | None:
    """``cu_seqlens``/``pairs`` of a packed batch (from :class:`PaddingFreePreferenceCollator`), else None."""
    if "cu_seqlens" not in inputs:
        return None
    return {"cu_seqlens": inputs["cu_seqlens"], "pairs": inputs["pairs"]}


def _engine_layout(h, labels, packed):
    """(hidden, labels, layout kwargs) for the engine: (2P, T, H) as is, or packed rows flattened to (N, H)."""
    if packed is None:
        return h, labels.to(h.device), {}
    layout = {k: v.to(h.device) for k, v in packed.items()}
    return h.reshape(-1, h.shape[-1]), labels.reshape(-1).to(h.device), layout


def _flat_rows(hidden):
    return hidden.reshape(-1, hidden.shape[-1])


def _bound_args(args, kwargs):
    """The DPOConfig passed to DPOTrainer(model, ref_model, args, ...) positionally or by keyword, or None."""
    if "args" in kwargs:
        return kwargs["args"]
    return args[2] if len(args) > 2 else None


class _FastDPOMixin(TrainerAdapter):
    """The methods FastDPOTrainer overrides; mixed into a DPOTrainer (sub)class."""

    _dpo_fast_trl_class = DPOTrainer
    _dpo_fast_stock = "trl.DPOTrainer"
    _dpo_fast_ulysses = True  # DeepSpeed Ulysses sequence parallelism (dpo_fast.integrations.sequence_sharded)
    _dpo_fast_kwargs = (Kwarg("token_metrics", True, "bool"), Kwarg("token_budget", None, "int | None"),
                        Kwarg("packed_row_tokens", None, "int | str | None"))
    _dpo_fast_options = (
        moe_aux_option(),
        VLM_HEAD_OPTION,
        Option("label_smoothing", lambda t: bool(float(t.label_smoothing) and "sigmoid" in t.loss_types
                                                  and _smoothed(t)), "error",
               "{who}: TRL applies label_smoothing to {t._dpo_fast_smoothed} but not to 'sigmoid'; dpo_fast has one "
               "label_smoothing for all losses of a list. Split the losses or set label_smoothing=0."),
    )

    @property
    def _dpo_fast_smoothed(self) -> list[str]:
        return _smoothed(self)

    @contextlib.contextmanager
    def _dpo_fast_constructing(self, args, kwargs, token_metrics=True, token_budget=None, packed_row_tokens=None):
        self.dpo_fast_token_metrics = bool(token_metrics)
        self._dpo_fast_pf_request = None
        cfg = _bound_args(args, kwargs)
        pf = bool(getattr(cfg, "padding_free", False))
        if pf:
            # TRL 1.16 would log that padding_free is unavailable and fall back to padding; this class honours
            # it. Hide the flag from TRL's __init__ only, and give the caller's config back unchanged.
            cfg.padding_free = False
            self._dpo_fast_pf_request = (token_budget, packed_row_tokens)
        try:
            yield
        finally:
            if pf:
                cfg.padding_free = True
            self._dpo_fast_pf_request = None

    def _dpo_fast_setup(self, token_metrics: bool = True, token_budget: int | None = None,
                        packed_row_tokens: int | str | None = None) -> None:
        self.dpo_fast_token_metrics = bool(token_metrics)
        self._dpo_fast_sp = sequence_sharded.setup(self)  # sp_size under DeepSpeed Ulysses, else 0
        self._dpo_fast_setup_padding_free(token_budget, packed_row_tokens)

    def _dpo_fast_build_loss(self, temperature, softcap):
        eps = float(self.label_smoothing)
        if eps and "sigmoid" in self.loss_types:
            eps = 0.0  # TRL's sigmoid ignores it (a list mixing it with smoothed types is an options-table error)
        # the other DPOOptions fields under TRL's names, from the trainer / DPOConfig
        opts = options_from_trainer(DPOOptions, self, loss_type=list(self.loss_types),
                                    loss_weights=list(self.loss_weights), label_smoothing=eps,
                                    use_weighting=bool(self.use_weighting))
        return DPOLoss(options=opts, ld_alpha=self.ld_alpha, compute_metrics=False, temperature=temperature,
                       softcap=softcap, token_metrics=self.dpo_fast_token_metrics)  # token stats from the same pass

    # ------------------------------------------------------------------------------------------------------
    # padding-free batches (DPOConfig(padding_free=True)); see dpo_fast.integrations.padding_free

    def _dpo_fast_setup_padding_free(self, token_budget, row_tokens) -> None:
        self._dpo_fast_padding_free = bool(getattr(self.args, "padding_free", False))
        self._dpo_fast_row_tokens = row_tokens
        if token_budget is not None and not self._dpo_fast_padding_free:
            raise ValueError("token_budget: token-budget batching packs each micro-batch into rows; it needs "
                             "DPOConfig(padding_free=True)")
        if token_budget is not None:
            from ..packing.options import check_budget

            token_budget = check_budget("token_budget", token_budget)
            if self.args.max_length is not None and token_budget < 2 * self.args.max_length:
                raise ValueError(f"token_budget: {token_budget} tokens cannot hold a pair of two max_length="
                                 f"{self.args.max_length} sequences; use token_budget >= {2 * self.args.max_length}")
        self._dpo_fast_token_budget = token_budget
        if self._dpo_fast_padding_free:
            self._dpo_fast_install_collator()
            self.padding_free = True  # TRL turned it off; the packed path below honours it
        if token_budget is not None:
            self.loss_is_scaled_for_ga = True  # compute_loss divides by the step's pair count itself

    def _dpo_fast_install_collator(self) -> None:
        """Replace TRL's padded collator with the packed one (same truncation); check the attention once."""
        if isinstance(self.data_collator, PaddingFreePreferenceCollator):
            return
        if getattr(self, "_is_vlm", False):
            raise NotImplementedError(
                f"{type(self).__name__}: padding_free=True is not supported with a vision-language model: packing "
                "would have to carry the image tokens and the model's own position ids (e.g. Qwen2-VL's 3-D M-RoPE "
                "positions) into the packed rows. Set padding_free=False (padded batches are supported).")
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        dc = self.data_collator
        if not isinstance(dc, DataCollatorForPreference):
            raise ValueError(f"padding_free=True replaces TRL's DataCollatorForPreference with dpo_fast's packed "
                             f"collator; a custom data_collator ({type(dc).__name__}) cannot be packed. Drop the "
                             "data_collator argument, pass a dpo_fast.integrations.padding_free."
                             "PaddingFreePreferenceCollator, or set padding_free=False.")
        # No probe under DeepSpeed/FSDP: the unprepared model may be sharded; the implementation check still runs.
        probe = not (getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False))
        impl = check_packed_attention(self.model, probe=probe)
        if getattr(self, "ref_model", None) is not None:
            check_packed_attention(self.ref_model, probe=probe)
        row = self._dpo_fast_row_tokens
        if row is None and "flash" in impl:
            row = "one_row"  # varlen attention: one row costs nothing extra
        self.data_collator = PaddingFreePreferenceCollator(
            pad_token_id=dc.pad_token_id, max_length=dc.max_length, truncation_mode=dc.truncation_mode,
            row_tokens=row, pad_to_multiple_of=dc.pad_to_multiple_of)

    # TRL hook: inside DPOTrainer.__init__, before training; pack the reference pass too
    def _precompute_ref_logps(self, dataset, name, batch_size):
        if getattr(self, "_dpo_fast_pf_request", None) is not None:  # FastDPOTrainer(padding_free=True) init
            token_budget, row_tokens = self._dpo_fast_pf_request
            self._dpo_fast_row_tokens, self._dpo_fast_token_budget = row_tokens, token_budget
            self._dpo_fast_install_collator()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def get_train_dataloader(self):
        if getattr(self, "_dpo_fast_token_budget", None) is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        dataset = self._remove_unused_columns(self.train_dataset, description="training")
        sampler = token_budget_sampler(dataset, self._dpo_fast_token_budget, max_length=self.args.max_length,
                                       seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def _get_num_items_in_batch(self, batch_samples, device):
        """Token-budget mode: the pairs of the whole optimizer step (all micro-batches, all processes)."""
        if getattr(self, "_dpo_fast_token_budget", None) is None:
            return super()._get_num_items_in_batch(batch_samples, device)
        n = torch.tensor([sum(int(b["pairs"].shape[0]) for b in batch_samples)], device=device)
        return self.accelerator.gather(n).sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._dpo_fast_step_pairs = num_items_in_batch
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    @staticmethod
    def _dpo_fast_forward(inputs) -> dict[str, Any]:
        """Decoder arguments of a padded (attention_mask) or packed (position_ids, cu_seqlens) batch."""
        if "cu_seqlens" in inputs:
            return dict(attention_mask=None, position_ids=inputs["position_ids"], cu_seqlens=inputs["cu_seqlens"],
                        max_seqlen=inputs["max_seqlen"])
        skip = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        kw = {k: v for k, v in inputs.items() if k not in skip}
        kw["attention_mask"] = inputs.get("attention_mask")
        return kw

    # ------------------------------------------------------------------------------------------------------
    def _dpo_fast_ref_pair_logps(self, run, inputs, labels):
        """(ref_chosen_logps, ref_rejected_logps), each (P,) in pair order, through the 1-GEMM no-grad forward of
        ``run`` (called inside :meth:`_dpo_fast_reference`)."""
        ld_alpha = self.ld_alpha
        packed = _packed_layout(inputs)

        def fn(hidden, head):
            h, w, b = head.operands(hidden)  # summed exactly as DPOLoss sums the policy (LD-DPO included)
            h, lab, layout = _engine_layout(h, labels, packed)
            return pair_logprobs(h, w, lab, bias=b, ld_alpha=ld_alpha, **layout, **head.engine_kwargs())

        with self.accelerator.autocast():
            return call_with_hidden_states(run, fn, inputs["input_ids"], **self._dpo_fast_forward(inputs))

    # TRL hook: reference log-probs of one batch (precompute_ref_log_probs), in the batch's example order
    def compute_ref_log_probs(self, model, inputs):
        packed = "cu_seqlens" in inputs
        labels = inputs["labels"] if packed else shifted_labels(inputs["input_ids"], inputs["completion_mask"])
        with self._dpo_fast_reference(model) as run:
            c, r = self._dpo_fast_ref_pair_logps(run, inputs, labels)
        if not packed:
            return c, r
        order = torch.argsort(inputs["example_index"].to(c.device))  # pair order -> example order
        return c[order], r[order]

    def evaluate(self, *args, **kwargs):
        if getattr(self, "_dpo_fast_sp", 0):
            raise NotImplementedError(f"{type(self).__name__}: sequence parallelism: {sequence_sharded.EVAL_REFUSED}")
        return super().evaluate(*args, **kwargs)

    # TRL hook: the loss and the metrics of one batch
    def _compute_loss(self, model, inputs, return_outputs):
        mode = self._dpo_fast_mode()
        if getattr(self, "_dpo_fast_sp", 0) and mode == "train":  # this rank's token block of every row
            if return_outputs:
                raise NotImplementedError(f"{type(self).__name__}: return_outputs under sequence parallelism")
            return sequence_sharded.dpo_step(self, model, inputs, self._dpo_fast_sp)
        input_ids = inputs["input_ids"]
        packed = _packed_layout(inputs)
        # (2P, T) padded, or (R, L) packed rows whose labels the collator derived by the same rule
        labels = inputs["labels"] if packed else shifted_labels(input_ids, inputs["completion_mask"])
        ref_c, ref_r = self._dpo_fast_ref_values(inputs, ("ref_chosen_logps", "ref_rejected_logps"),
                                                 lambda run: self._dpo_fast_ref_pair_logps(run, inputs, labels))
        fwd = self._dpo_fast_forward(inputs)
        out, _ = self._dpo_fast_fused(model, input_ids, labels.reshape(-1) if packed else labels, ref_c.float(),
                                      ref_r.float(), forward=fwd, rows=_flat_rows if packed else None,
                                      **(packed or {}))
        self._dpo_fast_log_step(mode, inputs, out, out.token_sums)
        loss = out.loss
        n_step = getattr(self, "_dpo_fast_step_pairs", None)
        if mode == "train" and getattr(self, "_dpo_fast_token_budget", None) is not None and n_step is not None:
            # Token-budget micro-batches hold different numbers of pairs: weight each by its share of the step's
            # pairs, so the step's gradient is TRL's mean over all of them (x processes: DDP averages gradients).
            loss = loss * (out.losses.shape[0] * self.accelerator.num_processes / n_step)
        if return_outputs:  # deprecated in TRL too: logits for compute_metrics need a plain forward
            with torch.no_grad():
                plain = {k: v for k, v in fwd.items() if k not in ("cu_seqlens", "max_seqlen")}
                outputs = model(input_ids=input_ids, **plain, use_cache=False)
            return loss, outputs
        return loss

    def _dpo_fast_log_step(self, mode, inputs, out, stats) -> None:
        """Append the metrics TRL logs, under TRL's names, gathered across processes as TRL does."""
        acc = self.accelerator

        def total(name):  # a per-process sum, summed over processes
            return acc.gather_for_metrics(stats[name]).sum().item()

        if stats is not None:
            n_tok = total("tokens")
            self._dpo_fast_log(mode, {"entropy": total("entropy_sum") / n_tok if n_tok > 0 else 0.0})
        if mode == "train":
            real = inputs["seq_lens"] if "cu_seqlens" in inputs else inputs["attention_mask"]
            n = acc.gather_for_metrics(real.sum()).sum().item()
            self._total_train_tokens += n // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        values = {}
        if stats is not None:
            nc, nr = total("chosen_tokens"), total("rejected_tokens")
            values["logits/chosen"] = total("chosen_logits_sum") / nc if nc > 0 else 0.0
            values["logits/rejected"] = total("rejected_logits_sum") / nr if nr > 0 else 0.0
            values["mean_token_accuracy"] = total("chosen_hits") / nc if nc > 0 else 0.0
        cr, rr = acc.gather(out.chosen_rewards.detach()), acc.gather(out.rejected_rewards.detach())
        means = torch.stack([cr.mean(), rr.mean(), (cr > rr).float().mean(), (cr - rr).mean(),
                             acc.gather(out.chosen_logps.detach()).mean(),
                             acc.gather(out.rejected_logps.detach()).mean()]).tolist()  # one readback, not six
        values.update(zip(("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                           "logps/chosen", "logps/rejected"), means))
        self._dpo_fast_log(mode, values)


class FastDPOTrainer(_FastDPOMixin, DPOTrainer):
    """``trl.DPOTrainer`` with the loss computed by the fused :class:`dpo_fast.DPOLoss`.

    Same constructor as ``trl.DPOTrainer``, plus:

    Args:
        token_metrics: log ``entropy``, ``mean_token_accuracy`` and ``logits/*`` like TRL (default True);
            computed in the loss's own logits pass (no extra GEMM). False skips them.
        token_budget: with ``DPOConfig(padding_free=True)``, micro-batches of at most this many tokens (after
            TRL's truncation) instead of ``per_device_train_batch_size`` pairs (a
            :class:`dpo_fast.TokenBudgetBatchSampler`), packed into rows as below. The loss of a
            micro-batch is weighted by its share of the optimizer step's pairs, so the step's gradient is TRL's
            mean over all the step's pairs whatever the micro-batch sizes (see the README, "Padding-free training").
        packed_row_tokens: capacity of a packed row with ``padding_free=True``: None (default) -- one row per
            batch under flash-attention (varlen), else rows of up to the batch's longest pair (dense sdpa/eager
            masks cost rows x length^2); an int; or ``"one_row"``.

    With ``DPOConfig(padding_free=True)`` (which stock TRL 1.16 switches off), every batch -- training,
    evaluation and ``precompute_ref_log_probs`` -- keeps TRL's pairs and truncation but is packed by the Rust
    packer: no decoder FLOPs on padding. Attention keeps the sequences apart (flash varlen arguments, or the
    block-diagonal mask transformers builds from ``position_ids`` for sdpa/eager); another implementation raises.

    Raises:
        UnsupportedTRLVersion: the installed TRL is outside :data:`SUPPORTED_TRL`.
        ValueError: padding_free with a custom ``data_collator`` or an attention implementation that cannot keep
            packed sequences apart; ``token_budget`` without ``padding_free`` or below ``2 * max_length``.
        NotImplementedError: ``padding_free=True`` with a vision-language model (padded batches are supported).
    """


def patch_trainer(trainer: DPOTrainer, *, token_metrics: bool = True, token_budget: int | None = None,
                  packed_row_tokens: int | str | None = None) -> DPOTrainer:
    """Make an existing ``trl.DPOTrainer`` (or subclass) instance compute its loss with ``DPOLoss``.

    The instance's class is swapped for a subclass that adds :class:`FastDPOTrainer`'s methods; its
    state (model, datasets, optimizer, callbacks) is kept. Call it before ``trainer.train()``. With
    ``trainer.args.padding_free=True`` its batches are packed from then on (``token_budget`` and
    ``packed_row_tokens`` as in :class:`FastDPOTrainer`); reference log-probs that stock TRL precomputed while
    building the trainer were computed padded (the same numbers up to float rounding).

    Returns:
        The same trainer object.
    """
    return patch_instance(trainer, _FastDPOMixin, token_metrics=token_metrics, token_budget=token_budget,
                          packed_row_tokens=packed_row_tokens)
