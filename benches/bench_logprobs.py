"""Benchmark of the log-prob engine and the fused DPO loss: the same as `dpo-fast bench` (see --help)."""

import sys

from dpo_fast.bench import main

if __name__ == "__main__":
    sys.exit(main())
