"""What the TRL-oracle parity tests share: a stub trainer environment for TRL 1.16's own ``_compute_loss``, the
loss-type x option cases TRL accepts, and the per-case precision.

TRL's loss code runs unchanged on a stub ``self`` that holds only what it reads; these are the pieces of that
stub and the case table that ``tests/integrations/test_trainer_dpo_parity.py`` (``dpo_loss``) and ``tests/integrations/test_trainer_dpo_parity_fused.py``
(the fused ``DPOLoss``) both use, and :func:`trl_grpo_loss`: ``GRPOTrainer._compute_loss`` on a stub trainer
(``tests/losses/test_grpo_loss_trl.py`` for ``grpo_loss``, ``tests/fused/test_wrong_answers.py`` for the fused ``GRPOLoss``).
"""

from __future__ import annotations

import types
from collections import defaultdict

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


# ------------------------------------------------------------------------------------------------ GRPO
class GRPOStubAccelerator:
    """The one-process accelerator ``GRPOTrainer._compute_loss`` talks to (gather / reduce / pad: identities)."""

    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x.reshape(-1) if x.dim() == 0 else x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x


def trl_grpo_loss(lp, ent, inputs, cfg, *, adaptive: dict | None = None, train: bool = False,
                  state_out: dict | None = None):
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` on a stub trainer; returns (loss, metrics of the mode run).

    ``lp`` / ``ent``: the (B, T) per-token log-probs / entropies the model call returns (completion positions);
    ``inputs``: TRL's batch dict (completion_mask, advantages, old/ref/sampling log-probs,
    importance_sampling_ratio, num_items_in_batch ...); ``cfg``: :meth:`dpo_fast.losses.GRPOOptions.as_kwargs`.
    ``adaptive``: TRL's adaptive entropy control — ``entropy_target``, ``entropy_coef_delta``,
    ``entropy_coef_min``, ``entropy_coef_max`` and the controller state ``last_world_entropy`` (else static
    ``entropy_coef``); ``train``: run in train mode (where the controller updates and ``entropy_coef`` is logged;
    one micro-batch per optimizer step); ``state_out``: filled with the controller state after the call
    (``entropy_coef``, ``last_world_entropy``).
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    ad = adaptive or {}
    args = types.SimpleNamespace(
        use_bias_correction_kl=cfg["use_bias_correction_kl"], delta=cfg["delta"],
        sapo_temperature_pos=cfg["sapo_temperature_pos"], sapo_temperature_neg=cfg["sapo_temperature_neg"],
        vespo_k_pos=cfg["vespo_k_pos"], vespo_lambda_pos=cfg["vespo_lambda_pos"], vespo_k_neg=cfg["vespo_k_neg"],
        vespo_lambda_neg=cfg["vespo_lambda_neg"], steps_per_generation=1,
        entropy_target=ad.get("entropy_target", 0.2), entropy_coef_delta=ad.get("entropy_coef_delta", 0.0),
        entropy_coef_min=ad.get("entropy_coef_min", 0.0), entropy_coef_max=ad.get("entropy_coef_max", 1.0))
    s = types.SimpleNamespace(
        args=args, accelerator=GRPOStubAccelerator(), model=types.SimpleNamespace(training=train),
        loss_type=cfg["loss_type"], beta=cfg["beta"], epsilon_low=cfg["epsilon_low"],
        epsilon_high=cfg["epsilon_high"], importance_sampling_level=cfg["importance_sampling_level"],
        top_entropy_quantile=cfg["top_entropy_quantile"], off_policy_mask_threshold=cfg["off_policy_mask_threshold"],
        use_vllm=inputs.get("importance_sampling_ratio") is not None, vllm_importance_sampling_correction=True,
        max_completion_length=cfg["max_completion_length"], current_gradient_accumulation_steps=1,
        aux_loss_enabled=False, entropy_coef=cfg["entropy_coef"], use_adaptive_entropy=adaptive is not None,
        _entropy_bonus_enabled=cfg["entropy_coef"] != 0.0 or adaptive is not None,
        _last_world_entropy=ad.get("last_world_entropy", float("inf")), _entropy_window_stats=None,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    s.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, s)
    s.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    s.get_gamma_weights = GRPOTrainer.get_gamma_weights
    s._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, None)
    loss = GRPOTrainer._compute_loss(s, None, inputs)
    if state_out is not None:
        state_out.update(entropy_coef=s.entropy_coef, last_world_entropy=s._last_world_entropy)
    return loss, {k: v[-1] for k, v in s._metrics["train" if train else "eval"].items()}
