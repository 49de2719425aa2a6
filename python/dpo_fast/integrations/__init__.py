"""Drop-in integrations with training frameworks.

- :mod:`dpo_fast.integrations.trl`: ``FastDPOTrainer`` (a ``trl.DPOTrainer`` subclass) and
  ``patch_trainer`` for an existing ``DPOTrainer`` instance.
- :mod:`dpo_fast.integrations.trl_grpo`: ``FastGRPOTrainer`` / ``patch_grpo_trainer`` (``trl.GRPOTrainer``).
- :mod:`dpo_fast.integrations.trl_kto`: ``FastKTOTrainer`` / ``patch_kto_trainer`` (``trl.KTOTrainer``).
- :mod:`dpo_fast.integrations.trl_cpo_orpo`: ``FastCPOTrainer`` / ``FastORPOTrainer`` and ``patch_cpo_trainer`` /
  ``patch_orpo_trainer`` (``trl.experimental``'s CPO and ORPO trainers).

What every trainer shares (construction, the options table, the loss module, the fused forward, the reference,
routes, metric logging, patching an instance) is :class:`~dpo_fast.integrations.adapter.TrainerAdapter`; the
helpers that need no trainer (TRL version gate, the no-grad forward) are in ``_trainer_common``.

Every trainer and patch function is importable from this package and from :mod:`dpo_fast.integrations.trl`
(``from dpo_fast.integrations import FastGRPOTrainer``, ``from dpo_fast.integrations.trl import FastKTOTrainer``),
each resolved lazily (PEP 562): a name imports only the module that defines it, so one trainer never imports
another's dependencies (e.g. ``trl.experimental`` for CPO/ORPO).

Each integration imports its framework only when imported itself.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    "FastDPOTrainer": "trl",
    "patch_trainer": "trl",
    "FastGRPOTrainer": "trl_grpo",
    "patch_grpo_trainer": "trl_grpo",
    "FastRLOOTrainer": "trl_grpo",
    "patch_rloo_trainer": "trl_grpo",
    "FastKTOTrainer": "trl_kto",
    "patch_kto_trainer": "trl_kto",
    "FastCPOTrainer": "trl_cpo_orpo",
    "FastORPOTrainer": "trl_cpo_orpo",
    "patch_cpo_trainer": "trl_cpo_orpo",
    "patch_orpo_trainer": "trl_cpo_orpo",
    "PaddingFreePreferenceCollator": "padding_free",
    # the TRL version gate (no TRL import)
    "SUPPORTED_TRL": "_trainer_common",
    "UnsupportedTRLVersion": "_trainer_common",
    "check_trl_version": "_trainer_common",
}

__all__ = sorted(_EXPORTS)

_SUBMODULES = ("trl", "trl_grpo", "trl_kto", "trl_cpo_orpo", "padding_free")


def _resolve(module: str, name: str) -> Any:
    """``name`` for ``module``'s ``__getattr__``: imported from the submodule that defines it."""
    source = _EXPORTS.get(name)
    if source is None or f"{__name__}.{source}" == module:  # unknown, or asked of its own (half-imported) module
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{source}"), name)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # `dpo_fast.integrations.trl_kto` without an explicit import
        return importlib.import_module(f"{__name__}.{name}")
    value = _resolve(__name__, name)
    globals()[name] = value  # cache: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_SUBMODULES))
