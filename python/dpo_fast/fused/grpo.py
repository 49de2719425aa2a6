"""``GRPOLoss``: every TRL 1.16 GRPO loss type straight from hidden states, on the fused route where possible.

The per-token loss of :func:`dpo_fast.grpo_loss` (:func:`dpo_fast.losses.grpo_token_terms`) depends on the
token's own log-prob (token-level ratio) or its sequence's (``importance_sampling_level="sequence"``), plus
detached per-token or per-sequence inputs (old, reference and sampler log-probs, advantages, the sampler IS
ratio, the off-policy mask). Every aggregation is linear in the per-token losses, loss = Σ_{s,t} c_{s,t} l_{s,t},
with coefficients fixed by the mask and the batch constants (sequence count, token count, max_completion_length,
num_items_in_batch): they are taken once per forward, by one autograd call of the loss type's registry
``aggregate`` on the whole mask. So the unit is one sequence and the group loss is Σ c l over the group's
sequences, l from ``grpo_token_terms`` on the group's rows only.

Which options are fused (one pass, 3 GEMMs) and why:

- fused: loss types grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo (each registry entry is ``local``);
  token- and sequence-level ratios; ``delta``; β > 0 with or without ``use_bias_correction_kl``;
  ``off_policy_mask_threshold`` (a per-sequence mask from detached log-probs); the sampler IS correction
  (``vllm_importance_sampling_mode`` from ``sampling_logps``, or a given ``importance_sampling_ratio``: detached
  per-token / per-sequence factors).
- two-pass route (``out.route == "two_pass"``): ``top_entropy_quantile < 1`` — the entropy threshold is a
  quantile over *every* completion token of the batch, unknown until the whole pass has run, so no group's
  gradient can be formed during it; the engine's pass gives the entropies (no extra GEMM), then autograd.
- fused too: ``entropy_coef != 0`` (TRL's entropy bonus, − coef · mean entropy over the completion tokens; the
  coefficient may change per step: ``forward(..., entropy_coef=)``, TRL's adaptive controller). Its mean's
  denominator is a batch constant, so each token's dL/dz depends only on its own (log-prob, entropy): the group
  loss gives the pair (dL/dlog p, dL/dH) per token and the row pass forms
  dz = g (onehot − p) − g_H p (zc − lse + H) · dzc/dz from the tile (the engine's entropy backward). With
  ``top_entropy_quantile < 1`` the bonus runs on the two-pass route with differentiable entropies.

Token layout: the per-token inputs (``old_logps``, ``ref_logps``, ``sampling_logps``, per-token advantages or
IS ratios) are shaped like ``labels`` — (B, T) padded or (N,) packed with ``cu_seqlens`` — and only their
scored positions are read. Internally every sequence is a row of an (S, C) matrix whose column is the token's
position in its row (padded: C = T; packed: C = the longest sequence), which is what ``grpo_loss`` sees;
``per_token_loss`` and ``token_logps`` come back shaped like ``labels``. ``max_completion_length`` (dr_grpo)
defaults to C.

Hidden states sharded over tokens (sequence / context parallelism: :func:`dpo_fast.distributed.sequence_parallel`
or a DTensor ``Shard`` on the token dim; padded rows or packed sequences crossing shard boundaries with the
global ``cu_seqlens``). Per-token inputs are this rank's shard like ``labels``; per-sequence ones (``(S,)``
advantages, an ``(S, 1)`` IS ratio), ``num_items_in_batch`` and ``entropy_coef`` are replicated. Every per-token
term is computed where its token lives; whatever :func:`dpo_fast.grpo_loss` sums over a row or the batch is
summed over the group by ``SeqStats`` (:mod:`dpo_fast.distributed.sequence_parallel`) — one all-gather of a stacked
float64 vector, reduced locally in rank order (bit-identical on every rank; sums, extremes, and a bitwise check
of the replicated inputs in the same collective):

- gather 1, only when a per-token term needs a per-sequence sum first (``importance_sampling_level="sequence"``,
  VESPO's φ, ``off_policy_mask_threshold``, a sequence-level ``vllm_importance_sampling_mode``): the replicated
  inputs' check (2S + 5 values), the scored counts (S; packed: + S lengths) and those sums (S each: Σ log-ratio,
  VESPO's Σ clamped log-ratios and IS log-ratios, the off-policy KL, the sampler log-ratio);
- gather 2 (the only one otherwise, then also carrying gather 1's check and counts): Σ_t l_{s,t} (S), with a
  sequence-level ratio its derivative in log w_s (S), the entropy sum (1), the metrics' per-sequence sums
  (S per clip statistic; KL 1), the sampler metrics' sums and extremes (6), the token sums (5, token_metrics).

So one collective per forward with token-level ratios, two with a sequence statistic, none in backward: every
rank computes the same loss from the gathered sums (the aggregation reads the mask only through Σ_t m and Σ m),
and the gathers' identity backward gives each rank its own tokens' gradient. With a sequence-level ratio ρ_s a
token's loss depends on every token of its sequence through log w_s: each rank's ∂(Σ_t l)/∂log w_s is taken by
autograd in forward and summed in gather 2 with Σ_t l, and the loss carries it as Q_s + D_s (log w_s − sg(log w_s)),
so the backward of log w_s reaches every rank's tokens without a collective. Such calls take the two-pass route
(the gathered sums are needed before any dz); ``top_entropy_quantile < 1`` is refused there (its threshold is a
quantile over every token of the batch, not a sum); ``token_metrics`` works (its sums ride in gather 2).
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import losses as L
from ..distributed.sequence_parallel import DistributedHeadError, SeqShard, SeqStats, local_input
from ..losses import GRPOOptions
from ..losses import grpo_terms as G
from ..losses import registry as R
from ..losses.grpo_terms import MetricParts, TokenTermInputs
from ..losses.inputs import compute_dtype
from ..losses.outputs import GRPOOutput, sync_metrics
from ..engine.checks import as_cu_seqlens
from ..engine import acc_dtype
from ..losses.policy_gradient import entropy_bonus, vllm_importance_sampling
from .metrics import token_metrics, token_sums
from .module import FusedLossModule, autocast_entry, compilable_forward
from .plan import Values
from .records import with_route

Tensor = torch.Tensor

SLOTS = ("completion",)
#: the value a per-token input holds at unscored cells of the (S, C) matrices (default 0: read at scored cells only)
NEUTRAL_FILL = {"importance_sampling_ratio": 1.0}


@dataclass
class GRPOTask:
    """One GRPOLoss forward as a :class:`dpo_fast.fused.plan.UnitTask`: units = sequences."""

    units: Tensor  # (S, 1)
    options: L.GRPOOptions  # validated, max_completion_length filled in
    row: Tensor  # (N,) row (sequence) of each scored token
    col: Tensor  # (N,) column of each scored token in its row
    num_cols: int  # C
    per_token: dict  # name -> (N,) detached values at the scored tokens (old, ref, sampling, advantages, ...)
    per_seq: dict  # name -> (S,) or (S, 1) detached per-sequence values (advantages, importance_sampling_ratio)
    coef: Tensor | None  # (S, C) aggregation coefficients c_{s,t} (None on sequence-sharded input: not used)
    num_items_in_batch: object
    want_stats: bool = False
    decomposable: bool = True
    units_host: Tensor | None = None  # host copy of units (the route's plan)
    entropy_grad: bool = False  # entropy_coef != 0: the loss is differentiated through the entropies too
    ent_denom: Tensor | None = None  # the batch's completion-token count: the entropy bonus's mean (fused route)
    # hidden states sharded over tokens (sequence parallelism): batch_loss reduces over seq.group itself
    seq: SeqShard | None = None
    packed: bool = False
    local_lengths: Tensor | None = None  # (S,) this rank's tokens of each packed sequence (clamped cu_seqlens)
    global_cols: int | None = None  # the single-process C when known here (padded rows: the global T)
    want_token_sums: bool = False  # token_metrics: the token sums ride in the gather
    sp_token_sums: dict | None = None  # out: the token sums over the group (token_metrics)
    #: the sequence-parallel route reduces this task's token sums itself (dpo_fast.distributed.check_task)
    reduces_token_sums: ClassVar[bool] = True

    def matrices(self, v: Values, rows: Tensor, ids: Tensor) -> dict:
        """grpo_loss's (R, C) inputs for the tokens of ``v`` at rows ``rows`` (n,) of units ``ids`` (R,)."""
        cols = self.col.index_select(0, v.tok)
        shape = (ids.numel(), self.num_cols)
        dev, dt = v.logp.device, v.logp.dtype

        def place(x, fill=0.0):
            return torch.full(shape, fill, dtype=dt, device=dev).index_put((rows, cols), x.to(dt))

        # unscored cells (prompt, padding, the (S, C) matrix's tail) hold each input's neutral value: a per-token
        # IS ratio is 1 there, as in TRL's own ratio exp(0 * mask) -- VESPO sums log(ratio) over every cell of a
        # row, so a 0 there would add log(1e-8) per cell; the other inputs are read at scored cells only
        kw = {name: place(x.index_select(0, v.tok), NEUTRAL_FILL.get(name, 0.0))
              for name, x in self.per_token.items()}
        kw.update({name: x[ids] for name, x in self.per_seq.items()})
        kw["mask"] = torch.zeros(shape, dtype=torch.bool, device=dev).index_put(
            (rows, cols), torch.ones_like(rows, dtype=torch.bool))
        kw["logps"] = place(v.logp)
        if v.stats is not None:
            kw["entropies"] = place(v.stats.entropy)
        return kw

    def group_loss(self, v: Values) -> Tensor:
        ids = v.units  # (G,) sequence ids
        kw = self.matrices(v, v.seg, ids)
        # the quantile mask (top_entropy_quantile < 1) runs two-pass: here the entropies feed the bonus only
        ent = kw.get("entropies")
        if self.options.entropy_coef == 0.0:
            kw.pop("entropies", None)
        mask = kw.pop("mask")
        terms = L.grpo_token_terms(kw.pop("logps"), kw.pop("advantages"), mask, options=self.options, **kw)
        loss = (terms.per_token_loss * self.coef[ids]).sum()
        if self.options.entropy_coef != 0.0:  # the group's share of - coef * (batch mean entropy)
            loss = loss - entropy_bonus(ent, mask.to(ent.dtype), self.options.entropy_coef, self.ent_denom)
        return loss

    def batch_loss(self, v: Values, compute_metrics: bool):
        if self.seq is not None:
            return self._seq_parallel_loss(v, compute_metrics)
        kw = self.matrices(v, self.row, v.units)
        return L.grpo_loss(kw.pop("logps"), kw.pop("advantages"), kw.pop("mask"), **kw, options=self.options,
                           num_items_in_batch=self.num_items_in_batch, compute_metrics=compute_metrics)

    # -- hidden states sharded over tokens -----------------------------------------------------------------
    def _replicated(self, st: SeqStats, compute_metrics: bool) -> None:
        """The inputs every rank must hold identically, as ``same`` columns of the first gather. Their layout
        does not depend on the values checked (a per-token input reads as NaN here), so a rank that differs is
        told so instead of meeting a collective of another size."""
        S = self.units.shape[0]
        st.add("per-token advantages / importance_sampling_ratio",
               [float(n in self.per_token) for n in ("advantages", "importance_sampling_ratio")], "same",
               hint="read as per-token inputs on some ranks and as per-sequence ones on others (a packed shard of "
                    "exactly S tokens reads a (S,) tensor as per-token); pass them shaped like labels on every rank")
        for name in ("advantages", "importance_sampling_ratio"):  # (S,) / (S, 1) per-sequence values
            x = self.per_seq.get(name)
            st.add(name, torch.full((S,), torch.nan, dtype=torch.float64) if x is None else x.reshape(-1), "same")
        n = self.num_items_in_batch
        st.add("num_items_in_batch", torch.nan if n is None else n.detach() if isinstance(n, Tensor) else float(n),
               "same")
        o = self.options
        st.add("entropy_coef", float(o.entropy_coef), "same")
        config = repr((sorted(o.as_kwargs().items()), compute_metrics, self.want_token_sums))
        st.add("GRPOLoss options", float(zlib.crc32(config.encode())), "same",
               hint="construct the loss module with the same options (compute_metrics, token_metrics too) on every "
                    "rank")

    def _seq_parallel_loss(self, v: Values, compute_metrics: bool):
        """:func:`dpo_fast.grpo_loss` of the whole batch from this rank's tokens (``v``): the same per-token
        maths, with every per-sequence and batch sum taken over the sequence group in one or two all-gathers
        (``SeqStats``); see the module docstring."""
        o, seq = self.options, self.seq
        entry = o.entry
        kw = self.matrices(v, self.row, v.units)  # this rank's (S, C_r) rows
        lp, A, mask = kw.pop("logps"), kw.pop("advantages"), kw.pop("mask")
        ent = kw.pop("entropies", None)
        old_in, ref_in, samp_in, isr = (kw.pop(k, None) for k in
                                        ("old_logps", "ref_logps", "sampling_logps", "importance_sampling_ratio"))
        S, C = lp.shape
        dt = compute_dtype(lp, old_in, ref_in, A, ent)
        lp, m = lp.to(dt), mask.to(dt)
        on = m > 0
        old = lp.detach() if old_in is None else old_in.detach().to(dt)
        samp = None if samp_in is None else samp_in.detach().to(dt)
        isr = None if isr is None else isr.detach().to(dt)
        A = A.detach().to(dt)
        A = A.unsqueeze(-1) if A.dim() == 1 else A
        lp_on = torch.where(on, lp, 0.0)
        log_ratio = torch.where(on, lp - old, 0.0)
        mode = o.vllm_importance_sampling_mode
        lo, hi = o.vllm_importance_sampling_clip_min, o.vllm_importance_sampling_clip_max
        seq_is = o.importance_sampling_level == R.SEQUENCE_IS_LEVEL
        seq_mode = mode in R.VLLM_IS_SEQUENCE_MODES
        vespo = entry.term is G.term_vespo  # its φ reads the sequence's summed log-ratios (and IS log-ratios)
        tok_ratio = None if mode is None or seq_mode else vllm_importance_sampling(old, samp, m, mode, lo, hi)[0]

        # gather 1: the replicated inputs' check, counts, lengths, and the per-sequence sums the per-token terms
        # need first (sequence-level ratio, VESPO's weight, the off-policy mask, a sequence-level sampler ratio)
        st = SeqStats()
        self._replicated(st, compute_metrics)
        st.add("count", m.sum(-1))
        if self.packed:
            st.add("length", self.local_lengths)
        if seq_mode:
            st.add("sampling log-ratio", torch.nan_to_num((old - samp) * m, nan=0.0).sum(-1))
        if seq_is:
            st.add("log-ratio", log_ratio.sum(-1))  # differentiable (GSPO's gradient reaches every token)
        if o.off_policy_mask_threshold is not None:
            ref_s = old if samp is None else samp
            st.add("off-policy KL", torch.nan_to_num(torch.where(on, ref_s - lp.detach(), 0.0), nan=0.0).sum(-1))
        tok_isr = tok_ratio if tok_ratio is not None else (isr if isr is not None and isr.shape[-1] == C else None)
        if vespo:
            with torch.no_grad():
                lr = log_ratio.clamp(-G.VESPO_LOG_RATIO_CLAMP, G.VESPO_LOG_RATIO_CLAMP) * m
                if tok_isr is not None:  # the scored cells here; the unscored ones of the (S, C) rows below
                    lr = lr + torch.where(on, torch.log(tok_isr).clamp(G.VESPO_LOG_W_MIN, G.VESPO_LOG_RATIO_CLAMP), 0.0)
                st.add("VESPO log-weight", lr.sum(-1))
        first = seq_is or seq_mode or vespo or o.off_policy_mask_threshold is not None
        g1, host = st.reduce(seq, read=("length",) if self.packed else ()) if first else ({}, {})
        if first:
            st = SeqStats()

        # the per-token terms of this rank's tokens (global per-sequence values where grpo_token_terms sums rows)
        count = g1["count"].to(dt) if first else None
        log_w = (g1["log-ratio"].to(dt) / count.clamp_min(1.0)).unsqueeze(-1) if seq_is else log_ratio
        # GSPO: a token's loss reaches every token of its sequence through ρ_s. dQ_s/dlog w_s is summed over the
        # group in gather 2 with Q_s itself, so the backward needs no collective (see the module docstring)
        want_d = seq_is and log_w.requires_grad
        lw = log_w.detach().requires_grad_(True) if want_d else log_w
        coef = torch.exp(lw)
        if mode is not None:
            is_ratio = tok_ratio if not seq_mode else vllm_importance_sampling(
                g1["sampling log-ratio"].to(dt)[:, None], lp.new_zeros(S, 1), lp.new_ones(S, 1), mode, lo, hi)[0]
        else:
            is_ratio = isr
        kl = None
        if o.beta != 0.0:
            d = torch.where(on, ref_in.detach().to(dt) - lp, 0.0)
            kl = torch.exp(d) - d - 1.0
            if o.use_bias_correction_kl:
                kl = kl * coef
        x = TokenTermInputs(coef, A, lp_on, log_ratio, m, is_ratio, o)
        if vespo:
            gw = g1["VESPO log-weight"].to(dt)
            if is_ratio is not None and is_ratio.shape[-1] == 1:  # per-sequence IS ratio: one cell per row
                gw = gw + torch.log(is_ratio[:, 0]).clamp(G.VESPO_LOG_W_MIN, G.VESPO_LOG_RATIO_CLAMP)
            elif tok_ratio is not None:  # the sampler ratio at the unscored cells of the single-process rows
                r1 = vllm_importance_sampling(*(lp.new_zeros(1, 1),) * 3, mode, lo, hi)[0][0, 0]
                cols = int(max(host["length"], default=0)) if self.packed else self.global_cols
                gw = gw + (cols - count) * torch.log(r1).clamp(G.VESPO_LOG_W_MIN, G.VESPO_LOG_RATIO_CLAMP)
            # φ from the global row sum: vespo_phi clamps the one-cell row's sum as it would the whole row's
            term = entry.term(dataclasses.replace(x, log_ratio=gw[:, None], mask=torch.ones_like(gw[:, None]),
                                                  is_ratio=None))
        else:
            term = entry.term(x)
        per_token = term.loss
        if o.off_policy_mask_threshold is not None:
            avg = (g1["off-policy KL"].to(dt) / count.clamp_min(1.0)).unsqueeze(-1)
            per_token = per_token * ((A >= 0) | (avg <= o.off_policy_mask_threshold)).to(dt)
        if is_ratio is not None and not entry.folds_is_ratio:
            per_token = per_token * is_ratio
        if kl is not None:
            per_token = per_token + o.beta * kl
        per_token = torch.where(on, torch.broadcast_to(per_token, (S, C)) * m, 0.0)
        q = per_token.sum(-1)  # (S,) this rank's share of each sequence's Σ_t l_t

        # gather 2 (the only one when nothing above needed gather 1): the loss's per-sequence sums, their
        # derivative in log w_s (GSPO), the entropy sum, and the metrics' per-sequence sums and extremes
        st.add("loss", q)
        if seq_is:  # (zeros under no_grad: the columns do not depend on the grad mode)
            dq = torch.autograd.grad(q.sum(), lw, retain_graph=True, allow_unused=True)[0] if want_d else None
            st.add("dloss/dlogw", torch.zeros(S, dtype=dt, device=q.device) if dq is None else dq.reshape(-1))
        # the entropy sum (differentiable: the bonus); 0 without entropies (the per-step coefficient is checked)
        st.add("entropy", lp.new_zeros(()) if ent is None else (torch.where(on, ent.to(dt), 0.0) * m).sum())
        parts, cols_of = {}, {}
        if compute_metrics:
            with torch.no_grad():
                if o.beta != 0.0:
                    st.add("kl", (kl * m).sum())
                parts = entry.metrics.parts(term, x)
                for name, part in parts.items():  # per-sequence sums of each statistic (shared values once; a
                    if id(part.values) not in cols_of:  # per-sequence statistic's are not read, but sent alike)
                        cols_of[id(part.values)] = f"metric {name}"
                        st.add(cols_of[id(part.values)], (part.values * m).sum(-1))
                if mode is not None:
                    dd = (old - samp).abs()
                    ok = on & ~torch.isnan(dd)
                    st.add("d sum", torch.where(ok, dd, 0.0).sum())
                    st.add("d count", ok.sum())
                    st.add("d max", torch.where(ok, dd, -torch.inf).amax(), "max")
                    if not seq_mode:
                        st.add("ratio sum", torch.where(on, tok_ratio, 0.0).sum())
                        st.add("ratio min", torch.where(on, tok_ratio, torch.inf).amin(), "min")
                        st.add("ratio max", torch.where(on, tok_ratio, -torch.inf).amax(), "max")
        sums_local = token_sums(v, SLOTS) if self.want_token_sums else {}
        for k, t in sums_local.items():
            st.add("token " + k, t.detach())
        g2, host2 = st.reduce(seq, read=("length",) if self.packed and not first else ())
        g = {**g1, **g2}
        host = host if first else host2
        count = g["count"].to(dt)
        total = count.sum()
        if self.want_token_sums:
            self.sp_token_sums = {k: g["token " + k].to(t.dtype) for k, t in sums_local.items()}

        # the aggregation on the global per-sequence sums: the registry's aggregate reads the (S, C) mask only
        # through Σ_t m and Σ m, so an (S, 1) "mask" holding the counts gives the same loss
        Q = g["loss"].to(dt)
        if want_d:
            lws = log_w.squeeze(-1)
            Q = Q + g["dloss/dlogw"].to(dt) * (lws - lws.detach())  # value Q; d/dlog w_s the group's dQ_s/dlog w_s
        n_items = total.clamp_min(1.0)
        if entry.token_normalised and self.num_items_in_batch is not None:
            n_items = self.num_items_in_batch
            if not isinstance(n_items, Tensor) and not (float(n_items) > 0):
                raise ValueError(f"num_items_in_batch must be > 0, got {self.num_items_in_batch!r}")
        if o.max_completion_length is None:  # packed: the longest sequence over the group
            o = dataclasses.replace(o, max_completion_length=int(max(host["length"], default=0)))
        loss = entry.aggregate(Q[:, None], count[:, None], o, n_items)
        policy_loss = loss
        if o.entropy_coef != 0.0:
            e = g["entropy"].to(dt).reshape(1)
            loss = loss - entropy_bonus(e, torch.ones_like(e), o.entropy_coef, total)

        metrics: dict[str, float] = {}
        if compute_metrics:
            with torch.no_grad():
                vals: dict[str, Tensor] = {}
                denom = total.clamp_min(1.0)
                if kl is not None:
                    vals["kl"] = g["kl"].to(dt) / denom
                if ent is not None:
                    vals["entropy"] = g["entropy"].to(dt) / denom
                for name, part in parts.items():
                    if part.values.shape[-1] == 1:  # per sequence: already the global values on every rank
                        vals[name] = part.local(m)
                        continue
                    sums = g[cols_of[id(part.values)]].to(dt)
                    vals[name] = sums.sum() / denom if part.reduce == "mean" else \
                        MetricParts((sums / count)[:, None], part.reduce).local(m)
                if o.entropy_coef != 0.0:
                    vals["policy_loss"] = policy_loss
                if mode is not None:
                    zero = torch.zeros((), dtype=torch.float64, device=total.device)
                    dn = g["d count"]
                    vals["sampling/sampling_logp_difference/mean"] = torch.where(dn > 0, g["d sum"] / dn.clamp_min(1),
                                                                                 zero)
                    vals["sampling/sampling_logp_difference/max"] = torch.where(dn > 0, g["d max"], zero)
                    if seq_mode:
                        flat = is_ratio.flatten()
                        ext = (flat.min(), flat.mean(), flat.max()) if flat.numel() else (zero,) * 3
                    else:
                        ext = tuple(torch.where(total > 0, t, zero) for t in
                                    (g["ratio min"], g["ratio sum"] / denom, g["ratio max"]))
                    for k, t in zip(("min", "mean", "max"), ext):
                        vals[f"sampling/importance_sampling_ratio/{k}"] = t
                metrics = sync_metrics(list(vals), list(vals.values()))
        return GRPOOutput(loss, per_token, metrics)


def aggregation_coefficients(options: L.GRPOOptions, mask: Tensor, num_items, dtype: torch.dtype) -> Tensor:
    """(S, C) c with loss = Σ c ⊙ per_token_loss, from one autograd call of the registry's (linear) aggregate."""
    entry = options.entry
    # autograd must run here even when the caller is in torch.inference_mode() / no_grad (a loss value only):
    # leave inference mode and work on normal (non-inference) copies of the inputs
    with torch.inference_mode(False), torch.enable_grad():
        m = mask.to(dtype).clone()  # the loss's compute dtype (float64 for float64 inputs)
        if isinstance(num_items, Tensor):
            num_items = num_items.detach().clone()
        n_items = num_items if (entry.token_normalised and num_items is not None) else m.sum().clamp_min(1.0)
        x = torch.zeros_like(m, requires_grad=True)
        (c,) = torch.autograd.grad(entry.aggregate(x, m, options, n_items), x)
    return c.detach()


@L.document_options(GRPOOptions)
class GRPOLoss(FusedLossModule):
    r"""Every TRL 1.16 GRPO loss (GRPO / BNPO / Dr. GRPO / DAPO / CISPO / SAPO / LUSPO / VESPO, GSPO's
    sequence-level ratio) from last hidden states and the lm_head weight; see :func:`dpo_fast.grpo_loss`.

    Args:
        {OPTIONS}
            The options are validated at construction; the module docstring says which are fused
            (``entropy_coef`` is: the entropies are differentiated in the same pass).
        ignore_index, temperature, softcap, backend: as in :func:`dpo_fast.sequence_logprobs` (use the
            sampling temperature here, as TRL does); validated at construction.
        fused: use the one-pass route when possible (default True).
        workspace_bytes: bytes for one group of whole sequences' logits (default 8 x the engine workspace);
            a sequence that does not fit alone sends the batch to the two-pass route.
        compute_metrics: fill ``metrics`` (TRL's names: ``kl``, the loss type's clip statistics, ``sampling/*``;
            one host sync).
        token_metrics: also log ``entropy`` (mean over completion tokens), from the same pass.

    Forward:
        hidden: (B, T, H) last hidden states of prompt + sampled completion, or packed (N, H) with
        ``cu_seqlens`` (S+1,) (a tensor, list or numpy array of ints); weight: (V, H); labels: (B, T) / (N,)
        shifted completion tokens,
        ``ignore_index`` elsewhere (they define the mask); advantages: (S,) one per sequence, or per token
        shaped like ``labels``; old_logps, ref_logps, sampling_logps: optional per-token log-probs shaped like
        ``labels`` (``ref_logps`` required when beta != 0, ``sampling_logps`` with
        ``vllm_importance_sampling_mode``); importance_sampling_ratio: optional (S, 1) or shaped like
        ``labels``; bias: optional (V,); num_items_in_batch: for dapo / cispo / vespo; entropy_coef: this
        step's entropy-bonus coefficient (a float; default the constructor's option), e.g. TRL's adaptive one.
        Per-token inputs are
        read at scored positions only (a per-token IS ratio counts as 1 elsewhere, as TRL's own ratio is).
        Sequence-sharded hidden states (:func:`dpo_fast.distributed.sequence_parallel`): per-token inputs are
        this rank's shard like ``labels``, per-sequence ones and the scalars the same on every rank (checked);
        the loss and metrics are the whole batch's on every rank (module docstring: one or two all-gathers).
        Under ``torch.no_grad()`` / ``torch.inference_mode()`` the loss and metrics are computed (no
        backward); a double backward (``create_graph=True``) raises a RuntimeError.

    Returns:
        :class:`dpo_fast.fused.FusedGRPOOutput`: ``loss`` differentiable w.r.t. hidden, weight and bias;
        ``per_token_loss`` and ``token_logps`` shaped like ``labels`` (detached on the fused route);
        ``route`` ("fused" | "two_pass"); ``token_sums`` with ``token_metrics``.

    Examples::

        >>> out = dpo_fast.GRPOLoss(loss_type="dapo", epsilon_high=0.28)(hidden, W, labels, advantages)
        >>> out.loss.backward()
    """

    op_record = ("tokens", ("per_token_loss", "token_logps"))

    @L.takes_options(GRPOOptions, positional=("beta", "epsilon_low", "epsilon_high"))
    def __init__(self, *, options: GRPOOptions | None = None, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", fused: bool = True,
                 workspace_bytes: int | None = None, compute_metrics: bool = True, token_metrics: bool = False):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics,
                         token_metrics=token_metrics)
        #: the loss options, validated once (by takes_options, before this body)
        self.options = options

    def extra_repr(self) -> str:
        defaults = GRPOOptions().as_kwargs()
        shown = {k: v for k, v in self.options.as_kwargs().items() if v != defaults[k] or k == "loss_type"}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items()) + f", fused={self.fused}"

    @compilable_forward  # under torch.compile: the dpo_fast::fused_loss custom op
    @autocast_entry("hidden", "weight", "bias")
    def forward(self, hidden, weight, labels, advantages, old_logps=None, ref_logps=None, *, bias=None,
                cu_seqlens=None, num_items_in_batch=None, sampling_logps=None, importance_sampling_ratio=None,
                entropy_coef=None):
        # a list / numpy array of boundaries becomes a tensor once, here; prepare() validates it
        cu_seqlens = as_cu_seqlens(cu_seqlens, hidden.device if isinstance(hidden, Tensor) else None)
        p = self.prepare(hidden, weight, labels, bias, cu_seqlens)
        sc = p.sc
        S, dev = sc.num_seqs, sc.idx.device
        seq = p.head.seq  # hidden states sharded over tokens (dpo_fast.distributed.sequence_parallel), or None
        o = self.options
        if seq is not None:
            if o.top_entropy_quantile < 1.0:
                raise DistributedHeadError(
                    "top_entropy_quantile < 1: its entropy threshold is a quantile over every completion token of "
                    "the batch, which per-sequence sums over the group cannot give; not supported on "
                    "sequence-sharded hidden states")
            # DTensor inputs -> this rank's tensors (sharded over tokens like hidden, or replicated)
            advantages, old_logps, ref_logps, sampling_logps, importance_sampling_ratio = (
                local_input(t, n, seq) for t, n in ((advantages, "advantages"), (old_logps, "old_logps"),
                                                    (ref_logps, "ref_logps"), (sampling_logps, "sampling_logps"),
                                                    (importance_sampling_ratio, "importance_sampling_ratio")))
        shape = tuple(labels.shape)
        like = "like labels" if seq is None else "like labels (this rank's token shard)"
        if not isinstance(advantages, Tensor) or tuple(advantages.shape) not in ((S,), shape):
            raise ValueError(f"advantages: expected shape ({S},) (one per sequence) or {shape} (per token, {like}), "
                             f"got {tuple(getattr(advantages, 'shape', ()))}")
        for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps)):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
                raise ValueError(f"{name}: expected shape {shape} {like}, got {tuple(getattr(t, 'shape', ()))}")
        isr = importance_sampling_ratio
        if isr is not None and (not isinstance(isr, Tensor) or tuple(isr.shape) not in ((S, 1), shape)):
            raise ValueError(f"importance_sampling_ratio: expected shape ({S}, 1) or {shape} {like}, got "
                             f"{tuple(getattr(isr, 'shape', ()))}")
        lengths = None
        if cu_seqlens is None:
            T = labels.shape[1]
            col = sc.idx - sc.seq * T
            T_full = T if seq is None else seq.total_len  # the single-process row length
        else:
            cu = cu_seqlens.to(device=dev, dtype=torch.int64)
            col = sc.idx - cu[sc.seq]
            cuh = sc.cu_host if sc.cu_host is not None else cu.cpu()  # prepare's readback brought it: no sync
            lengths = cuh[1:] - cuh[:-1]
            T = int(lengths.max()) if lengths.numel() else 0
            T_full = T if seq is None else None  # sequence-parallel: the longest sequence over the group, later
        if seq is not None:
            T = max(T, 2)  # this rank's rows; never one column (an (S, 1) row reads as per-sequence)
        if o.max_completion_length is None and T_full is not None:
            o = dataclasses.replace(o, max_completion_length=T_full)
        if entropy_coef is not None and float(entropy_coef) != o.entropy_coef:  # this step's (adaptive) value
            o = dataclasses.replace(o, entropy_coef=entropy_coef)  # validated again: finite

        def at_scored(t):
            return t.detach().reshape(-1).index_select(0, sc.idx)

        per_token = {name: at_scored(t) for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps),
                                                         ("sampling_logps", sampling_logps)) if t is not None}
        per_seq = {}
        for name, t in (("advantages", advantages), ("importance_sampling_ratio", isr)):
            if t is None:
                continue
            if tuple(t.shape) == shape and (t.dim() > 1 or cu_seqlens is not None):  # per token
                per_token[name] = at_scored(t)
            else:
                per_seq[name] = t.detach().to(dev)
        quantile = o.top_entropy_quantile < 1.0
        bonus = o.entropy_coef != 0.0
        acc = acc_dtype(sc.hidden2.dtype)
        coef = ent_denom = None
        if seq is None:  # the aggregation's coefficients and the bonus's mean from the whole batch's mask
            mask = torch.zeros(S, T, dtype=torch.bool, device=dev).index_put(
                (sc.seq, col), torch.ones_like(col, dtype=torch.bool))
            coef = aggregation_coefficients(o, mask, num_items_in_batch, acc)
            ent_denom = mask.sum().to(acc) if bonus else None
        task = GRPOTask(units=torch.arange(S, device=dev)[:, None], options=o, row=sc.seq, col=col, num_cols=T,
                        per_token=per_token, per_seq=per_seq, coef=coef,
                        num_items_in_batch=num_items_in_batch, want_stats=self.token_metrics or quantile or bonus,
                        decomposable=o.entry.local and not quantile, units_host=torch.arange(S)[:, None],
                        entropy_grad=bonus, ent_denom=ent_denom, seq=seq, packed=cu_seqlens is not None,
                        local_lengths=None if seq is None or lengths is None else lengths.to(dev, torch.float64),
                        global_cols=T_full, want_token_sums=seq is not None and self.token_metrics)
        out, route, values = self.run(p, task, hidden)
        # back to the labels' layout: (S, C) rows -> flat positions
        n_pos = labels.numel()

        def to_labels(per_scored: Tensor) -> Tensor:  # (N,) at the scored tokens -> labels' shape
            flat = torch.zeros(n_pos, dtype=per_scored.dtype, device=dev)
            return flat.index_copy(0, sc.idx, per_scored).view(shape)

        if cu_seqlens is not None or seq is not None:  # padded: the (S, C) = (B, T) matrix has labels' layout
            out.per_token_loss = to_labels(out.per_token_loss[sc.seq, col])
        logps = to_labels(values.logp.detach())
        sums = None
        if self.token_metrics:
            sums = token_sums(values, SLOTS) if seq is None else task.sp_token_sums  # (over the group)
            if self.compute_metrics:
                out.metrics.update(token_metrics(sums, SLOTS, accuracy=False, logits=False))
        return with_route(out, route, sums, token_logps=logps)
