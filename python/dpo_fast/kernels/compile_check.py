"""Compile every Triton kernel variant the launchers use for real GPU targets, without a GPU.

    python -m dpo_fast.kernels.compile_check [--arch 80 90 100] [--jobs 2]

The variants come from :data:`dpo_fast.kernels.logprob.VARIANTS`, the table the launchers check each launch
against: every dtype combination x every constexpr flag value x every GPU block size. Each is compiled by
Triton's bundled compiler down to a cubin (``triton.compile`` of an ``ASTSource`` with a ``GPUTarget``), so a
kernel that only the interpreter accepts fails here. Must run with ``TRITON_INTERPRET`` unset (the
interpreter replaces the jit functions when they are defined); this module refuses to run otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# per kernel: the tensor arguments whose element type is the variant's dtype(s), by position in the dtypes
# tuple; other pointers are int64 labels or float32 vectors; scalars are int32 sizes/strides or fp32 floats
_DTYPE_ARGS = {"fwd": ("z_ptr",), "bwd": ("z_ptr", "dz_ptr")}
_FLOAT_SCALARS = ("inv_temp", "softcap")


def _kernel_fn(kernel: str):
    from .logprob import VARIANTS

    return VARIANTS[kernel]["fn"]


def constexpr_names(fn) -> list[str]:
    """The constexpr parameters of a jit function, in order."""
    return [fn.arg_names[i] for i, p in enumerate(fn.params) if p.is_constexpr]


def table_problems() -> list[str]:
    """Mismatches between each kernel's constexpr parameters and the flags the table lists (must be none)."""
    from .logprob import VARIANTS

    bad = []
    for kernel, spec in VARIANTS.items():
        have, listed = set(constexpr_names(_kernel_fn(kernel))), set(spec["flags"]) | {"BLOCK_V"}
        if have != listed:
            bad.append(f"{kernel}: kernel constexprs {sorted(have)} != table {sorted(listed)}")
    return bad


def variants() -> list[dict]:
    """Every launch variant: {kernel, dtypes, constexprs, num_warps}, from the launchers' table."""
    from .logprob import VARIANTS

    out = []
    for kernel, spec in VARIANTS.items():
        flag_names = sorted(spec["flags"])
        for dtypes in spec["dtypes"]:
            for values in itertools.product(*(spec["flags"][k] for k in flag_names)):
                for block in spec["blocks"]:
                    out.append({"kernel": kernel, "dtypes": tuple(str(d).replace("torch.", "") for d in dtypes),
                                "constexprs": {**dict(zip(flag_names, values)), "BLOCK_V": block},
                                "num_warps": spec["num_warps"](block)})
    return out


def signature(kernel: str, dtypes: tuple[str, ...]) -> dict[str, str]:
    """Triton signature of ``kernel`` for a variant's dtypes (as a torch launch of that variant specialises it)."""
    fn = _kernel_fn(kernel)
    const = set(constexpr_names(fn))
    typed = dict(zip(_DTYPE_ARGS[kernel], (_TRITON_TYPES[d] for d in dtypes)))
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in typed:
            sig[name] = "*" + typed[name]
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(v: dict, arch: int) -> tuple[str, int, float, int]:
    """Compile one variant for sm_<arch>; returns (description, arch, seconds, cubin bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_fn(v["kernel"])
    sig = signature(v["kernel"], v["dtypes"])
    # torch tensors are 16-byte aligned: the JIT marks pointer arguments divisible by 16, so do we
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, v["constexprs"], attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": v["num_warps"]})
    desc = f"{v['kernel']} {'/'.join(v['dtypes'])} {v['constexprs']} warps={v['num_warps']}"
    return desc, arch, time.perf_counter() - t0, len(k.asm["cubin"])


def supported_archs(wanted=(80, 90, 100)) -> list[int]:
    """The archs of ``wanted`` that the installed Triton's NVIDIA backend can target."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.backends.compiler import GPUTarget

    return [a for a in wanted if CUDABackend.supports_target(GPUTarget("cuda", a, 32))]


def _job(args):
    v, arch = args
    try:
        return compile_one(v, arch)
    except Exception as e:  # report the variant, keep compiling the others
        return f"{v['kernel']} {'/'.join(v['dtypes'])} {v['constexprs']}: {type(e).__name__}: {e}", arch, 0.0, 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90, 100])
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the jit functions)", file=sys.stderr)
        return 2
    problems = table_problems()
    for msg in problems:
        print("BAD table:", msg)
    if problems:
        return 1
    archs = a.arch
    work = [(v, arch) for v in variants() for arch in archs]
    t0 = time.perf_counter()
    failed = 0
    if a.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(a.jobs) as pool:
            results = pool.imap_unordered(_job, work)
            for r in _report(results):
                failed += r
    else:
        for r in _report(map(_job, work)):
            failed += r
    print(f"compiled {len(work) - failed}/{len(work)} variants ({len(work) // max(1, len(archs))} x sm_"
          f"{', sm_'.join(map(str, archs))}) in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


def _report(results):
    for desc, arch, secs, nbytes in results:
        ok = nbytes > 0
        print(f"{'ok ' if ok else 'BAD'} sm_{arch} {desc} ({secs:.2f} s, cubin {nbytes} B)", flush=True)
        yield 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
