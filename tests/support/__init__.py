"""Shared test support: the one tolerance table, error measures, float64 references, the GEMM counter and
stable seeds. Every test module imports shared helpers from here (``from support import ...``) and never from
another test module; pytest finds this package through ``pythonpath = ["tests"]`` in pyproject.toml.

Submodules with heavier dependencies are imported explicitly: :mod:`support.models` (tiny Hugging Face models
and tokenized examples, needs transformers), :mod:`support.trl_fixtures` (TRL trainers on a tiny Llama),
:mod:`support.trainer_fixtures` (GRPO / RLOO / KTO / CPO / ORPO trainers, datasets, the peak-RSS script) and
:mod:`support.vlm_fixtures` (tiny vision-language models, processors and their trainers).
"""

from __future__ import annotations

import zlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["TOL", "rel_err", "assert_close", "seed_of", "CountMM", "random_labels", "ref_token_logprobs",
           "ref_sequence_logprobs", "naive_sequence_logprobs", "assert_output_matches"]

# ------------------------------------------------------------------------------------------- the one table
# Keyed by an input dtype: the norm-relative bound of ``assert_close`` (max|actual - ref| <= rtol * max(max|ref|, 1));
#   float32 inputs 1e-5; 16-bit inputs 1e-2 (bf16 has an 8-bit mantissa: 2^-9 = 2e-3 per rounding).
# Keyed by a check kind: elementwise ``torch.testing.assert_close(a, b, **TOL[kind])`` of the loss tests:
#   f64:    code under test in float64 vs float64 reference
#   f32:    code under test on float32 inputs vs float64 reference
#   grad:   pair_loss_and_grads vs autograd of dpo_loss, same dtype (float64)
#   metric: metrics (python floats computed from float32 tensors) vs float64 reference
TOL = {
    torch.float64: dict(rtol=1e-10, atol=0.0),
    torch.float32: dict(rtol=1e-5, atol=0.0),
    torch.bfloat16: dict(rtol=1e-2, atol=0.0),
    torch.float16: dict(rtol=1e-2, atol=0.0),
    "f64": dict(rtol=1e-10, atol=1e-12),
    "f32": dict(rtol=2e-5, atol=2e-6),
    "grad": dict(rtol=1e-10, atol=1e-12),
    "metric": dict(rtol=1e-5, atol=1e-6),
}


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """max|actual - ref| / max(max|ref|, 1), in float64; asserts equal shapes and finite ``actual``."""
    actual = actual.detach().double()
    ref = ref.detach().double()
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
    return (actual - ref).abs().max().item() / scale if ref.numel() else 0.0


def assert_close(actual, ref, dtype, what="", baseline=None):
    """actual within ``TOL[dtype]`` of the float64 ref, or -- the flash-attention idiom -- within twice the error
    that plain PyTorch makes at the same precision (``baseline``), for cases such as a float32 sum over
    V > 65536 terms where no float32 implementation can reach the table's bound."""
    bound = TOL[dtype]["rtol"]
    err = rel_err(actual, ref)
    if err <= bound:
        return
    base = rel_err(baseline, ref) if baseline is not None else None
    assert base is not None and err <= 2 * base + 1e-7, (
        f"{what}: relative error {err:.3g} > {bound:.1g} ({dtype})"
        + (f" and > 2 x PyTorch's own error {base:.3g}" if base is not None else ""))


def seed_of(*parts) -> int:
    """A stable seed from a test's parameters (``hash()`` of a str is salted per process; crc32 is not)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) % 100_000


class CountMM(TorchDispatchMode):
    """Counts the GEMMs (aten.mm and aten.addmm calls) dispatched inside the ``with`` block: ``.calls``."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.calls += 1
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------- references


def ref_token_logprobs(hidden, weight, labels, bias=None, ignore_index=-100, temperature=1.0, softcap=None):
    """Float64 reference on the full logits: per-token log-probs shaped like labels (0 where ignored)."""
    h = hidden.double()
    z = h @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:  # the model's cap first, then the sampling temperature
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lp = torch.log_softmax(z, dim=-1)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    tok = lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, tok, torch.zeros_like(tok))


def ref_sequence_logprobs(hidden, weight, labels, bias=None, cu_seqlens=None, ignore_index=-100,
                          temperature=1.0, softcap=None, average=False):
    """Float64 per-sequence sums (means with ``average``) of :func:`ref_token_logprobs`: (B,) or (S,)."""
    tok = ref_token_logprobs(hidden, weight, labels, bias, ignore_index, temperature, softcap)
    mask = (labels != ignore_index).double()
    if cu_seqlens is None:
        s, c = tok.sum(-1), mask.sum(-1)
    else:
        cu = cu_seqlens.tolist()
        s = torch.stack([tok[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
        c = torch.stack([mask[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
    return s / c.clamp_min(1) if average else s


def naive_sequence_logprobs(hidden, weight, labels, bias=None, ignore_index=-100, temperature=1.0,
                            softcap=None, average=False):
    """Plain PyTorch at the inputs' precision (logits in the input dtype, fp32 log_softmax): the baseline."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    mask = labels != ignore_index
    tok = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0).long().unsqueeze(-1)).squeeze(-1) * mask
    s = tok.sum(-1)
    return s / mask.sum(-1).clamp_min(1) if average else s


def random_labels(shape, V, frac_ignored=0.3, generator=None):
    """Labels in [0, V) with about ``frac_ignored`` of the positions set to -100."""
    labels = torch.randint(0, V, shape, generator=generator)
    drop = torch.rand(shape, generator=generator) < frac_ignored
    return labels.masked_fill(drop, -100)


def assert_output_matches(out, expect, fields, grads, ref_grads, metrics_abs: float):
    """A fused module's output against its composition: the named tensor fields, the gradients (hidden,
    weight, bias) at float32 tolerance, and every metric of ``expect`` (rel 1e-5, abs ``metrics_abs``)."""
    import pytest

    for f in fields:
        assert_close(getattr(out, f), getattr(expect, f), torch.float32, f)
    for g, r, n in zip(grads, ref_grads, "hwb"):
        assert_close(g, r, torch.float32, f"d{n}")
    for k, v in expect.metrics.items():
        assert out.metrics[k] == pytest.approx(v, rel=1e-5, abs=metrics_abs), k
