#!/usr/bin/env bash
# Prepare a GPU check for the `device` tool and print the command to run there.
#
# The check runs from the source tree (PYTHONPATH=python): the device copy of the working tree has the Python
# package and its Triton kernels, and gpu_check.py needs neither the Rust extension nor a wheel. The GPU machine
# has torch and triton and no internet; the peers benchmarked next to dpo_fast (trl, liger-kernel,
# cut-cross-entropy: pure-Python wheels) are downloaded here into .whl/ (git-ignored) and carried with
# carry [".whl"]; there they are unpacked with `pip install --no-index --target` and put on PYTHONPATH.
#
#   scripts/prepare_gpu_run.sh                 # download the peer wheels, print the commands
#   scripts/prepare_gpu_run.sh --no-download   # only print the commands
set -euo pipefail
cd "$(dirname "$0")/.."
download=1
[[ "${1:-}" == "--no-download" ]] && download=0
PEERS=("trl>=1.16,<1.17" liger-kernel cut-cross-entropy)

# the check's one-line command: pipefail, so a failing check is not hidden by `tee`'s exit status
check='PYTHONPATH=python PYTHONUNBUFFERED=1 python3 benches/gpu_check.py --out $OUT --budget-s 360 2>&1 | tee $OUT/log.txt'
peers='python3 -m pip install -q --no-index --no-deps --no-compile --target .whl/site .whl/*.whl'

if (( download )); then
    rm -rf .whl/site .whl/trl-*.whl .whl/liger_kernel-*.whl .whl/cut_cross_entropy-*.whl
    if python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "${PEERS[@]}"; then
        ls -l .whl
    else
        echo "prepare_gpu_run.sh: could not download the peer wheels; run the check without them" >&2
    fi
fi

echo "run on the device (timeout_s ~ 420; the check keeps to --budget-s 360):"
echo "set -o pipefail; $check"
echo
echo "with the peer wheels in .whl/ (carry [\".whl\"]):"
echo "set -o pipefail; $peers && ${check/PYTHONPATH=python/PYTHONPATH=python:.whl/site}"
