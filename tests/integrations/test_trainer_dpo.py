"""FastDPOTrainer / patch_trainer against TRL's stock DPOTrainer on a tiny random Llama (no download).

Peak memory is measured as the growth of the process's peak resident set (VmHWM) during ``train()``, in
a fresh subprocess per trainer: VmHWM is reset (``/proc/self/clear_refs`` = 5) right before training, so
the number is the largest amount of memory the training steps held at once beyond what the process
already held (model, optimizer-free state, imports). Large temporaries (logits tiles) are mmap-backed in
glibc and show up there one-for-one.
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

from dpo_fast.integrations import trl as fast_trl  # noqa: E402
from support.trainer_fixtures import rss_growth_script  # noqa: E402
from support.trl_fixtures import char_tokenizer, logged, make_trainer, sums_dataset, tiny_llama  # noqa: E402

try:
    fast_trl.check_trl_version()
except fast_trl.UnsupportedTRLVersion as e:  # pragma: no cover
    pytest.skip(str(e), allow_module_level=True)

METRICS = ["loss", "grad_norm", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy",
           "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]


def assert_same_logs(a, b, rtol=1e-4, atol=1e-5, keys=METRICS):
    assert len(a) == len(b) > 0
    for step, (x, y) in enumerate(zip(a, b)):
        for k in keys:
            if k not in x and k not in y:
                continue
            assert k in x and k in y, (step, k, sorted(x), sorted(y))
            assert x[k] == pytest.approx(y[k], rel=rtol, abs=atol), (step, k, x[k], y[k])


# ------------------------------------------------------------------------------------------------ stock vs fast



def _can_measure_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def test_stock_vs_fast_same_logs_and_lower_peak_memory(tmp_path):
    """Same data and seed, 4 steps: identical metrics (fp32), and training's peak memory is lower.

    vocab = 32000 (a real-LM vocabulary, tiny hidden size) so the logits side dominates the step's memory,
    as it does in real DPO runs.
    """
    if not _can_measure_rss():
        pytest.skip("needs Linux /proc/self/clear_refs")
    tests = str(Path(__file__).resolve().parents[1])
    procs, results = {}, {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for kind in ("trl", "fast"):
        res = tmp_path / f"{kind}.json"
        code = rss_growth_script.format(tests=tests, module="support.trl_fixtures", fn="make_trainer", res=str(res),
                                        kwargs=dict(kind=kind, out_dir=str(tmp_path / kind), vocab=32000, steps=4))
        procs[kind] = (subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True), res)
    for kind, (p, res) in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
        results[kind] = json.loads(res.read_text())
    stock, fast = results["trl"], results["fast"]
    assert_same_logs(stock["logs"], fast["logs"])
    print(f"\npeak RSS growth during train(): trl {stock['peak_bytes'] / 2**20:.1f} MiB, "
          f"dpo_fast {fast['peak_bytes'] / 2**20:.1f} MiB; time {stock['seconds']:.2f}s vs {fast['seconds']:.2f}s")
    assert fast["peak_bytes"] < 0.5 * stock["peak_bytes"], (fast["peak_bytes"], stock["peak_bytes"])


# ------------------------------------------------------------------------------------------------ in-process


@pytest.mark.parametrize("options", [
    dict(),
    dict(precompute_ref_log_probs=True),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type=["ipo"], beta=0.5),
    dict(loss_type=["robust"], label_smoothing=0.1),
    dict(label_smoothing=0.2),  # TRL's sigmoid ignores label_smoothing; so must we
    dict(ld_alpha=0.5),
    dict(f_divergence_type="js_divergence"),
    dict(use_weighting=True),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_options_match_stock(tmp_path, options):
    stock = make_trainer("trl", tmp_path / "a", **options)
    stock.train()
    fast = make_trainer("fast", tmp_path / "b", **options)
    fast.train()
    assert_same_logs(logged(stock), logged(fast))


def test_patch_trainer_matches_subclass(tmp_path):
    a = make_trainer("fast", tmp_path / "a")
    a.train()
    b = make_trainer("patched", tmp_path / "b")
    assert isinstance(b, fast_trl._FastDPOMixin) and isinstance(b, trl.DPOTrainer)
    assert fast_trl.patch_trainer(b) is b  # idempotent
    b.train()
    assert_same_logs(logged(a), logged(b), rtol=1e-6, atol=1e-7)


def test_peft_lora_matches_stock(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    stock = make_trainer("trl", tmp_path / "a", peft_config=cfg, learning_rate=1e-2)
    stock.train()
    fast = make_trainer("fast", tmp_path / "b", peft_config=cfg, learning_rate=1e-2)
    fast.train()
    assert_same_logs(logged(stock), logged(fast))
    assert logged(fast)[-1]["rewards/margins"] != 0.0  # the adapter trained and the reference is the base


def test_token_metrics_off(tmp_path):
    from trl import DPOConfig

    model, ref = tiny_llama()
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True)
    tr = fast_trl.FastDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=sums_dataset(),
                                 processing_class=char_tokenizer(), token_metrics=False)
    tr.train()
    logs = logged(tr)
    assert "entropy" not in logs[0] and "mean_token_accuracy" not in logs[0] and "rewards/margins" in logs[0]


def test_version_check(monkeypatch):
    with pytest.raises(fast_trl.UnsupportedTRLVersion, match=r"supports TRL >=1\.16\.0,<1\.17\.0; found trl 0\.9\.6"):
        fast_trl.check_trl_version("0.9.6")
    monkeypatch.setenv("DPO_FAST_ALLOW_UNTESTED_TRL", "1")
    assert fast_trl.check_trl_version("0.9.6") == "0.9.6"


def test_patch_rejects_non_trainer():
    with pytest.raises(TypeError, match="DPOTrainer"):
        fast_trl.patch_trainer(object())


def test_mixed_label_smoothing_raises(tmp_path):
    with pytest.raises(NotImplementedError, match="label_smoothing"):
        make_trainer("fast", tmp_path, loss_type=["sigmoid", "robust"], label_smoothing=0.1)


def test_shifted_labels():
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    cm = torch.tensor([[0, 0, 1, 1, 0]])
    from dpo_fast.packing import shifted_labels

    assert shifted_labels(ids, cm).tolist() == [[-100, 7, 8, -100, -100]]
