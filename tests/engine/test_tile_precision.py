"""Logits tile precision: float32 tiles for float16 inputs (no silent inf above 65504) and opt-in exact
(float32) logits for bfloat16; the workspace accounting follows the tile dtype."""

from __future__ import annotations

import pytest
import torch

import dpo_fast
from dpo_fast.engine import TorchRows, per_elem_bytes, tile_dtype
from support import random_labels, ref_sequence_logprobs, rel_err


@pytest.fixture(autouse=True)
def _reset_exact():
    yield
    dpo_fast.set_exact_logits(None)


def _huge_fp16(seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(2, 5, 16, generator=gen) * 90).half()
    w = (torch.randn(40, 16, generator=gen) * 90).half()
    labels = random_labels((2, 5), 40, 0.2, gen)
    return h, w, labels


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_logits_above_65504_are_exact_not_inf(backend):
    h, w, labels = _huge_fp16()
    z = h.double().reshape(-1, 16) @ w.double().t()
    assert z.abs().max() > 65504 * 1.5  # these logits do not fit float16
    dpo_fast.set_workspace_bytes(2048)  # several tiles and vocabulary slices
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = dpo_fast.sequence_logprobs(hh, ww, labels, backend=backend)
    out.sum().backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = ref_sequence_logprobs(h64, w64, labels)
    ref.sum().backward()
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-5
    assert rel_err(hh.grad, h64.grad) < 1e-2 and rel_err(ww.grad, w64.grad) < 1e-2
    tok = dpo_fast.token_logprobs(h, w, labels, backend=backend)
    assert torch.isfinite(tok).all()


def test_fused_loss_fp16_large_logits_finite():
    h, w, labels = _huge_fp16(1)
    hh = h.clone().requires_grad_()
    out = dpo_fast.DPOLoss(backend="torch")(hh, w, labels, torch.zeros(1), torch.zeros(1))
    out.loss.backward()
    ref = ref_sequence_logprobs(h, w, labels)
    assert torch.isfinite(out.loss) and rel_err(out.chosen_logps, ref[:1]) < 1e-5
    assert torch.isfinite(hh.grad).all()


def test_exact_logits_bf16_closer_to_float64():
    gen = torch.Generator().manual_seed(2)
    h = (torch.randn(4, 24, 64, generator=gen) * 2).bfloat16()
    w = torch.randn(500, 64, generator=gen).bfloat16()
    labels = random_labels((4, 24), 500, 0.2, gen)
    ref = ref_sequence_logprobs(h, w, labels)
    default = dpo_fast.sequence_logprobs(h, w, labels, backend="torch")
    dpo_fast.set_exact_logits(True)
    assert dpo_fast.get_exact_logits() and tile_dtype(torch.bfloat16) == torch.float32
    exact = dpo_fast.sequence_logprobs(h, w, labels, backend="torch")
    assert rel_err(exact, ref) < 1e-5 < rel_err(default, ref)
    dpo_fast.set_exact_logits(False)
    assert torch.equal(dpo_fast.sequence_logprobs(h, w, labels, backend="torch"), default)


def test_workspace_accounting_follows_the_tile_dtype():
    rows = TorchRows(1.0, None)
    assert tile_dtype(torch.float16) == torch.float32 and tile_dtype(torch.bfloat16) == torch.bfloat16
    assert per_elem_bytes(rows, torch.float16) == 4 + rows.bytes_per_elem
    assert per_elem_bytes(rows, torch.float16, grad=True) == 4 + rows.bytes_per_elem + 2  # dz for the GEMMs
    assert per_elem_bytes(rows, torch.bfloat16, grad=True) == 2 + rows.bytes_per_elem
    dpo_fast.set_exact_logits(True)
    assert per_elem_bytes(rows, torch.bfloat16, grad=True) == 4 + rows.bytes_per_elem + 2
    assert per_elem_bytes(rows, torch.float32, grad=True) == 4 + rows.bytes_per_elem


def test_exact_logits_knob_validation(monkeypatch):
    with pytest.raises(TypeError, match="enabled"):
        dpo_fast.set_exact_logits(1)
    monkeypatch.setenv("DPO_FAST_EXACT_LOGITS", "yes")
    with pytest.raises(ValueError, match="DPO_FAST_EXACT_LOGITS"):
        dpo_fast.get_exact_logits()
    monkeypatch.setenv("DPO_FAST_EXACT_LOGITS", "1")
    assert dpo_fast.get_exact_logits()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_16bit_gemms_run_as_fp32_blocks_rounded_once(dtype, monkeypatch):
    """On CPU the 16-bit GEMMs run as float32 GEMMs on upcast blocks: equal to the fp32 product rounded once."""
    from dpo_fast.engine import addmm_fp32_, linear_into, matmul
    from dpo_fast.engine import tiles

    monkeypatch.setattr(tiles, "_CPU_BLOCK_BYTES", 4096)  # many blocks in every dimension
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(37, 300, generator=gen).to(dtype)
    b = torch.randn(300, 45, generator=gen).to(dtype)
    bias = torch.randn(45, generator=gen).to(dtype)
    ref = a.float() @ b.float()
    torch.testing.assert_close(matmul(a, b).float(), ref.to(dtype).float(), rtol=2e-3, atol=2e-3)
    out = torch.empty(45, 37, dtype=dtype)
    torch.testing.assert_close(matmul(b.t(), a.t(), out=out).float(), ref.t().to(dtype).float(), rtol=2e-3, atol=2e-3)
    z16 = linear_into(torch.empty(37, 45, dtype=dtype), a, b.t().contiguous(), bias)
    torch.testing.assert_close(z16.float(), (ref + bias.float()).to(dtype).float(), rtol=2e-3, atol=2e-3)
    z32 = linear_into(torch.empty(37, 45), a, b.t().contiguous(), bias)
    torch.testing.assert_close(z32, ref + bias.float(), rtol=1e-5, atol=1e-4)
    acc = torch.ones(37, 45)
    addmm_fp32_(acc, a, b)
    torch.testing.assert_close(acc, 1 + ref.to(dtype).float(), rtol=2e-3, atol=2e-3)  # one 16-bit rounding
