"""Compatibility re-exports, kept until ``dpo_fast.integrations`` imports from the new homes.

The checks live in :mod:`dpo_fast.engine.checks`, ``autocast_aware`` in :mod:`dpo_fast.engine.autocast`.
Nothing inside dpo_fast outside ``integrations/`` imports this module; do not add importers.
"""

from .engine.autocast import autocast_aware  # noqa: F401
from .engine.checks import (FLOAT_DTYPES, as_cu_seqlens, check_cu_seqlens, check_engine_inputs,  # noqa: F401
                            check_ignore_index, check_labels_range, check_same_device, check_scalars, check_tensor,
                            cu_seqlens_tensor)
