"""Nothing at the repository root shadows an installed distribution.

`python -m …` and `python -c …` (so `python3 -m pytest`, the README's test command) put the current directory
first on ``sys.path``. When that directory is the repository root, a top-level regular package (a folder with
``__init__.py``) or a top-level ``.py`` file would win over an installed distribution of the same import name.
transformers ≥ 5.25 imports Hugging Face's ``kernels`` distribution at start-up, and the repository keeps a
top-level ``kernels/`` folder (symlinks to the package's kernel files): that folder must stay a plain folder,
which the import system only treats as a namespace-package candidate, so the installed regular package wins."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _top_level_names() -> dict[str, Path]:
    """Import names the repository root offers: folders (any) and ``*.py`` files, name -> path."""
    out = {}
    for p in ROOT.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir() and p.name.isidentifier():
            out[p.name] = p
        elif p.suffix == ".py" and p.stem.isidentifier():
            out[p.stem] = p
    return out


def _run_at_root(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_top_level_kernels_is_a_plain_folder():
    kernels = ROOT / "kernels"
    assert kernels.is_dir() and not kernels.is_symlink(), "kernels/ must be a real folder, not a package symlink"
    assert not (kernels / "__init__.py").exists(), "kernels/__init__.py would shadow Hugging Face's `kernels`"
    # the files there are the package's kernels, not copies
    for f in kernels.glob("*.py"):
        assert f.is_symlink() and f.resolve().parent == ROOT / "python" / "dpo_fast" / "kernels", f


def test_no_top_level_name_is_an_installed_distribution_package():
    installed = md.packages_distributions()  # import name -> [distribution, ...]
    names = _top_level_names()
    clashing = sorted(n for n in names if n in installed)
    # each clash must resolve to the installed distribution when Python runs from the root
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps({n: (importlib.util.find_spec(n).origin or '') for n in sys.argv[1:]}))")
    res = _run_at_root("-c", probe, *clashing)
    assert res.returncode == 0, res.stderr
    import json
    origins = json.loads(res.stdout)
    for name in clashing:
        origin = origins[name]
        assert origin and not Path(origin).resolve().is_relative_to(ROOT.resolve()), (
            f"top-level {names[name].name!r} shadows the installed distribution {installed[name]} "
            f"(import {name!r} from the root resolves to {origin!r})")
    # and no regular package or module at the root can ever shadow one: none has __init__.py / is a .py file
    for name, path in names.items():
        if name in installed:
            assert path.is_dir() and not (path / "__init__.py").exists(), path


def test_trl_and_transformers_import_from_the_root():
    pytest.importorskip("trl")
    try:
        md.distribution("kernels")
    except md.PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` distribution is a dependency of transformers>=5.25 and must be "
                    "installed in the test environment for this check to mean anything")
    res = _run_at_root("-c", "import trl, transformers.activations, kernels; print(kernels.__file__)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not Path(res.stdout.strip()).resolve().is_relative_to(ROOT.resolve()), res.stdout


def test_pytest_collects_without_errors_from_the_root():
    res = _run_at_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", timeout=600)
    tail = "\n".join(res.stdout.splitlines()[-5:])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "error" not in tail.lower(), tail
