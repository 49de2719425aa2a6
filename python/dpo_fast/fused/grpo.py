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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import losses as L
from ..losses import GRPOOptions
from ..engine.checks import as_cu_seqlens
from ..engine import acc_dtype
from ..losses.policy_gradient import entropy_bonus
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
    coef: Tensor  # (S, C) aggregation coefficients c_{s,t}
    num_items_in_batch: object
    want_stats: bool = False
    decomposable: bool = True
    units_host: Tensor | None = None  # host copy of units (the route's plan)
    entropy_grad: bool = False  # entropy_coef != 0: the loss is differentiated through the entropies too
    ent_denom: Tensor | None = None  # the batch's completion-token count: the entropy bonus's mean (fused route)

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
        kw = self.matrices(v, self.row, v.units)
        return L.grpo_loss(kw.pop("logps"), kw.pop("advantages"), kw.pop("mask"), **kw, options=self.options,
                           num_items_in_batch=self.num_items_in_batch, compute_metrics=compute_metrics)


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
        shape = tuple(labels.shape)
        if not isinstance(advantages, Tensor) or tuple(advantages.shape) not in ((S,), shape):
            raise ValueError(f"advantages: expected shape ({S},) (one per sequence) or {shape} (per token, like "
                             f"labels), got {tuple(getattr(advantages, 'shape', ()))}")
        for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps)):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
                raise ValueError(f"{name}: expected shape {shape} like labels, got {tuple(getattr(t, 'shape', ()))}")
        isr = importance_sampling_ratio
        if isr is not None and (not isinstance(isr, Tensor) or tuple(isr.shape) not in ((S, 1), shape)):
            raise ValueError(f"importance_sampling_ratio: expected shape ({S}, 1) or {shape} like labels, got "
                             f"{tuple(getattr(isr, 'shape', ()))}")
        if cu_seqlens is None:
            T = labels.shape[1]
            col = sc.idx - sc.seq * T
        else:
            cu = cu_seqlens.to(device=dev, dtype=torch.int64)
            col = sc.idx - cu[sc.seq]
            cuh = sc.cu_host if sc.cu_host is not None else cu.cpu()  # prepare's readback brought it: no sync
            T = int((cuh[1:] - cuh[:-1]).max())
        o = self.options
        if o.max_completion_length is None:
            o = dataclasses.replace(o, max_completion_length=T)
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
        mask = torch.zeros(S, T, dtype=torch.bool, device=dev).index_put(
            (sc.seq, col), torch.ones_like(col, dtype=torch.bool))
        quantile = o.top_entropy_quantile < 1.0
        bonus = o.entropy_coef != 0.0
        task = GRPOTask(units=torch.arange(S, device=dev)[:, None], options=o, row=sc.seq, col=col, num_cols=T,
                        per_token=per_token, per_seq=per_seq,
                        coef=aggregation_coefficients(o, mask, num_items_in_batch, acc_dtype(sc.hidden2.dtype)),
                        num_items_in_batch=num_items_in_batch, want_stats=self.token_metrics or quantile or bonus,
                        decomposable=o.entry.local and not quantile, units_host=torch.arange(S)[:, None],
                        entropy_grad=bonus, ent_denom=mask.sum().to(acc_dtype(sc.hidden2.dtype)) if bonus else None)
        out, route, values = self.run(p, task, hidden)
        # back to the labels' layout: (S, C) rows -> flat positions
        n_pos = labels.numel()

        def to_labels(per_scored: Tensor) -> Tensor:  # (N,) at the scored tokens -> labels' shape
            flat = torch.zeros(n_pos, dtype=per_scored.dtype, device=dev)
            return flat.index_copy(0, sc.idx, per_scored).view(shape)

        if cu_seqlens is not None:  # padded: the (S, C) = (B, T) matrix already has labels' layout
            out.per_token_loss = to_labels(out.per_token_loss[sc.seq, col])
        logps = to_labels(values.logp.detach())
        sums = None
        if self.token_metrics:
            sums = token_sums(values, SLOTS)
            if self.compute_metrics:
                out.metrics.update(token_metrics(sums, SLOTS, accuracy=False, logits=False))
        return with_route(out, route, sums, token_logps=logps)
