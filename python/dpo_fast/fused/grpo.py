"""``GRPOLoss``: GRPO-family policy-gradient loss straight from hidden states, on the fused route.

The per-token GRPO loss (clipped importance ratio x advantage, optional KL to a reference) depends on a
token's own log-prob — or, with ``importance_sampling_level="sequence"`` (GSPO), on its sequence's mean — and
the aggregation is linear in the per-token losses with per-sequence coefficients known before the pass:

    loss = Σ_s c_s Σ_t l_{s,t}      grpo: c_s = 1/(S·max(|y_s|,1))   bnpo: 1/max(Σ|y|,1)
                                    dr_grpo: 1/(S·max_completion_length)   dapo: 1/num_items_in_batch

So the unit is one sequence: the group loss is Σ_s c_s Σ_t l_{s,t} over the group's sequences, with l from
:func:`dpo_fast.grpo_loss`'s ``per_token_loss`` on the group's rows only (one autograd call per group).

Token layout: the per-token inputs (``old_logps``, ``ref_logps``) are shaped like ``labels`` — (B, T) padded
or (N,) packed with ``cu_seqlens`` — and only their scored positions are read. Internally every sequence is a
row of an (S, C) matrix whose column is the token's position in its row (padded: C = T; packed: C = the
longest sequence), which is what ``grpo_loss`` sees; ``per_token_loss`` and ``token_logps`` come back shaped
like ``labels``. ``max_completion_length`` (dr_grpo) defaults to C.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import losses as L
from .route import FusedLossModule, Values, autocast_entry, token_metrics, token_sums, with_route

Tensor = torch.Tensor

SLOTS = ("completion",)


@dataclass
class GRPOTask:
    """One GRPOLoss forward as a :class:`dpo_fast.fused.route.UnitTask`: units = sequences."""

    units: Tensor  # (S, 1)
    options: dict  # grpo_loss options (beta, epsilons, level, loss_type, max_completion_length)
    row: Tensor  # (N,) row (sequence) of each scored token
    col: Tensor  # (N,) column of each scored token in its row
    num_cols: int  # C
    advantages: Tensor  # (S,)
    old: Tensor | None  # (N,) old-policy log-probs at the scored tokens
    ref: Tensor | None  # (N,) reference log-probs at the scored tokens
    coef: Tensor  # (S,) aggregation coefficient c_s
    num_items_in_batch: object
    want_stats: bool = False
    decomposable: bool = True

    def matrices(self, v: Values, rows: Tensor, num_rows: int):
        """(R, C) logp / mask / old / ref matrices of the tokens in ``v`` at rows ``rows`` (n,)."""
        cols = self.col.index_select(0, v.tok)
        shape = (num_rows, self.num_cols)

        def place(x):
            z = torch.zeros(shape, dtype=v.logp.dtype, device=v.logp.device)
            return z.index_put((rows, cols), x.to(v.logp.dtype))

        mask = torch.zeros(shape, dtype=torch.bool, device=v.logp.device).index_put(
            (rows, cols), torch.ones_like(rows, dtype=torch.bool))
        old = None if self.old is None else place(self.old.index_select(0, v.tok))
        ref = None if self.ref is None else place(self.ref.index_select(0, v.tok))
        return place(v.logp), mask, old, ref

    def group_loss(self, v: Values) -> Tensor:
        ids = v.units  # (G,) sequence ids
        lp, mask, old, ref = self.matrices(v, v.seg, ids.numel())
        out = L.grpo_loss(lp, self.advantages[ids], mask, old, ref, **self.options, compute_metrics=False)
        return (out.per_token_loss.sum(-1) * self.coef[ids]).sum()

    def batch_loss(self, v: Values, compute_metrics: bool):
        lp, mask, old, ref = self.matrices(v, self.row, self.units.shape[0])
        return L.grpo_loss(lp, self.advantages, mask, old, ref, **self.options,
                           num_items_in_batch=self.num_items_in_batch, compute_metrics=compute_metrics)


def aggregation_coefficients(loss_type: str, counts: Tensor, max_completion_length: int, num_items) -> Tensor:
    """(S,) c_s with loss = Σ_s c_s Σ_t l_{s,t}, exactly as :func:`dpo_fast.grpo_loss` aggregates."""
    S = counts.shape[0]
    if loss_type == "grpo":
        return 1.0 / (counts.clamp_min(1.0) * S)
    if loss_type == "bnpo":
        return torch.full_like(counts, 1.0) / counts.sum().clamp_min(1.0)
    if loss_type == "dr_grpo":
        return torch.full_like(counts, 1.0 / (S * max_completion_length))
    n = counts.sum().clamp_min(1.0) if num_items is None else num_items
    if isinstance(n, Tensor):
        n = n.detach().to(device=counts.device, dtype=counts.dtype)
    return torch.ones_like(counts) / n


class GRPOLoss(FusedLossModule):
    r"""GRPO / DAPO / Dr. GRPO / GSPO loss from last hidden states and the lm_head weight.

    Args:
        beta, epsilon_low, epsilon_high, importance_sampling_level (``token`` | ``sequence``), loss_type
            (``grpo`` | ``bnpo`` | ``dr_grpo`` | ``dapo``), max_completion_length: as in
            :func:`dpo_fast.grpo_loss` (``max_completion_length`` defaults to the row length T, or the longest
            packed sequence).
        ignore_index, temperature, softcap, backend: as in :func:`dpo_fast.sequence_logprobs` (use the
            sampling temperature here, as TRL does); validated at construction.
        fused: use the one-pass route when possible (default True).
        workspace_bytes: bytes for one group of whole sequences' logits (default 8 x the engine workspace);
            a sequence that does not fit alone sends the batch to the two-pass route.
        compute_metrics: fill ``metrics`` (``kl``, ``clip_ratio/*``; one host sync).
        token_metrics: also log ``entropy`` (mean over completion tokens), from the same pass.

    Forward:
        hidden: (B, T, H) last hidden states of prompt + sampled completion, or packed (N, H) with
        ``cu_seqlens`` (S+1,); weight: (V, H); labels: (B, T) / (N,) shifted completion tokens,
        ``ignore_index`` elsewhere (they define the mask); advantages: (S,) one per sequence;
        old_logps, ref_logps: optional per-token log-probs shaped like ``labels`` (``ref_logps`` required
        when beta != 0); bias: optional (V,); num_items_in_batch: for ``dapo``.

    Returns:
        :class:`dpo_fast.fused.FusedGRPOOutput`: ``loss`` differentiable w.r.t. hidden, weight and bias;
        ``per_token_loss`` and ``token_logps`` shaped like ``labels`` (detached on the fused route);
        ``route``; ``token_sums`` with ``token_metrics``.

    Examples::

        >>> out = dpo_fast.GRPOLoss(loss_type="dapo", epsilon_high=0.28)(hidden, W, labels, advantages)
        >>> out.loss.backward()
    """

    def __init__(self, beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float | None = None, *,
                 importance_sampling_level: str = "token", loss_type: str = "grpo",
                 max_completion_length: int | None = None, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", fused: bool = True,
                 workspace_bytes: int | None = None, compute_metrics: bool = True, token_metrics: bool = False):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics,
                         token_metrics=token_metrics)
        self.options = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                            importance_sampling_level=importance_sampling_level, loss_type=loss_type,
                            max_completion_length=max_completion_length)
        # validate the options now: a bad config fails at construction, not at the first step
        one = torch.zeros(1, 2)
        L.grpo_loss(one, torch.zeros(1), torch.ones(1, 2), None, None if beta == 0 else one,
                    **self.options, compute_metrics=False)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + f", fused={self.fused}"

    @torch.compiler.disable  # data-dependent grouping: run eagerly inside compiled graphs
    @autocast_entry("hidden", "weight", "bias")
    def forward(self, hidden, weight, labels, advantages, old_logps=None, ref_logps=None, *, bias=None,
                cu_seqlens=None, num_items_in_batch=None):
        p = self.prepare(hidden, weight, labels, bias, cu_seqlens)
        sc = p.sc
        S, dev = sc.num_seqs, sc.idx.device
        if not isinstance(advantages, Tensor) or tuple(advantages.shape) != (S,):
            raise ValueError(f"advantages: expected shape ({S},) (one per sequence), got "
                             f"{tuple(getattr(advantages, 'shape', ()))}")
        for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != tuple(labels.shape)):
                raise ValueError(f"{name}: expected shape {tuple(labels.shape)} like labels, got "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        if cu_seqlens is None:
            T = labels.shape[1]
            col = sc.idx - sc.seq * T
        else:
            cu = cu_seqlens.to(device=dev, dtype=torch.int64)
            col = sc.idx - cu[sc.seq]
            T = int((cu[1:] - cu[:-1]).max())
        counts = sc.counts()
        opts = dict(self.options)
        if opts["max_completion_length"] is None:
            opts["max_completion_length"] = T

        def at_scored(t):
            return None if t is None else t.detach().reshape(-1).index_select(0, sc.idx)

        task = GRPOTask(
            units=torch.arange(S, device=dev)[:, None], options=opts, row=sc.seq, col=col, num_cols=T,
            advantages=advantages.detach().to(dev), old=at_scored(old_logps), ref=at_scored(ref_logps),
            coef=aggregation_coefficients(opts["loss_type"], counts, opts["max_completion_length"],
                                          num_items_in_batch),
            num_items_in_batch=num_items_in_batch, want_stats=self.token_metrics)
        out, route, values = self.run(p, task, hidden)
        # back to the labels' layout: (S, C) rows -> flat positions
        n_pos = labels.numel()

        def to_labels(per_scored: Tensor) -> Tensor:  # (N,) at the scored tokens -> labels' shape
            flat = torch.zeros(n_pos, dtype=per_scored.dtype, device=dev)
            return flat.index_copy(0, sc.idx, per_scored).view(labels.shape)

        if cu_seqlens is not None:  # padded: the (S, C) = (B, T) matrix already has labels' layout
            out.per_token_loss = to_labels(out.per_token_loss[sc.seq, col])
        logps = to_labels(values.logp.detach())
        sums = None
        if self.token_metrics:
            sums = token_sums(values, SLOTS)
            if self.compute_metrics:
                out.metrics.update(token_metrics(sums, SLOTS, accuracy=False, logits=False))
        return with_route(out, route, sums, token_logps=logps)
