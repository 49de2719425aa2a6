"""Bad input gets a clear exception naming the argument and what was expected — never a crash or NaN."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dpo_fast

H, V = 8, 17


def _ok():
    return torch.randn(2, 3, H), torch.randn(V, H), torch.randint(0, V, (2, 3))


def _call(**over):
    h, w, labels = _ok()
    args = dict(hidden=h, weight=w, labels=labels)
    args.update(over)
    kw = {k: v for k, v in args.items() if k not in ("hidden", "weight", "labels")}
    return dpo_fast.sequence_logprobs(args["hidden"], args["weight"], args["labels"], **kw)


PACKED_H = torch.randn(5, H)
PACKED_L = torch.randint(0, V, (5,))

BAD = {
    "label_too_large": (dict(labels=torch.tensor([[0, 1, V], [2, 3, 4]])), ValueError, "labels: expected values in [0, 17)"),
    "label_negative": (dict(labels=torch.tensor([[0, -5, 1], [2, 3, 4]])), ValueError, "found -5"),
    "hidden_weight_mismatch": (dict(weight=torch.randn(V, H + 1)), ValueError, "weight: expected shape (V, H) with H=8"),
    "labels_shape": (dict(labels=torch.randint(0, V, (2, 4))), ValueError, "labels: expected shape (2, 3)"),
    "float_labels": (dict(labels=torch.zeros(2, 3)), TypeError, "labels: expected an integer tensor"),
    "bool_labels": (dict(labels=torch.zeros(2, 3, dtype=torch.bool)), TypeError, "labels: expected an integer tensor"),
    "mixed_dtypes": (dict(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "weight: expected the same dtype"),
    "bias_dtype": (dict(bias=torch.randn(V, dtype=torch.float16)), TypeError, "bias: expected the same dtype"),
    "bias_shape": (dict(bias=torch.randn(V + 1)), ValueError, "bias: expected shape (17,)"),
    "int_hidden": (dict(hidden=torch.ones(2, 3, H, dtype=torch.int64)), TypeError, "hidden: expected a floating"),
    "hidden_4d": (dict(hidden=torch.randn(1, 2, 3, H)), ValueError, "hidden: expected a 2-D or 3-D"),
    "not_tensor": (dict(weight=[[1.0]]), TypeError, "weight: expected a torch.Tensor"),
    "cu_not_zero": (dict(hidden=PACKED_H, labels=PACKED_L, cu_seqlens=torch.tensor([1, 5])), ValueError,
                    "cu_seqlens: expected cu_seqlens[0] == 0"),
    "cu_decreasing": (dict(hidden=PACKED_H, labels=PACKED_L, cu_seqlens=torch.tensor([0, 3, 2, 5])), ValueError,
                      "cu_seqlens: expected non-decreasing"),
    "cu_bad_end": (dict(hidden=PACKED_H, labels=PACKED_L, cu_seqlens=torch.tensor([0, 4])), ValueError,
                   "cu_seqlens: expected the last entry to equal the number of tokens N=5"),
    "cu_float": (dict(hidden=PACKED_H, labels=PACKED_L, cu_seqlens=torch.tensor([0.0, 5.0])), TypeError,
                 "cu_seqlens: expected an integer tensor"),
    "cu_with_3d": (dict(cu_seqlens=torch.tensor([0, 6])), ValueError, "hidden: expected a packed (N, H)"),
    "packed_without_cu": (dict(hidden=PACKED_H, labels=PACKED_L), ValueError, "together with cu_seqlens"),
    "empty_batch": (dict(hidden=torch.randn(0, 3, H), labels=torch.zeros(0, 3, dtype=torch.long)), ValueError,
                    "hidden: empty batch"),
    "empty_packed": (dict(hidden=torch.randn(0, H), labels=torch.zeros(0, dtype=torch.long),
                          cu_seqlens=torch.tensor([0])), ValueError, "cu_seqlens: expected at least 2 entries"),
    "zero_temperature": (dict(temperature=0.0), ValueError, "temperature: expected a finite float > 0"),
    "nan_temperature": (dict(temperature=float("nan")), ValueError, "temperature"),
    "negative_softcap": (dict(softcap=-1.0), ValueError, "softcap: expected None or a finite float > 0"),
    "bad_backend": (dict(backend="cuda"), ValueError, "backend: expected one of"),
    "bad_average": (dict(average="yes"), TypeError, "average: expected a bool"),
    "bad_ignore_index": (dict(ignore_index=1.5), TypeError, "ignore_index: expected an int"),
    "hidden_h_zero": (dict(hidden=torch.randn(2, 3, 0), weight=torch.randn(V, 0)), ValueError,
                      "hidden: expected a non-empty last (hidden) dimension H = hidden.shape[-1] >= 1"),
    "cu_float_list": (dict(hidden=PACKED_H, labels=PACKED_L, cu_seqlens=[0.0, 5.0]), TypeError,
                      "cu_seqlens: expected a 1-D integer torch.Tensor (or a list or numpy array of ints)"),
    "cu_string": (dict(hidden=PACKED_H, labels=PACKED_L, cu_seqlens="0,5"), TypeError,
                  "cu_seqlens: expected a 1-D integer torch.Tensor"),
    "cu_list_bad_end": (dict(hidden=PACKED_H, labels=PACKED_L, cu_seqlens=[0, 4]), ValueError,
                        "cu_seqlens: expected the last entry to equal the number of tokens N=5"),
}
if torch.device("meta").type == "meta":
    BAD["mixed_devices"] = (dict(weight=torch.randn(V, H, device="meta")), ValueError,
                            "weight: expected a tensor on hidden's device cpu")


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_clear_error(name):
    over, exc, msg = BAD[name]
    with pytest.raises(exc) as info:
        _call(**over)
    assert msg in str(info.value), str(info.value)


def test_bad_input_logits_and_token_api():
    with pytest.raises(ValueError, match="reduction: expected one of"):
        dpo_fast.logprobs_from_logits(torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long), reduction="max")
    with pytest.raises(ValueError, match="labels: expected values in"):
        dpo_fast.logprobs_from_logits(torch.randn(2, 3, V), torch.full((2, 3), V))
    with pytest.raises(ValueError, match="cu_seqlens: required"):
        dpo_fast.logprobs_from_logits(torch.randn(4, V), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels: expected shape"):
        dpo_fast.token_logprobs(torch.randn(2, 3, H), torch.randn(V, H), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="logits: expected a floating"):
        dpo_fast.logprobs_from_logits(torch.ones(2, 3, V, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="nbytes"):
        dpo_fast.set_workspace_bytes(10)


def test_cu_seqlens_as_list_or_numpy_is_accepted():
    np = pytest.importorskip("numpy")
    cu = torch.tensor([0, 2, 2, 5])
    want = dpo_fast.sequence_logprobs(PACKED_H, torch.randn(V, H, generator=torch.Generator().manual_seed(0)),
                                      PACKED_L, cu_seqlens=cu)
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    for given in ([0, 2, 2, 5], (0, 2, 2, 5), np.array([0, 2, 2, 5], dtype=np.int32), np.array([0, 2, 2, 5], np.uint64),
                  [np.int64(0), np.int64(2), np.int64(2), np.int64(5)]):
        got = dpo_fast.sequence_logprobs(PACKED_H, w, PACKED_L, cu_seqlens=given)
        assert torch.equal(got, want), given
    logits = torch.randn(5, V)
    assert torch.equal(dpo_fast.logprobs_from_logits(logits, PACKED_L, cu_seqlens=[0, 2, 2, 5]),
                       dpo_fast.logprobs_from_logits(logits, PACKED_L, cu_seqlens=cu))
    with pytest.raises(TypeError, match="cu_seqlens: expected .* numpy array of dtype float64"):
        dpo_fast.sequence_logprobs(PACKED_H, w, PACKED_L, cu_seqlens=np.array([0.0, 5.0]))
    with pytest.raises(ValueError, match="H = hidden.shape"):
        dpo_fast.token_logprobs(torch.randn(5, 0), torch.randn(V, 0), PACKED_L)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch, dpo_fast\n"
        "try:\n"
        "    dpo_fast.sequence_logprobs(torch.randn(1,2,4), torch.randn(5,4), torch.zeros(1,2,dtype=torch.long),"
        " backend='triton')\n"
        "except ValueError as e:\n"
        "    print('ERR', e)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR backend='triton' needs CUDA tensors" in out.stdout, out.stdout + out.stderr
