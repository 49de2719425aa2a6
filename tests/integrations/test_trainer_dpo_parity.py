"""dpo_loss against TRL 1.16's own ``DPOTrainer._compute_loss`` (the oracle), called on a stub trainer.

The stub holds only what ``_compute_loss`` reads; its "model" and "reference model" return fixed per-token
log-probs (and the other fused-head outputs TRL reads) in TRL's layout: rows [chosen_0..chosen_{P-1},
rejected_0..rejected_{P-1}], position t scoring token t+1. TRL's loss code then runs unchanged. We compare
the loss, its gradient w.r.t. the per-token log-probs and TRL's reward / log-prob / logit metrics, for every
loss type x f-divergence x ld_alpha x use_weighting combination TRL accepts, plus loss lists.

dpo_fast's own arguments are formed from the same tensors: sequence sums (LD-weighted through
:func:`ld_dpo_logps` when ``ld_alpha`` is set), the unweighted chosen sums as ``sft_chosen_logps``, the WPO
log-weights by their definition, and label_smoothing per loss type as the TRL trainer path passes it (0 for
sigmoid, whose TRL formula has no ε).
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from dpo_fast import losses as L
from dpo_fast.losses import registry as R
from support.trl_oracle import (DPO_METRICS, StubAccelerator, StubModel, case_precision, dpo_cases,
                                 trl_epsilon)

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
DPOTrainer = trl_dpo.DPOTrainer

METRICS = DPO_METRICS


def _layout(P, T, seed, dtype):
    """completion_mask (2P, T) and per-token tensors (2P, T-1) in TRL's fused-head layout."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * P, T, dtype=torch.long)
    for i in range(2 * P):
        start = int(torch.randint(1, 3, (1,), generator=g))
        n = int(torch.randint(1, T - start + 1, (1,), generator=g))
        mask[i, start:start + n] = 1
    shift = mask[:, 1:].bool()
    tok = torch.where(shift, -torch.rand(2 * P, T - 1, generator=g, dtype=torch.float64) * 2, 0.0).to(dtype)
    ref = torch.where(shift, tok.double() + 0.4 * torch.randn(2 * P, T - 1, generator=g, dtype=torch.float64),
                      0.0).to(dtype)
    lssp = torch.where(shift, -torch.rand(2 * P, T - 1, generator=g, dtype=torch.float64), 0.0).to(dtype)
    heads = dict(mean_logits=torch.randn(2 * P, T - 1, generator=g, dtype=torch.float64).to(dtype),
                 entropy=torch.rand(2 * P, T - 1, generator=g, dtype=torch.float64).to(dtype),
                 is_top1=torch.rand(2 * P, T - 1, generator=g) > 0.5, log_sum_sq_probs=lssp)
    return mask, tok, ref, heads


def _trl(loss_types, weights, eps, fdiv, alpha, ld_alpha, weighting, beta, mask, tok, ref, heads):
    args = types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None)
    out = types.SimpleNamespace(log_probs=tok, **heads)
    s = types.SimpleNamespace(
        args=args, accelerator=StubAccelerator(), model=StubModel().eval(),
        ref_model=lambda **kw: types.SimpleNamespace(log_probs=ref), aux_loss_enabled=False,
        precompute_ref_logps=False, _total_train_tokens=0, _tp_size=1, ld_alpha=ld_alpha, f_divergence_type=fdiv,
        f_alpha_divergence_coef=alpha,
        loss_types=loss_types, loss_weights=weights, beta=beta, label_smoothing=eps, use_weighting=weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    inputs = dict(input_ids=torch.zeros_like(mask), attention_mask=torch.ones_like(mask), completion_mask=mask)
    loss = DPOTrainer._compute_loss(s, lambda **kw: out, inputs, False)
    return loss, {k: v[-1] for k, v in s._metrics["eval"].items()}


def _ours(loss_types, weights, eps, fdiv, alpha, ld_alpha, weighting, beta, mask, tok, ref, heads):
    P = mask.shape[0] // 2
    shift = mask[:, 1:].bool()
    n = shift.sum(-1)
    if ld_alpha is None:
        seq, ref_seq = tok.sum(-1), ref.sum(-1)
    else:
        lc, lr = L.ld_dpo_logps(tok[:P], tok[P:], shift[:P], shift[P:], ld_alpha)
        rc, rr = L.ld_dpo_logps(ref[:P], ref[P:], shift[:P], shift[P:], ld_alpha)
        seq, ref_seq = torch.cat([lc, lr]), torch.cat([rc, rr])
    kw = {}
    if weighting:  # WPO log-weight by its definition: mean over scored tokens of log p − log Σ p²
        lw = ((tok.detach() - heads["log_sum_sq_probs"]) * shift).sum(-1) / n.clamp_min(1)
        kw = dict(chosen_wpo_logweights=lw[:P], rejected_wpo_logweights=lw[P:])
    logit_mean = (heads["mean_logits"] * shift).sum(-1) / n.clamp_min(1)
    # the TRL trainer path: TRL's sigmoid has no ε, the other smoothed types read the config's
    smoothing = [eps if R.pairwise(lt).trl_uses_label_smoothing else 0.0 for lt in loss_types]
    return L.dpo_loss(seq[:P], seq[P:], ref_seq[:P], ref_seq[P:], beta=beta, loss_type=loss_types,
                      loss_weights=weights, label_smoothing=smoothing, f_divergence_type=fdiv,
                      f_alpha_divergence_coef=alpha, chosen_lengths=n[:P], rejected_lengths=n[P:],
                      use_weighting=weighting, sft_chosen_logps=(tok * shift).sum(-1)[:P],
                      chosen_logits_mean=logit_mean[:P],
                      rejected_logits_mean=logit_mean[P:], **kw)


@pytest.mark.parametrize("loss_types,fdiv,ld_alpha,weighting", list(dpo_cases()))
def test_dpo_loss_matches_trl(loss_types, fdiv, ld_alpha, weighting):
    dtype, tol = case_precision(loss_types, fdiv)
    P, T = 5, 9
    mask, tok, ref, heads = _layout(P, T, sum(map(ord, "".join(loss_types) + fdiv + str(ld_alpha))), dtype)
    eps = trl_epsilon(loss_types)
    weights = [1.0] if len(loss_types) == 1 else [1.0 + 0.5 * i for i in range(len(loss_types))]
    common = (loss_types, weights, eps, fdiv, 0.3, ld_alpha, weighting, 0.4, mask)
    t_trl = tok.clone().requires_grad_()
    try:
        loss_trl, m_trl = _trl(*common, t_trl, ref, heads)
    except RuntimeError as e:  # TRL's in-place WPO product on the expanded sft term
        assert weighting and "sft" in loss_types, e
        pytest.skip(f"TRL 1.16 fails on this combination: {e}")
    t_ours = tok.clone().requires_grad_()
    out = _ours(*common, t_ours, ref, heads)
    torch.testing.assert_close(out.loss.to(loss_trl.dtype), loss_trl, **tol)
    (g_ours,) = torch.autograd.grad(out.loss, t_ours)
    try:
        (g_trl,) = torch.autograd.grad(loss_trl, t_trl)
    except RuntimeError as e:  # TRL 1.16: `per_sequence_loss *= weights` in place on relu's output (hinge)
        assert weighting and "inplace" in str(e), e
        g_trl = None
    if g_trl is not None:
        # gradients at the scored positions (elsewhere the fused head's output is a constant 0)
        scored = mask[:, 1:].bool()
        torch.testing.assert_close(g_ours.to(g_trl.dtype)[scored], g_trl[scored], **tol)
    for k in METRICS:  # TRL takes the accuracy in float32 (``.float()``)
        torch.testing.assert_close(torch.tensor(out.metrics[k], dtype=torch.float64),
                                   torch.tensor(m_trl[k], dtype=torch.float64),
                                   **(dict(rtol=1e-7, atol=0.0) if k == "rewards/accuracies" else tol), msg=k)


def test_sigmoid_label_smoothing_is_cdpo_where_trl_ignores_it():
    """The documented difference: dpo_fast's sigmoid + ε is cDPO; TRL's sigmoid ignores ε."""
    P, T = 4, 8
    mask, tok, ref, heads = _layout(P, T, 3, torch.float64)
    loss_trl, _ = _trl(["sigmoid"], [1.0], 0.2, "reverse_kl", 0.5, None, False, 0.4, mask, tok, ref, heads)
    shift = mask[:, 1:].bool()
    seq, rseq = tok.sum(-1), ref.sum(-1)
    plain = L.dpo_loss(seq[:P], seq[P:], rseq[:P], rseq[P:], beta=0.4).loss
    cdpo = L.dpo_loss(seq[:P], seq[P:], rseq[:P], rseq[P:], beta=0.4, label_smoothing=0.2).loss
    torch.testing.assert_close(plain, loss_trl, rtol=1e-12, atol=0)
    assert not torch.allclose(cdpo, loss_trl)
    z = 0.4 * ((seq[:P] - rseq[:P]) - (seq[P:] - rseq[P:]))
    expect = (-(0.8) * torch.nn.functional.logsigmoid(z) - 0.2 * torch.nn.functional.logsigmoid(-z)).mean()
    torch.testing.assert_close(cdpo, expect)
    assert shift.any()


def test_trl_smoothed_set_and_f_divergence_set_match_trl_source():
    """The registry's trl_uses_label_smoothing / trl_accepts_f_divergence flags against TRL's source."""
    import inspect

    src = inspect.getsource(DPOTrainer._compute_loss)
    init = inspect.getsource(DPOTrainer.__init__)
    branches = src.split('elif loss_type == "')
    first = src.split('if loss_type == "sigmoid":')[1].split("elif")[0]
    reads = {"sigmoid": "label_smoothing" in first}
    for b in branches[1:]:
        name, body = b.split('"', 1)
        reads[name] = "label_smoothing" in body.split("elif loss_type")[0].split("if self.use_weighting")[0]
    assert {k for k, v in reads.items() if v} == set(R.TRL_SMOOTHED)
    accepted = init.split("f_divergence_loss_types = {")[1].split("}")[0]
    names = {n.strip().strip('"') for n in accepted.split(",")}
    assert names == {e.name for e in R.PAIRWISE if e.trl_accepts_f_divergence}
    assert set(R.LOSS_TYPES) == set(reads)


# ------------------------------------------------------------------------------------------------ CPO / ORPO
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("loss_type", R.CPO_LOSS_TYPES)
def test_cpo_loss_matches_trl_experimental(loss_type, alpha):
    """cpo_loss's preference term and rewards against trl.experimental's CPOTrainer.cpo_loss (its inputs are the
    length-averaged log-probs for ipo / simpo, as the trainer's forward passes them)."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    g = torch.Generator().manual_seed(7)
    P = 6
    lw = -10 - 5 * torch.rand(P, generator=g, dtype=torch.float64)
    ll = -11 - 5 * torch.rand(P, generator=g, dtype=torch.float64)
    nw, nl = torch.randint(1, 20, (P,), generator=g), torch.randint(1, 20, (P,), generator=g)
    avg = R.cpo_entry(loss_type).length_averaged
    eps = 0.1 if R.cpo_entry(loss_type).uses_label_smoothing else 0.0
    s = types.SimpleNamespace(alpha=alpha, beta=0.3, loss_type=loss_type, simpo_gamma=0.5, label_smoothing=eps,
                              accelerator=StubAccelerator())
    tw, tl = (lw / nw, ll / nl) if avg else (lw, ll)
    losses, cr, rr = cpo.CPOTrainer.cpo_loss(s, tw, tl)
    out = L.cpo_loss(lw, ll, beta=0.3, loss_type=loss_type, label_smoothing=eps, simpo_gamma=0.5, cpo_alpha=0.0,
                     alpha=alpha, chosen_lengths=nw, rejected_lengths=nl)
    torch.testing.assert_close(out.losses, losses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, cr, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, rr, rtol=1e-9, atol=1e-12)


def test_orpo_loss_matches_trl_experimental():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    g = torch.Generator().manual_seed(8)
    P = 6
    nw, nl = torch.randint(1, 20, (P,), generator=g), torch.randint(1, 20, (P,), generator=g)
    lw = -nw * (0.05 + 2 * torch.rand(P, generator=g, dtype=torch.float64))
    ll = -nl * (0.05 + 2 * torch.rand(P, generator=g, dtype=torch.float64))
    s = types.SimpleNamespace(beta=0.2, accelerator=StubAccelerator())
    aw, al = (lw / nw).float(), (ll / nl).float()  # TRL computes in float32
    losses, cr, rr, ratio, log_odds = orpo.ORPOTrainer.odds_ratio_loss(s, aw, al)
    out = L.orpo_loss(lw.float(), ll.float(), chosen_lengths=nw, rejected_lengths=nl, beta=0.2, chosen_nll=0.0)
    torch.testing.assert_close(out.losses, -losses, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(out.metrics["log_odds_ratio"], ratio.item(), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(out.metrics["log_odds_chosen"], log_odds.item(), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(out.chosen_rewards, cr, rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ KTO
@pytest.mark.parametrize("calculate_kl", [True, False])
@pytest.mark.parametrize("loss_type", R.KTO_LOSS_TYPES)
def test_kto_loss_matches_trl(loss_type, calculate_kl):
    """kto_loss against TRL 1.16's own KTOTrainer._compute_loss on a stub (precomputed reference log-probs)."""
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    N, T = 7, 8
    g = torch.Generator().manual_seed(9 + calculate_kl)
    mask = torch.zeros(N, T, dtype=torch.long)
    for i in range(N):
        mask[i, 2:2 + int(torch.randint(1, T - 2, (1,), generator=g))] = 1
    shift = mask[:, 1:].bool()
    tok = torch.where(shift, -torch.rand(N, T - 1, generator=g, dtype=torch.float64) * 2, 0.0)
    ref = tok.sum(-1) + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    kl_pol = -5 - torch.rand(N, generator=g, dtype=torch.float64)
    kl_ref = kl_pol - 0.3 * torch.rand(N, generator=g, dtype=torch.float64)  # mean KL > 0
    label = torch.tensor([True, False, True, True, False, False, True])
    heads = dict(entropy=torch.rand(N, T - 1, dtype=torch.float64), mean_logits=torch.randn(N, T - 1, generator=g))
    t_trl = tok.clone().requires_grad_()
    s = types.SimpleNamespace(
        model=StubModel().eval(), accelerator=StubAccelerator(), aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=calculate_kl, loss_type=loss_type, beta=0.3, desirable_weight=1.2, undesirable_weight=0.8,
        _total_train_tokens=0, _tp_size=1, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    s._compute_kl_logps = lambda model, batch: kl_pol if calculate_kl else None
    batch = dict(input_ids=torch.zeros_like(mask), attention_mask=torch.ones_like(mask), completion_mask=mask,
                 label=label, ref_logps=ref, ref_KL_logps=kl_ref)
    out_trl = types.SimpleNamespace(log_probs=t_trl, **heads)
    loss_trl = kto.KTOTrainer._compute_loss(s, lambda **kw: out_trl, batch, False)
    m_trl = {k: v[-1] for k, v in s._metrics["eval"].items()}

    t_ours = tok.clone().requires_grad_()
    kl_args = (kl_pol, kl_ref) if calculate_kl else (None, None)
    out = L.kto_loss(t_ours.sum(-1), ref, label, *kl_args, beta=0.3, desirable_weight=1.2, undesirable_weight=0.8,
                     loss_type=loss_type)
    torch.testing.assert_close(out.loss, loss_trl, rtol=1e-10, atol=1e-12)
    (g_trl,) = torch.autograd.grad(loss_trl, t_trl)
    (g_ours,) = torch.autograd.grad(out.loss, t_ours)
    torch.testing.assert_close(g_ours[shift], g_trl[shift], rtol=1e-10, atol=1e-12)
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(torch.tensor(out.metrics[k], dtype=torch.float64),
                                   torch.tensor(m_trl[k], dtype=torch.float64), rtol=1e-7, atol=1e-9, msg=k)
