"""Shared harness of the two-process CPU benches (bench_tp.py, bench_sp.py): a payload counter for the collectives,
gloo set-up on a free local port, and the rank-0 result file.

    res = spawn(worker, args, "bench_tp")    # worker(rank, world, args) returns the result dict on rank 0
    res, outs = time_routes([("tp", step_tp), ...], repeats, zero_grad)   # inside the worker
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class PayloadCounter:
    """Counts the payload bytes of every collective issued through ``torch.distributed`` while installed."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self._orig = {}

    def install(self):
        for name, which in (("all_reduce", 0), ("all_gather_into_tensor", 0), ("all_gather", 1)):
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _orig=orig, _which=which, _name=name, **kwargs):
                t = args[_which]
                if isinstance(t, (list, tuple)):
                    t = args[1]
                self.bytes += t.numel() * t.element_size() * (dist.get_world_size() if _name == "all_gather" else 1)
                self.calls += 1
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapped)

    def uninstall(self):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def time_routes(routes, repeats: int, zero_grad) -> tuple[dict, dict]:
    """Time each ``(name, step)`` of ``routes`` on every rank: one warm-up, then ``repeats`` barrier-aligned steps.

    ``step()`` returns ``(dh, dW)``; ``zero_grad()`` runs before each. Returns ({name: {"step_s": median seconds,
    "comm_bytes": payload bytes, "collectives": calls}} -- counted on the first timed step --, {name: (dh, dW)}
    of the last step).
    """
    res, outs = {}, {}
    for name, fn in routes:
        zero_grad()
        fn()  # warm-up
        times = []
        cnt = PayloadCounter()
        for i in range(repeats):
            zero_grad()
            dist.barrier()
            if i == 0:
                cnt.install()
            t0 = time.perf_counter()
            dh, dw = fn()
            times.append(time.perf_counter() - t0)
            if i == 0:
                cnt.uninstall()
        outs[name] = (dh.clone(), dw.clone())
        res[name] = {"step_s": statistics.median(times), "comm_bytes": cnt.bytes, "collectives": cnt.calls}
    return res, outs


def _entry(rank, world, worker, args, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = worker(rank, world, args)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def spawn(worker, args, name: str, world: int = 2) -> dict:
    """Run ``worker(rank, world, args)`` on ``world`` gloo processes (1 thread each); rank 0's returned dict."""
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), f"{name}.json")
    mp.spawn(_entry, args=(world, worker, args, port, out), nprocs=world, join=True)
    with open(out) as f:
        return json.load(f)
