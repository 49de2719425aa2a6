"""FastCPOTrainer / FastORPOTrainer against trl.experimental's stock CPO and ORPO trainers on a tiny random Llama
(no download): same data and seed, every logged metric equal within fp32 tolerance over several steps."""

import pytest

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from dpo_fast.integrations import trl_cpo_orpo  # noqa: E402
from support.trainer_fixtures import assert_same_logs, logged, make_pair_trainer  # noqa: E402

try:
    trl_cpo_orpo.check_trl_version()
except trl_cpo_orpo.UnsupportedTRLVersion as e:  # pragma: no cover
    pytest.skip(str(e), allow_module_level=True)


def _pair(tmp_path, algo, **cfg):
    stock = make_pair_trainer(algo, "trl", tmp_path / "a", **cfg)
    stock.train()
    fast = make_pair_trainer(algo, "fast", tmp_path / "b", **cfg)
    fast.train()
    return stock, fast


@pytest.mark.parametrize("options", [
    dict(),
    dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.7, beta=2.0),
    dict(loss_type="ipo", beta=0.5, max_steps=2),
    dict(loss_type="hinge", cpo_alpha=0.5, max_steps=2),
    dict(alpha=0.3, label_smoothing=0.1),  # AlphaPO with cDPO smoothing
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_cpo_matches_stock(tmp_path, options):
    stock, fast = _pair(tmp_path, "cpo", **options)
    assert fast.dpo_fast_route == "fused"
    a, b = logged(stock), logged(fast)
    assert_same_logs(a, b)
    assert {"rewards/chosen", "logps/chosen", "logits/chosen", "nll_loss"} <= set(b[0])


def test_orpo_matches_stock(tmp_path):
    stock, fast = _pair(tmp_path, "orpo", beta=0.2)
    assert fast.dpo_fast_route == "two_pass"
    a, b = logged(stock), logged(fast)
    assert_same_logs(a, b)
    assert {"log_odds_ratio", "log_odds_chosen", "nll_loss", "logits/rejected"} <= set(b[0])


def test_patch_and_errors(tmp_path):
    fast = make_pair_trainer("orpo", "fast", tmp_path / "a", max_steps=2)
    fast.train()
    patched = make_pair_trainer("orpo", "patched", tmp_path / "b", max_steps=2)
    assert trl_cpo_orpo.patch_orpo_trainer(patched) is patched
    patched.train()
    assert_same_logs(logged(fast), logged(patched))
    with pytest.raises(TypeError, match="trainer: expected a trl.experimental"):
        trl_cpo_orpo.patch_cpo_trainer(patched)
