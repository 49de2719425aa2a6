"""FastDPOTrainer with DeepSpeed Ulysses sequence parallelism (``ParallelismConfig(sp_size=2, sp_backend=
"deepspeed")``) under ``accelerate launch``, ZeRO-3, 2 CPU processes (gloo): every logged metric of 3 SGD steps
and the trained parameters equal one process's FastDPOTrainer on the same batches (each step: one rank's 2 pairs,
cut into 2 token blocks); evaluate() is refused. ``grad_norm`` and the SGD update would be halved if the sequence
group's gradients were averaged instead of summed (ZeRO-3 on deepspeed < 0.20.2). Plus what stays refused:
context parallelism, other backends, the other trainers; and the collator the DeepSpeed dataloader adapter needs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from support import TOL

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(HERE, "dist", "dpo_sp_worker.py")

pytest.importorskip("trl")
pytest.importorskip("accelerate")

CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: false
  offload_optimizer_device: none
  offload_param_device: none
  gradient_clipping: 1000000.0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _read(out, proc):
    assert proc.returncode == 0 and os.path.exists(out + ".json"), \
        f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    with open(out + ".json") as f:
        return json.load(f), torch.load(out + ".pt")


def test_fast_dpo_trainer_ulysses_sp2_matches_one_process(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (a test dependency)")
    single = str(tmp_path / "single")
    ref = subprocess.Popen([sys.executable, WORKER, single, "single"], env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    cfg = tmp_path / "sp.yaml"
    cfg.write_text(CONFIG)
    sp = str(tmp_path / "sp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port", "0",
           WORKER, sp, "sp"]
    got_proc = subprocess.run(cmd, env=_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=400)
    out, err = ref.communicate(timeout=300)
    want, want_params = _read(single, SimpleNamespace(returncode=ref.returncode, stdout=out, stderr=err))
    got, got_params = _read(sp, got_proc)
    assert got["world"] == 2 and got["wrapper"] == "DeepSpeedEngine", got
    assert got["rows"] == [[4, 16]] * 3, got["rows"]  # 2 pairs = 4 rows, this rank's 16 of 32 (max_length) tokens
    assert want["rows"][0][0] == 4 and want["rows"][0][1] < 32
    assert len(got["logs"]) == len(want["logs"]) == 3
    for step, (a, b) in enumerate(zip(got["logs"], want["logs"])):
        assert set(a) == set(b) and {"loss", "grad_norm", "entropy", "logits/chosen", "mean_token_accuracy",
                                     "rewards/margins", "logps/chosen"} <= set(a), (a, b)
        for k in b:
            assert a[k] == pytest.approx(b[k], **{"rel": TOL["metric"]["rtol"], "abs": TOL["metric"]["atol"]}), \
                (step, k, a[k], b[k])
    assert want["evaluate"] == "ran" and "evaluation is not wired" in got["evaluate"], got["evaluate"]
    assert set(got_params) == set(want_params)
    for name, p in want_params.items():
        torch.testing.assert_close(got_params[name], p, **TOL["f32"], msg=name)
    moved = max((want_params[n] - p).abs().max().item() for n, p in _initial().items())
    assert moved > 1e-3  # the 3 steps really trained the parameters compared


def _initial():
    from support.trl_fixtures import tiny_llama

    return dict(tiny_llama(64)[0].named_parameters())


def _pc(**kw):
    return SimpleNamespace(parallelism_config=SimpleNamespace(**{"cp_size": 1, "sp_size": 1, "sp_backend": None, **kw}))


def test_only_fast_dpo_trainer_with_deepspeed_ulysses_passes_the_sequence_sharding_check():
    from dpo_fast.integrations import adapter

    adapter.check_sequence_sharding("FastDPOTrainer", _pc(sp_size=2, sp_backend="deepspeed"), ulysses=True)
    with pytest.raises(NotImplementedError, match=r"FastKTOTrainer: .*sp_size=2.*sequence_parallel\(hidden, group\)"):
        adapter.check_sequence_sharding("FastKTOTrainer", _pc(sp_size=2, sp_backend="deepspeed"))
    with pytest.raises(NotImplementedError, match=r"sp_backend='deepspeed'.*got sp_backend='torch'"):
        adapter.check_sequence_sharding("FastDPOTrainer", _pc(sp_size=2, sp_backend="torch"), ulysses=True)
    for cfg in (_pc(cp_size=2), _pc(cp_size=2, sp_size=2, sp_backend="deepspeed")):
        with pytest.raises(NotImplementedError, match="context parallelism.*cannot run on CPU.*DISTRIBUTED.md"):
            adapter.check_sequence_sharding("FastDPOTrainer", cfg, ulysses=True)


def test_ulysses_collator_adds_positions_and_labels_at_one_length():
    from dpo_fast.integrations.sequence_sharded import UlyssesPreferenceCollator

    ids = torch.tensor([[5, 6, 7, 0], [5, 8, 9, 4]])
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    cm = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    col = UlyssesPreferenceCollator(lambda ex: {"input_ids": ids, "attention_mask": am, "completion_mask": cm},
                                    sp_size=2, pad_token_id=0, length=6)
    b = col(None)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [5, 8, 9, 4, 0, 0]]
    assert b["attention_mask"][:, 4:].eq(0).all() and b["completion_mask"][:, 4:].eq(0).all()
    assert b["position_ids"].tolist() == [list(range(6))] * 2
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100, -100], [-100, -100, 9, 4, -100, -100]]
    with pytest.raises(ValueError, match="left-padded"):
        UlyssesPreferenceCollator(lambda ex: {"input_ids": ids, "attention_mask": am.flip(1), "completion_mask": cm},
                                  2, 0, 6)(None)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        UlyssesPreferenceCollator(lambda ex: {"input_ids": ids, "attention_mask": am, "completion_mask": cm,
                                              "ref_chosen_logps": torch.zeros(2)}, 2, 0, 6)(None)
    with pytest.raises(ValueError, match="multiple of sp_size"):
        UlyssesPreferenceCollator(None, 2, 0, 5)
