"""Padding-free DPO batches for the TRL trainer path: TRL's pairs and truncation, packed by the Rust packer.

:class:`PaddingFreePreferenceCollator` replaces TRL's ``DataCollatorForPreference`` when
``DPOConfig(padding_free=True)``. It receives the same examples (the trainer's sampler is unchanged, so a step
holds the same pairs), truncates every sequence exactly as TRL's collator does (``max_length`` per
prompt + completion sequence, ``truncation_mode`` keep_start / keep_end), and lets
:func:`dpo_fast.pack_pairs` place whole pairs into rows (best-fit-decreasing), with ``position_ids`` restarting
per sequence and ``cu_seqlens``. The labels come from the one shifted-label rule
(:func:`dpo_fast.packing.shifted_labels`) over the packed completion mask, so a packed batch scores exactly
the tokens TRL's padded batch scores.

Attention must respect the sequence boundaries (:func:`check_packed_attention`): flash-attention
implementations get the varlen arguments (``cu_seq_lens_q/k``, ``max_length_q/k``) through
:func:`dpo_fast.hf.call_with_hidden_states`; ``sdpa`` / ``eager`` (and ``flex_attention``) get the
block-diagonal causal mask that transformers (>= 4.54; 5.x here) derives from packed ``position_ids`` when no
``attention_mask`` is passed. A one-time probe on the model proves it; an implementation that lets packed
sequences see each other raises instead of training on cross-sequence attention.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..packing import PackOptions, TokenBudgetBatchSampler, pack_pairs, resolve_pair_keys, shifted_labels
from ..packing.layout import REF_KEYS

__all__ = ["PaddingFreePreferenceCollator", "truncate_like_trl", "trl_pair_costs", "check_packed_attention",
           "token_budget_sampler", "PACKED_ATTENTION"]

#: attention implementations that honour packed boundaries (flash*: varlen kwargs; the others: the block-diagonal
#: mask transformers builds from position_ids). Anything else is refused.
PACKED_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def truncate_like_trl(prompt: Sequence[int], completion: Sequence[int], max_length: int | None,
                      mode: str) -> tuple[list[int], int]:
    """(kept sequence, prompt tokens kept) of ``prompt + completion`` under TRL's ``DataCollatorForPreference`` rule.

    ``keep_start`` keeps the first ``max_length`` tokens, ``keep_end`` the last ``max_length`` (which may cut into
    the completion's start once the prompt is gone). ``max_length=None``: no truncation.
    """
    seq = list(prompt) + list(completion)
    lp = len(prompt)
    if max_length is None or len(seq) <= max_length:
        return seq, lp
    if mode == "keep_start":
        return seq[:max_length], min(lp, max_length)
    if mode == "keep_end":
        cut = len(seq) - max_length
        return seq[cut:], max(lp - cut, 0)
    raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {mode!r}")


def trl_pair_costs(dataset: Any, *, max_length: int | None, keys: Sequence[str] | None = None) -> np.ndarray:
    """(N,) int64 tokens each pair occupies packed after TRL's truncation: both sequences' kept lengths."""
    n = len(dataset)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = resolve_pair_keys(dataset[0], keys)
    cols = [dataset[name] for name in k] if hasattr(dataset, "column_names") else [[ex[name] for ex in dataset]
                                                                                  for name in k]
    lp = np.fromiter((len(x) for x in cols[0]), np.int64, n)
    lc = np.fromiter((len(x) for x in cols[1]), np.int64, n)
    lr = np.fromiter((len(x) for x in cols[2]), np.int64, n)
    c, r = lp + lc, lp + lr
    if max_length is not None:
        c, r = np.minimum(c, max_length), np.minimum(r, max_length)
    return c + r


def token_budget_sampler(dataset: Any, max_tokens: int, *, max_length: int | None, seed: int,
                         keys: Sequence[str] | None = None) -> TokenBudgetBatchSampler:
    """A :class:`~dpo_fast.TokenBudgetBatchSampler` over a TRL-tokenized dataset (costs after TRL's truncation)."""
    costs = trl_pair_costs(dataset, max_length=max_length, keys=keys)
    if costs.size and int(costs.max()) > max_tokens:
        i = int(np.argmax(costs))
        raise ValueError(f"token_budget: {max_tokens} tokens cannot hold pair {i}, which needs {int(costs[i])} after "
                         f"truncation to max_length={max_length}; raise token_budget to >= 2 * max_length or lower "
                         "max_length")
    return TokenBudgetBatchSampler(costs, max_tokens, shuffle=True, seed=seed)


class PaddingFreePreferenceCollator:
    """``collate_fn`` turning TRL-tokenized preference examples into one packed batch.

    Args:
        pad_token_id: id at row padding (never scored, never attended to by real tokens).
        max_length: TRL's per-sequence ``max_length`` (None: no truncation).
        truncation_mode: TRL's ``"keep_start"`` or ``"keep_end"``.
        row_tokens: capacity of a packed row. None: every row may hold up to the longest pair of the batch
            (short rows keep dense sdpa/eager attention cheap); ``"one_row"``: the whole batch in one row (what
            flash-attention varlen wants). A pair is never split, so a row holds at most
            ``max(row_tokens, longest pair)`` tokens.
        pad_to_multiple_of: round the row length up (see :class:`~dpo_fast.packing.PackOptions`).
        keys: explicit (prompt, chosen, rejected) key names.

    Returns (per call) a dict:
        ``input_ids``, ``position_ids``, ``labels`` (R, L) int64 (labels already shifted, -100 off the completion);
        ``cu_seqlens`` (2P + 1,) int32, ``max_seqlen`` int; ``pairs`` (P, 2) and ``example_index`` (P,) int64;
        ``seq_lens`` (2P,) int64 real tokens per sequence; ``ref_chosen_logps`` / ``ref_rejected_logps`` (P,)
        float32 in pair order when the examples carry them. No ``attention_mask`` (it would hide the boundaries).
    """

    def __init__(self, *, pad_token_id: int = 0, max_length: int | None = None, truncation_mode: str = "keep_start",
                 row_tokens: int | str | None = None, pad_to_multiple_of: int | None = None,
                 keys: Sequence[str] | None = None) -> None:
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be an int >= 1 or None, got {max_length!r}")
        if row_tokens not in (None, "one_row"):
            PackOptions(max_tokens=row_tokens)  # the one budget check
        PackOptions(max_tokens=2, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)  # validate now
        self.pad_token_id, self.max_length, self.truncation_mode = int(pad_token_id), max_length, truncation_mode
        self.row_tokens, self.pad_to_multiple_of = row_tokens, pad_to_multiple_of
        self.keys = None if keys is None else tuple(keys)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("PaddingFreePreferenceCollator: got an empty batch of examples")
        k = resolve_pair_keys(examples[0], self.keys)
        P = len(examples)
        chosen, rejected = [], []
        plen = np.empty((P, 2), dtype=np.int64)  # prompt tokens kept in (chosen, rejected) of each example
        for i, ex in enumerate(examples):
            p = ex[k[0]]
            c, plen[i, 0] = truncate_like_trl(p, ex[k[1]], self.max_length, self.truncation_mode)
            r, plen[i, 1] = truncate_like_trl(p, ex[k[2]], self.max_length, self.truncation_mode)
            if not c or not r:
                raise ValueError(f"example {i}: an empty prompt + completion sequence cannot be scored")
            chosen.append(c)
            rejected.append(r)
        costs = [len(c) + len(r) for c, r in zip(chosen, rejected)]
        if self.row_tokens == "one_row":
            budget = sum(costs)
        else:
            budget = max(max(costs), self.row_tokens or 0)
        # The sequences are already truncated as TRL truncates them; the packer only places them (empty
        # "prompts": the prompt/completion split is carried by plen and applied by shifted_labels below).
        opts = PackOptions(max_tokens=max(budget, 2), mode="packed", pad_token_id=self.pad_token_id,
                           truncation="error", pad_to_multiple_of=self.pad_to_multiple_of)
        batch = pack_pairs([[]] * P, chosen, rejected, options=opts)
        out = batch.to_torch()
        pos, cu = out["position_ids"], out["cu_seqlens"].to(torch.int64)
        ex_idx = out["example_index"]
        # packed sequence s = 2j (chosen) / 2j + 1 (rejected) of pair j = example ex_idx[j]
        seq_plen = torch.from_numpy(plen)[ex_idx].reshape(-1)  # (2P,)
        seg = torch.repeat_interleave(torch.arange(2 * P), cu[1:] - cu[:-1]).view(pos.shape)
        completion = (pos >= seq_plen[seg]) & (pos < out["seq_lens"][seg])
        labels = shifted_labels(out["input_ids"], completion, position_ids=pos)
        res = {"input_ids": out["input_ids"], "position_ids": pos, "labels": labels, "cu_seqlens": out["cu_seqlens"],
               "max_seqlen": out["max_seqlen"], "pairs": out["pairs"], "example_index": ex_idx,
               "seq_lens": out["seq_lens"]}
        if all(name in examples[0] for name in REF_KEYS):
            for name in REF_KEYS:
                ref = torch.tensor([float(ex[name]) for ex in examples], dtype=torch.float32)
                res[name] = ref[ex_idx]
        return res


def _probe_hidden(model, ids: list[int], pos: list[int], cu: list[int]) -> torch.Tensor:
    from ..hf import call_with_hidden_states, unwrap_model

    _, hf = unwrap_model(model)
    dev = hf.get_output_embeddings().weight.device
    t = lambda x, dt=torch.int64: torch.tensor([x], dtype=dt, device=dev)  # noqa: E731
    return call_with_hidden_states(model, lambda h, head: h.float(), t(ids), position_ids=t(pos),
                                   cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev), max_seqlen=max(
                                       b - a for a, b in zip(cu, cu[1:])))


@torch.no_grad()
def check_packed_attention(model, *, probe: bool = True) -> str:
    """Check that ``model`` keeps packed sequences apart; returns its attention implementation.

    The implementation must be one of :data:`PACKED_ATTENTION`. With ``probe`` (a no-grad forward of 7 tokens),
    the hidden states of a packed sequence must not depend on the sequence packed before it.

    Raises:
        ValueError: an implementation that cannot honour the boundaries, naming the fix.
    """
    from ..hf import unwrap_model

    _, hf = unwrap_model(model)
    impl = str(getattr(hf.config, "_attn_implementation", None) or "eager")
    fix = ("load the model with attn_implementation='sdpa', 'eager' or 'flash_attention_2' (e.g. "
           "AutoModelForCausalLM.from_pretrained(..., attn_implementation='sdpa')), or set padding_free=False")
    if not (impl in PACKED_ATTENTION or "flash" in impl):
        raise ValueError(f"padding_free=True: attention implementation {impl!r} is not known to respect packed "
                         f"sequence boundaries (packed sequences could attend to each other); {fix}")
    if not probe:
        return impl
    V = hf.get_output_embeddings().weight.shape[0]
    a, a2, b = [1 % V, 2 % V, 3 % V], [4 % V, 5 % V, 6 % V], [7 % V, 8 % V, 9 % V, 10 % V]
    was = hf.training
    hf.eval()
    try:
        h1 = _probe_hidden(model, a + b, [0, 1, 2, 0, 1, 2, 3], [0, 3, 7])[0, 3:]
        h2 = _probe_hidden(model, a2 + b, [0, 1, 2, 0, 1, 2, 3], [0, 3, 7])[0, 3:]
    finally:
        hf.train(was)
    rel = ((h1 - h2).abs().max() / h1.abs().max().clamp_min(1e-6)).item()
    if not rel <= 1e-2:
        raise ValueError(f"padding_free=True: with attention implementation {impl!r} a packed sequence's hidden "
                         f"states change with the sequence packed before it (relative change {rel:.3g}): this "
                         f"model does not build a block-diagonal mask from position_ids; {fix}")
    return impl
