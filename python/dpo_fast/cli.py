"""The ``dpo-fast`` command: ``bench``, ``info`` (and ``demo`` when present)."""

from __future__ import annotations

import sys


def info() -> int:
    """Print the versions of everything the kernels depend on."""
    import platform

    import torch

    import dpo_fast

    print(f"dpo_fast     {dpo_fast.__version__}")
    try:
        from dpo_fast import _native

        ver, abi = _native.build_info()
        print(f"native       {ver} ({abi}) at {_native.__file__}")
    except ImportError as e:  # source checkout without a build
        print(f"native       not built ({e})")
    print(f"python       {platform.python_version()} ({platform.machine()})")
    print(f"torch        {torch.__version__}")
    try:
        import triton

        print(f"triton       {triton.__version__}")
    except ImportError:
        print("triton       not installed (the torch backend is used)")
    print(f"CUDA (torch) {torch.version.cuda}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}        {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        print("GPU          none visible (backend 'auto' uses the torch backend)")
    print(f"workspace    {dpo_fast.get_workspace_bytes('cuda' if torch.cuda.is_available() else 'cpu')} bytes")
    from dpo_fast.engine import gemm_path  # which fp32-output GEMM path 16-bit inputs take here

    for dt in (torch.bfloat16, torch.float16):
        p = gemm_path("cuda" if torch.cuda.is_available() else "cpu", dt)
        print(f"GEMM {str(dt)[6:]:8s} {p['fp32 logits']} (fp32 logits), {p['fp32 accumulate']} (fp32 accumulate)")
    return 0


COMMANDS = {
    "bench": ("time and measure the log-prob engine against naive PyTorch and others", "dpo_fast.bench"),
    "info": ("print torch/triton/CUDA/native build versions", None),
    "demo": ("train a tiny model with DPO on CPU in about a minute", "dpo_fast.demo"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dpo-fast {bench,info,demo} [options]\n")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:<6} {text}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return info()
    if cmd not in COMMANDS:
        print(f"dpo-fast: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    from dpo_fast.extras import MissingExtraError

    try:
        mod = importlib.import_module(COMMANDS[cmd][1])
        return int(mod.main(rest) or 0)
    except MissingExtraError as e:  # an optional dependency: one line naming the extra, no traceback
        print(f"dpo-fast {cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
