"""Entropy with its gradient (issue 20): the engine's backward with the entropy term, on both row backends, and
the fused GRPOLoss / FastGRPOTrainer with TRL 1.16's entropy bonus (static and adaptive) against TRL's own code.

Per token H = lse − Σ_v p_v zc_v and ∂H/∂z_v = −p_v (zc_v − Σ_u p_u zc_u) ∂zc_v/∂z_v: checked against float64
autograd of the same formula (gradcheck on the torch backend, the Triton kernels in the interpreter).
"""

from __future__ import annotations

import os

import pytest
import torch

import dpo_fast
from dpo_fast.engine import make_rows, prepare
from dpo_fast.engine.passes import scored_logprobs_entropy
from dpo_fast.logprobs import token_logprobs_and_entropy
from support import seed_of

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _ref_logp_ent(h, w, b, labels, temperature, softcap, ignore_index=-100):
    """float64 (log p, H) per position (0 where ignored) by plain autograd-able ops."""
    z = h.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    zc = z if softcap is None else softcap * torch.tanh(z / softcap)
    zc = zc / temperature
    lsm = torch.log_softmax(zc, -1)
    keep = labels != ignore_index
    lp = lsm.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


def _batch(B=3, T=5, H=8, V=37, seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, H, generator=g) * 1.5).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.7).to(dtype)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[2, :] = -100  # a fully masked row: no scored token
    return h, w, b, labels


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (1.3, 4.0)])
def test_gradcheck_float64_torch_backend(temperature, softcap):
    h, w, b, labels = _batch()
    sc_args = dict(temperature=temperature, softcap=softcap)

    def f(h, w, b):
        sc = prepare(h, w, labels, bias=b, **sc_args)
        return scored_logprobs_entropy(sc, w, b, backend="torch", **sc_args)

    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    assert torch.autograd.gradcheck(f, (hh, ww, bb), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERP, reason="the Triton kernels run on CPU only in the interpreter"))])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.6, None), (1.4, 3.0)])
def test_token_logprobs_and_entropy_grads_vs_float64(backend, temperature, softcap):
    """Odd V, several backward vocabulary slices and forward token chunks (a tiny workspace), a fully masked row,
    upstream gradients on both outputs; float32 against float64 autograd."""
    h, w, b, labels = _batch(B=4, T=6, H=16, V=301, seed=3, dtype=torch.float32)
    dpo_fast.set_workspace_bytes(20 * 1024)  # forward chunks of a few rows, backward slices of a few columns
    gen = torch.Generator().manual_seed(5)
    g_lp, g_ent = torch.randn(labels.shape, generator=gen), torch.randn(labels.shape, generator=gen)
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    lp, ent = token_logprobs_and_entropy(hh, ww, labels, bias=bb, temperature=temperature, softcap=softcap,
                                         backend=backend)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    rh, rw, rb = (t.double().requires_grad_() for t in (h, w, b))
    rlp, rent = _ref_logp_ent(rh, rw, rb, labels, temperature, softcap)
    ((rlp * g_lp.double()).sum() + (rent * g_ent.double()).sum()).backward()
    tol = dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(lp.double(), rlp.detach(), **tol)
    torch.testing.assert_close(ent.double(), rent.detach(), **tol)
    for got, want in ((hh.grad, rh.grad), (ww.grad, rw.grad), (bb.grad, rb.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=5e-5)
    assert torch.all(hh.grad[2] == 0)  # the fully masked row


@pytest.mark.skipif(not INTERP, reason="runs the kernels in the interpreter")
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (1.3, 5.0)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_bwd_kernel_entropy_variant_small_blocks(temperature, softcap, out_dtype):
    """The WITH_ENTROPY kernel at BLOCK_V = 16 over two vocabulary slices with an offset (masked tails)."""
    from dpo_fast.kernels import logprob as k

    gen = torch.Generator().manual_seed(11)
    n, V = 5, 203
    z = torch.randn(n, V, generator=gen) * 4
    z[0] += torch.linspace(-20, 20, V)
    y = torch.randint(0, V, (n,), generator=gen)
    g, gh = torch.linspace(-1.0, 2.0, n), torch.linspace(1.5, -0.5, n)
    zz = z.double().requires_grad_()
    zc = (zz if softcap is None else softcap * torch.tanh(zz / softcap)) / temperature
    lsm = torch.log_softmax(zc, 1)
    ent = -(lsm.exp() * lsm).sum(1)
    ((lsm.gather(1, y[:, None]).squeeze(1) * g.double()).sum() + (ent * gh.double()).sum()).backward()
    lse = torch.logsumexp(zc, 1).float().detach()
    H = ent.float().detach()
    dz = torch.empty(n, V, dtype=out_dtype)
    for v0, v1 in ((0, 77), (77, 203)):
        zs, out = z[:, v0:v1], dz[:, v0:v1]
        k._logprob_bwd_kernel[(n, -(-(v1 - v0) // 16))](
            zs, out, y, lse, g, gh, H, v1 - v0, v0, zs.stride(0), out.stride(0), 1.0 / temperature,
            float(softcap or 1.0), HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=True, BLOCK_V=16)
    tol = dict(rtol=1e-5, atol=2e-6) if out_dtype == torch.float32 else dict(rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(dz.double(), zz.grad, **tol)


def test_entropy_without_its_gradient_is_the_logprob_backward():
    """With g_H = 0 the entropy variant gives exactly the log-prob-only gradient (torch backend)."""
    h, w, b, labels = _batch(dtype=torch.float32)
    outs = []
    for with_ent in (False, True):
        hh = h.clone().requires_grad_()
        if with_ent:
            lp, ent = token_logprobs_and_entropy(hh, w, labels, bias=b, backend="torch")
            (lp.sum() + 0.0 * ent.sum()).backward()
        else:
            dpo_fast.token_logprobs(hh, w, labels, bias=b, backend="torch").sum().backward()
        outs.append(hh.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)


def test_rows_bwd_interface_both_backends_agree():
    """RowOps.bwd with (g_ent, ent) on a tile: TorchRows against float64 (and TritonRows when interpreted)."""
    gen = torch.Generator().manual_seed(2)
    n, V = 4, 53
    z = torch.randn(n, V, generator=gen) * 3
    y = torch.randint(0, V, (n,), generator=gen)
    backends = ["torch"] + (["triton"] if INTERP else [])
    res = []
    for be in backends:
        rows = make_rows(be, z.device, z.dtype, 0.8, 6.0)
        r = rows.fwd(z.clone(), y, stats=True)
        g, gh = torch.ones(n), torch.full((n,), -0.5)
        res.append(rows.bwd(z.clone(), torch.empty_like(z), y, r.lse, g, 0, gh, r.stats.entropy))
    for other in res[1:]:
        torch.testing.assert_close(other, res[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ GRPOLoss
# the fused GRPOLoss with TRL's entropy bonus (static, and the adaptive controller's per-step coefficient) against
# TRL 1.16's own GRPOTrainer._compute_loss (tests/support/trl_oracle.py) on float64 log-probs and entropies

D64 = torch.float64
#: (TRL's entropy settings, the coefficient GRPOLoss gets for the step): static; adaptive with the controller's
#: last window entropy at or below its target (the bonus applies) and above it (gated off this step)
ENTROPY_CASES = {
    "static": (None, 0.05, 0.05),
    "adaptive_on": (dict(entropy_target=0.5, entropy_coef_delta=0.01, entropy_coef_min=0.0, entropy_coef_max=0.2,
                         last_world_entropy=0.3), 0.07, 0.07),
    "adaptive_off": (dict(entropy_target=0.5, entropy_coef_delta=0.01, entropy_coef_min=0.0, entropy_coef_max=0.2,
                          last_world_entropy=0.9), 0.07, 0.0),
}


def _grpo_batch(seed, B=4, P=3, Tc=6, H=8, V=19, softcap=None, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    T = P + Tc
    h = torch.randn(B, T, H, generator=g, dtype=D64)
    w = torch.randn(V, H, generator=g, dtype=D64) / 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :P] = -100
    for i, n in enumerate([Tc, Tc - 2, 0, Tc - 3][:B]):  # sequence 2: no completion token (fully masked)
        labels[i, P + n:] = -100
    return h, w, labels, g


def _trl_case(loss_type, case, seed=0, beta=0.0, temperature=1.0, softcap=None, quantile=1.0):
    from support.trl_oracle import trl_grpo_loss

    P = 3
    h, w, labels, g = _grpo_batch(seed)
    B, T = labels.shape
    cm = (labels != -100)[:, P:].long()
    Tc = cm.shape[1]
    adaptive, coef, step_coef = ENTROPY_CASES[case]
    opts = dict(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=5.0 if loss_type == "cispo" else 0.28,
                max_completion_length=Tc, entropy_coef=coef, top_entropy_quantile=quantile)
    o = dpo_fast.GRPOOptions(**opts)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = _ref_logp_ent(hh, ww, None, labels, temperature, softcap)
    lp_c, ent_c = lp[:, P:], ent[:, P:]
    old_c = lp_c.detach() + 0.3 * torch.randn(B, Tc, generator=g, dtype=D64) * cm
    ref_c = lp_c.detach() + 0.3 * torch.randn(B, Tc, generator=g, dtype=D64) * cm
    adv = torch.tensor([1.0, -0.7, 0.4, -1.3], dtype=D64)
    n_items = torch.tensor(float(cm.sum()) + 2.0, dtype=D64)
    inputs = dict(prompt_ids=torch.zeros(B, P, dtype=torch.long), prompt_mask=torch.ones(B, P),
                  completion_ids=torch.zeros_like(cm), completion_mask=cm, advantages=adv,
                  old_per_token_logps=old_c, ref_per_token_logps=ref_c, num_items_in_batch=n_items)
    state = {}
    cfg = o.as_kwargs()
    loss, metrics = trl_grpo_loss(lp_c, ent_c, inputs, cfg, adaptive=adaptive, train=adaptive is not None,
                                  state_out=state)
    gh, gw = torch.autograd.grad(loss, (hh, ww))

    def layout(c):  # completion columns -> labels' layout
        return torch.cat([torch.zeros(B, P, dtype=D64), c], 1)

    mod_inputs = dict(labels=labels, advantages=adv, old_logps=layout(old_c), ref_logps=layout(ref_c) if beta else None,
                      num_items_in_batch=n_items, entropy_coef=step_coef)
    return dict(h=h, w=w, opts=opts, trl=(loss, gh, gw, metrics, state), mod=mod_inputs, step_coef=step_coef)


def _check_against_trl(c, module, backend_tol=None, dtype=D64):
    loss, gh, gw, metrics, _ = c["trl"]
    hh = c["h"].to(dtype).clone().requires_grad_()
    ww = c["w"].to(dtype).clone().requires_grad_()
    m = c["mod"]
    out = module(hh, ww, m["labels"], m["advantages"], m["old_logps"], m["ref_logps"],
                 num_items_in_batch=m["num_items_in_batch"], entropy_coef=m["entropy_coef"])
    out.loss.backward()
    tol = backend_tol or dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.loss.double(), loss.detach(), **tol)
    torch.testing.assert_close(hh.grad.double(), gh, **tol)
    torch.testing.assert_close(ww.grad.double(), gw, **tol)
    for k, v in metrics.items():
        if k == "entropy_coef":
            continue  # trainer state (the controller): checked with FastGRPOTrainer
        if k == "policy_loss" and c["step_coef"] == 0.0:
            k_got = out.loss.item()  # the bonus is gated off this step: policy loss == loss
        else:
            assert k in out.metrics, k
            k_got = out.metrics[k]
        torch.testing.assert_close(torch.tensor(float(k_got), dtype=D64), torch.tensor(float(v), dtype=D64),
                                   rtol=max(tol["rtol"], 1e-7), atol=max(tol["atol"], 1e-12), equal_nan=True,
                                   msg=k)
    return out


@pytest.mark.parametrize("case", list(ENTROPY_CASES))
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_fused_grpo_entropy_bonus_matches_trl(loss_type, case):
    pytest.importorskip("trl.trainer.grpo_trainer")
    c = _trl_case(loss_type, case, seed=seed_of(loss_type, case) % 1000, beta=0.04)
    module = dpo_fast.GRPOLoss(**c["opts"], token_metrics=True, backend="torch")
    out = _check_against_trl(c, module)
    assert out.route == "fused"


def test_fused_grpo_entropy_bonus_several_groups_and_two_pass():
    """One sequence per group (a tiny group workspace), and fused=False: the same loss and gradients as TRL."""
    pytest.importorskip("trl.trainer.grpo_trainer")
    c = _trl_case("dapo", "static", seed=4, beta=0.04)
    out = _check_against_trl(c, dpo_fast.GRPOLoss(**c["opts"], token_metrics=True, workspace_bytes=2048))
    assert out.route == "fused"
    out = _check_against_trl(c, dpo_fast.GRPOLoss(**c["opts"], token_metrics=True, fused=False))
    assert out.route == "two_pass"


def test_grpo_entropy_bonus_with_entropy_quantile_two_pass_matches_trl():
    pytest.importorskip("trl.trainer.grpo_trainer")
    c = _trl_case("grpo", "static", seed=6, quantile=0.5)
    out = _check_against_trl(c, dpo_fast.GRPOLoss(**c["opts"], token_metrics=True))
    assert out.route == "two_pass"


@pytest.mark.skipif(not INTERP, reason="runs the kernels in the interpreter")
def test_fused_grpo_entropy_bonus_triton_float32():
    pytest.importorskip("trl.trainer.grpo_trainer")
    c = _trl_case("grpo", "static", seed=8, beta=0.04)
    module = dpo_fast.GRPOLoss(**c["opts"], token_metrics=True, backend="triton")
    out = _check_against_trl(c, module, backend_tol=dict(rtol=2e-4, atol=2e-5), dtype=torch.float32)
    assert out.route == "fused"


def test_grpo_loss_module_accepts_entropy_coef_and_per_step_value():
    h, w, labels, _ = _grpo_batch(1)
    adv = torch.tensor([1.0, -0.7, 0.4, -1.3], dtype=D64)
    m0 = dpo_fast.GRPOLoss(entropy_coef=0.0)
    m1 = dpo_fast.GRPOLoss(entropy_coef=0.1)
    with pytest.raises(ValueError, match="entropy_coef"):
        dpo_fast.GRPOLoss(entropy_coef=float("nan"))
    a = m1(h, w, labels, adv).loss
    b = m0(h, w, labels, adv, entropy_coef=0.1).loss  # the per-step value wins
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, m1(h, w, labels, adv, entropy_coef=0.0).loss)


# ------------------------------------------------------------------------------------------------ FastGRPOTrainer
TRAINER_ENTROPY = {
    "static": dict(loss_type="grpo", entropy_coef=0.05),
    "static_dapo_accum": dict(loss_type="dapo", entropy_coef=0.05, gradient_accumulation_steps=2),
    # the controller steps the coefficient every optimizer step: up (target above the entropy), then applied
    "adaptive": dict(loss_type="bnpo", entropy_coef=0.02, use_adaptive_entropy=True, entropy_target=50.0,
                     entropy_coef_delta=0.01, entropy_coef_max=0.1, max_steps=3),
}


@pytest.mark.parametrize("cfg", list(TRAINER_ENTROPY))
def test_fast_grpo_trainer_entropy_bonus_fused_and_logs_what_trl_logs(tmp_path, cfg):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from support.trainer_fixtures import assert_same_logs, logged, make_grpo_trainer, saved_tiny_llama

    from dpo_fast.integrations import trl_grpo

    try:
        trl_grpo.check_trl_version()
    except trl_grpo.UnsupportedTRLVersion as e:  # pragma: no cover
        pytest.skip(str(e))
    model_path = saved_tiny_llama(tmp_path / "model")
    opts = dict(num_iterations=2, epsilon=0.02, learning_rate=0.05, max_steps=2)
    opts.update(TRAINER_ENTROPY[cfg])
    stock = make_grpo_trainer("trl", tmp_path / "a", model_path, **opts)
    stock.train()
    fast = make_grpo_trainer("fast", tmp_path / "b", model_path, **opts)
    fast.train()
    assert not fast.dpo_fast_fallback_reasons and set(fast.dpo_fast_routes) == {"fused"}
    assert fast.dpo_fast_route == "fused"
    a, b = logged(stock), logged(fast)
    assert_same_logs(a, b)
    assert "policy_loss" in b[0] and "entropy_coef" in b[0] and "entropy" in b[0]
    assert fast.entropy_coef == pytest.approx(stock.entropy_coef)
    assert fast._last_world_entropy == pytest.approx(stock._last_world_entropy, rel=1e-4)
    if cfg == "adaptive":
        assert [h["entropy_coef"] for h in b] != [b[0]["entropy_coef"]] * len(b)  # the controller moved
