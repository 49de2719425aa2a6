"""The release artifacts, built once per module by scripts/build_dist.sh (sdist + release abi3 wheel):

- the wheel is tagged cp310-abi3-manylinux_2_28 or older (pip installs it on glibc >= 2.28: RHEL 8, Ubuntu 20.04)
  and `auditwheel show` agrees with that tag from the symbols the extension actually needs;
- installed into a scratch directory, the Triton kernels import from the installed copy (not from the source
  tree): kernels ship inside the package (dpo_fast/kernels/*.py) and no top-level kernels/ ships;
- the sdist carries what a source build needs (Cargo files, the Rust sources, the Python package)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)  # maturin, auditwheel and ziglang of this interpreter's environment
ENV = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
MAX_GLIBC = (2, 28)

CHECK = r"""
import os, sys, torch
import dpo_fast, dpo_fast._native as native
import dpo_fast.kernels.logprob as k
site = sys.argv[1]
assert dpo_fast.__file__.startswith(site), dpo_fast.__file__
assert k.__file__.startswith(site), k.__file__
h, w = torch.randn(2, 3, 8), torch.randn(19, 8)
labels = torch.randint(0, 19, (2, 3))
a = dpo_fast.sequence_logprobs(h, w, labels, backend="triton")
b = dpo_fast.sequence_logprobs(h, w, labels, backend="torch")
assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)
print("OK", native.build_info())
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist + wheel from scripts/build_dist.sh (the release build: a few minutes on 2 cores, once per module)."""
    # never skipped: these come with `pip install ".[test]"`, and cargo is needed to install dpo-fast at all
    for tool in ("maturin", "cargo", "auditwheel"):
        assert shutil.which(tool, path=ENV["PATH"]), f'{tool} is not on PATH: pip install ".[test]"'
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(["bash", str(ROOT / "scripts" / "build_dist.sh"), str(out)], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=1500)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    (whl,) = dist.glob("dpo_fast-*.whl")
    return whl


def _manylinux_version(platform_tag: str) -> tuple[int, int]:
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    m = re.fullmatch(r"(manylinux_(\d+)_(\d+)|manylinux1|manylinux2010|manylinux2014)_(x86_64|aarch64)", platform_tag)
    assert m, f"not a manylinux platform tag: {platform_tag}"
    return (int(m.group(2)), int(m.group(3))) if m.group(2) else legacy[m.group(1)]


def test_wheel_tags_install_on_glibc_2_28(wheel):
    name, version, _, tags = parse_wheel_filename(wheel.name)
    assert name == "dpo-fast"
    assert {(t.interpreter, t.abi) for t in tags} == {("cp310", "abi3")}, wheel.name
    for t in tags:
        assert _manylinux_version(t.platform) <= MAX_GLIBC, f"{wheel.name}: pip refuses it on glibc 2.28"
    # the WHEEL metadata says the same as the file name
    meta = zipfile.ZipFile(wheel).read(f"dpo_fast-{version}.dist-info/WHEEL").decode()
    assert {ln.split(": ", 1)[1] for ln in meta.splitlines() if ln.startswith("Tag: ")} == {str(t) for t in tags}


def test_auditwheel_accepts_the_tag(wheel):
    res = subprocess.run(["auditwheel", "show", str(wheel)], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    text = " ".join(res.stdout.split())  # auditwheel wraps its lines
    m = re.search(r'is consistent with the following platform tag: "([^"]+)"', text)
    assert m, text
    assert _manylinux_version(m.group(1)) <= MAX_GLIBC, text
    # every tag the file name claims is one auditwheel allows (the symbols need nothing newer)
    for t in parse_wheel_filename(wheel.name)[3]:
        assert _manylinux_version(t.platform) >= _manylinux_version(m.group(1)), text


def test_wheel_ships_kernels(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert "dpo_fast/kernels/logprob.py" in names
    assert {"dpo_fast/py.typed", "dpo_fast/_native.pyi", "dpo_fast/demo/__init__.py",
            "dpo_fast/integrations/trl.py"} <= set(names)
    assert any(re.fullmatch(r"dpo_fast/_native\.abi3\.so", n) for n in names), names
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must not ship as a top-level package"
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    env = dict(os.environ, PYTHONPATH=str(site), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr


def test_sdist_has_the_sources(dist):
    (sdist,) = dist.glob("dpo_fast-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"pyproject.toml", "Cargo.toml", "Cargo.lock", "rust/src/lib.rs", "python/dpo_fast/__init__.py",
            "python/dpo_fast/kernels/logprob.py", "python/dpo_fast/py.typed"} <= names
    assert not any(n.startswith("target/") for n in names)


def test_release_workflow_builds_the_same_artifacts():
    """.github/workflows/release.yml (not run here): sdist + x86_64/aarch64 manylinux_2_28 wheels, published on a tag."""
    yaml = pytest.importorskip("yaml")
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the bare key `on` as True
    assert on["push"]["tags"] == ["v*"]
    jobs = wf["jobs"]
    steps = {name: [s.get("uses", "") for s in job["steps"]] for name, job in jobs.items()}
    sdist = next(s for s in jobs["sdist"]["steps"] if s.get("uses", "").startswith("PyO3/maturin-action@"))
    assert sdist["with"]["command"] == "sdist"
    assert jobs["wheels"]["strategy"]["matrix"]["target"] == ["x86_64", "aarch64"]
    build = next(s for s in jobs["wheels"]["steps"] if s.get("uses", "").startswith("PyO3/maturin-action@"))
    assert build["with"]["manylinux"] == "2_28" and "--release" in build["with"]["args"]
    assert set(jobs["publish"]["needs"]) == {"sdist", "wheels"}
    assert "refs/tags/" in jobs["publish"]["if"] and jobs["publish"]["permissions"] == {"id-token": "write"}
    assert any(u.startswith("pypa/gh-action-pypi-publish@") for u in steps["publish"])


def test_prepare_gpu_run_prints_the_device_command():
    """scripts/prepare_gpu_run.sh prints one-line commands for the device: pipefail (a failing check must not be
    hidden by tee's exit status), the check from the source tree, its log teed under $OUT."""
    res = subprocess.run(["bash", str(ROOT / "scripts" / "prepare_gpu_run.sh"), "--no-download"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    cmds = [ln for ln in res.stdout.splitlines() if ln.startswith("set -o pipefail;")]
    assert len(cmds) == 2, res.stdout
    plain, peers = cmds
    assert plain == ("set -o pipefail; PYTHONPATH=python PYTHONUNBUFFERED=1 python3 benches/gpu_check.py "
                     "--out $OUT --budget-s 360 2>&1 | tee $OUT/log.txt")
    assert "pip install -q --no-index --no-deps" in peers and "--target .whl/site .whl/*.whl &&" in peers
    assert "PYTHONPATH=python:.whl/site " in peers and peers.endswith("2>&1 | tee $OUT/log.txt")
    # the flags it passes are gpu_check.py's
    flags = set(re.findall(r"\s(--[a-z][a-z-]*)", plain.split("gpu_check.py", 1)[1]))
    helptext = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_check.py"), "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120).stdout
    assert "--out" in flags and "--out" in helptext
    assert {"--out", "--budget-s"} <= flags
    missing = sorted(f for f in flags if f not in helptext)
    assert not missing, f"benches/gpu_check.py does not accept {missing}: update scripts/prepare_gpu_run.sh"
