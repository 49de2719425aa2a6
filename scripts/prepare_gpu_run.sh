#!/usr/bin/env bash
# Prepare a GPU check for the `device` tool: build the abi3 wheel here (the GPU machine has no internet and
# builds nothing), put it in .whl/ (git-ignored), and print the command to run there with carry [".whl"].
# The GPU machine has torch and triton; liger-kernel / cut-cross-entropy wheels may be added to .whl/ to
# benchmark them too (pure-Python wheels: `pip download --no-deps -d .whl liger-kernel cut-cross-entropy`).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl/dpo_fast-*.whl
maturin build --release --quiet -o .whl
ls -la .whl
cat <<'CMD'
run on the device (carry [".whl"], timeout_s ~ 420):
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && cd /tmp && PYTHONUNBUFFERED=1 python3 $OLDPWD/benches/gpu_check.py --out $OUT 2>&1 | tee $OUT/log.txt
CMD
