"""Optional dependencies: one clear line naming the extra to install, instead of a ``ModuleNotFoundError``.

dpo_fast itself needs only torch, numpy and tqdm. The features below need more, grouped in pip extras
(pyproject.toml ``[project.optional-dependencies]``):

=========  =====================================================  ========================================
extra      installs                                               for
=========  =====================================================  ========================================
``bench``  matplotlib                                             ``dpo-fast bench``'s results.png
``demo``   transformers, matplotlib                               ``dpo-fast demo``
``hf``     transformers                                           :mod:`dpo_fast.hf` with real models, the
                                                                  own-loop example
``trl``    trl 1.16, datasets, accelerate (+ transformers)        :mod:`dpo_fast.integrations.trl`
``peft``   peft                                                   LoRA models
``test``   everything the test suite needs                        ``python3 -m pytest``
=========  =====================================================  ========================================

Usage::

    from dpo_fast.extras import require
    transformers = require("transformers", "hf", feature="dpo_fast.hf")   # the module, or MissingExtraError
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require", "install_hint"]

# import name -> pip distribution name, where they differ
_DIST = {"cut_cross_entropy": "cut-cross-entropy", "liger_kernel": "liger-kernel"}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed. ``str(err)`` is one line naming the extra to install;
    ``err.name`` is the missing module, ``err.extra`` the extra that provides it."""

    def __init__(self, message: str, *, name: str, extra: str):
        super().__init__(message, name=name)
        self.extra = extra


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``, from PyPI or from a source checkout."""
    return f"pip install \"dpo-fast[{extra}]\" (in a source checkout: pip install \".[{extra}]\")"


def require(module: str, extra: str, *, feature: str | None = None, exit: bool = False) -> ModuleType:
    """Import and return ``module``, or fail with one line naming the pip extra that provides it.

    Args:
        module: the import name (e.g. ``"transformers"``, ``"matplotlib.pyplot"``).
        extra: the dpo-fast extra that installs it (``"bench"``, ``"demo"``, ``"hf"``, ``"trl"``, ...).
        feature: what needs it, for the message (default: the module's top-level name).
        exit: for scripts and commands: raise ``SystemExit`` with the line (printed without a traceback,
            exit status 1) instead of :class:`MissingExtraError`.

    Raises:
        MissingExtraError: (a ``ModuleNotFoundError``) when ``module`` or a module it imports is missing.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = (e.name or module).split(".")[0]
        dist = _DIST.get(missing, missing)
        msg = f"{feature or module.split('.')[0]} needs {dist}, which is not installed: {install_hint(extra)}"
        if exit:
            raise SystemExit(msg) from None
        raise MissingExtraError(msg, name=missing, extra=extra) from e
