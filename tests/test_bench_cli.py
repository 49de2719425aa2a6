"""The CLI and the benchmark scripts run end to end (tiny shapes) and write what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, **kw)


def test_bench_cli_tiny(tmp_path):
    res = _run([sys.executable, "-m", "dpo_fast.cli", "bench", "--device", "cpu", "--shapes", "tiny",
                "--reps", "1", "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    by = {r["method"]: r for r in data["results"]}
    for m in ("naive", "trl_rowloop", "dpo_fast", "dpo_fast_nograd", "dpo_naive", "dpo_fast_fused"):
        assert by[m]["ms"] > 0 and by[m]["peak_bytes"] is not None, m
    # equal results: ours agrees with naive
    assert by["dpo_fast"]["max_abs_diff_vs_naive"] < 1e-3
    assert by["dpo_fast_fused"]["max_abs_diff_vs_naive"] < 1e-4
    assert by["liger"]["note"] and by["cce"]["note"]  # listed with the reason they did not run
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert "x naive time" in res.stdout


def test_bench_rejects_bad_arguments():
    res = _run([sys.executable, "-m", "dpo_fast.cli", "bench", "--shapes", "nope"])
    assert res.returncode != 0 and "unknown shape 'nope'" in res.stderr
    res = _run([sys.executable, "-m", "dpo_fast.cli", "frobnicate"])
    assert res.returncode == 2 and "unknown command" in res.stderr


def test_info():
    res = _run([sys.executable, "-m", "dpo_fast.cli", "info"])
    assert res.returncode == 0, res.stderr
    for key in ("dpo_fast", "native", "torch", "triton", "CUDA"):
        assert key in res.stdout
    assert "abi3" in res.stdout


def test_gpu_check_script_runs_on_cpu(tmp_path):
    res = _run([sys.executable, str(ROOT / "benches" / "gpu_check.py"), "--device", "cpu", "--skip-bench",
                "--out", str(tmp_path)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    checks = json.loads((tmp_path / "check.json").read_text())
    assert checks and all(c["ok"] for c in checks)


def test_bench_packing_leaves_the_tracked_record_alone(tmp_path):
    """By default the packing benchmark writes bench_out/packing.json, never the tracked benches/packing.json."""
    (tmp_path / "benches").mkdir()
    tracked = tmp_path / "benches" / "packing.json"
    tracked.write_text((ROOT / "benches" / "packing.json").read_text())
    before = tracked.read_bytes()
    args = ["--pairs", "300", "--repeat", "1", "--list-pairs", "50", "--skip-python"]
    res = _run([sys.executable, str(ROOT / "benches" / "bench_packing.py"), *args], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert tracked.read_bytes() == before
    out = json.loads((tmp_path / "bench_out" / "packing.json").read_text())
    assert out["pairs"] == 300 and out["packed_efficiency"] > 0.5
    res = _run([sys.executable, str(ROOT / "benches" / "bench_packing.py"), *args, "--out",
                str(tmp_path / "x" / "p.json")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "x" / "p.json").read_text())["pairs"] == 300 and tracked.read_bytes() == before


def test_bench_plot_readable():
    """One distinct colour per method, one legend for both panels outside the bars, and the methods that were
    not run named on the figure."""
    import matplotlib.colors as mcolors

    from dpo_fast import bench

    results = []
    for shape in ("llama3-8b", "gemma2-2b"):
        for i, m in enumerate(bench.METHODS):
            r = bench.Result(m, shape, "cuda", "bfloat16")
            if m in ("liger", "cce", "liger_dpo"):
                r.note = "CUDA only" if m != "liger_dpo" else "liger-kernel not installed"
            elif m == "grpo_naive" and shape == "llama3-8b":
                r.note = "out of memory"
            else:
                r.ms, r.peak_bytes = 10.0 + i, (1 + i) * 2**20
            results.append(r)
    fig = bench.figure(results, "t")
    ran = [m for m in bench.METHODS if m not in ("liger", "cce", "liger_dpo")]
    assert len(ran) >= 11
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ran
    colors = [mcolors.to_hex(h.get_facecolor()) for h in legend.legend_handles]
    assert len(set(colors)) == len(ran), colors
    assert not any(ax.get_legend() for ax in fig.axes)  # nothing drawn over the bars
    fig.canvas.draw()
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent())
    for ax in fig.axes:  # every bar of a method has that method's colour, on both panels
        for c in ax.containers:
            assert {mcolors.to_hex(p.get_facecolor()) for p in c.patches} == {colors[ran.index(c.get_label())]}
    notes = [t.get_text() for t in fig.texts]
    assert ("not run: liger, cce (CUDA only); liger_dpo (liger-kernel not installed); grpo_naive on llama3-8b "
            "(out of memory)") in notes, notes
    import matplotlib.pyplot as plt

    plt.close(fig)
