"""DataLoader pieces for preference data: a collator over :func:`dpo_fast.pack_pairs` and a token-budget
batch sampler.

Typical padding-free use (one packed row of at most ``max_tokens`` real tokens per micro-batch)::

    sampler = TokenBudgetBatchSampler.from_examples(dataset, max_tokens=8192)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=PairCollator(max_tokens=8192))
    for batch in loader:
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        logps = dpo_fast.sequence_logprobs(hidden.view(-1, H), model.lm_head.weight, batch["labels"].view(-1),
                                           cu_seqlens=batch["cu_seqlens"])              # (2P,)
        chosen, rejected = logps[batch["pairs"][:, 0]], logps[batch["pairs"][:, 1]]     # (P,), (P,)
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .batch import pack_pairs
from .layout import REF_KEYS, TRL_KEYS, resolve_pair_keys
from .options import PackOptions, check_budget

__all__ = ["PairCollator", "TokenBudgetBatchSampler", "pair_costs"]


class PairCollator:
    """``collate_fn`` for ``torch.utils.data.DataLoader`` over tokenized preference examples.

    Each example is a mapping with token ids of the prompt, the chosen and the rejected completion
    (``prompt_input_ids``/``chosen_input_ids``/``rejected_input_ids`` or TRL's newer
    ``prompt_ids``/``chosen_ids``/``rejected_ids``, or ``keys=``), as lists or 1-D arrays. Optional
    ``ref_chosen_logps``/``ref_rejected_logps`` floats are passed through in pair order.

    Args:
        max_tokens: token budget per pair and per packed row (see :func:`dpo_fast.pack_pairs`).
        mode: ``"packed"`` (default) or ``"padded"`` (TRL layout).
        pad_token_id, truncation, pad_to_multiple_of, vocab_size, backend: as in :func:`pack_pairs`.
        options: a :class:`~dpo_fast.packing.PackOptions` instead of the separate options above.
        flatten: return packed batches as one row ``(1, R*L)`` -- the form Hugging Face models
            recognise as packed through ``position_ids`` (they require batch size 1). Default: True in
            packed mode; ignored in padded mode.
        return_attention_mask: include ``attention_mask``. Default: True in padded mode, False in
            packed mode, where a 0/1 padding mask would make a Hugging Face model ignore the sequence
            boundaries in ``position_ids`` (and let packed sequences attend to each other).
        keys: explicit (prompt, chosen, rejected) key names.
        device: where to put the tensors (default: CPU; leave it there with ``pin_memory``/workers).

    Returns (per call) a dict:
        - ``input_ids``, ``labels``, ``position_ids`` int64 and, if requested, ``attention_mask``:
          (R, L), or (1, R·L) when flattened;
        - ``cu_seqlens`` (2P + 1,) int32 and ``max_seqlen`` int: sequence boundaries in the flattened
          layout, for ``dpo_fast.sequence_logprobs(hidden.view(-1, H), W, labels.view(-1), cu_seqlens=...)``
          and flash-attention varlen kernels;
        - ``pairs`` (P, 2) int64: (chosen, rejected) sequence indices into those 2P outputs;
        - ``example_index`` (P,) int64: position in the incoming example list of each pair;
        - ``seq_lens``, ``completion_lens`` (2P,) int64: real and scored tokens per sequence;
        - ``ref_chosen_logps``, ``ref_rejected_logps`` (P,) float32 in pair order, when the examples
          carry them.
    """

    def __init__(
        self,
        *,
        max_tokens: int | None = None,
        mode: str = "packed",
        pad_token_id: int = 0,
        truncation: str = "keep_start",
        pad_to_multiple_of: int | None = None,
        vocab_size: int | None = None,
        options: PackOptions | None = None,
        flatten: bool | None = None,
        return_attention_mask: bool | None = None,
        keys: tuple[str, str, str] | None = None,
        device: Any = None,
        backend: str = "rust",
    ) -> None:
        if options is None:  # validated here, at construction, not in a worker process
            options = PackOptions(max_tokens=max_tokens, mode=mode, pad_token_id=pad_token_id, truncation=truncation,
                                  pad_to_multiple_of=pad_to_multiple_of, vocab_size=vocab_size)
        elif not isinstance(options, PackOptions):
            raise TypeError(f"options must be a dpo_fast.packing.PackOptions, got {type(options).__name__}")
        if backend not in ("rust", "python"):
            raise ValueError(f"backend must be 'rust' or 'python', got {backend!r}")
        self.options = options
        self.backend = backend
        packed = options.mode == "packed"
        self.flatten = packed if flatten is None else (bool(flatten) and packed)
        self.return_attention_mask = (not packed) if return_attention_mask is None else bool(return_attention_mask)
        self.keys = None if keys is None else tuple(keys)
        self.device = device

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            keys = self.keys or TRL_KEYS[0]
        else:
            keys = resolve_pair_keys(examples[0], self.keys)
        columns = [[ex[k] for ex in examples] for k in keys]
        batch = pack_pairs(*columns, options=self.options, backend=self.backend)
        out = batch.to_torch(self.device)
        if not self.return_attention_mask:
            del out["attention_mask"]
        if self.flatten:
            for k in ("input_ids", "labels", "position_ids", "attention_mask"):
                if k in out:
                    out[k] = out[k].view(1, -1)  # (1, R*L)
        if len(examples) and all(k in examples[0] for k in REF_KEYS):
            idx = batch.example_index
            for k in REF_KEYS:
                ref = torch.tensor([float(ex[k]) for ex in examples], dtype=torch.float32)
                out[k] = ref[torch.from_numpy(idx)].to(self.device) if self.device is not None else ref[torch.from_numpy(idx)]
        return out


def pair_costs(examples: Any, *, keys: tuple[str, str, str] | None = None, max_tokens: int | None = None) -> np.ndarray:
    """Tokens each example's pair occupies when packed: ``2·|prompt| + |chosen| + |rejected|`` (int64, (N,)),
    capped at ``max_tokens`` when given (truncation brings every pair within the budget)."""
    n = len(examples)
    costs = np.empty(n, dtype=np.int64)
    resolved = None
    for i in range(n):
        ex = examples[i]
        if resolved is None:
            resolved = resolve_pair_keys(ex, keys)
        p, c, r = (len(ex[k]) for k in resolved)
        costs[i] = 2 * p + c + r
    if max_tokens is not None:
        np.minimum(costs, max_tokens, out=costs)
    return costs


def _budget_lengths(lengths: Any, max_tokens: int) -> np.ndarray:
    """(N,) int64 pair costs clipped to [2, max_tokens], without wrapping wide unsigned values."""
    arr = np.asarray(lengths)
    if arr.ndim != 1 or (arr.size and (arr.dtype == np.bool_ or arr.dtype.kind not in "iu")):
        raise TypeError(f"lengths must be a 1-D sequence of ints, got {arr.dtype} of shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        i = int(np.argmax(arr < 0))
        raise ValueError(f"lengths[{i}] = {int(arr[i])} is negative: a pair costs 2*|prompt| + |chosen| + |rejected| >= 2 "
                         "tokens")
    # Clip in the input's own dtype first (a uint64 above 2**63 would wrap in an int64 cast).
    capped = np.minimum(arr, arr.dtype.type(max_tokens)) if arr.dtype.kind == "u" else arr
    return np.clip(capped.astype(np.int64), 2, max_tokens)


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Groups pair indices into micro-batches whose pairs total at most ``max_tokens`` tokens.

    Each micro-batch then packs into a single row (``PairCollator(max_tokens=...)`` in packed mode),
    so the model sees ``(1, <= max_tokens)`` inputs with ~no padding. Batches are formed by
    best-fit-decreasing (the packer's rule) over windows of ``window`` pairs of a per-epoch shuffled
    order, and the batch order is shuffled (call :meth:`set_epoch` each epoch, as with
    ``DistributedSampler``). Deterministic for a given (seed, epoch).

    Args:
        lengths: (N,) non-negative ints, the token cost of each pair: ``2·|prompt| + |chosen| + |rejected|``
            (see :func:`pair_costs`); values above ``max_tokens`` count as ``max_tokens`` (the collator
            truncates them), values below 2 as 2. Any integer dtype (uint64 included, never wrapped).
        max_tokens: token budget of a micro-batch, an int in ``[2, 2**31)``.
        shuffle: shuffle pairs into windows and the batches' order each epoch. False: one plan over
            the dataset order, batches in opening order.
        seed: base seed of the shuffles.
        window: pairs considered together by best-fit, an int >= 1 (None: all). Smaller windows mix lengths
            more across epochs at a small cost in packing efficiency.
        drop_last: drop the batch that best-fit opened last in each window (the emptiest).
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        window: int | None = None,
        drop_last: bool = False,
    ) -> None:
        max_tokens = check_budget("max_tokens", max_tokens)  # a micro-batch packs into one int32-indexed row
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
                raise TypeError(f"window must be an int >= 1 or None, got {type(window).__name__}")
            if window < 1:
                raise ValueError(f"window must be an int >= 1 or None, got {window}")
            window = int(window)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int >= 0, got {type(seed).__name__}")
        if seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed}")
        self.lengths = _budget_lengths(lengths, max_tokens)
        self.max_tokens = max_tokens
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.window = window
        self.drop_last = drop_last
        self.epoch = 0
        self._plan: tuple[int, list[list[int]]] | None = None

    @classmethod
    def from_examples(cls, examples: Any, max_tokens: int, *, keys: tuple[str, str, str] | None = None,
                      **kwargs: Any) -> "TokenBudgetBatchSampler":
        """Build from a dataset of TRL-style examples (reads the three lengths of each)."""
        return cls(pair_costs(examples, keys=keys, max_tokens=max_tokens), max_tokens, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[list[int]]:
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        from dpo_fast import _native

        n = self.lengths.shape[0]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        window = n if self.window is None else self.window
        batches: list[list[int]] = []
        for s in range(0, n, max(window, 1)):
            idx = order[s : s + window]
            items, starts = _native.best_fit_bins(np.ascontiguousarray(self.lengths[idx]), self.max_tokens)
            chosen = idx[items]  # dataset indices in bin order
            bins = [chosen[starts[b] : starts[b + 1]].tolist() for b in range(len(starts) - 1)]
            if self.drop_last and bins:
                bins.pop()
            batches.extend(bins)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._plan = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())

    def efficiency(self) -> float:
        """Real tokens / (batches · max_tokens) of the current epoch's plan."""
        batches = self._batches()
        if not batches:
            return 1.0
        used = sum(int(self.lengths[b].sum()) for b in batches)
        return used / (len(batches) * self.max_tokens)
