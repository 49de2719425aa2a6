"""FastKTOTrainer / patch_kto_trainer against TRL's stock KTOTrainer on a tiny random Llama (no download).

The model is saved to a temporary directory and passed as a path, so TRL loads its reference copy from it; same
data and seed; every logged metric (kl, entropy, logits/*, rewards/*, logps/*) equal within fp32 tolerance."""

import pytest

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from dpo_fast.integrations import trl_kto  # noqa: E402
from support.trainer_fixtures import assert_same_logs, logged, make_kto_trainer, saved_tiny_llama  # noqa: E402

try:
    trl_kto.check_trl_version()
except trl_kto.UnsupportedTRLVersion as e:  # pragma: no cover
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("kto_model"))


@pytest.mark.parametrize("options", [
    dict(),  # KTO with its KL reference point z from the mismatched pairs
    dict(loss_type="apo_zero_unpaired", beta=0.3, max_steps=2),
    dict(precompute_ref_log_probs=True, desirable_weight=0.6, max_steps=2),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_kto_matches_stock(tmp_path, model_path, options):
    stock = make_kto_trainer("trl", tmp_path / "a", model_path, **options)
    stock.train()
    fast = make_kto_trainer("fast", tmp_path / "b", model_path, **options)
    fast.train()
    assert fast.dpo_fast_route == "fused"
    a, b = logged(stock), logged(fast)
    assert_same_logs(a, b)
    assert {"kl", "entropy", "logits/chosen", "rewards/margins", "logps/rejected"} <= set(b[0])
    if not options:
        assert any(h["kl"] > 0 for h in a), "z stayed 0: the KL reference point is untested"


def test_patch_kto_trainer(tmp_path, model_path):
    fast = make_kto_trainer("fast", tmp_path / "a", model_path, max_steps=2)
    fast.train()
    patched = make_kto_trainer("patched", tmp_path / "b", model_path, max_steps=2)
    assert trl_kto.patch_kto_trainer(patched) is patched
    patched.train()
    assert_same_logs(logged(fast), logged(patched))
    with pytest.raises(TypeError, match="trainer: expected a trl"):
        trl_kto.patch_kto_trainer(object())
