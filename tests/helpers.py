"""Deprecated: the shared test helpers moved to the ``support`` package (tests/support/); this re-export goes
once nothing imports it."""

from support import *  # noqa: F401,F403
from support import TOL, assert_close, rel_err  # noqa: F401
