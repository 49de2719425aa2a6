"""Every trainer and patch function is importable from dpo_fast.integrations and from dpo_fast.integrations.trl,
lazily: importing one imports only the module that defines it (checked in a fresh interpreter's sys.modules)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("trl")

TRAINER_MODULES = ("trl", "trl_grpo", "trl_kto", "trl_cpo_orpo")
# a dependency only one trainer module has: importing another trainer must not import it
OWN_DEPS = {"trl_cpo_orpo": ["trl.experimental.cpo", "trl.experimental.orpo"]}

PROBE = r"""
import importlib, json, sys
stmt = sys.argv[1]
exec(stmt)
mods = [m for m in sys.modules if m.startswith(("dpo_fast.integrations.", "trl.experimental."))]
print(json.dumps(mods))
"""


def _loaded_after(stmt: str) -> set[str]:
    res = subprocess.run([sys.executable, "-c", PROBE, stmt], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return set(json.loads(res.stdout.splitlines()[-1]))


def test_package_import_is_free():
    loaded = _loaded_after("import dpo_fast.integrations")
    assert not {m for m in loaded if m.rsplit(".", 1)[-1] in TRAINER_MODULES}, loaded


# a fresh interpreter importing TRL each (~10 s): one case per trainer module, and the user's guesses through .trl
@pytest.mark.parametrize("via, name, home", [
    ("dpo_fast.integrations", "FastDPOTrainer", "trl"),
    ("dpo_fast.integrations", "FastGRPOTrainer", "trl_grpo"),
    ("dpo_fast.integrations", "patch_kto_trainer", "trl_kto"),
    ("dpo_fast.integrations", "FastORPOTrainer", "trl_cpo_orpo"),
    ("dpo_fast.integrations.trl", "FastGRPOTrainer", "trl_grpo"),
    ("dpo_fast.integrations.trl", "FastCPOTrainer", "trl_cpo_orpo"),
])
def test_one_name_imports_only_its_module(via, name, home):
    loaded = _loaded_after(f"from {via} import {name}")
    trainers = {m.rsplit(".", 1)[-1] for m in loaded if m.rsplit(".", 1)[-1] in TRAINER_MODULES}
    expected = {home} | ({"trl"} if via.endswith(".trl") else set())
    assert trainers == expected, loaded
    for other, deps in OWN_DEPS.items():
        if other in expected:
            assert set(deps) <= loaded, (name, via, loaded)  # the probe sees them when they are imported
        else:
            assert not set(deps) & loaded, (name, via, loaded)


def test_every_name_resolves_from_both_places():
    import dpo_fast.integrations as integ
    import dpo_fast.integrations.trl as trl_mod

    names = [n for n in integ.__all__]
    for module in TRAINER_MODULES:  # every Fast*Trainer / patch_* the trainer modules define is exported
        mod = __import__(f"dpo_fast.integrations.{module}", fromlist=["__all__"])
        for n in mod.__all__:
            if n.startswith(("Fast", "patch_")):
                assert n in names, f"{n} ({module}) is missing from dpo_fast.integrations._EXPORTS"
                assert getattr(integ, n) is getattr(mod, n) is getattr(trl_mod, n)
    for n in names:
        assert getattr(integ, n) is getattr(trl_mod, n), n
    assert set(integ.__all__) <= set(dir(integ))


def test_unknown_names_raise_attribute_error():
    import dpo_fast.integrations as integ
    import dpo_fast.integrations.trl as trl_mod

    with pytest.raises(AttributeError, match="no attribute 'FastPPOTrainer'"):
        integ.FastPPOTrainer
    with pytest.raises(ImportError):
        exec("from dpo_fast.integrations.trl import FastPPOTrainer", {})
    assert not hasattr(trl_mod, "_SOMETHING_PRIVATE")
