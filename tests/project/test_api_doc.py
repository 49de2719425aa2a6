"""docs/API.md lists every public name with its current signature.

Its signature blocks are generated (python -m dpo_fast._apidoc docs/API.md); when a test here fails after a
signature change, rerun that command and commit docs/API.md."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")  # the integrations section imports the trainers

from dpo_fast import _apidoc  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "docs" / "API.md"
RERUN = "docs/API.md is out of date with the code: run `python -m dpo_fast._apidoc docs/API.md` and commit it"


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("'", "").replace('"', ""))


@pytest.fixture(scope="module")
def doc() -> str:
    return API.read_text()


def test_regenerating_changes_nothing(doc):
    new = _apidoc.regenerate(doc)
    if new != doc:
        import difflib

        diff = "".join(list(difflib.unified_diff(doc.splitlines(True), new.splitlines(True), "docs/API.md",
                                                 "regenerated"))[:60])
        pytest.fail(f"{RERUN}\n{diff}")


def test_every_public_name_has_an_entry_with_its_signature(doc):
    """Independent of the generator's formatting: ``str(inspect.signature(obj))`` (quotes and line breaks aside)
    appears right after the name, for every public name of every documented module."""
    flat = _flat(doc)
    for modules in _apidoc.SECTIONS.values():
        for module_name in modules:
            module = importlib.import_module(module_name)
            for name in module.__all__:
                if name in _apidoc._SKIP:
                    continue
                obj = getattr(module, name)
                homes = [m for ms in _apidoc.SECTIONS.values() for m in ms
                         if getattr(importlib.import_module(m), name, None) is obj
                         and name in importlib.import_module(m).__all__]
                heads = [f"{m}.{name}" for m in homes]
                assert any(re.search(re.escape(h) + r"\b", flat) for h in heads), f"{module_name}.{name}: {RERUN}"
                if inspect.isclass(obj) and issubclass(obj, BaseException) or inspect.ismodule(obj):
                    continue
                if callable(obj):
                    sig = _flat(str(inspect.signature(obj)))
                    assert any(_flat(h) + sig in flat for h in heads), f"{module_name}.{name}{sig}: {RERUN}"


def test_names_the_issue_found_missing(doc):
    for name in ("dpo_fast.cpo_loss(", "dpo_fast.orpo_loss(", "dpo_fast.kto_loss(", "dpo_fast.bco_loss(",
                 "dpo_fast.grpo_loss(", "dpo_fast.PairCollator(", "dpo_fast.TokenBudgetBatchSampler(",
                 "dpo_fast.PackOptions(", "dpo_fast.hf.call_with_hidden_states(",
                 "dpo_fast.reference.precompute_reference_logps(", "dpo_fast.integrations.FastGRPOTrainer("):
        assert name in doc, name
    import dpo_fast

    block = doc[doc.index("dpo_fast.GRPOLoss("):]
    forward = _flat(block[block.index(".forward("):block.index(")\n", block.index(".forward("))])
    for param in inspect.signature(dpo_fast.GRPOLoss.forward).parameters:
        if param != "self":
            assert re.search(rf"\b{param}\b", forward), (param, forward)


def test_command_line_check(tmp_path):
    stale = tmp_path / "API.md"
    stale.write_text(API.read_text().replace("dpo_fast.sequence_logprobs(hidden,", "dpo_fast.sequence_logprobs(h,"))
    cmd = [sys.executable, "-m", "dpo_fast._apidoc", str(stale), "--check"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "python -m dpo_fast._apidoc" in res.stderr, res.stdout + res.stderr
    assert "-dpo_fast.sequence_logprobs(h," in res.stdout
    subprocess.run(cmd[:-1], check=True, capture_output=True, timeout=300)
    assert stale.read_text() == API.read_text()


def test_markers_are_checked():
    with pytest.raises(ValueError, match="missing sections"):
        _apidoc.regenerate("<!-- apidoc: dpo_fast -->\n<!-- /apidoc -->\n")
