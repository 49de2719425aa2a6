"""``DPOLoss`` and ``pair_logprobs``: the pairwise DPO family from last hidden states, on the fused route.

Every pairwise loss except aot / aot_unpaired decomposes per pair: once a pair's two sequence sums ℓ_w, ℓ_l
are known, dL/dℓ_w and dL/dℓ_l are scalars, and every scored token of a sequence gets g_t = dL/dℓ (times its
LD-DPO weight). So the pair is the unit of :mod:`dpo_fast.fused.logits_pass` and the loss on a group of pairs is
:func:`dpo_fast.dpo_loss` on their sums, summed and divided by the batch's P (batch constants: P, Σ|y_w|
for the "sft" term; the reference log-probs and lengths are per pair). aot / aot_unpaired sort over the
batch and take the two-pass route.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..distributed import distributed_head
from ..distributed.sequence_parallel import reduce_sums, seq_scored
from .. import losses as L
from ..losses import DPOOptions
from ..engine.autocast import autocast_aware
from ..engine.checks import check_engine_inputs, check_tensor
from ..engine import Head, Scored, as_head, prepare, scored_logprobs, segment_sum
from .pairs import (add_pair_token_metrics, check_ld_alpha, ld_token_weights, logits_means, pair_layout,
                    pair_units_host, wpo_logweights)
from .module import FusedLossModule, autocast_entry, compilable_forward
from .plan import Values
from .records import with_route

Tensor = torch.Tensor


@dataclass
class DPOTask:
    """One DPOLoss forward as a :class:`dpo_fast.fused.plan.UnitTask` (units = pairs, batch constants)."""

    units: Tensor  # (P, 2) (chosen, rejected) sequence ids
    decomposable: bool
    want_stats: bool
    options: DPOOptions  # validated once, at the module's construction
    len_w: Tensor  # (P,) scored tokens of each chosen / rejected sequence
    len_l: Tensor
    ref_c: Tensor | None  # (P,) detached reference log-probs, or None (reference-free)
    ref_r: Tensor | None
    token_weights: Tensor | None  # (N,) LD-DPO weights, or None
    sft: bool  # "sft" in the loss list: its NLL uses the unweighted chosen sums (TRL)
    n_chosen_tokens: Tensor  # () Σ max(|y_w|, 1) over the batch (dpo_loss counts |y| = 0 as 1), float64
    logits_mean: tuple[Tensor, Tensor] | None  # (P,) each, for the logits/* metrics
    units_host: Tensor | None = None  # host copy of units, when known without a copy (the route's plan)

    def _loss(self, v: Values, reduction: str, compute_metrics: bool, logits_mean=(None, None)):
        ids = v.units
        sums = v.unit_sums(token_weights=self.token_weights)  # (G, 2)
        kw = {}
        if self.options.use_weighting:
            wpo = wpo_logweights(v)
            kw.update(chosen_wpo_logweights=wpo[:, 0], rejected_wpo_logweights=wpo[:, 1])
        if self.sft:  # TRL: the sft term is the token-mean NLL of the *unweighted* chosen log-probs
            plain = sums if self.token_weights is None else v.unit_sums()
            if reduction == "sum":  # a group: each pair's share of the batch NLL, with the batch's P and Σ|y_w|
                kw["sft_nll"] = -plain[:, 0] * (self.len_w.shape[0] / self.n_chosen_tokens.to(plain.dtype))
            elif self.token_weights is not None:  # the whole batch: dpo_loss derives the same shares
                kw["sft_chosen_logps"] = plain[:, 0]
        ref_c = None if self.ref_c is None else self.ref_c[ids]
        ref_r = None if self.ref_r is None else self.ref_r[ids]
        return L.dpo_loss(sums[:, 0], sums[:, 1], ref_c, ref_r, options=self.options,
                          chosen_lengths=self.len_w[ids],
                          rejected_lengths=self.len_l[ids], chosen_logits_mean=logits_mean[0],
                          rejected_logits_mean=logits_mean[1],
                          reduction=reduction, compute_metrics=compute_metrics,
                          check_lengths=False, **kw)  # lengths are scored-token counts: no sync to check them

    def group_loss(self, v: Values) -> Tensor:
        return self._loss(v, "sum", False).loss / self.len_w.shape[0]

    def batch_loss(self, v: Values, compute_metrics: bool):
        return self._loss(v, "mean", compute_metrics, self.logits_mean or (None, None))


@L.document_options(DPOOptions)
class DPOLoss(FusedLossModule):
    r"""DPO-family loss straight from last hidden states and the lm_head weight, logits never materialised.

    Args:
        {OPTIONS}
        ld_alpha: LD-DPO: tokens past min(|y_w|, |y_l|) of a pair count with weight α in ℓ (policy, and
            reference when it is computed here from ``ref_hidden``). The "sft" term of a loss list uses the
            *unweighted* chosen log-probs, as TRL does.
        ignore_index, temperature, softcap, backend: as in :func:`dpo_fast.sequence_logprobs`; validated
            here, at construction.
        fused: use the one-pass route when possible (default True); False always runs the two-pass route.
        workspace_bytes: bytes the fused pass may hold for one group of whole pairs' logits (default: 8 x
            the engine workspace, :func:`dpo_fast.get_workspace_bytes` — 768 MiB on CUDA, 256 MiB on CPU with
            the defaults; one pair of two 1536-token completions at V = 128256 in bf16 takes 752 MiB). When a
            single pair's logits exceed it, the two-pass route is used.
        compute_metrics: fill ``metrics`` (TRL names; one host sync).
        token_metrics: also log TRL's ``entropy`` (mean softmax entropy over all scored tokens) and
            ``mean_token_accuracy`` (fraction of scored *chosen* tokens whose label is the arg-max), and take
            ``logits/*`` from the actual (capped) logits, all from the same logits pass; the sums behind
            them are in ``out.token_sums``.

    Forward:
        hidden: (2P, T, H) padded in TRL's layout [chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}],
            or packed (N, H) with ``cu_seqlens`` (S+1,) and ``pairs`` (P, 2) of (chosen, rejected)
            sequence indices (each sequence in at most one pair).
        weight: (V, H); labels: (2P, T) or (N,), already shifted, ``ignore_index`` on prompt/padding.
        ref_chosen_logps, ref_rejected_logps: (P,) precomputed reference log-probs; or pass
            ``ref_hidden`` (hidden's leading dims; its last dim matching ``ref_weight``) with optional
            ``ref_weight``/``ref_bias`` (default: the policy head) to compute them here with the no-grad
            forward (1 GEMM). Neither = reference-free.
        bias: optional (V,) lm_head bias.

    Returns:
        :class:`dpo_fast.fused.FusedDPOOutput` — a :class:`dpo_fast.DPOOutput` whose ``loss`` is
        differentiable w.r.t. hidden, weight, bias, plus ``route`` ("fused" | "two_pass") and ``token_sums``
        (with ``token_metrics``: entropy_sum, tokens, chosen_/rejected_tokens, _hits, _logits_sum, 0-d
        tensors). On the fused route the per-pair tensors (losses, logps, rewards) are detached values.

    NaN or inf in one pair's hidden states stays in that pair: the other pairs' ``losses`` and hidden-state
    gradients are unaffected (on both routes); ``loss`` (the mean) and the shared dW / db are not.

    Examples::

        >>> loss_fn = dpo_fast.DPOLoss(beta=0.1)
        >>> out = loss_fn(hidden, model.lm_head.weight, labels, ref_chosen, ref_rejected)
        >>> out.loss.backward()
    """

    op_record = ("pairs", ("losses", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"))

    @L.takes_options(DPOOptions, positional=("beta", "loss_type"))
    def __init__(self, *, options: DPOOptions | None = None, ld_alpha: float | None = None,
                 ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                 backend: str = "auto", fused: bool = True, workspace_bytes: int | None = None,
                 compute_metrics: bool = True, token_metrics: bool = False):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics,
                         token_metrics=token_metrics)
        #: the loss options, validated once (by takes_options, before this body): a bad config fails here
        self.options = options
        self.config = options.config()
        check_ld_alpha(ld_alpha)
        self.ld_alpha = ld_alpha

    def extra_repr(self) -> str:
        lt = self.options.loss_type
        return f"beta={self.options.beta}, loss_type={lt if isinstance(lt, str) else list(lt)!r}, fused={self.fused}"

    @compilable_forward  # under torch.compile: the dpo_fast::fused_loss custom op
    @autocast_entry("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")
    def forward(self, hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, *, bias=None,
                cu_seqlens=None, pairs=None, ref_hidden=None, ref_weight=None, ref_bias=None):
        p = self.prepare(hidden, weight, labels, bias, cu_seqlens)
        sc = p.sc
        c_seq, r_seq = pair_layout(pairs, sc.num_seqs, sc.idx.device)
        P = c_seq.numel()
        counts = sc.counts()  # (S,) float32
        tokw = None if self.ld_alpha is None else ld_token_weights(sc, counts, c_seq, r_seq, self.ld_alpha)

        # reference log-probs: given, computed here with the no-grad forward, or none
        if ref_hidden is not None:
            if ref_chosen_logps is not None or ref_rejected_logps is not None:
                raise ValueError("ref_hidden: pass either ref_hidden or ref_chosen/rejected_logps, not both")
            ref_chosen_logps, ref_rejected_logps = self._reference(sc, hidden, labels, cu_seqlens, ref_hidden,
                                                                   ref_weight, ref_bias, p.head, tokw,
                                                                   c_seq, r_seq)
        elif (ref_chosen_logps is None) != (ref_rejected_logps is None):
            raise ValueError("ref_chosen_logps, ref_rejected_logps: pass both or neither (reference-free)")
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if t is not None:
                check_tensor(name, t, dims=(1,), floating=True)
                if t.shape[0] != P:
                    raise ValueError(f"{name}: expected shape ({P},) (one per pair), got {tuple(t.shape)}")

        # logits/* without token_metrics: one GEMV (with token_metrics they come from the pass itself)
        lm = logits_means(sc, p.head, counts, c_seq, r_seq, self.temperature) \
            if self.compute_metrics and not self.token_metrics else None
        len_w, len_l = counts[c_seq], counts[r_seq]
        task = DPOTask(
            units=torch.stack([c_seq, r_seq], 1), decomposable=self.config.decomposable,
            want_stats=self.token_metrics or self.options.use_weighting, options=self.options, len_w=len_w, len_l=len_l,
            ref_c=None if ref_chosen_logps is None else ref_chosen_logps.detach(),
            ref_r=None if ref_rejected_logps is None else ref_rejected_logps.detach(),
            token_weights=tokw, sft="sft" in self.config.types,
            n_chosen_tokens=len_w.clamp_min(1.0).sum().double(), logits_mean=lm,
            units_host=pair_units_host(pairs, sc.num_seqs))
        out, route, values = self.run(p, task, hidden)
        sums = add_pair_token_metrics(out, values, self.compute_metrics) if self.token_metrics else None
        return with_route(out, route, sums)

    def _reference(self, sc: Scored, hidden, labels, cu_seqlens, ref_hidden, ref_weight, ref_bias, head: Head,
                   tokw, c_seq, r_seq):
        """(P,) reference chosen / rejected log-probs of the same scored tokens: the no-grad forward."""
        check_tensor("ref_hidden", ref_hidden, dims=(2, 3), floating=True)
        if ref_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"ref_hidden: expected shape {tuple(hidden.shape[:-1])} + (H,) (hidden's leading "
                             f"dims), got {tuple(ref_hidden.shape)}")
        if ref_weight is None:  # the policy head (its bias unless ref_bias is given)
            ref = head if ref_bias is None else dataclasses.replace(head, bias=ref_bias)
        else:
            ref = as_head(ref_weight, ref_bias)
        check_engine_inputs(ref_hidden, ref.weight, labels, ref.bias, cu_seqlens, self.ignore_index,
                            self.temperature, self.softcap, cu_values=False)  # prepare() validated cu_seqlens
        seq = self.reference_sums(ref_hidden, ref, sc, tokw)
        return seq[c_seq], seq[r_seq]


@torch.compiler.disable
@distributed_head()  # DTensor / ZeRO-3 / vocabulary-parallel heads (dpo_fast.distributed)
@autocast_aware("hidden", "weight", "bias")
def pair_logprobs(hidden, weight, labels, *, bias=None, cu_seqlens=None, pairs=None, ld_alpha=None,
                  ignore_index=-100, temperature=1.0, softcap=None, backend="auto") -> tuple[Tensor, Tensor]:
    r"""(chosen, rejected) sequence log-probs of preference pairs, as :class:`DPOLoss` sums them.

    The same layouts as :meth:`DPOLoss.forward`, and the same LD-DPO weighting (``ld_alpha``), so reference
    log-probs computed here match the policy's summation bit for bit — use it to precompute reference
    log-probs for :class:`DPOLoss`. Differentiable (through :func:`dpo_fast.sequence_logprobs`'s engine).

    Returns:
        ``(chosen, rejected)``: two (P,) float32 tensors.
    """
    check_ld_alpha(ld_alpha)
    head = as_head(weight, bias)  # resolved by distributed_head, or the plain (weight, bias)
    sc = prepare(hidden, head, labels, cu_seqlens=cu_seqlens, ignore_index=ignore_index, temperature=temperature,
                 softcap=softcap)
    if head.seq is not None:  # hidden sharded over tokens: global counts (LD-DPO) and sums (dpo_fast.distributed)
        sc = seq_scored(sc, head.seq)
    c_seq, r_seq = pair_layout(pairs, sc.num_seqs, sc.idx.device)
    logp = scored_logprobs(sc, head, temperature=temperature, softcap=softcap, backend=backend)
    tokw = None if ld_alpha is None else ld_token_weights(sc, sc.counts(), c_seq, r_seq, ld_alpha)
    seq = reduce_sums(head.seq, segment_sum(logp if tokw is None else logp * tokw, sc.seq, sc.num_seqs))
    return seq[c_seq], seq[r_seq]
