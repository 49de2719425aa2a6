"""The fused loss modules: from last hidden states to a loss in one pass over the logits.

- the route, one file per concern: :mod:`.module` — ``FusedLossModule`` (shared options, autocast and
  distributed wiring at ``forward``, the choice between the one-pass and the two-pass route, the no-grad
  reference forward); :mod:`.plan` — units, groups and the ``UnitTask`` protocol; :mod:`.logits_pass` — the
  one-pass autograd Function; :mod:`.records` — the output records (``route``, ``token_sums``), each
  registered with ``fused_record``; :mod:`.metrics` — TRL's token metrics from the pass's statistics.
- :mod:`.dpo` — :class:`DPOLoss`, :func:`pair_logprobs`; :mod:`.reference_free` — :class:`CPOLoss`,
  :class:`ORPOLoss`; :mod:`.kto` — :class:`KTOLoss`; :mod:`.grpo` — :class:`GRPOLoss`.
- :mod:`.pairs` — preference pairs as units (layouts, LD-DPO weights, the logits/* GEMV).

A module supplies only how tokens group into units and the loss on per-unit values (a
:class:`~dpo_fast.fused.plan.UnitTask`); every module therefore has packed input, token metrics, the
two-pass fallback and the no-grad forward.
"""

from .dpo import DPOLoss, pair_logprobs
from .grpo import GRPOLoss
from .kto import KTOLoss
from .reference_free import CPOLoss, ORPOLoss
from .records import ROUTES, FusedDPOOutput, FusedGRPOOutput, FusedUnpairedOutput

__all__ = ["CPOLoss", "DPOLoss", "FusedDPOOutput", "FusedGRPOOutput", "FusedUnpairedOutput", "GRPOLoss", "KTOLoss",
           "ORPOLoss", "ROUTES", "pair_logprobs"]
