"""The fused loss modules: from last hidden states to a loss in one pass over the logits.

- :mod:`.route` — the one implementation of the route (groups of whole units, the fused logits pass, the
  two-pass fallback, the output records with ``route`` and ``token_sums``).
- :mod:`.dpo` — :class:`DPOLoss`, :func:`pair_logprobs`; :mod:`.reference_free` — :class:`CPOLoss`,
  :class:`ORPOLoss`; :mod:`.kto` — :class:`KTOLoss`; :mod:`.grpo` — :class:`GRPOLoss`.
- :mod:`.pairs` — preference pairs as units (layouts, LD-DPO weights, the logits/* GEMV).

A module supplies only how tokens group into units and the loss on per-unit values (a
:class:`~dpo_fast.fused.route.UnitTask`); every module therefore has packed input, token metrics, the
two-pass fallback and the no-grad forward.
"""

from .dpo import DPOLoss, pair_logprobs
from .grpo import GRPOLoss
from .kto import KTOLoss
from .reference_free import CPOLoss, ORPOLoss
from .route import ROUTES, FusedDPOOutput, FusedGRPOOutput, FusedUnpairedOutput

__all__ = ["CPOLoss", "DPOLoss", "FusedDPOOutput", "FusedGRPOOutput", "FusedUnpairedOutput", "GRPOLoss", "KTOLoss",
           "ORPOLoss", "ROUTES", "pair_logprobs"]
