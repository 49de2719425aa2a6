"""The README's two set-up commands are what CI runs, each installs what it needs, and CI fails when one does.

.ci/run reads the commands from README.md (between the setup-commands markers) and runs them in a fresh
virtualenv; here: the extraction gives exactly the two commands, the extras they install cover every
third-party module the test suite imports, those are installed (a missing one fails here instead of a module
being skipped), and .ci/run's exit status follows the commands'."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI_RUN = ROOT / ".ci" / "run"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name -> distribution name, where they differ
DIST_OF = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}


def _names(reqs) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in reqs}


def _commands() -> list[str]:
    res = subprocess.run(["bash", str(CI_RUN), "--print-commands"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_ci_runs_exactly_the_readme_commands():
    bench, test = _commands()
    assert bench == 'pip install ".[bench]" && dpo-fast bench'
    assert test.startswith('pip install ".[test]" && ') and test.endswith("python3 -m pytest -q")
    assert "cargo test --quiet" in test
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{bench}\n{test}\n```" in readme  # one block, as a user copies it
    script = CI_RUN.read_text()
    assert "python3 -m venv" in script and 'bash -c "$cmd"' in script


def test_extras_cover_what_the_commands_need():
    extras = PYPROJECT["optional-dependencies"]
    assert "matplotlib" in _names(extras["bench"])  # results.png
    test_extra = _names(extras["test"])
    assert {"pytest", "hypothesis", "maturin", "matplotlib", "transformers", "trl", "datasets", "accelerate",
            "tokenizers", "peft", "deepspeed"} <= test_extra
    assert any(r.startswith("trl>=1.16,<1.17") for r in extras["test"])
    # every third-party module a test imports (directly, via pytest.importorskip, or in a subprocess script)
    # comes from the core dependencies or the [test] extra
    have = _names(PYPROJECT["dependencies"]) | test_extra
    local = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"support", "dpo_fast", "__future__"}
    needed = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for mod in _third_party_imports(path):
            if mod not in local and mod not in sys.stdlib_module_names:
                needed.setdefault(DIST_OF.get(mod, mod).lower().replace("_", "-"), path.name)
    missing = {d: f for d, f in needed.items() if d not in have}
    assert not missing, f"add to [test] in pyproject.toml (distribution: first test importing it): {missing}"


def _third_party_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip" and node.args
              and isinstance(node.args[0], ast.Constant)):
            yield node.args[0].value.split(".")[0]


def test_test_extra_is_installed():
    """With `pip install ".[test]"` done, nothing the suite needs is missing, so nothing is skipped for it."""
    from packaging.requirements import Requirement

    missing = []
    for r in PYPROJECT["optional-dependencies"]["test"]:
        req = Requirement(r)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            v = md.version(req.name)
        except md.PackageNotFoundError:
            missing.append(r)
            continue
        if not req.specifier.contains(v, prereleases=True):
            missing.append(f"{r} (found {v})")
    assert not missing, f'not installed: {missing}; run: pip install ".[test]"'
    for tool in ("maturin", "cargo"):
        assert shutil.which(tool), f"{tool} is not on PATH"


@pytest.mark.parametrize("second, status", [("echo second-ran", 0), ("echo second-ran && false && echo no", 1)])
def test_ci_run_exit_status(tmp_path, second, status):
    """.ci/run against a README whose commands are stand-ins: its status is 0 only if both succeed."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(CI_RUN, tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text(f"x\n<!-- setup-commands -->\n```bash\necho first-ran\n{second}\n```\n"
                                        "<!-- /setup-commands -->\n")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    res = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == status, res.stdout + res.stderr
    assert "first-ran" in res.stdout and "second-ran" in res.stdout and "\nno\n" not in res.stdout
    assert ("FAILED" in res.stderr) == bool(status)
