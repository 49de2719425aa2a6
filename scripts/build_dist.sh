#!/usr/bin/env bash
# Build the release artifacts into dist/ (or the folder given as $1): the sdist and an abi3 wheel
# (cp310-abi3, one wheel for CPython >= 3.10) tagged manylinux_2_28, which pip installs on glibc >= 2.28
# (RHEL 8, Ubuntu 20.04, ...).
#
# A plain `maturin build` links against this machine's glibc and gets the tag of that glibc (manylinux_2_34 or
# newer on current distributions); `--compatibility manylinux_2_28` alone then fails maturin's audit (the .so
# needs GLIBC_2.30/2.33/2.34 symbols). `--zig` links with zig against a glibc 2.28 symbol set instead, so the
# wheel needs nothing newer than GLIBC_2.28 (zig: `pip install ziglang`, in the [test] extra). CI builds the
# same tags in the manylinux_2_28 containers instead (.github/workflows/release.yml).
#
# Then `auditwheel show` checks the tag against the symbols the wheel actually needs (skipped with a notice
# when auditwheel is not installed: `pip install auditwheel`).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist}"
compat="${DPO_FAST_MANYLINUX:-manylinux_2_28}"
mkdir -p "$out"
rm -f "$out"/dpo_fast-*.whl "$out"/dpo_fast-*.tar.gz
if ! command -v zig >/dev/null && ! python3 -c "import ziglang" 2>/dev/null; then
    echo "build_dist.sh: zig is needed for a $compat wheel: pip install ziglang" >&2
    exit 2
fi
maturin sdist --out "$out"
maturin build --release --zig --compatibility "$compat" --out "$out"
if command -v auditwheel >/dev/null; then
    auditwheel show "$out"/dpo_fast-*.whl
else
    echo "build_dist.sh: auditwheel not installed, tag not audited (pip install auditwheel)" >&2
fi
ls -l "$out"
