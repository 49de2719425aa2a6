"""Preference and policy-gradient losses on per-sequence (or per-token) log-probs, through autograd.

Every function here takes log-probs that the engine (:func:`dpo_fast.sequence_logprobs` /
:func:`dpo_fast.token_logprobs`) or any other code produced; nothing here touches logits (except the WPO
reference helper), so this package never imports the engine or the native extension.

Layout (one module per kind; the loss-type names live only in :mod:`.registry`):

- :mod:`.registry` — one entry per loss type: function, properties, formula, paper; renders the tables.
- :mod:`.options` — one frozen, validated, documented options dataclass per family (:class:`DPOOptions`,
  :class:`CPOOptions`, :class:`ORPOOptions`, :class:`KTOOptions`, :class:`GRPOOptions`); the functions here
  and the fused modules take either the dataclass (``options=``) or its fields as keywords.
- :mod:`.inputs` — validation and normalisation of the inputs, shared by every family.
- :mod:`.terms`, :mod:`.grpo_terms` — the elementwise terms the registry points at.
- :mod:`.pairwise` — :func:`dpo_loss` (the pairwise losses, lists with weights, f-divergences, cDPO, WPO,
  TRL metrics), :func:`make_pairwise_config`, :func:`pair_loss_and_grads`, :func:`is_pair_decomposable`.
- :mod:`.weighting` — LD-DPO (:func:`ld_dpo_logps`, :func:`ld_dpo_token_weights`) and WPO
  (:func:`wpo_logweights_from_logits`).
- :mod:`.reference_free` — :func:`cpo_loss` (CPO / SimPO / AlphaPO), :func:`orpo_loss`.
- :mod:`.unpaired` — :func:`kto_loss`, :func:`bco_loss`, :class:`BCORunningMean`.
- :mod:`.policy_gradient` — :func:`grpo_loss`, :class:`GRPOOptions`, :func:`grpo_token_terms`,
  :func:`vllm_importance_sampling`.
- :mod:`.outputs` — :class:`DPOOutput`, :class:`UnpairedOutput`, :class:`GRPOOutput`.

Dtypes: inputs may be bf16/fp16/fp32/fp64; maths runs in float32 (float64 when an input is float64) and the
outputs have that dtype. Inputs are never modified. Metrics cost one host sync (``compute_metrics=False``
skips it). Formulas with their papers: docs/LOSSES.md.
"""

from __future__ import annotations

from .options import (CPOOptions, DPOOptions, GRPOOptions, KTOOptions, OPTION_CLASSES, ORPOOptions, build_options,
                      document_options, option_names, options_doc, takes_options)
from .outputs import DPOOutput, GRPOOutput, UnpairedOutput
from .pairwise import (PairwiseConfig, dpo_loss, is_pair_decomposable, make_pairwise_config, normalize_loss_types,
                       pair_loss_and_grads)
from .policy_gradient import (GRPOTerms, grpo_loss, grpo_token_terms, high_entropy_mask,
                              vllm_importance_sampling)
from .reference_free import cpo_loss, orpo_loss
from .registry import (BATCH_COUPLED, CPO_LOSS_TYPES, EPS_RANGES, F_DIVERGENCE_TYPES, GRPO_LOSS_TYPES, IS_LEVELS,
                       KTO_LOSS_TYPES, LOSS_TYPES, NEEDS_LENGTHS, TRL_SMOOTHED, VLLM_IS_MODES, render_markdown_table)
from .unpaired import BCORunningMean, bco_loss, kto_loss
from .weighting import ld_dpo_logps, ld_dpo_token_weights, wpo_logweights_from_logits

__all__ = [
    "LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "CPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "VLLM_IS_MODES",
    "IS_LEVELS",
    "NEEDS_LENGTHS",
    "BATCH_COUPLED",
    "EPS_RANGES",
    "TRL_SMOOTHED",
    "DPOOptions",
    "CPOOptions",
    "ORPOOptions",
    "KTOOptions",
    "GRPOOptions",
    "OPTION_CLASSES",
    "build_options",
    "takes_options",
    "document_options",
    "options_doc",
    "option_names",
    "DPOOutput",
    "UnpairedOutput",
    "GRPOOutput",
    "dpo_loss",
    "PairwiseConfig",
    "make_pairwise_config",
    "normalize_loss_types",
    "pair_loss_and_grads",
    "is_pair_decomposable",
    "ld_dpo_token_weights",
    "ld_dpo_logps",
    "wpo_logweights_from_logits",
    "cpo_loss",
    "orpo_loss",
    "kto_loss",
    "bco_loss",
    "BCORunningMean",
    "grpo_loss",
    "GRPOTerms",
    "grpo_token_terms",
    "high_entropy_mask",
    "vllm_importance_sampling",
    "render_markdown_table",
]

