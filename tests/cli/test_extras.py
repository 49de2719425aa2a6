"""A missing optional dependency gives one line naming the extra to install, never a traceback: the bench
(without matplotlib: results.json still written), the demo (without transformers or matplotlib, or asked for
CUDA on a machine without it) and the examples. Each check runs in a fresh interpreter with the module
blocked (``sys.modules[name] = None`` makes every import of it fail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_fast.extras import MissingExtraError, install_hint, require

ROOT = Path(__file__).resolve().parents[2]

BLOCKED = r"""
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None
if {script!r}:
    sys.argv = [{script!r}]
    runpy.run_path({script!r}, run_name="__main__")
else:
    from dpo_fast.cli import main
    sys.exit(main({argv!r}))
"""


def _run_blocked(blocked, argv=(), script="", cwd=None):
    code = BLOCKED.format(blocked=list(blocked), argv=list(argv), script=str(script))
    env = dict(os.environ, TRITON_INTERPRET="0", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=cwd)


def _one_clear_line(stderr: str, module: str, extra: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if module in ln]
    assert len(lines) == 1, stderr[-3000:]
    assert f'pip install "dpo-fast[{extra}]"' in lines[0] and "not installed" in lines[0], lines[0]
    return lines[0]


def test_require_returns_the_module_or_names_the_extra(monkeypatch):
    assert require("json", "bench") is json
    for name in ("matplotlib", "matplotlib.pyplot"):  # an earlier test may have imported pyplot already
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtraError) as e:
        require("matplotlib.pyplot", "bench", feature="the plot")
    assert isinstance(e.value, ModuleNotFoundError) and e.value.name == "matplotlib" and e.value.extra == "bench"
    assert str(e.value) == f"the plot needs matplotlib, which is not installed: {install_hint('bench')}"
    with pytest.raises(SystemExit) as e:
        require("matplotlib", "bench", exit=True)
    assert "dpo-fast[bench]" in str(e.value.code)


def test_bench_without_matplotlib_writes_json_and_says_so(tmp_path):
    res = _run_blocked(["matplotlib"], ["bench", "--device", "cpu", "--shapes", "tiny", "--reps", "1",
                                        "--methods", "naive,dpo_fast", "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    _one_clear_line(res.stderr, "matplotlib", "bench")
    assert "no results.png" in res.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in data["results"]} == {"naive", "dpo_fast"}
    assert not (tmp_path / "results.png").exists()


@pytest.mark.parametrize("blocked", ["transformers", "matplotlib"])
def test_demo_without_its_extra(blocked, tmp_path):
    res = _run_blocked([blocked], ["demo", "--quick", "--steps", "1", "--plot", str(tmp_path / "d.png")])
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    line = _one_clear_line(res.stderr, blocked, "demo")
    assert line.startswith("dpo-fast demo: ")
    assert "training pairs" not in res.stdout  # said before any work started


def test_demo_cuda_without_a_device(monkeypatch, capsys):
    from dpo_fast.demo import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        run(["--quick", "--steps", "1", "--device", "cuda", "--plot", ""])
    assert e.value.code == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["--quick", "--device", "tpu", "--plot", ""])
    assert "--device: expected cpu or cuda, got 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize("script, blocked, extra", [("own_loop.py", "transformers", "hf"),
                                                    ("use_with_trl.py", "trl", "trl"),
                                                    ("use_with_trl.py", "datasets", "trl")])
def test_example_without_its_extra(script, blocked, extra, tmp_path):
    res = _run_blocked([blocked], script=ROOT / "docs" / "examples" / script, cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    _one_clear_line(res.stderr, blocked, extra)
