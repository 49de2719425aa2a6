"""The CLI and the benchmark scripts run end to end (tiny shapes) and write what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(args, **kw):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, **kw)


def test_bench_cli_tiny(tmp_path):
    from dpo_fast import bench

    res = _run([sys.executable, "-m", "dpo_fast.cli", "bench", "--device", "cpu", "--shapes", "tiny",
                "--reps", "2", "--out", str(tmp_path)])
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
    # which fp32-output GEMM path 16-bit inputs take here, recorded beside the versions
    from dpo_fast.engine import gemm_path

    assert data["env"]["gemm_path"] == {"bfloat16": gemm_path("cpu", torch.bfloat16),
                                        "float16": gemm_path("cpu", torch.float16)}
    assert "16-bit GEMM path" in res.stdout
    # the minimum and the spread over the reps, in the JSON ...
    for m in ("naive", "dpo_fast", "dpo_fast_fused"):
        r = by[m]
        assert len(r["ms_reps"]) == 2, r
        assert r["ms"] == r["ms_min"] == min(r["ms_reps"])
        assert r["ms_max"] == max(r["ms_reps"]) and r["ms_min"] <= r["ms_median"] <= r["ms_max"]
        assert r["extra"]["wall_s"] > 0 and r["extra"]["cpu_s"] >= 0 and r["extra"]["threads"] >= 1
    assert by["liger"]["ms_reps"] == [] and by["liger"]["ms_median"] is None
    # ... and in the table: a min, a median and a max column, each row's figures those of the JSON
    header = next(line for line in res.stdout.splitlines() if line.startswith("shape "))
    assert header.split()[:6] == ["shape", "method", "min", "ms", "median", "max"]
    row = next(line for line in res.stdout.splitlines() if line.startswith("tiny") and line.split()[1] == "naive")
    assert [float(x) for x in row.split()[2:5]] == [round(by["naive"][k], 1) for k in ("ms_min", "ms_median",
                                                                                       "ms_max")]
    # the load record: the readings, the verdict by the documented rule, and the line under the table
    load = data["load"]
    for key in ("loadavg_before", "loadavg_after", "cpu_count", "cores", "threads", "ratio", "timed_wall_s",
                "cpu_per_wall", "runq_wait_per_wall", "criteria", "loaded", "reasons", "rule"):
        assert key in load, key
    assert load["cpu_count"] == os.cpu_count() and 1 <= load["cores"] <= load["cpu_count"]
    assert load["rule"] == bench.LOAD_RULE and isinstance(load["loaded"], bool)
    assert len(load["loadavg_before"]) == 3 and load["ratio"] == load["loadavg_before"][0] / load["cpu_count"]
    ran = [r for r in data["results"] if r["ms"] is not None]
    assert abs(load["timed_wall_s"] - sum(r["extra"]["wall_s"] for r in ran)) < 1e-9
    again = bench.load_verdict(loadavg=tuple(load["loadavg_before"]), cpu_count=load["cpu_count"],
                               wall_s=load["timed_wall_s"], cpu_s=load["cpu_s"], runq_wait_s=load["runq_wait_s"])
    assert again["loaded"] == load["loaded"] and again["criteria"] == load["criteria"]
    line = bench.load_line(load)
    assert line in res.stdout.splitlines()
    assert line.startswith("WARNING: the machine was loaded" if load["loaded"] else "load: idle")


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


def _bars(ax):
    """{method: (x, height)} of the bars on one panel."""
    from matplotlib.container import BarContainer

    return {c.get_label(): (c.patches[0].get_x() + c.patches[0].get_width() / 2, c.patches[0].get_height())
            for c in ax.containers if isinstance(c, BarContainer)}


def _labels(ax):
    return {round(t.xy[0], 6): t.get_text() for t in ax.texts}


def test_bench_plot_groups_bars_by_task_with_ratio_labels():
    """Each naive baseline beside its fast variants, a group per task; every bar labelled with its ratio to the
    task's naive; the time bar is the minimum with a line up to the maximum; shape, device and dtype in the
    title; a loaded run says so on the figure."""
    import matplotlib.pyplot as plt

    from dpo_fast import bench

    spec = {  # method: (min ms, median, max, peak MiB)
        "naive": (100.0, 110.0, 130.0, 800.0), "trl_rowloop": (120.0, 121.0, 125.0, 400.0),
        "dpo_fast": (42.0, 45.0, 50.0, 64.0), "dpo_fast_nograd": (10.0, 10.0, 10.0, 8.0),
        "dpo_naive": (200.0, 200.0, 200.0, 1000.0), "dpo_fast_fused": (116.0, 120.0, 140.0, 190.0),
        "grpo_naive": (50.0, 55.0, 60.0, 500.0), "grpo_fused": (25.0, 26.0, 27.0, 100.0),
    }
    results = []
    for m, (lo, med, hi, mib) in spec.items():
        r = bench.Result(m, "cpu-small", "cpu", "float32", ms=lo, peak_bytes=int(mib * 2**20), ms_min=lo,
                         ms_median=med, ms_max=hi, ms_reps=[lo, med, hi])
        results.append(r)
    results.append(bench.Result("liger", "cpu-small", "cpu", "float32", note="CUDA only"))
    load = {"loaded": True, "reasons": ["threads waited 1.40 s for a core per second of the timed reps"]}
    title = bench.plot_title(results, {"cpu": "x86_64", "date": "2026-01-01"}, "cpu", "torch.float32")
    assert "cpu-small (B 4 x T 512, H 256, V 32000)" in title and "cpu (x86_64), float32" in title
    fig = bench.figure(results, title, load)
    try:
        assert fig._suptitle.get_text() == title
        ax_t, ax_m = fig.axes
        t, mem = _bars(ax_t), _bars(ax_m)
        assert set(t) == set(mem) == set(spec)
        assert {m: h for m, (_, h) in t.items()} == {m: v[0] for m, v in spec.items()}  # bar = the minimum
        # grouped: log-probs, then DPO, then GRPO; each naive first, its fast variants right after it
        xs = sorted(t, key=lambda m: t[m][0])
        assert xs == ["naive", "trl_rowloop", "dpo_fast", "dpo_fast_nograd", "dpo_naive", "dpo_fast_fused",
                      "grpo_naive", "grpo_fused"]
        step = t["trl_rowloop"][0] - t["naive"][0]
        assert t["dpo_fast_nograd"][0] - t["naive"][0] == 3 * step  # contiguous within a task ...
        assert t["dpo_naive"][0] - t["dpo_fast_nograd"][0] > step  # ... a gap between tasks
        assert [tl.get_text() for tl in ax_t.get_xticklabels()] == ["sequence log-probs", "DPO loss", "GRPO loss"]
        # the ratio labels, over each bar, against that task's naive
        want_t = {"naive": "1.00x", "trl_rowloop": "1.20x", "dpo_fast": "0.42x", "dpo_fast_nograd": "0.10x",
                  "dpo_naive": "1.00x", "dpo_fast_fused": "0.58x", "grpo_naive": "1.00x", "grpo_fused": "0.50x"}
        want_m = {"naive": "1.00x", "trl_rowloop": "0.50x", "dpo_fast": "0.080x", "dpo_fast_nograd": "0.010x",
                  "dpo_naive": "1.00x", "dpo_fast_fused": "0.19x", "grpo_naive": "1.00x", "grpo_fused": "0.20x"}
        for ax, bars, want in ((ax_t, t, want_t), (ax_m, mem, want_m)):
            labels = _labels(ax)
            assert len(ax.texts) == len(want)
            assert {m: labels[round(bars[m][0], 6)] for m in want} == want
        # the spread: a line from the minimum to the maximum over each bar whose reps differ
        spans = sorted((ln.get_ydata()[0], ln.get_ydata()[1]) for ln in ax_t.lines if len(ln.get_ydata()) == 2)
        assert spans == sorted((v[0], v[2]) for v in spec.values() if v[2] > v[0])
        notes = [x.get_text() for x in fig.texts]
        assert "not run: liger (CUDA only)" in notes
        assert any(n.startswith("WARNING: measured on a loaded machine (threads waited 1.40 s") for n in notes)
        fig2 = bench.figure(results, title, {"loaded": False, "reasons": []})
        assert not any(x.get_text().startswith("WARNING") for x in fig2.texts)
        plt.close(fig2)
    finally:
        plt.close(fig)


def test_load_rule_flags_a_loaded_reading_and_not_an_idle_one():
    from dpo_fast.bench import load_verdict

    # idle 2-core machine: 10 s of timed reps, 1.8 s/s of CPU, 0.02 s/s of run-queue wait, load 0.1
    idle = load_verdict(loadavg=(0.1, 0.2, 0.3), cpu_count=2, wall_s=10.0, cpu_s=18.0, runq_wait_s=0.2)
    assert idle["loaded"] is False and idle["reasons"] == []
    assert idle["criteria"] == {"run_queue_wait": False, "cpu_time": False, "load_average": False}
    assert idle["ratio"] == 0.05 and idle["cpu_per_wall"] == 1.8 and idle["runq_wait_per_wall"] == 0.02
    # the loaded reading seen on that machine: threads waited 1.42 s per s, load 6.5
    busy = load_verdict(loadavg=(6.5, 3.5, 1.5), cpu_count=2, wall_s=4.0, cpu_s=2.3, runq_wait_s=5.68)
    assert busy["loaded"] is True and busy["criteria"]["run_queue_wait"] is True
    assert busy["criteria"]["cpu_time"] is False and busy["criteria"]["load_average"] is True
    assert busy["reasons"] == ["threads waited 1.42 s for a core per second of the timed reps"]
    # no schedstat (not Linux): the CPU time alone decides
    starved = load_verdict(loadavg=None, cpu_count=2, wall_s=4.0, cpu_s=1.2, runq_wait_s=None)
    assert starved["loaded"] is True and starved["criteria"] == {"run_queue_wait": None, "cpu_time": True,
                                                                 "load_average": None}
    assert starved["reasons"] == ["the process got only 0.30 s of CPU time per second of the timed reps"]
    # in-run readings present and quiet: a high load average (say, a run that just ended) does not decide
    after_run = load_verdict(loadavg=(1.9, 0.8, 0.3), cpu_count=2, wall_s=10.0, cpu_s=18.0, runq_wait_s=0.1)
    assert after_run["loaded"] is False and after_run["criteria"]["load_average"] is True
    # CUDA without schedstat: only the load average is left, and it decides
    assert load_verdict(loadavg=(40.0, 30.0, 20.0), cpu_count=64, wall_s=2.0)["loaded"] is True
    assert load_verdict(loadavg=(8.0, 8.0, 8.0), cpu_count=64, wall_s=2.0)["loaded"] is False
    # a window too short to judge (a tiny shape, one rep) is not judged on its in-run readings
    short = load_verdict(loadavg=(0.0, 0.0, 0.0), cpu_count=2, wall_s=0.05, cpu_s=0.001, runq_wait_s=0.05)
    assert short["criteria"] == {"run_queue_wait": None, "cpu_time": None, "load_average": False}
    assert short["loaded"] is False


def test_load_record_sums_the_timed_reps_of_the_methods_that_ran():
    from dpo_fast import bench

    rs = []
    for m, (wall, cpu, wait) in {"naive": (3.0, 1.5, 3.0), "dpo_fast": (1.0, 0.5, 1.4)}.items():
        r = bench.Result(m, "tiny", "cpu", "float32", ms=1.0, peak_bytes=0)
        r.extra.update(wall_s=wall, cpu_s=cpu, runq_wait_s=wait, threads=2)
        rs.append(r)
    rs.append(bench.Result("liger", "tiny", "cpu", "float32", note="CUDA only"))
    rec = bench.load_record(rs, "cpu", (5.0, 2.0, 1.0), (6.0, 3.0, 1.0))
    assert rec["timed_wall_s"] == 4.0 and rec["cpu_s"] == 2.0 and rec["runq_wait_s"] == 4.4
    assert rec["runq_wait_per_wall"] == 1.1 and rec["cpu_per_wall"] == 0.5 and rec["threads"] == 2
    assert rec["loaded"] is True and rec["criteria"]["run_queue_wait"] is True and rec["rule"] == bench.LOAD_RULE
    assert rec["loadavg_before"] == [5.0, 2.0, 1.0] and rec["loadavg_after"] == [6.0, 3.0, 1.0]
    line = bench.load_line(rec)
    assert line.startswith("WARNING: the machine was loaded while timing (threads waited 1.10 s for a core")
    assert "run-queue wait 1.10 s/s and CPU 0.50 s/s over 4.0 s of timed reps" in line
    cuda = bench.load_record(rs, "cuda", (5.0, 2.0, 1.0))
    assert cuda["cpu_s"] is None and cuda["criteria"]["cpu_time"] is None  # the host thread waits for the GPU


def test_table_prints_min_and_spread():
    from dpo_fast import bench

    rs = [bench.Result("naive", "tiny", "cpu", "float32", ms=100.0, peak_bytes=2**20, ms_min=100.0,
                       ms_median=120.0, ms_max=180.0, ms_reps=[100.0, 120.0, 180.0]),
          bench.Result("dpo_fast", "tiny", "cpu", "float32", ms=42.0, peak_bytes=2**19, ms_min=42.0,
                       ms_median=43.5, ms_max=47.25, ms_reps=[42.0, 43.5, 47.25])]
    out = bench.table(rs).splitlines()
    assert "over 3 timed reps: min, median, max" in out[1]
    rows = {line.split()[1]: line.split() for line in out[2:]}
    assert rows["naive"][2:5] == ["100.0", "120.0", "180.0"]
    assert rows["dpo_fast"][2:7] == ["42.0", "43.5", "47.2", "0.5", "0.42"]  # min, median, max, MiB, x naive
