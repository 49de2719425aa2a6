"""Triton kernels of dpo_fast (one kernel family per file). Importing this package imports Triton.

- :mod:`dpo_fast.kernels.logprob` — row kernels of the fused log-prob engine (forward lse + gather,
  backward in-place logits gradient).
"""

from .logprob import _logprob_bwd, _logprob_fwd

__all__ = ["_logprob_fwd", "_logprob_bwd"]
