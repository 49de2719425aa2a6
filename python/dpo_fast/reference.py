"""Reference log-probs, computed once before training, with an on-disk cache.

DPO needs log π_ref(y|x) for every chosen and rejected completion. With a frozen reference these numbers
never change, so they can be computed once (no-grad forward: the decoder plus one GEMM over the scored
tokens, no logits tensor) and stored next to the data — TRL's ``precompute_ref_log_probs`` columns
``ref_chosen_logps`` / ``ref_rejected_logps``. The reference model then need not sit in memory during
training.

Cache: one file per (model, data, options) fingerprint in ``cache_dir``. It is written to a temporary file
in the same directory and moved into place with ``os.replace`` (atomic on POSIX and Windows), so an
interrupted run (Ctrl-C, a killed job, a full disk) leaves either no cache file or a complete one — never
a half-written file under the final name. A file that fails to load or does not match its key is ignored
(with a warning) and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .hf import sequence_logprobs_from_model
from .packing import PackOptions, pack_pairs, resolve_pair_keys, shifted_labels

__all__ = ["precompute_reference_logps", "model_fingerprint", "data_fingerprint", "REF_COLUMNS"]

#: the two column names (TRL's)
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------
# fingerprints


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hex digest of the model's class, config and every parameter/buffer (names, dtypes, shapes, bytes).

    Reads all weights once (a few seconds per GB); pass ``model_fingerprint=`` to
    :func:`precompute_reference_logps` to skip it (e.g. a checkpoint hash you already have).
    """
    h = hashlib.blake2b(digest_size=20)
    h.update(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        t = t.detach()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)  # numpy has no bfloat16: hash the raw bits
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(data, keys=None) -> str:
    """Hex digest of the token ids of every example (a ``datasets.Dataset``'s own fingerprint if it has one)."""
    fp = getattr(data, "_fingerprint", None)
    if isinstance(fp, str):
        return "datasets:" + fp
    h = hashlib.blake2b(digest_size=20)
    if len(data):
        k = resolve_pair_keys(data[0], keys)
        for ex in data:
            for name in k:
                a = np.asarray(ex[name], dtype=np.int64)
                h.update(len(a).to_bytes(8, "little"))
                h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# cache files


def _cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"ref_logps-{key}.pt")


def _load_cache(path: str, key: str, n: int | None):
    if not os.path.exists(path):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        c, r = obj[REF_COLUMNS[0]], obj[REF_COLUMNS[1]]
        ok = obj.get("format") == _FORMAT and obj.get("key") == key and c.shape == r.shape and c.dim() == 1
        if ok and n is not None:
            ok = c.shape[0] == n
        if not ok:
            raise ValueError("key/shape mismatch")
        return c, r
    except Exception as e:  # unreadable or foreign file: never trust it
        warnings.warn(f"dpo_fast: ignoring unusable reference-log-prob cache {path} ({e}); recomputing", stacklevel=3)
        return None


def _atomic_save(obj, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, then os.replace onto ``path``."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ref_logps-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: leave nothing behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ----------------------------------------------------------------------------------------------------------
# computing


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _batches_from_examples(data, keys, batch_size: int, mode: str, max_tokens, pad_token_id, truncation):
    n = len(data)
    for s in range(0, n, batch_size):
        rows = [data[i] for i in range(s, min(n, s + batch_size))]
        k = resolve_pair_keys(rows[0], keys)
        cols = [[list(ex[name]) for ex in rows] for name in k]
        cost = max(2 * len(p) + len(c) + len(r) for p, c, r in zip(*cols))
        budget = max_tokens if max_tokens is not None else cost
        if mode == "packed" and max_tokens is None:
            budget = max(cost, min(sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(*cols)), 4 * cost))
        opts = PackOptions(max_tokens=budget, mode=mode, pad_token_id=pad_token_id, truncation=truncation)
        batch = pack_pairs(*cols, options=opts).to_torch()
        if mode == "packed":
            del batch["attention_mask"]  # a padding mask would hide the sequence boundaries from the model
        yield s, batch


def _run_batch(model, batch: Mapping[str, Any], device, temperature, average):
    """(chosen (P,), rejected (P,), example_index (P,) or None) for a PairCollator or TRL-collator batch."""
    dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    if "completion_mask" in batch:  # TRL DataCollatorForPreference: [chosen..., rejected...], unshifted mask
        ids, cm = dev(batch["input_ids"]), dev(batch["completion_mask"])
        labels = shifted_labels(ids, cm)
        lp = sequence_logprobs_from_model(model, ids, labels, attention_mask=dev(batch.get("attention_mask")),
                                          temperature=temperature, average=average)
        c, r = lp.chunk(2)
        return c, r, None
    ids, labels = dev(batch["input_ids"]), dev(batch["labels"])
    pairs = batch["pairs"]
    # PairCollator: packed batches carry cu_seqlens and no padding mask; padded ones a 0/1 attention_mask
    packed = "cu_seqlens" in batch and batch.get("attention_mask") is None
    if packed:
        lp = sequence_logprobs_from_model(model, ids, labels, position_ids=dev(batch.get("position_ids")),
                                          cu_seqlens=dev(batch["cu_seqlens"]), max_seqlen=batch.get("max_seqlen"),
                                          temperature=temperature, average=average)
    else:
        lp = sequence_logprobs_from_model(model, ids, labels, attention_mask=dev(batch.get("attention_mask")),
                                          temperature=temperature, average=average)
    pairs = pairs.to(lp.device)
    return lp[pairs[:, 0]], lp[pairs[:, 1]], batch.get("example_index")


def _is_loader(data) -> bool:
    return isinstance(data, torch.utils.data.DataLoader) or (
        not isinstance(data, (Sequence, np.ndarray)) and not hasattr(data, "column_names")
        and isinstance(data, Iterable))


@torch.no_grad()
def precompute_reference_logps(model: torch.nn.Module, data, *, batch_size: int = 16, mode: str = "padded",
                               max_tokens: int | None = None, truncation: str = "keep_start", pad_token_id: int = 0,
                               keys: Sequence[str] | None = None, temperature: float = 1.0, average: bool = False,
                               cache_dir: str | os.PathLike | None = None, fingerprint: str | None = None,
                               model_fingerprint: str | None = None, progress: bool = True,
                               desc: str = "reference log-probs"):
    r"""Reference log-probs of every (chosen, rejected) pair, with the no-grad fused forward.

    Args:
        model: the reference model (a Hugging Face causal LM; see :mod:`dpo_fast.hf`). Put it on the
            device you want; it runs in eval mode (restored afterwards), under ``torch.no_grad``.
        data: one of
            - a ``datasets.Dataset`` or a list of dict examples with token ids under TRL's keys
              (``prompt_ids``/``chosen_ids``/``rejected_ids`` or ``prompt_input_ids``/...);
            - a ``DataLoader`` (or any iterable) of batches from :class:`dpo_fast.PairCollator` or TRL's
              ``DataCollatorForPreference``, in a fixed order (no shuffling).
        batch_size: examples per forward (datasets / lists).
        mode: ``"padded"`` or ``"packed"`` batches (datasets / lists; see :func:`dpo_fast.pack_pairs`).
        max_tokens, truncation: pair budget and truncation rule — use the values your training batches
            use, or the log-probs will not be those of the same tokens. Default: no truncation.
        pad_token_id: padding id (its positions are never scored).
        keys: explicit (prompt, chosen, rejected) key names.
        temperature, average: as in :func:`dpo_fast.hf.sequence_logprobs_from_model`.
        cache_dir: directory for the on-disk cache (None: no cache). The key covers the model, the data
            and these options.
        fingerprint: data fingerprint for the cache key (default: a ``Dataset``'s own, or a hash of all
            token ids of a list). Required with ``cache_dir`` for loaders.
        model_fingerprint: model fingerprint for the cache key (default: :func:`model_fingerprint`).
        progress: show a tqdm progress bar.
        desc: progress-bar label.

    Returns:
        - ``datasets.Dataset`` in: the dataset with columns ``ref_chosen_logps``, ``ref_rejected_logps``
          (replaced if present);
        - list of dicts in: a new list of new dicts with the two keys added (float);
        - loader in: a dict of two float32 (N,) CPU tensors, in the order the loader yields the pairs
          (``example_index`` of PairCollator batches undone).
    """
    from tqdm.auto import tqdm

    if mode not in ("padded", "packed"):
        raise ValueError(f"mode: expected 'padded' or 'packed', got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    loader = _is_loader(data)
    n = None if loader else len(data)

    key = path = None
    if cache_dir is not None:
        if loader and fingerprint is None:
            raise ValueError("fingerprint: required with cache_dir when data is a DataLoader/iterable (its contents "
                             "cannot be hashed before iterating); pass a string that identifies the data")
        mfp = model_fingerprint if model_fingerprint is not None else globals()["model_fingerprint"](model)
        dfp = fingerprint if fingerprint is not None else data_fingerprint(data, keys)
        opts = dict(format=_FORMAT, max_tokens=max_tokens, truncation=truncation, keys=keys and list(keys),
                    temperature=temperature, average=average, n=n)
        key = hashlib.blake2b(json.dumps([mfp, dfp, opts], sort_keys=True).encode(), digest_size=20).hexdigest()
        path = _cache_path(os.fspath(cache_dir), key)
        hit = _load_cache(path, key, n)
        if hit is not None:
            return _attach(data, loader, *hit)

    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        if loader:
            chosen, rejected = [], []
            total = len(data) if hasattr(data, "__len__") else None
            for batch in tqdm(data, total=total, desc=desc, disable=not progress):
                c, r, ex = _run_batch(model, batch, device, temperature, average)
                c, r = c.float().cpu(), r.float().cpu()
                if ex is not None:  # PairCollator reorders pairs; put them back in the batch's example order
                    order = torch.as_tensor(ex).argsort()
                    c, r = c[order], r[order]
                chosen.append(c)
                rejected.append(r)
            out_c = torch.cat(chosen) if chosen else torch.zeros(0)
            out_r = torch.cat(rejected) if rejected else torch.zeros(0)
        else:
            out_c, out_r = torch.zeros(n), torch.zeros(n)
            batches = _batches_from_examples(data, keys, batch_size, mode, max_tokens, pad_token_id, truncation)
            for start, batch in tqdm(batches, total=-(-n // batch_size), desc=desc, disable=not progress):
                c, r, ex = _run_batch(model, batch, device, temperature, average)
                idx = start + torch.as_tensor(ex)
                out_c[idx], out_r[idx] = c.float().cpu(), r.float().cpu()
    finally:
        model.train(was_training)

    if path is not None:
        _atomic_save({"format": _FORMAT, "key": key, REF_COLUMNS[0]: out_c, REF_COLUMNS[1]: out_r}, path)
    return _attach(data, loader, out_c, out_r)


def _attach(data, loader: bool, c: torch.Tensor, r: torch.Tensor):
    if loader:
        return {REF_COLUMNS[0]: c, REF_COLUMNS[1]: r}
    if hasattr(data, "add_column") and hasattr(data, "column_names"):  # datasets.Dataset
        present = [k for k in REF_COLUMNS if k in data.column_names]
        if present:
            data = data.remove_columns(present)
        return data.add_column(REF_COLUMNS[0], c.tolist()).add_column(REF_COLUMNS[1], r.tolist())
    out = []
    for ex, vc, vr in zip(data, c.tolist(), r.tolist()):
        d = dict(ex)
        d[REF_COLUMNS[0]], d[REF_COLUMNS[1]] = vc, vr
        out.append(d)
    return out
