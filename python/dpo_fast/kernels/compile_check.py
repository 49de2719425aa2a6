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
import json
import os
import re
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
    """Every launch variant: {kernel, dtypes, constexprs, num_warps, div16}, from the launchers' table.

    ``div16``: the specialisation Triton's JIT gives a launch whose integer arguments (sizes, offsets, row
    strides) are all multiples of 16 — every real shape (vocabularies of 32000, 128256, 151936, 256000 and
    their tiles) — which lets the compiler prove 16-byte alignment and emit vector loads. Without it (odd
    sizes, as in the tests) the loads stay scalar; both are compiled.
    """
    from .logprob import VARIANTS

    out = []
    for kernel, spec in VARIANTS.items():
        flag_names = sorted(spec["flags"])
        for dtypes in spec["dtypes"]:
            for values in itertools.product(*(spec["flags"][k] for k in flag_names)):
                flags = dict(zip(flag_names, values))
                blocks = spec["blocks"](flags) if callable(spec["blocks"]) else spec["blocks"]
                for block in blocks:
                    for div16 in (True, False):
                        out.append({"kernel": kernel, "dtypes": tuple(str(d).replace("torch.", "") for d in dtypes),
                                    "constexprs": {**flags, "BLOCK_V": block},
                                    "num_warps": spec["num_warps"](block), "div16": div16})
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


def describe(v: dict) -> str:
    flags = " ".join(f"{k}={int(x) if isinstance(x, bool) else x}" for k, x in v["constexprs"].items())
    return f"{v['kernel']} {'/'.join(v['dtypes'])} {flags} warps={v['num_warps']} {'div16' if v['div16'] else 'plain'}"


# --- reading the compiled kernel back ---------------------------------------------------------------------

#: per-variant limits the compile test asserts, on every arch: registers per thread (at the variant's num_warps;
#: 96 keeps 2 blocks of 8 warps per SM, 3 of 4 warps... i.e. >= 25% occupancy at 8 warps with room), no spills,
#: and SASS instructions per element in the forward's loop (div16 variants, where the loop is what runs).
BUDGETS = {
    "regs": 96,
    "spill_bytes": 0,
    "fwd_instr_per_elem": {False: 12.0, True: 20.0},  # by HAS_SOFTCAP, WITH_STATS off
}


def _tool(name: str) -> str:
    import triton

    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path:
            return path
    except Exception:
        pass
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run_tool(name: str, args: list[str]) -> str:
    import subprocess

    return subprocess.run([_tool(name), *args], capture_output=True, text=True, check=True).stdout


_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b[^`;]*`\(?(\.L_x_\d+)")  # BRA `(.L_x_1), @!P0 BRA ..., BRA.U UP0, `(.L_x_1)


def sass_instructions(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(address, text) of every instruction in ``nvdisasm -c`` output, and the address of each label."""
    labels, ins, pending = {}, [], []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            ins.append((addr, m.group(2)))
    return ins, labels


def loop_bodies(sass: str) -> list[list[str]]:
    """The instructions of each loop: from a backward branch's target to the branch, both included."""
    ins, labels = sass_instructions(sass)
    out = []
    for addr, text in ins:
        m = _BRANCH.search(text)
        if m and labels.get(m.group(1), addr + 1) < addr:
            lo = labels[m.group(1)]
            out.append([t for a, t in ins if lo <= a <= addr])
    return out


def kernel_metrics(v: dict, cubin: bytes) -> dict:
    """Registers, spills and instruction counts of one compiled variant, read back from its cubin.

    - ``regs``/``local_bytes``/``stack_bytes``: ``cuobjdump -res-usage`` of the cubin Triton built;
      ``spill_instrs``: local-memory loads/stores (LDL/STL) in the SASS; ``spill_bytes`` = local + stack.
    - ``instr_per_elem`` (forward): SASS instructions of the column loop's body — from the target of its backward
      branch to the branch, both included, by ``nvdisasm -c`` — divided by the columns each thread handles per
      iteration, BLOCK_V / (32 num_warps). Backward (no loop: one block per program): every instruction of the
      kernel over BLOCK_V / (32 num_warps), so it includes the per-program set-up. ``mufu_per_elem``: the same
      for MUFU (special-function unit) instructions.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = _run_tool("cuobjdump", ["-res-usage", path])
        sass = _run_tool("nvdisasm", ["-c", path])
    field = lambda key: int(m.group(1)) if (m := re.search(rf"\b{key}:(\d+)", res)) else -1  # noqa: E731
    ins, _ = sass_instructions(sass)
    per_thread = v["constexprs"]["BLOCK_V"] / (32 * v["num_warps"])
    loops = loop_bodies(sass)
    if v["kernel"] == "fwd":  # one column loop (the masked last block is peeled off after it)
        body = max(loops, key=len) if loops else []
    else:
        body = [t for _, t in ins if not t.startswith(("NOP", "BRA", "EXIT"))]
    return {"regs": field("REG"), "local_bytes": field("LOCAL"), "stack_bytes": field("STACK"),
            "spill_bytes": max(0, field("LOCAL")) + max(0, field("STACK")),
            "spill_instrs": sum(bool(re.search(r"\b(LDL|STL)\b", t)) for _, t in ins),
            "sass_instrs": len(ins), "loop_instrs": (len(body) or None) if v["kernel"] == "fwd" else None,
            "instr_per_elem": round(len(body) / per_thread, 2),
            "mufu_per_elem": round(sum("MUFU" in t for t in body) / per_thread, 2)}


def budget_problems(v: dict, m: dict) -> list[str]:
    """Where a compiled variant exceeds :data:`BUDGETS` (must be none)."""
    bad = []
    if m["regs"] < 0 or m["regs"] > BUDGETS["regs"]:
        bad.append(f"{m['regs']} registers > {BUDGETS['regs']}")
    if m["spill_bytes"] > BUDGETS["spill_bytes"] or m["spill_instrs"]:
        bad.append(f"spills ({m['spill_bytes']} B local/stack, {m['spill_instrs']} LDL/STL)")
    c = v["constexprs"]
    if v["kernel"] == "fwd" and v["div16"] and not c["WITH_STATS"]:
        lim = BUDGETS["fwd_instr_per_elem"][bool(c["HAS_SOFTCAP"])]
        if m["loop_instrs"] is None or m["instr_per_elem"] > lim:
            bad.append(f"{m['instr_per_elem']} SASS instructions per element > {lim}")
    return bad


def compile_one(v: dict, arch: int) -> dict:
    """Compile one variant for sm_<arch> and read it back: {desc, arch, seconds, cubin_bytes, metrics, problems}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_fn(v["kernel"])
    sig = signature(v["kernel"], v["dtypes"])
    # torch tensors are 16-byte aligned: the JIT marks pointer arguments divisible by 16, and, for div16,
    # every integer argument (sizes, offsets, strides) as the JIT does when their values are multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or (v["div16"] and sig[n] == "i32")}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, v["constexprs"], attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": v["num_warps"], "enable_fp_fusion": True})
    secs = time.perf_counter() - t0
    m = kernel_metrics(v, k.asm["cubin"])
    return {"desc": describe(v), "arch": arch, "seconds": secs, "cubin_bytes": len(k.asm["cubin"]),
            "variant": {**v, "dtypes": list(v["dtypes"])}, "metrics": m, "problems": budget_problems(v, m)}


def supported_archs(wanted=(80, 90, 100)) -> list[int]:
    """The archs of ``wanted`` that the installed Triton's NVIDIA backend can target."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.backends.compiler import GPUTarget

    return [a for a in wanted if CUDABackend.supports_target(GPUTarget("cuda", a, 32))]


def arch_name(arch: int) -> str:
    """The PTX target Triton compiles a capability for (sm_90 -> sm_90a, sm_100 -> sm_100a)."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def _job(args):
    v, arch = args
    try:
        return compile_one(v, arch)
    except Exception as e:  # report the variant, keep compiling the others
        return {"desc": describe(v), "arch": arch, "seconds": 0.0, "cubin_bytes": 0,
                "variant": {**v, "dtypes": list(v["dtypes"])}, "metrics": None,
                "problems": [f"{type(e).__name__}: {e}"]}


def markdown_table(records: list[dict]) -> str:
    """The per-variant table of benches/RESULTS.md: one row per variant, one column group per arch."""
    archs = sorted({r["arch"] for r in records})
    rows: dict[str, dict[int, dict]] = {}
    for r in records:
        rows.setdefault(r["desc"], {})[r["arch"]] = r["metrics"] or {}
    head = "| variant | " + " | ".join(f"{arch_name(a)} regs / spill B / instr per elem (MUFU)" for a in archs) + " |"
    lines = [head, "|---|" + "---|" * len(archs)]
    for desc in sorted(rows, key=lambda d: (d.split()[0] != "fwd", "plain" in d, d)):
        cells = []
        for a in archs:
            m = rows[desc].get(a) or {}
            cells.append(f"{m.get('regs', '?')} / {m.get('spill_bytes', '?')} / {m.get('instr_per_elem', '?')} "
                         f"({m.get('mufu_per_elem', '?')})" if m else "failed")
        lines.append(f"| {desc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90, 100])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", help="write one JSON record per (variant, arch) here")
    p.add_argument("--table", action="store_true", help="print the markdown table of registers/spills/instructions")
    p.add_argument("--only", help="compile only variants whose description contains this text")
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
    work = [(v, arch) for v in variants() for arch in archs if not a.only or a.only in describe(v)]
    t0 = time.perf_counter()
    if a.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(a.jobs) as pool:
            records = list(_report(pool.imap_unordered(_job, work)))
    else:
        records = list(_report(map(_job, work)))
    failed = sum(bool(r["problems"]) for r in records)
    if a.json:
        with open(a.json, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    if a.table:
        print(markdown_table(records))
    print(f"compiled {len(work) - failed}/{len(work)} variants ({len(work) // max(1, len(archs))} x "
          f"{', '.join(map(arch_name, archs))}) in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


def _report(results):
    for r in results:
        m = r["metrics"]
        info = (f"regs {m['regs']}, spill {m['spill_bytes']} B, {m['instr_per_elem']} instr/elem, "
                f"{m['mufu_per_elem']} MUFU/elem" if m else "")
        bad = "; ".join(r["problems"])
        print(f"{'BAD' if bad else 'ok '} {arch_name(r['arch'])} {r['desc']} ({r['seconds']:.2f} s, cubin "
              f"{r['cubin_bytes']} B) {info}{'  <- ' + bad if bad else ''}", flush=True)
        yield r


if __name__ == "__main__":
    sys.exit(main())
