"""Public log-prob functions: log-probs of label tokens from hidden states (or from logits you hold).

The work is done by the engine (:mod:`dpo_fast.engine`): only *scored* tokens (labels != ignore_index)
enter any GEMM, logits live only in bounded workspace tiles, and per-sequence sums are deterministic.
See docs/DESIGN.md ("Engine") for the math, the tiling and the memory bound.
"""

from __future__ import annotations

import torch

from . import _compiled
from ._compiled import compile_path
from .distributed import distributed_head
from .distributed.sequence_parallel import reduce_sums_counts
from .engine.autocast import autocast_aware
from .engine.checks import (as_cu_seqlens, check_cu_seqlens, check_ignore_index, check_same_device, check_scalars,
                            check_tensor)
from .engine import (LogitsLabelLogprobs, as_head, get_workspace_bytes, make_rows, prepare, scored_logprobs,
                     scored_positions, segment_sum)
from .engine.passes import scored_logprobs_entropy

# ----------------------------------------------------------------------------------------------------------
# public API


@compile_path(_compiled.sequence_logprobs)  # under torch.compile: the dpo_fast:: custom ops
@distributed_head()  # DTensor / ZeRO-3 / vocabulary-parallel heads (dpo_fast.distributed)
@autocast_aware("hidden", "weight", "bias")
def sequence_logprobs(hidden, weight, labels, *, bias=None, cu_seqlens=None, ignore_index=-100,
                      temperature=1.0, softcap=None, average=False, backend="auto") -> torch.Tensor:
    r"""Per-sequence sum (or mean) of the log-probs of the label tokens, without materialising logits.

    For every scored position t (``labels[t] != ignore_index``), with z = h_t W^T + b, then the model's cap
    z <- softcap * tanh(z / softcap) if ``softcap`` is set, then the sampling temperature z <- z / temperature
    (the order of samplers such as HF generate and vLLM, and of TRL):  log p_t = z[labels[t]] - logsumexp(z).
    Sequence s gets  sum_{t in s} log p_t  (divided by its scored-token count if ``average``). A sequence
    with no scored token gives 0 and zero gradient.

    Args:
        hidden: last hidden states, (B, T, H) padded or (N, H) packed; float32, bfloat16 or float16.
            ``labels[t]`` is the token predicted from ``hidden[t]`` (already shifted).
        weight: lm_head weight (V, H), same dtype and device as ``hidden``.
        labels: (B, T) or (N,) integer token ids in [0, V), or ``ignore_index`` for unscored positions.
        bias: optional (V,) lm_head bias.
        cu_seqlens: (S+1,) int32/int64 boundaries of the packed sequences: 0 = cu[0] <= ... <= cu[S] = N
            (a tensor, or a list / numpy array of ints).
        ignore_index: label value of positions that are not scored (default -100).
        temperature: sampling temperature (> 0): the (capped) logits are divided by it.
        softcap: optional Gemma-2/3 style final-logit cap (> 0), applied before the temperature.
        average: return the mean instead of the sum of each sequence's log-probs.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.

    Returns:
        (B,) or (S,) float32. Differentiable w.r.t. hidden, weight and bias (each only if it requires grad;
        a frozen weight skips the dW GEMM).

    Shape:
        B batch rows, T positions, H hidden size, V vocabulary, N packed tokens, S packed sequences.
        Memory beyond inputs and gradients: the workspace budget (:func:`dpo_fast.set_workspace_bytes`)
        plus O(N) float32 — never (B, T, V).

    NaN/inf in ``hidden`` (or a -inf bias at a label) stay in the affected sequences' log-probs and their
    ``hidden`` gradients; the other sequences get exactly the clean result; nothing crashes. Under ``torch.autocast``, hidden/weight/bias are cast to the autocast dtype first (as
    ``F.linear`` would), so bf16 activations with an fp32 master weight work; otherwise all three must share
    one dtype.

    Examples::

        >>> logps = dpo_fast.sequence_logprobs(hidden, model.lm_head.weight, labels)  # (B,)
    """
    if not isinstance(average, bool):
        raise TypeError(f"average: expected a bool, got {type(average).__name__}")
    head = as_head(weight, bias)  # resolved by distributed_head, or the plain (weight, bias)
    sc = prepare(hidden, head, labels, cu_seqlens=cu_seqlens, ignore_index=ignore_index, temperature=temperature,
                 softcap=softcap)
    logp = scored_logprobs(sc, head, temperature=temperature, softcap=softcap, backend=backend)
    out = segment_sum(logp, sc.seq, sc.num_seqs)
    counts = sc.counts() if average else None
    # hidden sharded over tokens (head.seq): this rank's partial sums -> the global ones, one all-reduce
    out, counts = reduce_sums_counts(head.seq, out, counts)
    if average:
        out = out / counts.to(logp.dtype).clamp_min(1.0)
    return out


@compile_path(_compiled.token_logprobs)  # under torch.compile: the dpo_fast:: custom ops
@distributed_head()  # DTensor / ZeRO-3 / vocabulary-parallel heads (dpo_fast.distributed)
@autocast_aware("hidden", "weight", "bias")
def token_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                   backend="auto") -> torch.Tensor:
    r"""Per-token log-probs of the label tokens, without materialising logits.

    Same math and arguments as :func:`sequence_logprobs` (no packing boundaries are needed per token).

    Args:
        hidden: (B, T, H) or (N, H), float32/bfloat16/float16.
        weight: (V, H). labels: (B, T) or (N,) integers in [0, V) or ``ignore_index``. bias: optional (V,).

    Returns:
        float32 tensor shaped like ``labels``: log p_t at scored positions, 0 at ignored ones.
        Differentiable w.r.t. hidden, weight and bias.
    """
    check_tensor("hidden", hidden, dims=(2, 3), floating=True)
    check_tensor("labels", labels, floating=False)
    shape = tuple(labels.shape)
    if hidden.dim() == 2 and labels.dim() == 1:  # packed tokens: one row (no boundaries needed per token)
        hidden, labels = hidden.unsqueeze(0), labels.unsqueeze(0)
    head = as_head(weight, bias)  # resolved by distributed_head, or the plain (weight, bias)
    sc = prepare(hidden, head, labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap)
    logp = scored_logprobs(sc, head, temperature=temperature, softcap=softcap, backend=backend)
    out = torch.zeros(sc.hidden2.shape[0], dtype=logp.dtype, device=logp.device).index_copy(0, sc.idx, logp)
    return out.view(shape)


@distributed_head()  # DTensor / ZeRO-3 / vocabulary-parallel heads (dpo_fast.distributed)
@autocast_aware("hidden", "weight", "bias")
def token_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias=None,
                               temperature: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
                               backend: str = "auto"):
    """(log-probs, entropies), each shaped like ``labels`` (B, T) float32, 0 at ``ignore_index`` positions.

    One engine pass over the scored positions: the log-probs and the entropies of the same rows' softmax
    (from that forward's statistics) are both differentiable w.r.t. hidden / weight / bias; the backward adds
    the entropy's term to the log-prob's in the same 3 GEMMs (see docs/DESIGN.md, "Engine"). (Internal for
    now: the GRPO trainer's helper; not exported by ``dpo_fast``.)

    Args:
        hidden: (B, T, H); weight: (V, H); labels: (B, T) ints in [0, V) or ``ignore_index``; bias: (V,) or None.
        temperature, softcap: the model's logit transform (see :meth:`dpo_fast.hf.OutputHead.engine_kwargs`).
        backend: as in :func:`token_logprobs`.
    """
    head = as_head(weight, bias)  # resolved by distributed_head, or the plain (weight, bias)
    sc = prepare(hidden, head, labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap)
    logp, ent_s = scored_logprobs_entropy(sc, head, temperature=temperature, softcap=softcap, backend=backend)
    M = sc.hidden2.shape[0]
    lp = torch.zeros(M, dtype=logp.dtype, device=logp.device).index_copy(0, sc.idx, logp)
    ent = torch.zeros(M, dtype=ent_s.dtype, device=logp.device).index_copy(0, sc.idx, ent_s)
    return lp.view(labels.shape), ent.view(labels.shape)


# ----------------------------------------------------------------------------------------------------------
# logits you already hold


_REDUCTIONS = ("sum", "mean", "none")


@compile_path(_compiled.logprobs_from_logits)  # under torch.compile: the dpo_fast:: custom ops
@autocast_aware("logits")
def logprobs_from_logits(logits, labels, *, ignore_index=-100, temperature=1.0, cu_seqlens=None,
                         reduction="sum") -> torch.Tensor:
    r"""Log-probs of the label tokens from logits you already hold, in bounded extra memory.

    Args:
        logits: (B, T, V) padded, or (N, V) packed (with ``cu_seqlens`` for sum/mean); any float dtype.
        labels: (B, T) or (N,) integer ids in [0, V), or ``ignore_index``.
        ignore_index: label value of unscored positions.
        temperature: logits are divided by it (> 0).
        cu_seqlens: (S+1,) boundaries of packed sequences (integer tensor, list or numpy array).
        reduction: ``"sum"`` -> (B,)/(S,) per-sequence sums; ``"mean"`` -> per-sequence means over scored
            tokens (0 for none); ``"none"`` -> float32 shaped like labels, 0 at ignored positions.

    Returns:
        float32 tensor; differentiable w.r.t. ``logits``. Never makes a float32 copy of all the logits:
        scored rows are processed in workspace-sized chunks.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    check_tensor("logits", logits, dims=(2, 3), floating=True)
    check_tensor("labels", labels, floating=False)
    cu_seqlens = as_cu_seqlens(cu_seqlens, logits.device)
    check_ignore_index(ignore_index)
    check_scalars(temperature, None)
    check_same_device(logits=logits, labels=labels, cu_seqlens=cu_seqlens)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:-1])} (logits' leading dims), got {tuple(labels.shape)}"
        )
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits: expected a non-empty vocabulary dimension, got V=0")
    if logits.shape[0] == 0 or (logits.dim() == 3 and logits.shape[1] == 0):
        raise ValueError(f"logits: empty batch, got shape {tuple(logits.shape)}")
    if cu_seqlens is not None:
        if logits.dim() != 2:
            raise ValueError(f"logits: expected a packed (N, V) tensor with cu_seqlens, got {tuple(logits.shape)}")
        S = check_cu_seqlens(cu_seqlens, logits.shape[0])
    elif logits.dim() == 2 and reduction != "none":
        raise ValueError("cu_seqlens: required with packed (N, V) logits when reduction is 'sum' or 'mean'")
    else:
        S = logits.shape[0]
    logits2 = logits.reshape(-1, V)  # (M, V)
    row_len = None if cu_seqlens is not None else (logits.shape[1] if logits.dim() == 3 else logits.shape[0])
    idx, labels_s, seq = scored_positions(labels, V, ignore_index, row_len, cu_seqlens)
    rows = make_rows("auto", logits.device, logits.dtype, temperature, None)
    budget = get_workspace_bytes(logits.device)
    logp = LogitsLabelLogprobs.apply(logits2, idx, labels_s, rows, budget)
    if reduction == "none":
        out = torch.zeros(logits2.shape[0], dtype=logp.dtype, device=logp.device).index_copy(0, idx, logp)
        return out.view(labels.shape)
    out = segment_sum(logp, seq, S)
    if reduction == "mean":
        cnt = torch.bincount(seq, minlength=S)[:S].to(logp.dtype)
        out = out / cnt.clamp_min(1.0)
    return out
