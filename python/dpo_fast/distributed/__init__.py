"""Distributed heads: DDP, FSDP2 (DTensor), DeepSpeed ZeRO-3 and vocabulary-parallel tensor parallelism.

Every public entry point of the engine (:func:`dpo_fast.sequence_logprobs`, :func:`dpo_fast.token_logprobs`,
the fused loss modules) carries :func:`distributed_head`, so a head weight held in any of these ways gives
the single-process answer:

* plain tensor (one process, DDP, FSDP2 inside the model's forward): used as is;
* DTensor on a data-parallel mesh (FSDP2 outside the forward, lm_head its own FSDP unit): gathered once per
  call, gradient reduce-scattered by autograd (mean over the mesh, as FSDP2 reduces);
* DTensor ``Shard(0)`` on a tensor-parallel mesh, or a local slice marked with :func:`vocab_parallel`:
  never gathered; per token, a few floats are all-reduced (:mod:`.vocab_parallel`);
* DeepSpeed ZeRO-3 parameter: gathered for the call and for any backward that recomputes logits (:mod:`.zero3`);
* hidden states sharded over tokens (context / sequence parallelism), marked with :func:`sequence_parallel` or
  a DTensor ``Shard`` on the token dimension: per-token work local, per-sequence sums all-reduced once
  (:mod:`.sequence_parallel`); composes with a vocabulary-parallel head.

See docs/DISTRIBUTED.md for the design and the communication per token.
"""

from .head import distributed_head, head_layout, resolve_head, vocab_parallel
from .sequence_parallel import sequence_parallel
from .state import DistributedHeadError, VocabShard, active_shard, vocab_size
from .zero3 import is_zero3_param

__all__ = ["DistributedHeadError", "VocabShard", "active_shard", "distributed_head", "head_layout",
           "is_zero3_param", "resolve_head", "sequence_parallel", "vocab_parallel", "vocab_size"]
