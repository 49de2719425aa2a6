"""The options dataclasses (dpo_fast.losses.options): one declaration per family, from which the functions'
and fused modules' keyword arguments, signatures, validation and docs derive."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import dpo_fast
from dpo_fast import losses as L

FAMILIES = [  # (options class, function, module)
    (L.DPOOptions, L.dpo_loss, dpo_fast.DPOLoss),
    (L.CPOOptions, L.cpo_loss, dpo_fast.CPOLoss),
    (L.ORPOOptions, L.orpo_loss, dpo_fast.ORPOLoss),
    (L.KTOOptions, L.kto_loss, dpo_fast.KTOLoss),
    (L.GRPOOptions, L.grpo_loss, dpo_fast.GRPOLoss),
]
IDS = [f[0].__name__ for f in FAMILIES]


@pytest.mark.parametrize("cls,fn,module", FAMILIES, ids=IDS)
def test_signatures_list_every_option_with_its_default(cls, fn, module):
    for obj in (fn, module, L.pair_loss_and_grads) if cls is L.DPOOptions else (fn, module):
        params = inspect.signature(obj).parameters
        for f in dataclasses.fields(cls):
            if f.init:
                assert params[f.name].default == f.default, (obj, f.name)
                assert params[f.name].annotation == f.type, (obj, f.name)
        assert params["options"].default is None


@pytest.mark.parametrize("cls,fn,module", FAMILIES, ids=IDS)
def test_docstrings_carry_the_field_docs(cls, fn, module):
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        first_words = " ".join(f.metadata["doc"].split()[:3])
        for obj in (cls, fn, module):
            assert "{OPTIONS}" not in obj.__doc__
            flat = " ".join(obj.__doc__.split())
            assert f"{f.name} (" in flat and first_words in flat, (obj, f.name)


@pytest.mark.parametrize("cls,fn,module", FAMILIES, ids=IDS)
def test_options_object_or_keywords_not_both(cls, fn, module):
    o = cls(beta=0.5)
    m = module(options=o)
    assert m.options is o and module(beta=0.5).options == o
    with pytest.raises(TypeError, match="not both"):
        module(beta=0.5, options=o)
    with pytest.raises(TypeError, match=f"options must be a {cls.__name__}"):
        module(options=o.as_kwargs())
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_option'"):
        module(not_an_option=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_option'"):
        fn(torch.zeros(1), torch.zeros(1), not_an_option=1)
    with pytest.raises(TypeError, match="unknown option 'not_an_option'"):
        L.build_options(cls, not_an_option=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.beta = 1.0  # type: ignore[misc]


def test_function_results_equal_with_options_object():
    g = torch.Generator().manual_seed(0)
    lw, ll, rw, rl = (torch.randn(4, generator=g, dtype=torch.float64) - 5 for _ in range(4))
    n = torch.tensor([3, 4, 5, 6])
    kw = dict(beta=0.3, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], label_smoothing=[0.1, 0.0])
    a = L.dpo_loss(lw, ll, rw, rl, chosen_lengths=n, rejected_lengths=n, **kw)
    b = L.dpo_loss(lw, ll, rw, rl, chosen_lengths=n, rejected_lengths=n, options=L.DPOOptions(**kw))
    assert torch.equal(a.losses, b.losses) and a.metrics == b.metrics
    o = L.GRPOOptions(loss_type="dapo", epsilon_high=0.28, beta=0.1)
    lp = torch.randn(2, 5, generator=g, dtype=torch.float64).clamp(max=0)
    A, m = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 5)
    old, ref = lp + 0.1, lp - 0.1
    x = L.grpo_loss(lp, A, m, old, ref, **o.as_kwargs())
    y = L.grpo_loss(lp, A, m, old, ref, options=o)
    assert torch.equal(x.per_token_loss, y.per_token_loss) and x.metrics == y.metrics
    k = L.kto_loss(lw, rw, torch.tensor([True, False, True, False]), options=L.KTOOptions(beta=0.2, loss_type="kto"))
    assert torch.equal(k.losses, L.kto_loss(lw, rw, torch.tensor([True, False, True, False]), beta=0.2).losses)


def test_modules_keep_positional_options():
    assert dpo_fast.GRPOLoss(0.1, 0.2, 0.28).options == L.GRPOOptions(beta=0.1, epsilon_low=0.2, epsilon_high=0.28)
    assert dpo_fast.KTOLoss(0.2, 2.0, 0.5).options == L.KTOOptions(beta=0.2, desirable_weight=2.0,
                                                                   undesirable_weight=0.5)
    assert dpo_fast.DPOLoss(0.2, "ipo").options == L.DPOOptions(beta=0.2, loss_type="ipo")
    assert dpo_fast.CPOLoss(0.2, "simpo").options == L.CPOOptions(beta=0.2, loss_type="simpo")
    assert dpo_fast.ORPOLoss(0.2).options == L.ORPOOptions(beta=0.2)
    with pytest.raises(TypeError, match="positional arguments"):
        dpo_fast.ORPOLoss(0.2, 0.3)
    with pytest.raises(TypeError, match="multiple values for argument 'beta'"):
        dpo_fast.DPOLoss(0.2, beta=0.3)


def test_validation_at_construction_without_a_loss_call(monkeypatch):
    """A bad option fails when the options are built; no module runs its loss to find out."""
    for name in ("kto_loss", "cpo_loss", "orpo_loss", "dpo_loss", "grpo_loss"):
        monkeypatch.setattr(L, name, None)
    with pytest.raises(ValueError, match="beta"):
        dpo_fast.KTOLoss(beta=-1.0)
    with pytest.raises(ValueError, match="desirable_weight"):
        dpo_fast.KTOLoss(desirable_weight=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_fast.CPOLoss(label_smoothing=0.7)
    with pytest.raises(ValueError, match="beta"):
        dpo_fast.ORPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_fast.DPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="epsilon_low"):
        dpo_fast.GRPOLoss(epsilon_low=1.5)
    dpo_fast.KTOLoss(beta=0.3), dpo_fast.CPOLoss(), dpo_fast.ORPOLoss(), dpo_fast.DPOLoss(), dpo_fast.GRPOLoss()


def test_warning_points_at_the_caller():
    with pytest.warns(UserWarning, match="label_smoothing is ignored") as rec:
        L.DPOOptions(loss_type="hinge", label_smoothing=0.1)
    assert rec[0].filename == __file__


@pytest.mark.parametrize("fused", [True, False])
def test_kto_module_takes_every_kto_option(fused):
    """KTOLoss derives its keywords from KTOOptions, loss_type included: equal to kto_loss on the engine's sums."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (4, 6), generator=g)
    labels[:, :2] = -100
    des, ref = torch.tensor([True, False, True, False]), torch.randn(4, generator=g, dtype=torch.float64) - 20
    o = L.KTOOptions(beta=0.3, desirable_weight=1.5, loss_type="apo_zero_unpaired")
    out = dpo_fast.KTOLoss(options=o, fused=fused)(h, w, labels, des, ref)
    want = L.kto_loss(dpo_fast.sequence_logprobs(h, w, labels), ref, des, options=o)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-12, atol=1e-12)
    (gh,) = torch.autograd.grad(out.loss, h)
    (wh,) = torch.autograd.grad(want.loss, h)
    torch.testing.assert_close(gh, wh, rtol=1e-10, atol=1e-12)
