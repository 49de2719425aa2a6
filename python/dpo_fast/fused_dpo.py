"""``DPOLoss``, ``CPOLoss`` (CPO / SimPO / AlphaPO), ``ORPOLoss``: from last hidden states to a pairwise
preference loss in one pass over the logits (the pass itself: :class:`dpo_fast._fused.FusedLogitsPass`).

Why one pass is enough. Every pairwise loss except aot decomposes per pair: once a pair's two sequence
sums ℓ_w, ℓ_l are known, dL/dℓ_w and dL/dℓ_l are scalars (:func:`dpo_fast.losses.pair_loss_and_grads`),
and every scored token t of a sequence gets the same upstream gradient g_t = dL/dℓ (times its LD-DPO
weight). So for a *group of whole pairs* whose logits fit the workspace:

    z = h W^T (+b)          GEMM 1   (n x V tile, kept)
    logp, lse = rows(z)     Triton/torch row pass: per-token log-probs, then the pair sums
    g = dL/dℓ per token     (P_g,) scalars from the loss formula
    dz = g (onehot - softmax(z)) in place on the tile
    dh = dz W               GEMM 2      dW += dz^T h   GEMM 3

Three GEMM-equivalents over scored tokens instead of the generic engine's four (the backward need not
recompute z). The gradients are produced in forward and merely scaled by grad_output in backward.
Memory: the group tile (bounded by ``workspace_bytes``) plus the gradients themselves. If one pair's
logits do not fit, for aot / aot_unpaired (which couple the batch through a sort), or when no gradient is
needed, the module falls back to the generic two-pass engine + :func:`dpo_fast.dpo_loss` through autograd.
Both routes give the same numbers (tests prove it). CPO and ORPO are a mean over pairs plus a chosen-token
NLL with a batch-constant denominator: per-pair decomposable too, with dL/dℓ from autograd on (P,) vectors.
"""

from __future__ import annotations

import torch

from . import losses as L
from ._fused import FusedLossModule, grads_at
from ._validate import autocast_aware, check_engine_inputs, check_tensor
from .engine import (Scored, acc_dtype, forward_tokens, get_workspace_bytes, make_rows, prepare, scored_logprobs,
                     segment_sum)


def _seq_sums(sc: Scored, logp: torch.Tensor, tokw: torch.Tensor | None) -> torch.Tensor:
    """(S,) per-sequence sums of the scored log-probs (N,), LD-DPO token weights applied when given."""
    return segment_sum(logp if tokw is None else logp * tokw, sc.seq, sc.num_seqs)


def _pair_group_grad(P: int, dtype, device, tokw, grad_fn, wpo: bool, aux: dict):
    """``group_grad`` for :class:`FusedLogitsPass` over groups of whole pairs.

    Per group: the pair sums (LD-DPO token weights applied), WPO log-weights from the same pass, then
    ``grad_fn(pair_ids, lw, ll, wpo)`` -> (dL/dlw, dL/dll), spread to the tokens. Fills ``aux`` with the
    (P,) ``chosen`` / ``rejected`` sums and, with WPO, ``wpo_c`` / ``wpo_r``.
    """
    for k in ("chosen", "rejected") + (("wpo_c", "wpo_r") if wpo else ()):
        aux[k] = torch.zeros(P, dtype=dtype, device=device)

    def group_grad(g, res):
        tok, local, pair_ids = g["tok"], g["local"], g["units"]
        logp, lse = res.logp.to(dtype), res.lse
        Pg = pair_ids.numel()
        w_t = None if tokw is None else tokw.index_select(0, tok)
        sums = segment_sum(logp if w_t is None else logp * w_t, local, 2 * Pg)  # (2Pg,): [c0, r0, c1, ...]
        lw, ll = sums[0::2], sums[1::2]
        aux["chosen"][pair_ids], aux["rejected"][pair_ids] = lw, ll
        wpo_g = None
        if wpo:  # WPO log-weights of the group's pairs, from this same pass (lse(2z) included)
            m = _wpo_means(logp, lse, res.stats.lse2, local, 2 * Pg)
            aux["wpo_c"][pair_ids], aux["wpo_r"][pair_ids] = m[0::2], m[1::2]
            wpo_g = (m[0::2], m[1::2])
        d_c, d_r = grad_fn(pair_ids, lw, ll, wpo_g)
        d_seq = torch.stack([d_c, d_r], dim=1).reshape(-1).to(dtype)  # (2Pg,)
        g_tok = d_seq.index_select(0, local)
        return g_tok if w_t is None else g_tok * w_t

    return group_grad


class DPOLoss(FusedLossModule):
    r"""DPO-family loss straight from last hidden states and the lm_head weight, logits never materialised.

    Args:
        beta: β > 0.
        loss_type: a :data:`dpo_fast.LOSS_TYPES` name or a list of them (with ``loss_weights``).
        label_smoothing, loss_weights, f_divergence_type, f_alpha_divergence_coef, discopop_tau: as in
            :func:`dpo_fast.dpo_loss`.
        use_weighting: WPO weights, from the same logits pass (the row pass also computes lse(2z)).
        ld_alpha: LD-DPO: tokens past min(|y_w|, |y_l|) of a pair count with weight α in ℓ (policy, and
            reference when it is computed here from ``ref_hidden``).
        ignore_index, temperature, softcap, backend: as in :func:`dpo_fast.sequence_logprobs`.
        fused: use the one-pass route when possible (default True); False always runs the two-pass route.
        workspace_bytes: bytes the fused pass may hold for one group of whole pairs' logits (default: 8 x
            the engine workspace, :func:`dpo_fast.get_workspace_bytes` — 768 MiB on CUDA, 256 MiB on CPU with
            the defaults; one pair of two 1536-token completions at V = 128256 in bf16 takes 752 MiB). When a
            single pair's logits exceed it, the two-pass route is used.
        compute_metrics: fill ``DPOOutput.metrics`` (TRL names; one host sync).
        token_metrics: also log TRL's ``entropy`` (mean softmax entropy over all scored tokens) and
            ``mean_token_accuracy`` (fraction of scored *chosen* tokens whose label is the arg-max), and take
            ``logits/*`` from the actual (capped) logits, all computed in the same logits pass. The sums
            behind them are kept in ``last_token_sums`` (0-d tensors) for cross-process aggregation.

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
        :class:`dpo_fast.DPOOutput` — ``loss`` is differentiable w.r.t. hidden, weight, bias. On the fused
        route the per-pair tensors (losses, logps, rewards) are detached values.

    Examples::

        >>> loss_fn = dpo_fast.DPOLoss(beta=0.1)
        >>> out = loss_fn(hidden, model.lm_head.weight, labels, ref_chosen, ref_rejected)
        >>> out.loss.backward()
    """

    def __init__(self, beta: float = 0.1, loss_type="sigmoid", *, label_smoothing: float = 0.0,
                 loss_weights=None, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 discopop_tau: float = 0.05, use_weighting: bool = False, ld_alpha: float | None = None,
                 ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                 backend: str = "auto", fused: bool = True, workspace_bytes: int | None = None,
                 compute_metrics: bool = True, token_metrics: bool = False):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics)
        # validate loss options now, so a bad config fails at construction and not mid-training
        L.make_pairwise_config(beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                               label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
                               f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
                               use_weighting=use_weighting)
        _check_ld_alpha(ld_alpha)
        self.beta, self.loss_type = beta, loss_type
        self.loss_options = dict(label_smoothing=label_smoothing, loss_weights=loss_weights,
                                 f_divergence_type=f_divergence_type,
                                 f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau)
        self.use_weighting, self.ld_alpha = bool(use_weighting), ld_alpha
        self.token_metrics = bool(token_metrics)
        #: with token_metrics: entropy_sum, tokens, chosen_hits, chosen_tokens, chosen_logits_sum,
        #: rejected_logits_sum, rejected_tokens of the last forward (0-d tensors, for distributed gathering)
        self.last_token_sums: dict[str, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, fused={self.fused}"

    # ------------------------------------------------------------------------------------------------------
    @torch.compiler.disable  # data-dependent grouping: run eagerly inside compiled graphs
    @autocast_aware("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")
    def forward(self, hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, *, bias=None,
                cu_seqlens=None, pairs=None, ref_hidden=None, ref_weight=None, ref_bias=None) -> L.DPOOutput:
        sc, rows = self._prepare(hidden, weight, labels, bias, cu_seqlens)
        dev = sc.idx.device
        c_seq, r_seq = _pair_layout(pairs, sc.num_seqs, dev)
        P = c_seq.numel()
        counts = sc.counts()  # (S,) float32
        len_w, len_l = counts[c_seq], counts[r_seq]
        tokw = _ld_token_weights(sc, counts, c_seq, r_seq, self.ld_alpha) if self.ld_alpha is not None else None

        # reference log-probs: given, computed here with the no-grad forward, or none
        if ref_hidden is not None:
            if ref_chosen_logps is not None or ref_rejected_logps is not None:
                raise ValueError("ref_hidden: pass either ref_hidden or ref_chosen/rejected_logps, not both")
            ref_chosen_logps, ref_rejected_logps = self._reference(sc, hidden, labels, cu_seqlens, ref_hidden,
                                                                   ref_weight, ref_bias, weight, bias, tokw, c_seq,
                                                                   r_seq)
        elif (ref_chosen_logps is None) != (ref_rejected_logps is None):
            raise ValueError("ref_chosen_logps, ref_rejected_logps: pass both or neither (reference-free)")
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if t is not None:
                check_tensor(name, t, dims=(1,), floating=True)
                if t.shape[0] != P:
                    raise ValueError(f"{name}: expected shape ({P},) (one per pair), got {tuple(t.shape)}")

        logit_c, logit_r = _logits_means(sc, weight, bias, counts, c_seq, r_seq, self.temperature) \
            if self.compute_metrics and not self.token_metrics else (None, None)  # else from the pass, or unused
        common = dict(beta=self.beta, loss_type=self.loss_type, **self.loss_options, chosen_lengths=len_w,
                      rejected_lengths=len_l, use_weighting=self.use_weighting, chosen_logits_mean=logit_c,
                      rejected_logits_mean=logit_r, compute_metrics=self.compute_metrics)
        groups = self._plan(sc, rows, weight, torch.stack([c_seq, r_seq], 1), counts, (hidden, weight, bias),
                            decomposable=L.is_pair_decomposable(self.loss_type))
        want_stats = self.token_metrics or self.use_weighting

        if groups is None:  # two-pass route: generic engine + autograd through dpo_loss
            stats = {} if want_stats else None
            logp = scored_logprobs(sc, weight, bias, temperature=self.temperature, softcap=self.softcap,
                                   backend=self.backend, stats_out=stats)
            if self.use_weighting:  # from the same forward pass: lse(2z) came with the stats
                wpo = _wpo_means(logp.detach(), stats["lse"], stats["lse2"], sc.seq, sc.num_seqs)
                common["chosen_wpo_logweights"], common["rejected_wpo_logweights"] = wpo[c_seq], wpo[r_seq]
            seq = _seq_sums(sc, logp, tokw)
            out = L.dpo_loss(seq[c_seq], seq[r_seq], ref_chosen_logps, ref_rejected_logps, **common)
        else:
            ref_c = None if ref_chosen_logps is None else ref_chosen_logps.detach()
            ref_r = None if ref_rejected_logps is None else ref_rejected_logps.detach()
            n_chosen_tokens = len_w.clamp_min(1.0).sum()  # dpo_loss counts |y| = 0 as 1

            def grad_fn(pair_ids, lw, ll, wpo_g):
                return L.pair_loss_and_grads(
                    lw, ll, None if ref_c is None else ref_c[pair_ids], None if ref_r is None else ref_r[pair_ids],
                    num_pairs=P, num_chosen_tokens=n_chosen_tokens, beta=self.beta, loss_type=self.loss_type,
                    **self.loss_options, chosen_lengths=len_w[pair_ids], rejected_lengths=len_l[pair_ids],
                    use_weighting=self.use_weighting,
                    chosen_wpo_logweights=None if wpo_g is None else wpo_g[0],
                    rejected_wpo_logweights=None if wpo_g is None else wpo_g[1])[1:]

            stats = {}
            group_grad = _pair_group_grad(P, acc_dtype(sc.hidden2.dtype), dev, tokw, grad_fn, self.use_weighting,
                                          stats)
            carrier = self._fused_pass(sc, weight, bias, groups, rows, group_grad, want_stats, stats)
            if self.use_weighting:
                common["chosen_wpo_logweights"], common["rejected_wpo_logweights"] = stats["wpo_c"], stats["wpo_r"]
            with torch.no_grad():
                out = L.dpo_loss(stats["chosen"], stats["rejected"], ref_c, ref_r, **common)
            out = self._with_gradient(out, carrier)
        self.last_token_sums = _add_token_metrics(out, stats if self.token_metrics else None, sc, c_seq, r_seq,
                                                  self.compute_metrics)
        return out

    def _reference(self, sc, hidden, labels, cu_seqlens, ref_hidden, ref_weight, ref_bias, weight, bias, tokw,
                   c_seq, r_seq):
        """(P,) reference chosen / rejected log-probs of the same scored tokens: the no-grad forward."""
        check_tensor("ref_hidden", ref_hidden, dims=(2, 3), floating=True)
        if ref_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"ref_hidden: expected shape {tuple(hidden.shape[:-1])} + (H,) (hidden's leading "
                             f"dims), got {tuple(ref_hidden.shape)}")
        rw = weight if ref_weight is None else ref_weight
        rb = (bias if ref_weight is None else None) if ref_bias is None else ref_bias
        check_engine_inputs(ref_hidden, rw, labels, rb, cu_seqlens, self.ignore_index, self.temperature,
                            self.softcap)
        rows = make_rows(self.backend, ref_hidden.device, ref_hidden.dtype, self.temperature, self.softcap)
        with torch.no_grad():
            logp = forward_tokens(ref_hidden.reshape(-1, ref_hidden.shape[-1]), rw.detach(),
                                  None if rb is None else rb.detach(), sc.idx, sc.labels, rows,
                                  get_workspace_bytes(ref_hidden.device)).logp
            seq = _seq_sums(sc, logp, tokw)
        return seq[c_seq], seq[r_seq]


# ----------------------------------------------------------------------------------------------------------
# helpers


def _add_token_metrics(out, stats, sc: Scored, c_seq, r_seq, compute_metrics: bool):
    """TRL's token metrics from the per-token stats of the logits pass; returns the sums behind them.

    entropy = mean over all scored tokens of the paired sequences; mean_token_accuracy = fraction of scored
    chosen tokens whose label is the arg-max; logits/chosen|rejected = mean over scored tokens of the
    vocab-mean (tempered, capped) logit. One host sync for the metrics dict.
    """
    if stats is None:
        return None
    role = torch.zeros(sc.num_seqs, dtype=torch.int8, device=sc.seq.device)  # 0 unpaired, 1 chosen, 2 rejected
    role[c_seq], role[r_seq] = 1, 2
    r = role[sc.seq]  # (N,)
    is_c, is_r = (r == 1).to(stats["hit"].dtype), (r == 2).to(stats["hit"].dtype)
    sums = {
        "entropy_sum": (stats["entropy"] * (is_c + is_r)).sum(), "tokens": (is_c + is_r).sum(),
        "chosen_hits": (stats["hit"] * is_c).sum(), "chosen_tokens": is_c.sum(),
        "chosen_logits_sum": (stats["zmean"] * is_c).sum(), "rejected_logits_sum": (stats["zmean"] * is_r).sum(),
        "rejected_tokens": is_r.sum(),
    }
    if compute_metrics:
        v = dict(zip(sums, torch.stack(list(sums.values())).tolist()))
        out.metrics["entropy"] = v["entropy_sum"] / max(v["tokens"], 1.0)
        out.metrics["mean_token_accuracy"] = v["chosen_hits"] / max(v["chosen_tokens"], 1.0)
        out.metrics["logits/chosen"] = v["chosen_logits_sum"] / max(v["chosen_tokens"], 1.0)
        out.metrics["logits/rejected"] = v["rejected_logits_sum"] / max(v["rejected_tokens"], 1.0)
    return sums


def _check_ld_alpha(ld_alpha) -> None:
    if ld_alpha is not None and not (isinstance(ld_alpha, (int, float)) and 0.0 <= ld_alpha <= 1.0):
        raise ValueError(f"ld_alpha: expected None or a float in [0, 1], got {ld_alpha!r}")


def _pair_layout(pairs, S: int, device):
    """(chosen_seq (P,), rejected_seq (P,)) int64 sequence indices."""
    if pairs is None:
        if S % 2:
            raise ValueError(
                f"hidden: the default pair layout needs an even number of sequences [chosen..., rejected...], "
                f"got {S}; pass pairs=(P, 2) for another layout")
        P = S // 2
        ar = torch.arange(P, device=device)
        return ar, ar + P
    check_tensor("pairs", pairs, dims=(2,), floating=False)
    if pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise ValueError(f"pairs: expected shape (P, 2) with P >= 1 of (chosen, rejected) sequence indices, "
                         f"got {tuple(pairs.shape)}")
    p = pairs.to(device=device, dtype=torch.int64)
    if bool(((p < 0) | (p >= S)).any()):
        raise ValueError(f"pairs: expected sequence indices in [0, {S}), got values outside")
    flat = p.reshape(-1)
    if torch.unique(flat).numel() != flat.numel():
        raise ValueError("pairs: expected each sequence in at most one pair (a sequence index repeats)")
    return p[:, 0].contiguous(), p[:, 1].contiguous()


def _ld_token_weights(sc: Scored, counts, c_seq, r_seq, alpha: float) -> torch.Tensor:
    """(N,) LD-DPO token weights: 1 for a sequence's first min(|y_w|, |y_l|) scored tokens, α after."""
    S = sc.num_seqs
    shared = torch.full((S,), float("inf"), device=counts.device)
    m = torch.minimum(counts[c_seq], counts[r_seq])
    shared[c_seq], shared[r_seq] = m, m
    start = torch.cumsum(counts, 0) - counts  # (S,) first scored token of each sequence
    rank = torch.arange(sc.idx.numel(), device=counts.device, dtype=torch.float32) - start[sc.seq]
    w = torch.where(rank < shared[sc.seq], 1.0, float(alpha))
    return w.to(acc_dtype(sc.hidden2.dtype))


def _logits_means(sc: Scored, weight, bias, counts, c_seq, r_seq, temperature):
    """(P,) mean over each sequence's scored tokens of the vocab-mean logit h·mean_v(W_v) + mean(b).

    No logits needed: mean_v z_tv = h_t · mean_v(W_v) + mean(b) (divided by the temperature). Softcap is
    not applied (it does not commute with the mean); TRL logs the raw logits too.
    """
    with torch.no_grad():
        wbar = weight.detach().float().mean(0).to(weight.dtype)  # (H,)
        m = torch.mv(sc.hidden2.detach(), wbar).index_select(0, sc.idx).float()  # (N,): a GEMV, no copy of h
        if bias is not None:
            m = m + bias.detach().float().mean()
        m = m / temperature
        per_seq = segment_sum(m, sc.seq, sc.num_seqs)
        per_seq = per_seq / counts.clamp_min(1.0)
    return per_seq[c_seq], per_seq[r_seq]


def _wpo_means(logp, lse, lse2, seq, num_seqs):
    """(num_seqs,) WPO log-weights: per sequence, mean_t[log p_t - (lse(2z_t) - 2 lse(z_t))] (no grad).

    logp, lse, lse2, seq: (n,) per scored token; seq: the token's sequence index in [0, num_seqs).
    """
    v = (logp.detach() - (lse2 - 2 * lse)).to(lse.dtype)
    sums = segment_sum(v, seq, num_seqs)
    cnt = torch.bincount(seq, minlength=num_seqs)[:num_seqs].to(v.dtype)
    return sums / cnt.clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------
# the reference-free family: CPO / SimPO / AlphaPO and ORPO through the same fused pass


class _ReferenceFreePairLoss(FusedLossModule):
    """Shared forward of the fused reference-free pairwise losses (subclasses define ``_loss``).

    dL/dℓ for a group comes from autograd of ``_loss`` with the other pairs at placeholders ℓ = −|y| (see
    :func:`dpo_fast._fused.grads_at`): exact, since these losses decompose per pair given P and Σ|y_w|.
    """

    def __init__(self, *, ignore_index, temperature, softcap, backend, fused, workspace_bytes, compute_metrics,
                 token_metrics):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics)
        self.token_metrics = bool(token_metrics)
        self.last_token_sums: dict[str, torch.Tensor] | None = None

    def _loss(self, lw, ll, len_w, len_l, logit_c, logit_r, compute_metrics) -> L.DPOOutput:
        raise NotImplementedError

    def _validate_options(self) -> None:
        # run the loss once on a tiny batch: a bad option raises now, not at the first training step
        one = torch.tensor([-2.0])
        self._loss(one, one - 1, torch.tensor([2.0]), torch.tensor([3.0]), None, None, False)

    @torch.compiler.disable  # data-dependent grouping: run eagerly inside compiled graphs
    @autocast_aware("hidden", "weight", "bias")
    def forward(self, hidden, weight, labels, *, bias=None, cu_seqlens=None, pairs=None) -> L.DPOOutput:
        """Same layouts as :meth:`DPOLoss.forward` (no reference model). Returns a :class:`DPOOutput`."""
        sc, rows = self._prepare(hidden, weight, labels, bias, cu_seqlens)
        dev = sc.idx.device
        c_seq, r_seq = _pair_layout(pairs, sc.num_seqs, dev)
        P = c_seq.numel()
        counts = sc.counts()
        len_w, len_l = counts[c_seq], counts[r_seq]
        logit_c, logit_r = _logits_means(sc, weight, bias, counts, c_seq, r_seq, self.temperature) \
            if self.compute_metrics and not self.token_metrics else (None, None)
        groups = self._plan(sc, rows, weight, torch.stack([c_seq, r_seq], 1), counts, (hidden, weight, bias))
        if groups is None:  # two-pass route: generic engine + autograd through the loss
            stats = {} if self.token_metrics else None
            logp = scored_logprobs(sc, weight, bias, temperature=self.temperature, softcap=self.softcap,
                                   backend=self.backend, stats_out=stats)
            seq = _seq_sums(sc, logp, None)
            out = self._loss(seq[c_seq], seq[r_seq], len_w, len_l, logit_c, logit_r, self.compute_metrics)
        else:
            acc = acc_dtype(sc.hidden2.dtype)
            base = -torch.stack([len_w, len_l], 1).clamp_min(1.0).to(acc)  # (P, 2) placeholders: mean logp -1

            def grad_fn(pair_ids, lw, ll, wpo_g):
                g = grads_at(lambda x: self._loss(x[:, 0], x[:, 1], len_w, len_l, None, None, False).loss,
                             base, pair_ids, torch.stack([lw, ll], 1))
                return g[:, 0], g[:, 1]

            stats = {}
            group_grad = _pair_group_grad(P, acc, dev, None, grad_fn, False, stats)
            carrier = self._fused_pass(sc, weight, bias, groups, rows, group_grad, self.token_metrics, stats)
            with torch.no_grad():
                out = self._loss(stats["chosen"], stats["rejected"], len_w, len_l, logit_c, logit_r,
                                 self.compute_metrics)
            out = self._with_gradient(out, carrier)
        self.last_token_sums = _add_token_metrics(out, stats if self.token_metrics else None, sc, c_seq, r_seq,
                                                  self.compute_metrics)
        return out


class CPOLoss(_ReferenceFreePairLoss):
    r"""CPO / SimPO / AlphaPO straight from hidden states: :func:`dpo_fast.cpo_loss`, logits never materialised.

    The loss is a mean over pairs plus ``cpo_alpha`` x the chosen token-mean NLL: it decomposes per pair, so
    the same one-pass fused route as :class:`DPOLoss` applies (3 GEMMs over scored tokens).

    Args:
        beta, loss_type (``sigmoid`` | ``hinge`` | ``ipo`` | ``simpo``), label_smoothing, simpo_gamma, cpo_alpha,
            alpha: as in :func:`dpo_fast.cpo_loss` (SimPO proper: ``loss_type="simpo", cpo_alpha=0``).
        ignore_index, temperature, softcap, backend, fused, workspace_bytes, compute_metrics, token_metrics:
            as in :class:`DPOLoss`.

    Forward:
        ``(hidden, weight, labels, *, bias=None, cu_seqlens=None, pairs=None)`` with :class:`DPOLoss`'s layouts;
        sequence lengths (for the length-averaged ``simpo``/``ipo`` and the NLL) are the scored-token counts.

    Examples::

        >>> out = dpo_fast.CPOLoss(beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0)(h, W, labels)
        >>> out.loss.backward()
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", *, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, cpo_alpha: float = 1.0, alpha: float = 0.0, ignore_index: int = -100,
                 temperature: float = 1.0, softcap: float | None = None, backend: str = "auto", fused: bool = True,
                 workspace_bytes: int | None = None, compute_metrics: bool = True, token_metrics: bool = False):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics,
                         token_metrics=token_metrics)
        self.options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                            simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, alpha=alpha)
        self._validate_options()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + f", fused={self.fused}"

    def _loss(self, lw, ll, len_w, len_l, logit_c, logit_r, compute_metrics):
        return L.cpo_loss(lw, ll, **self.options, chosen_lengths=len_w, rejected_lengths=len_l,
                          chosen_logits_mean=logit_c, rejected_logits_mean=logit_r, compute_metrics=compute_metrics)


class ORPOLoss(_ReferenceFreePairLoss):
    r"""ORPO straight from hidden states: :func:`dpo_fast.orpo_loss`, logits never materialised.

    ``NLL(chosen) − β · mean log σ(log odds)`` decomposes per pair (the NLL is a token mean over the batch, a
    constant denominator), so the one-pass fused route of :class:`DPOLoss` applies.

    Args:
        beta: β > 0 (ORPO's λ).
        ignore_index, temperature, softcap, backend, fused, workspace_bytes, compute_metrics, token_metrics:
            as in :class:`DPOLoss`.

    Examples::

        >>> out = dpo_fast.ORPOLoss(beta=0.1)(h, W, labels)
        >>> out.loss.backward()
    """

    def __init__(self, beta: float = 0.1, *, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", fused: bool = True,
                 workspace_bytes: int | None = None, compute_metrics: bool = True, token_metrics: bool = False):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics,
                         token_metrics=token_metrics)
        self.beta = beta
        self._validate_options()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, fused={self.fused}"

    def _loss(self, lw, ll, len_w, len_l, logit_c, logit_r, compute_metrics):
        return L.orpo_loss(lw, ll, chosen_lengths=len_w, rejected_lengths=len_l, beta=self.beta,
                           chosen_logits_mean=logit_c, rejected_logits_mean=logit_r, compute_metrics=compute_metrics)


@torch.compiler.disable
@autocast_aware("hidden", "weight", "bias")
def pair_logprobs(hidden, weight, labels, *, bias=None, cu_seqlens=None, pairs=None, ld_alpha=None,
                  ignore_index=-100, temperature=1.0, softcap=None, backend="auto"):
    r"""(chosen, rejected) sequence log-probs of preference pairs, as :class:`DPOLoss` sums them.

    The same layouts as :meth:`DPOLoss.forward`, and the same LD-DPO weighting (``ld_alpha``), so reference
    log-probs computed here match the policy's summation bit for bit — use it to precompute reference
    log-probs for :class:`DPOLoss`. Differentiable (through :func:`dpo_fast.sequence_logprobs`'s engine).

    Returns:
        ``(chosen, rejected)``: two (P,) float32 tensors.
    """
    _check_ld_alpha(ld_alpha)
    sc = prepare(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ignore_index=ignore_index,
                 temperature=temperature, softcap=softcap)
    c_seq, r_seq = _pair_layout(pairs, sc.num_seqs, sc.idx.device)
    logp = scored_logprobs(sc, weight, bias, temperature=temperature, softcap=softcap, backend=backend)
    tokw = None if ld_alpha is None else _ld_token_weights(sc, sc.counts(), c_seq, r_seq, ld_alpha)
    seq = _seq_sums(sc, logp, tokw)
    return seq[c_seq], seq[r_seq]
