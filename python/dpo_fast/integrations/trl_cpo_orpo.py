"""TRL: ``FastCPOTrainer`` / ``FastORPOTrainer`` — ``trl.experimental``'s CPO and ORPO trainers from hidden states.

One-line change::

    from dpo_fast.integrations.trl_cpo_orpo import FastCPOTrainer as CPOTrainer     # trl.experimental.cpo
    from dpo_fast.integrations.trl_cpo_orpo import FastORPOTrainer as ORPOTrainer   # trl.experimental.orpo
    # or, for a trainer you already built:
    trainer = patch_cpo_trainer(trainer)   # / patch_orpo_trainer(trainer)

TRL's experimental CPO and ORPO trainers run the model's full forward, materialise the (2B, T, V) logits and
take a log-softmax over them (plus a cross-entropy over the chosen rows for the NLL term). Here
``concatenated_forward`` runs the decoder only and hands its last hidden states to dpo_fast's engine:

* **CPO / SimPO / AlphaPO** (``FastCPOTrainer``): when the config is one :class:`dpo_fast.CPOLoss` computes
  (every TRL loss type, ``cpo_alpha``, ``alpha``, ``simpo_gamma``, ``label_smoothing``), route ``"fused"``: the
  loss and its gradient in one pass over the completion tokens' logits (3 GEMMs), logits never materialised.
* **ORPO** (``FastORPOTrainer``), and CPO when ``CPOLoss`` rejects a config: route ``"two_pass"``: the engine's
  per-token log-probs (differentiable; 1 GEMM forward, 3 in the backward, tiled) feed TRL's own loss method
  (``odds_ratio_loss`` / ``cpo_loss``) and metrics. ORPO is not fused because TRL's ORPO NLL term is taken
  over the *whole* chosen sequence (prompt included) while the odds ratio uses the completion tokens:
  two token sets, which :class:`dpo_fast.ORPOLoss` (completion-token NLL) does not express.

Every metric is logged under TRL's name and definition: ``rewards/*``, ``logps/*``, ``nll_loss``,
``log_odds_ratio``, ``log_odds_chosen`` and ``logits/chosen|rejected`` — the mean over *all* positions and
vocabulary entries of the rows' logits, as TRL logs it, computed exactly as a GEMV with the head's mean row
(``h @ mean(W) + mean(b)``, scaled) since the mean commutes with a linear head. A Gemma-style soft-capped
head (``final_logit_softcapping``) breaks that identity and raises ``NotImplementedError``; so do
encoder-decoder models and the MoE router aux loss. The route of the last step is ``trainer.dpo_fast_route``.

Padding-free (``FastCPOTrainer(..., padding_free=True)``, ``FastORPOTrainer(..., padding_free=True)``, or the same
keyword of ``patch_cpo_trainer`` / ``patch_orpo_trainer``; TRL 1.16's ``CPOConfig`` / ``ORPOConfig`` have no such
field): the policy's forward (CPO's fused or two-pass route; ORPO's, which gives its odds ratio and its
whole-sequence NLL) runs on the real tokens of the concatenated batch (chosen rows, then rejected rows), packed
into rows of whole sequences (:func:`dpo_fast.hf.call_without_padding`; ``packed_row_tokens`` sets the row
capacity). The loss, log-probs, NLL and their gradients come from real tokens only, so they are the padded
path's. TRL's collator right-pads every sequence (one contiguous run of real tokens from position 0 per row); a
batch where a scored token follows a padding position (a left-padded row) raises ``ValueError`` instead of
scoring a hidden state the packed forward never computes. ``logits/chosen|rejected`` are TRL's mean over *every*
position up to the padded length, padding included, and the model's logits at padding positions exist only in a
padded forward: to log TRL's exact values, each step runs one extra no-grad padded forward of the rows that hold
padding (among the positions TRL averages; ORPO leaves out the last) and takes their row means from it; rows
without padding keep the packed pass's. So padding-free saves the padding's share of the training pass's forward
and backward, and spends a no-grad forward of the padded rows on this metric (its slots are counted in
``trainer.dpo_fast_packing["logits_metric_slots"]``). The attention implementation is probed at construction
(``ValueError`` for one whose packed sequences see each other).

The experimental API is importable in TRL 1.16 (``trl.experimental.cpo`` / ``trl.experimental.orpo``); if it
is missing, importing this module raises ``ImportError`` saying so. Supported TRL releases: :data:`SUPPORTED_TRL`.
"""

from __future__ import annotations

import torch

from ..hf import call_with_hidden_states
from ._trainer_common import SUPPORTED_TRL, UnsupportedTRLVersion, check_trl_version  # noqa: F401 (re-export)
from .adapter import (ENCODER_DECODER_OPTION, PADDING_FREE_KWARGS, SOFTCAP_OPTION, TrainerAdapter, moe_aux_option,
                      options_from_trainer, patch_instance)

try:
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl's experimental trainers
    raise ImportError(
        "dpo_fast.integrations.trl_cpo_orpo needs TRL's experimental CPO/ORPO trainers (trl.experimental.cpo, "
        "trl.experimental.orpo), present in TRL 1.16: pip install 'trl>=1.16,<1.17'. The experimental API can "
        "change or disappear between TRL releases, which is why this integration is pinned.") from e

__all__ = ["FastCPOTrainer", "FastORPOTrainer", "patch_cpo_trainer", "patch_orpo_trainer", "SUPPORTED_TRL",
           "UnsupportedTRLVersion"]


def _row_logit_means(hidden: torch.Tensor, head, upto: int) -> torch.Tensor:
    """(R, 1) mean over positions [0, upto) and the vocabulary of each row's logits, as a GEMV (no softcap)."""
    w_mean = head.weight.detach().float().mean(0)  # (H,)
    b_mean = 0.0 if head.bias is None else head.bias.detach().float().mean()
    z = (hidden[:, :upto].detach().float() @ w_mean + b_mean) / head.temperature  # (R, upto)
    return z.mean(1, keepdim=True)


class _FastPairMixin(TrainerAdapter):
    """Shared by the CPO and ORPO mixins: options table, padding-free keywords and the hidden-state forward."""

    _dpo_fast_kwargs = PADDING_FREE_KWARGS
    _dpo_fast_options = (
        ENCODER_DECODER_OPTION,
        moe_aux_option("output_router_logits=False"),  # these trainers enable it from the model config
        SOFTCAP_OPTION,
    )
    _dpo_fast_nll_full = False  # ORPO: NLL over the whole chosen sequence; CPO: over the completion tokens
    _dpo_fast_logits_upto_last = False  # ORPO logs logits[:, :-1]; CPO all positions

    def _dpo_fast_inputs(self, batch):
        pad = self.padding_value if hasattr(self, "padding_value") else self.pad_token_id  # ORPO / CPO names
        cb = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=pad,
                                      device=self.accelerator.device)
        return cb, batch["chosen_labels"].shape[0]

    # TRL hook (two-pass route): the policy's log-probs, mean logits and NLL, from hidden states
    def concatenated_forward(self, model, batch):
        cb, n_chosen = self._dpo_fast_inputs(batch)
        ids, am = cb["concatenated_input_ids"], cb["concatenated_attention_mask"]
        resp = cb["concatenated_labels"][:, 1:]  # (2B, T-1) completion tokens, shifted: hidden[t] scores t+1
        scored = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100) if self._dpo_fast_nll_full else resp
        average = self._dpo_fast_average()
        T = ids.shape[1]
        upto = T - 1 if self._dpo_fast_logits_upto_last else T

        def fn(hidden, head):
            from .. import token_logprobs

            h, w, b = head.operands(hidden)
            lp = token_logprobs(h[:, :-1], w, scored.to(h.device), bias=b, **head.engine_kwargs())  # (2B, T-1)
            return lp, _row_logit_means(hidden, head, upto)

        needed = torch.nn.functional.pad(scored != -100, (0, 1))  # (2B, T): the hidden positions fn scores from
        with self.accelerator.autocast():
            lp, logit_means = self._dpo_fast_call(model, fn, ids, attention_mask=am, needed=needed)
        logit_means = self._dpo_fast_logit_means(model, ids, am, upto, logit_means)
        m = (resp != -100).to(lp.dtype)
        logps = (lp * m).sum(-1)
        if average:
            logps = logps / m.sum(-1)
        if self._dpo_fast_nll_full or self._dpo_fast_need_nll():
            mc = (scored[:n_chosen] != -100).to(lp.dtype)
            nll = -(lp[:n_chosen] * mc).sum() / mc.sum()  # CrossEntropyLoss(mean) over the chosen rows' tokens
        else:
            nll = torch.tensor(0.0, device=lp.device)
        self._dpo_fast_record("two_pass")
        return logps[:n_chosen], logps[n_chosen:], logit_means[:n_chosen], logit_means[n_chosen:], nll

    def _dpo_fast_average(self) -> bool:
        return True

    def _dpo_fast_need_nll(self) -> bool:
        return True

    # padding-free (see the module doc)
    def _dpo_fast_logit_means(self, model, ids: torch.Tensor, am: torch.Tensor, upto: int,
                              means: torch.Tensor) -> torch.Tensor:
        """TRL's (R, 1) per-row mean logit over positions [0, upto), padding positions included.

        ``means`` comes from the training pass. Padded, it is already TRL's. Padding-free, the rows that hold
        padding among those positions get theirs from one no-grad padded forward of just those rows (the model's
        logits at padding positions exist only there), under the same autocast. Every call runs exactly one such
        forward (of row 0 when no row holds padding), so that processes whose parameters are sharded (FSDP,
        ZeRO-3) call the model the same number of times.
        """
        if not getattr(self, "dpo_fast_padding_free", False):
            return means
        rows = (am[:, :upto] == 0).any(1).nonzero().squeeze(1)
        if rows.numel() == 0:
            rows = rows.new_zeros(1)
        sub_ids, sub_am = ids[rows, :upto], am[rows, :upto]
        with torch.no_grad(), self.accelerator.autocast():
            side = call_with_hidden_states(model, lambda hidden, head: _row_logit_means(hidden, head, upto), sub_ids,
                                           attention_mask=sub_am)
        self.dpo_fast_packing.update(logits_metric_slots=sub_ids.numel())
        means = means.clone()
        means[rows.to(means.device)] = side.to(means.device, means.dtype)
        return means


class _FastCPOMixin(_FastPairMixin):
    """FastCPOTrainer's methods; mixed into a CPOTrainer (sub)class."""

    _dpo_fast_trl_class = CPOTrainer
    _dpo_fast_stock = "trl.experimental.cpo.CPOTrainer"
    _dpo_fast_loss_rejected = "two_pass"  # an option CPOLoss rejects: TRL's cpo_loss on the engine's log-probs

    def _dpo_fast_build_loss(self, temperature, softcap):
        from .. import CPOLoss
        from ..losses import CPOOptions

        return CPOLoss(options=options_from_trainer(CPOOptions, self), temperature=temperature, softcap=softcap)

    def _dpo_fast_average(self) -> bool:
        return self.loss_type in ("ipo", "simpo")

    def _dpo_fast_need_nll(self) -> bool:
        return self.cpo_alpha != 0

    # TRL hook: loss and metrics of one batch
    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        if self.dpo_fast_fallback_reasons:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        cb, n_chosen = self._dpo_fast_inputs(batch)
        ids, am = cb["concatenated_input_ids"], cb["concatenated_attention_mask"]
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = cb["concatenated_labels"][:, 1:]  # (2B, T) shifted: chosen rows, then rejected rows
        T = ids.shape[1]
        forward = dict(attention_mask=am, needed=labels != -100)  # padding-free: every scored position is real
        out, logit_means = self._dpo_fast_fused(model, ids, labels, forward=forward, autocast=True,
                                                extra=lambda hidden, head: _row_logit_means(hidden, head, T))
        logit_means = self._dpo_fast_logit_means(model, ids, am, T, logit_means)
        acc = self.accelerator
        cr, rr = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        lc, lr = out.chosen_logps.detach(), out.rejected_logps.detach()
        if self._dpo_fast_average():  # TRL logs the length-averaged log-probs for ipo / simpo
            lens = (labels != -100).sum(-1).to(lc.dtype)
            lc, lr = lc / lens[:n_chosen], lr / lens[n_chosen:]
        p = "eval_" if train_eval == "eval" else ""
        metrics = {
            f"{p}rewards/chosen": acc.gather_for_metrics(cr).mean().item(),
            f"{p}rewards/rejected": acc.gather_for_metrics(rr).mean().item(),
            f"{p}rewards/accuracies": acc.gather_for_metrics((cr > rr).float()).mean().item(),
            f"{p}rewards/margins": acc.gather_for_metrics(cr - rr).mean().item(),
            f"{p}logps/rejected": acc.gather_for_metrics(lr).mean().item(),
            f"{p}logps/chosen": acc.gather_for_metrics(lc).mean().item(),
            f"{p}logits/rejected": acc.gather_for_metrics(logit_means[n_chosen:].mean()).mean().item(),
            f"{p}logits/chosen": acc.gather_for_metrics(logit_means[:n_chosen].mean()).mean().item(),
            f"{p}nll_loss": acc.gather_for_metrics(self._dpo_fast_nll(out)).mean().item(),
        }
        return out.loss, metrics

    def _dpo_fast_nll(self, out) -> torch.Tensor:
        """TRL's nll_loss metric: the chosen token-mean NLL (0 when cpo_alpha == 0)."""
        if self.cpo_alpha == 0:
            return torch.tensor(0.0, device=out.loss.device)
        nll = out.metrics.get("nll_loss")
        if nll is None:
            raise RuntimeError("FastCPOTrainer: CPOLoss did not report nll_loss")
        return torch.tensor(float(nll), device=out.loss.device)


class _FastORPOMixin(_FastPairMixin):
    """FastORPOTrainer's methods; mixed into an ORPOTrainer (sub)class (two-pass route, see the module doc)."""

    _dpo_fast_trl_class = ORPOTrainer
    _dpo_fast_stock = "trl.experimental.orpo.ORPOTrainer"
    _dpo_fast_nll_full = True
    _dpo_fast_logits_upto_last = True


class FastCPOTrainer(_FastCPOMixin, CPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` with the loss from hidden states (fused :class:`dpo_fast.CPOLoss`).

    Same constructor as TRL's, plus two keywords of its own.

    Args:
        padding_free: run the policy's forward on the concatenated batch's real tokens packed into rows instead
            of the padded batch (default False); every logged metric is the padded path's (``logits/*`` through
            one extra no-grad padded forward of the rows that hold padding, see the module doc).
            ``trainer.dpo_fast_packing`` counts the real tokens, packed slots and rows against the padded
            batches', and ``logits_metric_slots``.
        packed_row_tokens: packed-row capacity with ``padding_free=True``: None (default: the batch's longest
            sequence), ``"one_row"`` (every sequence in one row, for flash-attention varlen) or an int (at least
            the longest sequence, else the step raises ``ValueError``).

    Raises:
        UnsupportedTRLVersion: the installed TRL is outside :data:`SUPPORTED_TRL`.
        NotImplementedError: encoder-decoder models, soft-capped heads, the MoE aux loss.
        TypeError: ``padding_free`` not a bool.
        ValueError: ``packed_row_tokens`` without ``padding_free=True`` or not None / ``"one_row"`` / an int >= 1;
            with ``padding_free=True``, an attention implementation that lets packed sequences see each other
            (probed at construction), or (at a step) a scored token after a padding position.
    """


class FastORPOTrainer(_FastORPOMixin, ORPOTrainer):
    """``trl.experimental.orpo.ORPOTrainer`` with the policy's log-probs from hidden states (no logits tensor).

    Same constructor as TRL's, plus ``padding_free`` and ``packed_row_tokens`` as :class:`FastCPOTrainer` (the
    packed forward gives the odds ratio and the whole-sequence NLL); errors as :class:`FastCPOTrainer`.
    """


def patch_cpo_trainer(trainer: CPOTrainer, *, padding_free: bool = False,
                      packed_row_tokens: int | str | None = None) -> CPOTrainer:
    """Swap an existing ``trl.experimental.cpo.CPOTrainer`` instance's class for the fast one (state kept).

    ``padding_free`` / ``packed_row_tokens``: as :class:`FastCPOTrainer` (same errors). Returns the same trainer.
    """
    return patch_instance(trainer, _FastCPOMixin, padding_free=padding_free, packed_row_tokens=packed_row_tokens)


def patch_orpo_trainer(trainer: ORPOTrainer, *, padding_free: bool = False,
                       packed_row_tokens: int | str | None = None) -> ORPOTrainer:
    """Swap an existing ``trl.experimental.orpo.ORPOTrainer`` instance's class for the fast one (state kept).

    ``padding_free`` / ``packed_row_tokens``: as :class:`FastCPOTrainer` (same errors). Returns the same trainer.
    """
    return patch_instance(trainer, _FastORPOMixin, padding_free=padding_free, packed_row_tokens=packed_row_tokens)
