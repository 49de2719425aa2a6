"""dpo_fast: fused, memory-lean log-prob and preference-loss kernels for PyTorch.

Public API (see README.md):

- :func:`sequence_logprobs`, :func:`token_logprobs` — log-probs of label tokens straight from the last
  hidden states and the lm_head weight, never allocating the (B, T, V) logits.
- :func:`logprobs_from_logits` — the same reduction when you already hold logits.
- :func:`dpo_loss` and the family (:func:`cpo_loss`, :func:`orpo_loss`, :func:`kto_loss`,
  :func:`bco_loss`, :func:`grpo_loss`), and the fused :class:`DPOLoss`, :class:`CPOLoss` (CPO/SimPO/AlphaPO)
  :class:`ORPOLoss`, :class:`KTOLoss` and :class:`GRPOLoss` modules.
- :class:`DPOOptions`, :class:`CPOOptions`, :class:`ORPOOptions`, :class:`KTOOptions`, :class:`GRPOOptions` —
  each loss family's options, declared once; every function and module above takes one as ``options=`` or
  its fields as keyword arguments.
- :func:`pack_pairs` — Rust packing of (prompt, chosen, rejected) triples; :func:`pack_sequences` — of single
  sequences; :func:`pack_padded_rows` — a padded batch's rows re-laid into packed rows.

Names are resolved lazily so that ``import dpo_fast`` does no device probing and does not import Triton.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    # engine
    "sequence_logprobs": "dpo_fast.logprobs",
    "token_logprobs": "dpo_fast.logprobs",
    "logprobs_from_logits": "dpo_fast.logprobs",
    "set_workspace_bytes": "dpo_fast.engine.workspace",
    "get_workspace_bytes": "dpo_fast.engine.workspace",
    "set_exact_logits": "dpo_fast.engine.workspace",
    "get_exact_logits": "dpo_fast.engine.workspace",
    # losses
    "dpo_loss": "dpo_fast.losses",
    "DPOOutput": "dpo_fast.losses",
    "LOSS_TYPES": "dpo_fast.losses",
    "cpo_loss": "dpo_fast.losses",
    "orpo_loss": "dpo_fast.losses",
    "kto_loss": "dpo_fast.losses",
    "bco_loss": "dpo_fast.losses",
    "grpo_loss": "dpo_fast.losses",
    # the options of each loss family, one frozen dataclass each (functions and modules take them as options=)
    "DPOOptions": "dpo_fast.losses",
    "CPOOptions": "dpo_fast.losses",
    "ORPOOptions": "dpo_fast.losses",
    "KTOOptions": "dpo_fast.losses",
    "GRPOOptions": "dpo_fast.losses",
    "DPOLoss": "dpo_fast.fused",
    "pair_logprobs": "dpo_fast.fused",
    "CPOLoss": "dpo_fast.fused",
    "ORPOLoss": "dpo_fast.fused",
    "GRPOLoss": "dpo_fast.fused",
    "KTOLoss": "dpo_fast.fused",
    # packing
    "pack_pairs": "dpo_fast.packing",
    "PackedBatch": "dpo_fast.packing",
    "pack_sequences": "dpo_fast.packing",
    "PackedSequences": "dpo_fast.packing",
    "pack_padded_rows": "dpo_fast.packing",
    "PackOptions": "dpo_fast.packing",
    "PairCollator": "dpo_fast.packing",
    "TokenBudgetBatchSampler": "dpo_fast.packing",
}

__all__ = sorted(_LAZY) + ["__version__"]


_SUBMODULES = ("bench", "cli", "engine", "fused", "hf", "integrations",
               "kernels", "logprobs", "losses", "packing", "reference")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # `dpo_fast.hf` etc. without an explicit import
        return importlib.import_module(f"dpo_fast.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dpo_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
