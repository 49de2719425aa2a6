"""Launch a multi-process gloo worker from tests/dist/ and read its results (shared by the distributed tests).

Each worker runs several named scenarios and prints one ``DPO_FAST_RESULT {json}`` line per scenario with
``name``, ``ok``, ``err`` (the worst relative error against the single-process run) and ``detail``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

DIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dist")  # tests/dist/


def launch(worker: str, names: list[str], extra_env: dict | None = None, timeout: int = 300, nproc: int = 2) -> dict:
    """Run ``tests/dist/<worker> <names>`` on ``nproc`` processes (torch.distributed.run); name -> result record."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", **(extra_env or {}))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           os.path.join(DIST, worker), ",".join(names)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("DPO_FAST_RESULT "):
            rec = json.loads(line[len("DPO_FAST_RESULT "):])
            results[rec["name"]] = rec
    if not results:
        raise AssertionError(f"no results from {worker} (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return results


def check(results: dict, name: str) -> None:
    """Fail with the worker's detail unless scenario ``name`` ran and passed."""
    assert name in results, f"{name}: no result (the worker stopped before it)"
    rec = results[name]
    assert rec["ok"], f"{name}: worst error {rec['err']:.3g}: {rec['detail'][:4000]}"
