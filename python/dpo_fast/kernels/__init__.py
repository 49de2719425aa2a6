"""Triton kernels of dpo_fast (one kernel family per file). Importing this package imports Triton.

- :mod:`dpo_fast.kernels.logprob` — row kernels of the fused log-prob engine (forward lse + gather,
  backward in-place logits gradient).
"""

from .logprob import logprob_bwd, logprob_fwd

__all__ = ["logprob_fwd", "logprob_bwd"]
