"""FastDPOTrainer beside stock ``trl.DPOTrainer`` on a tiny random vision-language model (CPU).

The model and data are tests/support/vlm_fixtures.py's (those of tests/integrations/test_vlm.py): a tiny random
Qwen2-VL, LLaVA or Gemma-3 built from the config transformers ships (2 decoder layers, hidden 32, a 1-layer vision
tower, 1-8 image tokens per 28x28 / 28x56 image), a locally built processor, 8 preference rows with one image
each, batch 4, fp32, a reference model. ``--vocab`` pads the tokenizer's vocabulary with unused words so that the
head is a real LM's size (default 32000, as in tests/integrations/test_trainer_dpo.py's memory test); the
decoder and vision tower stay tiny, so the numbers show the head's share. ``--softcap`` sets Gemma-3's text-config
``final_logit_softcapping`` (which TRL's fused LM head applies and the model's own forward does not).

Each trainer runs in a fresh process with one torch thread (tests/support/trainer_fixtures.py's
``rss_growth_script``): peak = growth of the peak resident set (VmHWM, reset through ``/proc/self/clear_refs``
right before ``train()``); time = wall clock of ``train()`` over ``--steps`` steps (both trainers run one after
the other, not at the same time). Every logged metric of the fast trainer is compared with stock: the worst
|fast - stock| / (1e-4 |stock| + 1e-5) is printed (at most 1 means within the tests' tolerance).

Usage: ``python benches/bench_vlm.py [--kind qwen2_vl|llava|gemma3] [--softcap 0.2] [--vocab 32000] [--steps 4]
[--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent.parent / "tests")


def run(fast: bool, kind: str, vocab: int, steps: int, softcap: float | None, tmp: Path) -> dict:
    sys.path.insert(0, TESTS)
    from support.trainer_fixtures import rss_growth_script
    from support.vlm_fixtures import tokenizer

    extra = max(0, vocab - len(tokenizer(kind=kind)))
    res = tmp / f"{'fast' if fast else 'trl'}.json"
    kwargs = dict(fast=fast, out_dir=str(tmp / ("b" if fast else "a")), kind=kind, extra_vocab=extra,
                  softcap=softcap, max_steps=steps)
    code = rss_growth_script.format(tests=TESTS, module="support.vlm_fixtures", fn="make_dpo", kwargs=kwargs,
                                    res=str(res))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stdout[-3000:] + p.stderr[-3000:])
    return json.loads(res.read_text())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="qwen2_vl", choices=["qwen2_vl", "llava", "gemma3"])
    ap.add_argument("--softcap", type=float, default=None, help="Gemma-3's text-config final_logit_softcapping")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        stock = run(False, a.kind, a.vocab, a.steps, a.softcap, Path(d))
        fast = run(True, a.kind, a.vocab, a.steps, a.softcap, Path(d))
    worst, worst_key = 0.0, None  # the largest |fast - stock| / (1e-4 |stock| + 1e-5): <= 1 passes the tests' check
    for x, y in zip(stock["logs"], fast["logs"]):
        for k, v in x.items():
            if k in y and isinstance(v, (int, float)) and k not in ("epoch", "learning_rate", "step_time"):
                r = abs(v - y[k]) / (1e-4 * abs(v) + 1e-5)
                if r > worst:
                    worst, worst_key = r, f"{k}: {v} vs {y[k]}"
    out = {"kind": a.kind, "softcap": a.softcap, "vocab": a.vocab, "steps": a.steps,
           "trl_peak_mib": stock["peak_bytes"] / 2**20, "fast_peak_mib": fast["peak_bytes"] / 2**20,
           "trl_s": stock["seconds"], "fast_s": fast["seconds"], "worst_metric_vs_tolerance": worst,
           "worst_metric": worst_key, "load_avg": os.getloadavg()[0]}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
