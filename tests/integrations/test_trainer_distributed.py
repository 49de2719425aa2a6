"""FastDPOTrainer launched with ``accelerate launch`` on 2 CPU processes under DeepSpeed ZeRO-3: the same
per-step logged losses as one process over the same global batch (2 x 4 pairs vs 1 x 8 pairs, 2 steps, so
step 2 also checks the update made from the distributed gradients).

Only ZeRO-3 here: with ``use_cpu`` accelerate runs an FSDP config as plain DDP (checked: the model comes back
wrapped in DistributedDataParallel), so an FSDP2 trainer run needs GPUs; FSDP2 itself is tested through
the own-loop entry points in tests/distributed/test_distributed.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(HERE, "dist", "trainer_worker.py")

pytest.importorskip("trl")
pytest.importorskip("accelerate")

CONFIGS = {
    "zero3": """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: false
  offload_optimizer_device: none
  offload_param_device: none
  gradient_clipping: 1.0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
""",
}


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _read(path, proc):
    assert proc.returncode == 0 and os.path.exists(path), f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single") / "ref.json")
    proc = subprocess.run([sys.executable, WORKER, out, "8"], env=_env(), capture_output=True, text=True, timeout=300)
    return _read(out, proc)


@pytest.mark.parametrize("kind", ["zero3"])
def test_fast_dpo_trainer_two_processes(single, kind, tmp_path):
    if kind == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (a test dependency)")
    cfg = tmp_path / f"{kind}.yaml"
    cfg.write_text(CONFIGS[kind])
    out = str(tmp_path / "out.json")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port", "0",
           WORKER, out, "4"]
    proc = subprocess.run(cmd, env=_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=400)
    got = _read(out, proc)
    assert got["world"] == 2
    assert got["zero3"] and got["wrapper"] == "DeepSpeedEngine", got  # the head really is a ZeRO-3 partition
    assert len(got["logs"]) == len(single["logs"]) == 2
    for step, (a, b) in enumerate(zip(got["logs"], single["logs"])):
        for k in ("loss", "logps/chosen"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (kind, step, k, a, b)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6), (kind, step, a, b)
