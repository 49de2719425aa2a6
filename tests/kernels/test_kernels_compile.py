"""The Triton kernels compile for real GPUs (sm_80, sm_90a, sm_100a) within budget, proven without one.

``dpo_fast.kernels.compile_check`` compiles every variant in the launchers' table (dtypes x constexpr flags x
block sizes x the JIT's divisibility-16 specialisation or none) to cubins with Triton's bundled compiler and
reads registers, spills and SASS instruction counts back from each cubin (cuobjdump, nvdisasm). It runs in a
subprocess with TRITON_INTERPRET unset: this test session sets it (conftest), and the interpreter replaces jit
functions when they are defined.

The in-process tests below run the kernels in the interpreter with small blocks, so that the forward's
unmasked column loop, its masked last block and the rescaling on a new row maximum all run (the launchers'
interpreted blocks cover a whole test row at once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

ARCHS = ("80", "90", "100")


def test_every_variant_compiles_within_budget_for_sm80_sm90a_sm100a(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh cache: every variant is really compiled
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out_json = tmp_path / "variants.jsonl"
    code = ("import sys; from dpo_fast.kernels import compile_check as c; "
            "print('variants', len(c.variants())); sys.exit(c.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "--arch", *ARCHS, "--jobs", "2", "--json", str(out_json)],
                       env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    n = int(out.split("variants ", 1)[1].split()[0])
    recs = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert len(recs) == n * len(ARCHS), out[-2000:]
    assert n >= 44  # 22 table variants x (div16, plain)
    from dpo_fast.kernels.compile_check import BUDGETS

    for rec in recs:
        m, v = rec["metrics"], rec["variant"]
        assert m is not None and not rec["problems"], (rec["desc"], rec["arch"], rec["problems"])
        assert rec["cubin_bytes"] > 0
        # the budgets, re-checked here on the read-back numbers
        assert 0 < m["regs"] <= BUDGETS["regs"], (rec["desc"], rec["arch"], m)
        assert m["spill_bytes"] == 0 and m["spill_instrs"] == 0, (rec["desc"], rec["arch"], m)
        if v["kernel"] == "fwd" and v["div16"] and not v["constexprs"]["WITH_STATS"]:
            lim = 20.0 if v["constexprs"]["HAS_SOFTCAP"] else 12.0
            assert m["loop_instrs"] and m["instr_per_elem"] <= lim, (rec["desc"], rec["arch"], m)
            assert m["mufu_per_elem"] <= (3.5 if v["constexprs"]["HAS_SOFTCAP"] else 1.2), (rec["desc"], m)
    assert r.returncode == 0 and f"compiled {n * len(ARCHS)}/{n * len(ARCHS)} variants" in out, out[-3000:]
    # the div16 specialisation really vectorises the forward's loads (the plain variants cannot)
    fwd16 = [x for x in recs if x["variant"]["kernel"] == "fwd" and x["variant"]["div16"]]
    assert fwd16 and all(x["metrics"]["loop_instrs"] for x in fwd16)


def test_loop_bodies_reads_backward_branches():
    from dpo_fast.kernels.compile_check import loop_bodies

    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_1:",
        "        /*0010*/                   LDG.E.128 R4, desc[UR16][R26.64] ;",
        "        /*0020*/                   MUFU.EX2 R4, R4 ;",
        "        /*0030*/                   BRA.U UP0, `(.L_x_1) ;",
        "        /*0040*/              @!P0 BRA `(.L_x_2) ;",
        ".L_x_2:",
        "        /*0050*/                   EXIT ;",
    ])
    assert [len(b) for b in loop_bodies(sass)] == [3]


def test_launches_are_checked_against_the_table():
    from dpo_fast.kernels import logprob as k

    meta = k.launch_meta("bwd", 300, (torch.float32, torch.float16), HAS_SOFTCAP=True, WITH_ENTROPY=False)
    assert meta["HAS_SOFTCAP"] is True and meta["BLOCK_V"] >= 16
    with pytest.raises(AssertionError):  # a dtype pair the table does not list
        k.launch_meta("bwd", 300, (torch.float16, torch.float32), HAS_SOFTCAP=True, WITH_ENTROPY=False)
    with pytest.raises(AssertionError):  # a flag the table does not list
        k.launch_meta("fwd", 300, (torch.float32,), HAS_SOFTCAP=True, WITH_STATS=False, NEW_FLAG=1)
    with pytest.raises(AssertionError):  # a flag left out
        k.launch_meta("fwd", 300, (torch.float32,), HAS_SOFTCAP=True)


def _ref(z, y, temperature, softcap):
    z = z.double()
    zc = z if softcap is None else softcap * torch.tanh(z / softcap)
    zc = zc / temperature
    lse = torch.logsumexp(zc, 1)
    p = torch.softmax(zc, 1)
    zy = zc.gather(1, y[:, None]).squeeze(1)
    ent = lse - torch.where(p > 0, p * zc, torch.zeros_like(zc)).sum(1)
    return zy - lse, lse, ent, (zy >= zc.amax(1)).double(), zc.mean(1), torch.logsumexp(2 * zc, 1)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels in the interpreter")
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (0.5, 30.0), (1.3, 5.0)])
@pytest.mark.parametrize("stats", [False, True])
def test_small_block_forward_and_backward_match_float64(temperature, softcap, stats):
    """BLOCK_V = 16 on rows of 203 columns: 12 unmasked blocks, a masked tail of 11, a growing row maximum."""
    from dpo_fast.kernels import logprob as k

    gen = torch.Generator().manual_seed(7)
    n, V = 6, 203
    z = torch.randn(n, V, generator=gen) * 4
    z[0] += torch.linspace(-20, 20, V)  # the maximum keeps rising: a rescale at every block
    z[1] -= torch.linspace(-20, 20, V)  # the maximum is in the first block
    z[2, -1] = 60.0  # the maximum is in the masked tail
    y = torch.randint(0, V, (n,), generator=gen)
    y[2] = V - 1
    f32 = dict(dtype=torch.float32)
    logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    st = tuple(torch.empty(n if stats else 0, **f32) for _ in range(4))
    k._logprob_fwd_kernel[(n,)](z, y, logp, lse, *st, V, z.stride(0), 1.0 / temperature, float(softcap or 1.0),
                                HAS_SOFTCAP=softcap is not None, WITH_STATS=stats, BLOCK_V=16)
    ref = _ref(z, y, temperature, softcap)
    torch.testing.assert_close(logp.double(), ref[0], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), ref[1], rtol=1e-5, atol=2e-5)
    if stats:
        for got, want in zip(st, ref[2:]):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)
    # backward over vocabulary slices with an offset, small blocks, a masked last block per slice
    g = torch.linspace(-1.0, 2.0, n)
    zz = z.double().requires_grad_()
    zc = zz if softcap is None else softcap * torch.tanh(zz / softcap)
    (torch.log_softmax(zc / temperature, 1).gather(1, y[:, None]).squeeze(1) * g.double()).sum().backward()
    dz = torch.empty_like(z)
    for v0, v1 in ((0, 77), (77, 203)):
        zs = z[:, v0:v1]
        out = dz[:, v0:v1]
        k._logprob_bwd_kernel[(n, triton_cdiv(v1 - v0, 16))](
            zs, out, y, lse, g, g, lse, v1 - v0, v0, zs.stride(0), out.stride(0), 1.0 / temperature,
            float(softcap or 1.0), HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=False, BLOCK_V=16)
    torch.testing.assert_close(dz.double(), zz.grad, rtol=1e-5, atol=2e-6)


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels in the interpreter")
@pytest.mark.parametrize("softcap", [None, 10.0])
def test_small_block_nonfinite_rows_stay_in_their_row(softcap):
    from dpo_fast.kernels import logprob as k

    n, V = 4, 100
    z = torch.randn(n, V, generator=torch.Generator().manual_seed(3))
    z[0, 40] = float("nan")  # nan -> nan in its row only
    z[1, :50] = float("-inf")  # -inf columns (a -inf bias): no nan, they get probability 0
    z[2, 5] = float("-inf")
    y = torch.tensor([1, 70, 5, 9])  # row 2's label has a -inf logit: log p = -inf
    f32 = dict(dtype=torch.float32)
    logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    st = tuple(torch.empty(n, **f32) for _ in range(4))
    k._logprob_fwd_kernel[(n,)](z, y, logp, lse, *st, V, z.stride(0), 1.0, float(softcap or 1.0),
                                HAS_SOFTCAP=softcap is not None, WITH_STATS=True, BLOCK_V=16)
    assert torch.isnan(logp[0]) and torch.isnan(lse[0])
    ref = _ref(z[1:], y[1:], 1.0, softcap)
    torch.testing.assert_close(lse[1:].double(), ref[1], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(logp[1:].double(), ref[0], rtol=1e-5, atol=2e-5)
    if softcap is None:
        assert logp[2] == float("-inf")
        torch.testing.assert_close(st[0][3].double(), ref[2][2], rtol=1e-5, atol=2e-5)
