"""FastKTOTrainer / FastCPOTrainer / FastORPOTrainer with ``padding_free=True`` against the padded fast path and stock
TRL, on a tiny random Llama (sdpa, no download).

The datasets have long-tailed prompt and completion lengths, so TRL's right-padded batches hold much padding and a
packed row holds several sequences; with the same data and seed, every logged metric (training and evaluation) of the
packed trainer must equal the padded fast trainer's and stock TRL's within fp32 tolerance over several steps: KTO
with its KL pass, reference model, ``precompute_ref_log_probs`` and evaluation; CPO on the fused route (with its
chosen NLL) and the two-pass route; ORPO (odds ratio and whole-sequence NLL); ``logits/*``, TRL's mean over every
position padding included, through the extra no-grad padded forward.
"""

import random

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from dpo_fast.integrations import trl_cpo_orpo, trl_kto  # noqa: E402
from support.trainer_fixtures import PAIR_DEFAULTS, assert_same_logs, logged, saved_tiny_llama  # noqa: E402
from support.trl_fixtures import char_tokenizer, tiny_llama  # noqa: E402

try:
    trl_kto.check_trl_version()
except trl_kto.UnsupportedTRLVersion as e:  # pragma: no cover
    pytest.skip(str(e), allow_module_level=True)

PF = dict(padding_free=True)


def long_tail_pairs(n=32, seed=0):
    """{"prompt", "chosen", "rejected"} rows whose prompt and completion lengths are long-tailed (Pareto): most
    sequences short, a few up to ~30 tokens (under PAIR_DEFAULTS' max_length 32, so TRL truncates nothing)."""
    from datasets import Dataset

    rng = random.Random(seed)

    def tail(cap):
        return "0" * min(int(rng.paretovariate(0.7)) - 1, cap)

    rows = []
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        wrong = a + b + rng.choice([-3, -1, 1, 2, 10])
        rows.append({"prompt": tail(14) + f"{a}+{b}=", "chosen": str(a + b) + tail(6),
                     "rejected": str(wrong) + tail(6)})
    return Dataset.from_list(rows)


def long_tail_unpaired(n=32, seed=0):
    """KTO rows {"prompt", "completion", "label"} from :func:`long_tail_pairs` (two desirable in three)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"],
                               "label": bool(i % 3)} for i, r in enumerate(long_tail_pairs(n, seed))])


EVAL = dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8)


def pair_trainer(algo, kind, out, own=None, evaluate=False, **cfg):
    """A CPO / ORPO trainer of ``kind`` ("trl", "fast", "patched") on :func:`long_tail_pairs`."""
    if algo == "cpo":
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Stock
        fast, patch = trl_cpo_orpo.FastCPOTrainer, trl_cpo_orpo.patch_cpo_trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Stock
        fast, patch = trl_cpo_orpo.FastORPOTrainer, trl_cpo_orpo.patch_orpo_trainer
    model, _ = tiny_llama(64)
    args = Config(output_dir=str(out), **{**PAIR_DEFAULTS, **(EVAL if evaluate else {}), **cfg})
    init = dict(model=model, args=args, train_dataset=long_tail_pairs(), processing_class=char_tokenizer(),
                eval_dataset=long_tail_pairs(8, seed=1) if evaluate else None)
    if kind == "fast":
        return fast(**init, **(own or {}))
    tr = Stock(**init)
    return patch(tr, **(own or {})) if kind == "patched" else tr


def kto_trainer(kind, out, model_path, own=None, evaluate=False, **cfg):
    """A KTO trainer of ``kind`` on the saved tiny Llama (TRL loads the reference copy) and
    :func:`long_tail_unpaired`."""
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=str(out), model_init_kwargs={"dtype": torch.float32},
                     **{**PAIR_DEFAULTS, **(EVAL if evaluate else {}), **cfg})
    init = dict(model=str(model_path), args=args, train_dataset=long_tail_unpaired(),
                processing_class=char_tokenizer(), eval_dataset=long_tail_unpaired(8, seed=1) if evaluate else None)
    if kind == "fast":
        return trl_kto.FastKTOTrainer(**init, **(own or {}))
    tr = KTOTrainer(**init)
    return trl_kto.patch_kto_trainer(tr, **(own or {})) if kind == "patched" else tr


def trained(tr):
    tr.train()
    return tr


def check_packed(tr):
    """The packed forwards ran and removed padding: fewer decoder slots and rows than the padded batches had."""
    p = tr.dpo_fast_packing
    assert tr.dpo_fast_padding_free
    assert 0 < p["real_tokens"] <= p["packed_slots"] < p["padded_slots"], dict(p)
    assert p["packed_rows"] < p["padded_rows"], dict(p)


def records(tr):
    """Every log record but the final summary (evaluation records included), timings left out."""
    return [{k: v for k, v in h.items() if not k.endswith(("_runtime", "_per_second"))}
            for h in tr.state.log_history if "train_runtime" not in h]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("kto_pf_model"))


# ------------------------------------------------------------------------------------------------ KTO


def test_kto_packed_equals_padded_and_stock(tmp_path, model_path):
    """KL pass, reference model, policy pass, evaluation: every record equal."""
    stock = trained(kto_trainer("trl", tmp_path / "a", model_path, evaluate=True, max_steps=3))
    padded = trained(kto_trainer("fast", tmp_path / "b", model_path, evaluate=True, max_steps=3))
    packed = trained(kto_trainer("fast", tmp_path / "c", model_path, own=PF, evaluate=True, max_steps=3))
    assert not padded.dpo_fast_padding_free and not padded.dpo_fast_packing
    check_packed(packed)
    assert packed.dpo_fast_routes == padded.dpo_fast_routes and packed.dpo_fast_routes["fused"] == 3
    a, b, c = records(stock), records(padded), records(packed)
    assert any("eval_loss" in r for r in c)
    assert {"kl", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "rewards/margins"} <= set(c[0])
    assert any(r.get("kl", 0) > 0 for r in a), "z stayed 0: the KL pass is untested"
    assert_same_logs(b, c)
    assert_same_logs(a, c)


def test_kto_patched_precomputed_reference_one_row(tmp_path, model_path):
    """patch_kto_trainer(padding_free=True), precompute_ref_log_probs (packed reference and KL passes) and every
    sequence of a forward in one row (no padding left at all)."""
    opts = dict(precompute_ref_log_probs=True, max_steps=2)
    stock = trained(kto_trainer("trl", tmp_path / "a", model_path, **opts))
    patched = trained(kto_trainer("patched", tmp_path / "b", model_path,
                                  own=dict(padding_free=True, packed_row_tokens="one_row"), **opts))
    check_packed(patched)
    assert patched.dpo_fast_packing["packed_slots"] == patched.dpo_fast_packing["real_tokens"]
    assert_same_logs(logged(stock), logged(patched))


# ------------------------------------------------------------------------------------------------ CPO / ORPO


def test_cpo_packed_equals_padded_and_stock(tmp_path):
    """The fused route (CPOLoss, with the chosen NLL of cpo_alpha=1) from the packed forward."""
    stock = trained(pair_trainer("cpo", "trl", tmp_path / "a"))
    padded = trained(pair_trainer("cpo", "fast", tmp_path / "b"))
    packed = trained(pair_trainer("cpo", "fast", tmp_path / "c", own=PF))
    check_packed(packed)
    assert packed.dpo_fast_route == padded.dpo_fast_route == "fused"
    assert packed.dpo_fast_packing["logits_metric_slots"] > 0
    a, b, c = logged(stock), logged(padded), logged(packed)
    assert {"rewards/chosen", "logps/chosen", "logits/chosen", "logits/rejected", "nll_loss"} <= set(c[0])
    assert all(r["nll_loss"] > 0 for r in c)
    assert_same_logs(b, c)
    assert_same_logs(a, c)


@pytest.mark.parametrize("options, rows, route", [
    (dict(loss_type="simpo", cpo_alpha=0.5, simpo_gamma=0.7, beta=2.0), 64, "fused"),
    (dict(label_smoothing=0.7), "one_row", "two_pass"),  # CPOLoss rejects it: TRL's cpo_loss, engine's log-probs
], ids=["simpo,rows=64", "two_pass,one_row"])
def test_cpo_patched_routes_and_row_capacities(tmp_path, options, rows, route):
    stock = trained(pair_trainer("cpo", "trl", tmp_path / "a", max_steps=2, **options))
    packed = trained(pair_trainer("cpo", "patched", tmp_path / "b", own=dict(padding_free=True,
                                                                           packed_row_tokens=rows),
                                  max_steps=2, **options))
    check_packed(packed)
    assert packed.dpo_fast_route == route
    if rows == "one_row":
        assert packed.dpo_fast_packing["packed_slots"] == packed.dpo_fast_packing["real_tokens"]
    assert_same_logs(logged(stock), logged(packed))
    assert all(r["nll_loss"] > 0 for r in logged(packed))


def test_orpo_packed_equals_padded_and_stock(tmp_path):
    """The odds ratio and ORPO's whole-sequence NLL from the packed forward; evaluation too."""
    stock = trained(pair_trainer("orpo", "trl", tmp_path / "a", evaluate=True, beta=0.2))
    padded = trained(pair_trainer("orpo", "fast", tmp_path / "b", evaluate=True, beta=0.2))
    packed = trained(pair_trainer("orpo", "fast", tmp_path / "c", own=PF, evaluate=True, beta=0.2))
    check_packed(packed)
    assert packed.dpo_fast_route == "two_pass"
    a, b, c = records(stock), records(padded), records(packed)
    assert any("eval_loss" in r for r in c)
    assert {"log_odds_ratio", "log_odds_chosen", "nll_loss", "logits/chosen", "logits/rejected"} <= set(c[0])
    assert_same_logs(b, c)
    assert_same_logs(a, c)


@pytest.mark.parametrize("algo", ["cpo", "orpo"])
def test_packed_forward_equals_trls_and_logits_count_padding(tmp_path, monkeypatch, algo):
    """On one padded batch, the packed ``concatenated_forward`` returns TRL's log-probs, NLL (ORPO's over the whole
    sequence) and mean logits. TRL's mean logits average the logits at padding positions too: without the extra
    padded forward the packed values differ there, and only there."""
    stock = pair_trainer(algo, "trl", tmp_path / "a")
    packed = pair_trainer(algo, "patched" if algo == "orpo" else "fast", tmp_path / "b", own=PF)
    batch = next(iter(stock.get_train_dataloader()))
    assert (batch["chosen_attention_mask"] == 0).any() and (batch["rejected_attention_mask"] == 0).any()
    with torch.no_grad():
        lc, lr, zc, zr, nll = stock.concatenated_forward(stock.model, batch)
        want = (lc, lr, zc.mean(), zr.mean(), nll)
        got = packed.concatenated_forward(packed.model, batch)
        got = (got[0], got[1], got[2].mean(), got[3].mean(), got[4])
        monkeypatch.setattr(trl_cpo_orpo._FastPairMixin, "_dpo_fast_logit_means",
                            lambda self, model, ids, am, upto, means: means)
        blind = packed.concatenated_forward(packed.model, batch)
    if algo == "cpo":  # CPO's default (sigmoid) scores summed log-probs
        assert packed.loss_type == "sigmoid"
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=1e-5)
    assert float(nll) > 0
    torch.testing.assert_close(blind[0], got[0]), torch.testing.assert_close(blind[4], got[4])
    for i in (2, 3):
        assert abs(float(blind[i].mean()) - float(got[i])) > 1e-4 * abs(float(got[i])), i


# ------------------------------------------------------------------------------------------------ bad setups


def test_bad_keywords_raise(tmp_path, model_path):
    with pytest.raises(TypeError, match="padding_free: expected a bool"):
        kto_trainer("fast", tmp_path / "a", model_path, own=dict(padding_free="yes"))
    with pytest.raises(ValueError, match="packed_row_tokens: only meaningful with padding_free=True"):
        pair_trainer("cpo", "fast", tmp_path / "b", own=dict(packed_row_tokens=64))
    with pytest.raises(TypeError, match="padding_free: expected a bool"):
        pair_trainer("orpo", "patched", tmp_path / "c", own=dict(padding_free=1))
    with pytest.raises(ValueError, match="packed_row_tokens: expected None, 'one_row' or an int"):
        pair_trainer("orpo", "fast", tmp_path / "d", own=dict(padding_free=True, packed_row_tokens="all"))
    with pytest.raises(TypeError, match="unexpected keyword argument 'pading_free'"):
        trl_kto.patch_kto_trainer(kto_trainer("trl", tmp_path / "e", model_path), pading_free=True)
    # a packed row must hold the longest sequence: raised at the step, naming the fix
    tr = pair_trainer("cpo", "fast", tmp_path / "f", own=dict(padding_free=True, packed_row_tokens=8), max_steps=1)
    with pytest.raises(ValueError, match="row_tokens: 8 cannot hold row"):
        tr.train()


def test_leaking_attention_refused_at_construction(tmp_path, model_path, monkeypatch):
    """An attention implementation whose packed sequences see each other fails the probe: ValueError before any
    training, for the policy (CPO, ORPO) and for the policy and reference (KTO)."""
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    for make in (lambda: kto_trainer("fast", tmp_path / "a", model_path, own=PF),
                 lambda: pair_trainer("cpo", "fast", tmp_path / "b", own=PF),
                 lambda: pair_trainer("orpo", "patched", tmp_path / "c", own=PF)):
        with pytest.raises(ValueError, match="padding_free=True: with attention implementation 'sdpa'"):
            make()
    pair_trainer("orpo", "fast", tmp_path / "d")  # padded: no probe, no error


def test_vision_and_left_padding_refused(tmp_path, model_path):
    """A vision dataset/model is refused at construction; a left-padded batch (a scored token after padding, which
    the packed forward has no hidden state for) raises at the step instead of scoring a zero hidden state."""
    stock = kto_trainer("trl", tmp_path / "a", model_path)
    stock._is_vision_dataset = True
    with pytest.raises(NotImplementedError, match="padding_free=True is not supported with a vision-language"):
        trl_kto.patch_kto_trainer(stock, padding_free=True)

    kto = kto_trainer("fast", tmp_path / "b", model_path, own=PF)
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    am = (ids != 0).long()
    cm = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])  # row 0: empty prompt, left-padded
    with pytest.raises(ValueError, match="padding_free=True: a scored token follows a padding position"):
        kto._dpo_fast_seq_logps(kto.model, ids, am, cm)
    cm[0, 2] = 0  # the first real token unscored: fine (positions 2.. only)
    assert kto._dpo_fast_seq_logps(kto.model, ids, am, cm).shape == (2,)

    orpo = pair_trainer("orpo", "patched", tmp_path / "c", own=PF)
    batch = next(iter(orpo.get_train_dataloader()))
    # left-pad the chosen rows: roll each row's padding to its front
    for k in ("chosen_input_ids", "chosen_attention_mask", "chosen_labels"):
        shift = (batch["chosen_attention_mask"] == 0).sum(1)
        batch[k] = torch.stack([torch.roll(row, int(s)) for row, s in zip(batch[k], shift)])
    assert (batch["chosen_attention_mask"][:, 0] == 0).any()
    with pytest.raises(ValueError, match="padding_free=True: a scored token follows a padding position"):
        orpo.concatenated_forward(orpo.model, batch)
