"""Packing of tokenized (prompt, chosen, rejected) triples: options, the packer, collators, TRL's layout.

- :class:`PackOptions` (``options.py``): the one packing configuration, validated once.
- :func:`pack_pairs`, :class:`PackedBatch` (``batch.py``): the front of the Rust packer (``rust/src/pack.rs``);
  ``backend="python"`` runs the pure-Python twin (``_reference.py``), the test oracle.
- :class:`PairCollator`, :class:`TokenBudgetBatchSampler`, :func:`pair_costs` (``collate.py``): DataLoader
  pieces.
- :func:`pack_sequences`, :class:`PackedSequences` (``sequences.py``): the single-sequence entry beside
  ``pack_pairs`` -- token lists packed by the same Rust core (``backend="python"``: the twin).
- :func:`pack_padded_rows`, :class:`PackedRows` (``sequences.py``): single sequences -- a trainer's padded rows --
  packed best-fit-decreasing without their padding, and mapped back.
- :func:`resolve_pair_keys`, :func:`shifted_labels`, :data:`TRL_KEYS` (``layout.py``): where pairs live in a
  TRL example, and the shifted-label rule.
"""

from .batch import IGNORE_INDEX, PackedBatch, pack_pairs, pack_pairs_reference
from .collate import PairCollator, TokenBudgetBatchSampler, pair_costs
from .layout import REF_KEYS, TRL_KEYS, resolve_pair_keys, shifted_labels
from .options import PackOptions
from .sequences import (PackedRows, PackedSequences, PaddedPositionError, pack_padded_rows, pack_sequences,
                        pack_sequences_reference)

__all__ = ["PackOptions", "pack_sequences", "pack_sequences_reference", "PackedSequences", "pack_padded_rows",
           "PackedRows", "PaddedPositionError", "pack_pairs", "pack_pairs_reference", "PackedBatch", "IGNORE_INDEX",
           "PairCollator",
           "TokenBudgetBatchSampler", "pair_costs", "TRL_KEYS", "REF_KEYS", "resolve_pair_keys", "shifted_labels"]
