"""``GRPOLoss``: GRPO-family policy-gradient loss straight from hidden states, in one pass over the logits.

The per-token GRPO loss (clipped importance ratio x advantage, optional KL to a reference) depends on a
token's own log-prob — or, with ``importance_sampling_level="sequence"`` (GSPO), on its sequence's mean — and
on batch constants (the aggregation's denominators). So for a group of whole sequences, dL/dlog p_t is known
as soon as the group's log-probs are: the one-pass fused route of :mod:`dpo_fast._fused` applies (3 GEMMs
over completion tokens instead of 4, logits never materialised). The per-token derivatives come from
autograd of :func:`dpo_fast.grpo_loss` on (B, T) vectors, the other sequences held at placeholder values
that do not enter them.
"""

from __future__ import annotations

import torch

from . import losses as L
from ._fused import FusedLossModule, grads_at
from ._validate import autocast_aware
from .engine import acc_dtype, scored_logprobs


class GRPOLoss(FusedLossModule):
    r"""GRPO / DAPO / Dr. GRPO / GSPO loss from last hidden states and the lm_head weight.

    Args:
        beta, epsilon_low, epsilon_high, importance_sampling_level (``token`` | ``sequence``), loss_type
            (``grpo`` | ``bnpo`` | ``dr_grpo`` | ``dapo``), max_completion_length: as in
            :func:`dpo_fast.grpo_loss`.
        ignore_index, temperature, softcap, backend: as in :func:`dpo_fast.sequence_logprobs` (use the
            sampling temperature here, as TRL does).
        fused: use the one-pass route when possible (default True).
        workspace_bytes: bytes for one group of whole sequences' logits (default 8 x the engine workspace);
            a sequence that does not fit alone sends the batch to the two-pass route.
        compute_metrics: fill ``metrics`` (``kl``, ``clip_ratio/*``; one host sync).
        token_metrics: also log ``entropy`` (mean over completion tokens), from the same pass.

    Forward:
        hidden: (B, T, H) last hidden states of prompt + sampled completion; weight: (V, H);
        labels: (B, T) shifted completion tokens, ``ignore_index`` elsewhere (they define the mask);
        advantages: (B,); old_logps, ref_logps: optional (B, T) per-token log-probs (``ref_logps`` required
        when beta != 0); bias: optional (V,); num_items_in_batch: for ``dapo``.

    Returns:
        :class:`dpo_fast.losses.GRPOOutput`: ``loss`` differentiable w.r.t. hidden, weight and bias;
        ``per_token_loss`` (B, T) detached on the fused route.

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
                         fused=fused, workspace_bytes=workspace_bytes, compute_metrics=compute_metrics)
        self.options = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                            importance_sampling_level=importance_sampling_level, loss_type=loss_type,
                            max_completion_length=max_completion_length)
        self.token_metrics = bool(token_metrics)
        #: (B, T) detached per-token policy log-probs of the last forward (0 at unscored positions), for
        #: callers that log ratio-based metrics (the TRL integration)
        self.last_logps: torch.Tensor | None = None
        # validate the options now: a bad config fails at construction, not at the first step
        one = torch.zeros(1, 2)
        L.grpo_loss(one, torch.zeros(1), torch.ones(1, 2), None, None if beta == 0 else one,
                    **self.options, compute_metrics=False)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + f", fused={self.fused}"

    def _loss(self, logps, advantages, mask, old_logps, ref_logps, num_items_in_batch, compute_metrics):
        return L.grpo_loss(logps, advantages, mask, old_logps, ref_logps, **self.options,
                           num_items_in_batch=num_items_in_batch, compute_metrics=compute_metrics)

    @torch.compiler.disable  # data-dependent grouping: run eagerly inside compiled graphs
    @autocast_aware("hidden", "weight", "bias")
    def forward(self, hidden, weight, labels, advantages, old_logps=None, ref_logps=None, *, bias=None,
                num_items_in_batch=None) -> L.GRPOOutput:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"hidden: expected a padded (B, T, H) tensor, got "
                             f"{getattr(hidden, 'shape', type(hidden).__name__)}")
        sc, rows = self._prepare(hidden, weight, labels, bias)
        B, T = labels.shape
        dev = sc.idx.device
        mask = labels != self.ignore_index
        for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T)):
                raise ValueError(f"{name}: expected shape ({B}, {T}) like labels, got "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        acc = acc_dtype(sc.hidden2.dtype)
        groups = self._plan(sc, rows, weight, torch.arange(B, device=dev)[:, None], sc.counts(),
                            (hidden, weight, bias))
        if groups is None:  # two-pass route: generic engine + autograd through grpo_loss
            stats = {} if self.token_metrics else None
            logp = scored_logprobs(sc, weight, bias, temperature=self.temperature, softcap=self.softcap,
                                   backend=self.backend, stats_out=stats)
            tok = torch.zeros(B * T, dtype=logp.dtype, device=dev).index_copy(0, sc.idx, logp).view(B, T)
            out = self._loss(tok, advantages, mask, old_logps, ref_logps, num_items_in_batch, self.compute_metrics)
            self.last_logps = tok.detach()
        else:
            # placeholders for tokens outside a group: any finite value (they do not enter its derivatives)
            base = (torch.zeros(B * T, dtype=acc, device=dev) if old_logps is None
                    else old_logps.detach().reshape(-1).to(acc))
            final = torch.zeros(B * T, dtype=acc, device=dev)

            def total(x):
                return self._loss(x.view(B, T), advantages, mask, old_logps, ref_logps, num_items_in_batch,
                                  False).loss

            def group_grad(g, res):
                pos = sc.idx.index_select(0, g["tok"])  # (n,) flat (B*T) positions
                final[pos] = res.logp.detach().to(acc)
                return grads_at(total, base, pos, res.logp)

            stats = {}
            carrier = self._fused_pass(sc, weight, bias, groups, rows, group_grad, self.token_metrics, stats)
            with torch.no_grad():
                out = self._loss(final.view(B, T), advantages, mask, old_logps, ref_logps, num_items_in_batch,
                                 self.compute_metrics)
            self.last_logps = final.view(B, T)
            out = self._with_gradient(out, carrier)
        if self.token_metrics and self.compute_metrics:
            out.metrics["entropy"] = float(stats["entropy"].sum()) / max(sc.idx.numel(), 1)
        return out
