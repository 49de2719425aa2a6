"""FastGRPOTrainer / patch_grpo_trainer against TRL's stock GRPOTrainer on a tiny random Llama (no download).

The model is saved to a temporary directory and passed as a path, so with beta > 0 TRL loads its own reference
copy from it. Generation is TRL's (HF generate, seeded), so both trainers sample the same completions while their
parameters agree; every logged metric must agree within fp32 tolerance over several steps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from dpo_fast.integrations import trl_grpo  # noqa: E402
from support.trainer_fixtures import (assert_same_logs, logged, make_grpo_trainer, make_rloo_trainer,  # noqa: E402
                                      rss_growth_script, saved_tiny_llama)

try:
    trl_grpo.check_trl_version()
except trl_grpo.UnsupportedTRLVersion as e:  # pragma: no cover
    pytest.skip(str(e), allow_module_level=True)

CLIP = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
        "clip_ratio/high_max")
# off-policy updates (2 iterations per generation, a large step, a narrow clip range): ratios leave the clip range
MOVING = dict(num_iterations=2, epsilon=0.02, learning_rate=0.05, max_steps=2)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("grpo_model"))


def _pair(tmp_path, model_path, **cfg):
    stock = make_grpo_trainer("trl", tmp_path / "a", model_path, **cfg)
    stock.train()
    fast = make_grpo_trainer("fast", tmp_path / "b", model_path, **cfg)
    fast.train()
    return stock, fast


@pytest.mark.parametrize("options", [
    dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=False, **MOVING),
    dict(loss_type="bnpo", gradient_accumulation_steps=2, **MOVING),
    dict(loss_type="dr_grpo", **MOVING),
    dict(loss_type="dapo", gradient_accumulation_steps=2, epsilon_high=0.05, **MOVING),
    dict(loss_type="grpo", importance_sampling_level="sequence", **MOVING),
    dict(loss_type="grpo", beta=0.1, **MOVING),  # TRL's default use_bias_correction_kl=True: ratio-weighted KL
    dict(loss_type="grpo", delta=1.01, **MOVING),
    dict(loss_type="dapo", off_policy_mask_threshold=0.001, **MOVING),
    dict(loss_type="cispo", epsilon_high=1.02, beta=0.1, gradient_accumulation_steps=2, **MOVING),
    dict(loss_type="sapo", **MOVING),
    dict(loss_type="luspo", importance_sampling_level="sequence", **MOVING),
    dict(loss_type="vespo", **MOVING),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items() if k not in MOVING))
def test_fused_route_matches_stock(tmp_path, model_path, options):
    stock, fast = _pair(tmp_path, model_path, **options)
    assert fast.dpo_fast_routes["fused"] == fast.state.global_step * fast.args.gradient_accumulation_steps
    a, b = logged(stock), logged(fast)
    assert_same_logs(a, b)
    assert "entropy" in b[0] and ("kl" in b[0]) == (options.get("beta", 0.0) != 0.0)
    lt = options["loss_type"]
    if lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        assert set(CLIP) <= set(b[0])
        assert any(h["clip_ratio/region_mean"] > 0 for h in a), "the run never clips: the clip metrics are untested"
    elif lt == "cispo":
        assert any(h["cispo_clip_ratio"] > 0 for h in a), "CISPO never clips: its metric is untested"
    elif lt == "vespo":
        assert "vespo/phi_seq_mean" in b[0]


@pytest.mark.parametrize("options, route", [
    (dict(top_entropy_quantile=0.5, **MOVING), "two_pass"),  # TRL's quantile spans every process's tokens
    # with the entropy bonus: TRL's formula on the engine's differentiable entropies
    (dict(top_entropy_quantile=0.5, entropy_coef=0.05, **MOVING), "two_pass"),
], ids=["top_entropy_quantile", "top_entropy_quantile_with_entropy_bonus"])  # entropy bonus alone: fused
def test_unfused_options_take_the_recorded_route_and_match(tmp_path, model_path, options, route, caplog):
    with caplog.at_level("WARNING", logger="dpo_fast.integrations.trl_grpo"):
        stock, fast = _pair(tmp_path, model_path, **options)
    assert fast.dpo_fast_fallback_reasons and set(fast.dpo_fast_routes) == {route}
    assert "not fused by dpo_fast" in caplog.text and f"route '{route}'" in caplog.text
    assert_same_logs(logged(stock), logged(fast))


def test_patch_grpo_trainer_matches_fast(tmp_path, model_path):
    opts = dict(loss_type="grpo", **MOVING)
    fast = make_grpo_trainer("fast", tmp_path / "a", model_path, **opts)
    fast.train()
    patched = make_grpo_trainer("patched", tmp_path / "b", model_path, **opts)
    assert isinstance(patched, trl_grpo.FastGRPOTrainer.__mro__[1]) and isinstance(patched, trl.GRPOTrainer)
    assert trl_grpo.patch_grpo_trainer(patched) is patched
    patched.train()
    assert patched.dpo_fast_route == "fused"
    assert_same_logs(logged(fast), logged(patched))


def test_bad_options_and_inputs(tmp_path, model_path):
    with pytest.raises(TypeError, match="trainer: expected a trl"):
        trl_grpo.patch_grpo_trainer(object())
    with pytest.raises(ValueError, match="loss_type: 'ppo' is not a TRL GRPO loss type"):
        make_grpo_trainer("fast", tmp_path / "x", model_path, loss_type="ppo")

    def short_reward(completions, **kw):
        return [0.0] * (len(completions) - 1)

    errors = []
    for kind in ("trl", "fast"):
        tr = make_grpo_trainer(kind, tmp_path / kind, model_path, reward=short_reward, max_steps=1)
        with pytest.raises(ValueError) as e:
            tr.train()
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "returned 3 rewards, but 4 were expected" in errors[0]


def test_old_and_ref_logps_no_grad_forward_match_trl(tmp_path, model_path):
    """The 1-GEMM no-grad forward gives TRL's per-token log-probs (temperature included, padding at 0)."""
    tr = make_grpo_trainer("fast", tmp_path / "a", model_path, temperature=0.7)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 14, (3, 11), generator=g)
    am = torch.ones_like(ids)
    am[0, :2] = 0  # left padding of the prompt
    am[1, -3:] = 0  # completion padding
    with torch.no_grad():
        fast, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, am, 5)
        stock, _, _ = trl.GRPOTrainer._get_per_token_logps_and_entropies(tr, tr.model, ids, am, 5, batch_size=2)
    assert fast.shape == (3, 5) and torch.all(fast[1, -3:] == 0)
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)


def test_peak_memory_beside_stock(tmp_path):
    """Report (not assert) the growth of peak RSS during train() for stock vs fast, each in a fresh process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs")
    tests = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs, res = {}, {}
    for kind in ("trl", "fast"):  # both at once: the imports dominate the wall time
        out = tmp_path / f"{kind}.json"
        code = rss_growth_script.format(tests=tests, module="support.trainer_fixtures", fn="grpo_for_memory",
                                        kwargs=dict(kind=kind, out_dir=str(tmp_path / kind)), res=str(out))
        procs[kind] = (subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True), out)
    for kind, (p, out) in procs.items():
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
        res[kind] = json.loads(out.read_text())
    assert_same_logs(res["trl"]["logs"], res["fast"]["logs"])
    s, f = res["trl"], res["fast"]
    print(f"\nGRPO peak RSS growth during train() (vocab 8192, 4 x 24 completion tokens, 2 steps, beta>0, 2 iterations): "
          f"trl {s['peak_bytes'] / 2**20:.1f} MiB, dpo_fast {f['peak_bytes'] / 2**20:.1f} MiB; "
          f"time {s['seconds']:.2f}s vs {f['seconds']:.2f}s")


def test_token_logprobs_and_entropy_vs_float64():
    """The two-pass route's helper: log-probs (with gradient) and entropies vs a float64 softmax; odd sizes,
    an ignored row, temperature."""
    from dpo_fast.logprobs import token_logprobs_and_entropy

    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    w = torch.randn(13, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (3, 5), generator=g)
    labels[1] = -100  # a fully masked row
    labels[0, 2] = -100
    lp, ent = token_logprobs_and_entropy(h, w, labels, temperature=0.7)
    z = (h.double() @ w.double().T) / 0.7
    logp = z.log_softmax(-1)
    keep = labels != -100
    ref_lp = torch.where(keep, logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    ref_ent = torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert ent.requires_grad  # since the entropy bonus is fused, the entropies carry a gradient too
    gh, gw = torch.autograd.grad(lp.sum(), (h, w), retain_graph=True)
    rh, rw = torch.autograd.grad(ref_lp.sum(), (h, w), retain_graph=True)
    torch.testing.assert_close(gh, rh.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw.float(), rtol=1e-4, atol=1e-5)
    gh, gw = torch.autograd.grad((lp - 0.3 * ent).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref_lp - 0.3 * ref_ent).sum(), (h, w))
    torch.testing.assert_close(gh, rh.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw.float(), rtol=1e-4, atol=1e-5)


def test_rloo_matches_stock(tmp_path, model_path):
    """RLOO shares the log-prob hook (not the loss): old/ref no-grad forward, policy via the engine, TRL's loss."""
    opts = dict(beta=0.05, **MOVING)
    stock = make_rloo_trainer("trl", tmp_path / "a", model_path, **opts)
    stock.train()
    fast = make_rloo_trainer("fast", tmp_path / "b", model_path, **opts)
    fast.train()
    a, b = logged(stock), logged(fast)
    assert_same_logs(a, b)
    assert {"entropy", *CLIP} <= set(b[0])
    assert trl_grpo.patch_rloo_trainer(fast) is fast
