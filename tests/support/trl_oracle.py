"""What the TRL-oracle parity tests share: a stub trainer environment for TRL 1.16's own ``_compute_loss``, the
loss-type x option cases TRL accepts, and the per-case precision.

TRL's loss code runs unchanged on a stub ``self`` that holds only what it reads; these are the pieces of that
stub and the case table that ``tests/test_trl_parity.py`` (``dpo_loss``) and ``tests/test_trl_parity_fused.py``
(the fused ``DPOLoss``) both use.
"""

from __future__ import annotations

import pytest
import torch

from dpo_fast.losses import registry as R

#: label_smoothing per loss type where TRL reads it (exo_pair needs ε > 0)
EPS = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1, "sigmoid": 0.2}
#: the metrics every DPO parity case compares
DPO_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected"]
#: loss lists compared beside the single loss types
LOSS_LISTS = ((["sigmoid", "sft"], "reverse_kl"), (["sigmoid", "ipo", "sft"], "js_divergence"),
              (["robust", "sigmoid"], "forward_kl"), (["apo_zero", "bco_pair", "sft"], "reverse_kl"),
              (["sigmoid_norm", "exo_pair"], "alpha_divergence"))


class StubAccelerator:
    """A one-process accelerator: TRL's gathers are identities."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


class StubModel(torch.nn.Module):
    """What TRL asks of the policy module outside the forward (PEFT check, gradient checkpointing, mode)."""

    is_gradient_checkpointing = False


def dpo_cases(*, wpo_ld_default_fdiv_only: bool = False):
    """pytest params (loss_types, fdiv, ld_alpha, weighting) for every combination TRL 1.16 accepts.

    ``wpo_ld_default_fdiv_only`` keeps WPO x LD-DPO to the default f-divergence (a smaller suite for the fused
    module, whose every case runs the model head)."""
    for e in R.PAIRWISE:
        fdivs = R.F_DIVERGENCE_TYPES if e.trl_accepts_f_divergence else (R.DEFAULT_F_DIVERGENCE,)
        for fdiv in fdivs:
            for ld_alpha in (None, 0.5):
                for weighting in (False, True):
                    if weighting and e.batch_coupled:
                        continue  # TRL raises NotImplementedError (sorting misaligns the weights)
                    if (wpo_ld_default_fdiv_only and weighting and ld_alpha is not None
                            and fdiv != R.DEFAULT_F_DIVERGENCE):
                        continue
                    yield pytest.param([e.name], fdiv, ld_alpha, weighting,
                                       id=f"{e.name}-{fdiv}-ld{ld_alpha}-w{int(weighting)}")
    for types_, fdiv in LOSS_LISTS:
        for ld_alpha in (None, 0.5):
            yield pytest.param(types_, fdiv, ld_alpha, False, id=f"{'+'.join(types_)}-{fdiv}-ld{ld_alpha}")


def case_precision(loss_types, fdiv) -> tuple[torch.dtype, dict]:
    """(dtype, assert_close tolerances) of one case: float64 unless TRL's own code cannot run it there."""
    # TRL's alpha-divergence clamp table has no float64 entry: that case runs in float32
    dtype = torch.float32 if fdiv == "alpha_divergence" else torch.float64
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    if "exo_pair" in loss_types and dtype == torch.float64:
        tol = dict(rtol=1e-7, atol=1e-9)  # TRL forms log(1 − ε), log ε from a float32 tensor of ε
    return dtype, tol


def trl_epsilon(loss_types) -> float:
    """The label_smoothing a case passes to TRL: the largest ε among the loss types whose TRL formula reads it
    (exo_pair's small ε unless robust, which needs a larger one, is in the list)."""
    if "exo_pair" in loss_types and "robust" not in loss_types:
        return EPS["exo_pair"]
    return max([EPS.get(lt, 0.0) for lt in loss_types if R.pairwise(lt).trl_uses_label_smoothing] + [0.0])
