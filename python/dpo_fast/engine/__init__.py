"""The log-prob engine: scored positions, logits tiles, the passes and the per-row backend ops.

Modules (each name below is importable from ``dpo_fast.engine``):

- :mod:`.head` — ``Head``: the output head of one call (weight, bias, vocabulary split, master weight, dtype
  policy), ``as_head``; ``SplitHead``, the passes of a head split across processes; ``VocabShard``.
- :mod:`.workspace` — the knobs: workspace budget (``get_workspace_bytes``, ``set_workspace_bytes``) and
  tile precision (``get_exact_logits``, ``set_exact_logits``).
- :mod:`.scored` — ``Scored``, ``prepare``, ``scored_positions``: which positions enter the GEMMs.
- :mod:`.segments` — ``segment_sum``: deterministic per-sequence sums; ``segment_counts``, ``segment_starts``.
- :mod:`.tiles` — ``linear_into``, ``tile``, ``tile_dtype``, ``tile_rows``, ``per_elem_bytes``, ``matmul``,
  ``addmm_fp32_``, ``gemm_path`` (which GEMM path 16-bit inputs take: for ``dpo-fast info`` and benches).
- :mod:`.rows` — the ``RowOps`` interface, ``RowResult`` / ``TokenStats`` records, ``TorchRows``,
  ``TritonRows``, ``make_rows``, ``resolve_backend``, ``acc_dtype``.
- :mod:`.passes` — ``forward_tokens``, ``backward_tokens``, ``scored_logprobs`` and the autograd Functions.
- :mod:`.checks` — the input checks every layer shares (each error names the argument);
  :mod:`.autocast` — ``autocast_aware``: entry points cast their inputs once under ``torch.autocast``.

Importing it does not import Triton (``TritonRows`` imports the kernels when first built).
"""

from .head import Head, SplitHead, VocabShard, as_head
from .passes import (LinearLabelLogprobs, LogitsLabelLogprobs, backward_tokens, forward_tokens,
                     scored_logprobs)
from .rows import (BACKENDS, STAT_KEYS, RowOps, RowResult, TokenStats, TorchRows, TritonRows, acc_dtype,
                   make_rows, resolve_backend)
from .scored import Scored, prepare, scored_positions
from .segments import segment_counts, segment_starts, segment_sum
from .tiles import (addmm_fp32_, epilogue_probe_results, gemm_path, linear_into, matmul, per_elem_bytes, tile,
                    tile_dtype, tile_rows)
from .workspace import get_exact_logits, get_workspace_bytes, set_exact_logits, set_workspace_bytes

__all__ = [
    "BACKENDS", "STAT_KEYS", "Head", "LinearLabelLogprobs", "LogitsLabelLogprobs", "RowOps", "RowResult",
    "Scored", "SplitHead", "TokenStats", "TorchRows", "TritonRows", "VocabShard", "acc_dtype", "addmm_fp32_",
    "as_head", "backward_tokens", "epilogue_probe_results", "forward_tokens", "gemm_path", "get_exact_logits",
    "get_workspace_bytes", "linear_into", "make_rows", "matmul", "per_elem_bytes", "prepare", "resolve_backend",
    "scored_logprobs", "scored_positions", "segment_counts", "segment_starts", "segment_sum", "set_exact_logits",
    "set_workspace_bytes", "tile", "tile_dtype", "tile_rows",
]
