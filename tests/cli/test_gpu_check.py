"""benches/gpu_check.py's CPU dry run: every code path at tiny shapes, in a subprocess, from the source tree.

The GPU run has one slot; this keeps the script itself tested: each planned correctness case leaves a passing
record (the Triton ones in the interpreter), each timing method a timing record, or a skip with its reason
when its package is missing (Liger, Cut-Cross-Entropy here), and the JSON lines end with a summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benches" / "gpu_check.py"


def test_docstring_names_the_command():
    doc = SCRIPT.read_text().split('"""')[1]
    assert "PYTHONPATH=python" in doc and "benches/gpu_check.py --out $OUT" in doc
    for flag in ("--device", "--quick", "--out", "--budget-s"):
        assert flag in SCRIPT.read_text()


def test_cpu_dry_run_records_every_case_and_method(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    out = r.stdout + r.stderr
    recs = [json.loads(x) for x in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    kinds = [x["kind"] for x in recs]
    assert kinds[0] == "env" and kinds[-1] == "summary", kinds
    assert r.returncode == 0, out[-4000:]
    env_rec = recs[0]
    assert env_rec["device"] == "cpu" and env_rec["backend"] == "torch"
    plan = next(x for x in recs if x["kind"] == "plan")
    expected = {"vocab_slices/torch", "fused_groups/torch", "token_stats/torch", "softcap_temperature_bias/torch",
                "fp16/torch", "exact_logits/torch", "large_nv/torch", "vocab_slices/triton", "token_stats/triton",
                "softcap_temperature_bias/triton"}
    assert expected <= set(plan["cases"])
    checks = {f"{x['case']}/{x['backend']}": x for x in recs if x["kind"] == "check"}
    for case in plan["cases"]:
        rec = checks[case]
        assert rec["ok"] is True and "error" not in rec, rec
    assert checks["large_nv/torch"]["skipped"]  # GPU only
    assert len(checks["vocab_slices/torch"]["bwd_slice_offsets"]) >= 2
    assert len(checks["vocab_slices/triton"]["bwd_slice_offsets"]) >= 2
    assert checks["fused_groups/torch"]["groups"] >= 2 and checks["fused_groups/torch"]["route"] == "fused"
    # timings: one record per method; installed packages timed, missing ones skipped with the reason
    times = {x["method"]: x for x in recs if x["kind"] == "time"}
    assert set(times) == set(plan["methods"])
    import importlib.util

    for method, rec in times.items():
        assert "error" not in rec, rec
        if method in ("liger_dpo", "cce"):
            pkg = "liger_kernel" if method == "liger_dpo" else "cut_cross_entropy"
            if importlib.util.find_spec(pkg) is None:
                assert "not importable" in rec["skipped"], rec
                continue
            assert "skipped" in rec  # they need CUDA
            continue
        if method == "trl_chunked_dpo" and importlib.util.find_spec("trl") is None:
            assert rec["skipped"]
            continue
        assert len(rec["ms"]) == 5 and rec["ms_median"] > 0, rec
    assert any(x["kind"] == "profile" and "error" not in x for x in recs)
    assert any(x["kind"] == "gemm_path" for x in recs)
    summary = recs[-1]
    assert summary["failed"] == [] and summary["budget_cut"] == 0
    assert wall < 300, wall  # ~35 s on the idle 2-core machine


def test_budget_stops_new_work(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path),
                        "--budget-s", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    recs = [json.loads(x) for x in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert recs[-1]["kind"] == "summary" and recs[-1]["budget_cut"] > 0, r.stdout[-2000:]
    assert not any(x["kind"] in ("check", "time") for x in recs)
