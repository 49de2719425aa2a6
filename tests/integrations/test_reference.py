"""precompute_reference_logps: values, input kinds, and the on-disk cache (atomic, interruption-safe)."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dpo_fast  # noqa: E402
from dpo_fast import hf, reference  # noqa: E402
from dpo_fast.reference import precompute_reference_logps  # noqa: E402
from support.models import V, examples, tiny_model  # noqa: E402

def expected(model, exs):
    """One padded batch per example through the logits of the model's own forward."""
    c, r = [], []
    with torch.no_grad():
        for ex in exs:
            b = dpo_fast.pack_pairs([ex["prompt_ids"]], [ex["chosen_ids"]], [ex["rejected_ids"]], max_tokens=10**4,
                                    mode="padded").to_torch()
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            lp = torch.log_softmax(logits.float(), -1)
            m = b["labels"] != -100
            s = (lp.gather(-1, b["labels"].clamp_min(0)[..., None]).squeeze(-1) * m).sum(-1)
            c.append(float(s[0]))
            r.append(float(s[1]))
    return torch.tensor(c), torch.tensor(r)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def exs():
    return examples()


@pytest.fixture(scope="module")
def want(model, exs):
    return expected(model, exs)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_list_of_dicts(model, exs, want, mode):
    out = precompute_reference_logps(model, exs, batch_size=4, mode=mode, progress=False)
    assert len(out) == len(exs) and out[0] is not exs[0] and "ref_chosen_logps" not in exs[0]
    got_c = torch.tensor([o["ref_chosen_logps"] for o in out])
    got_r = torch.tensor([o["ref_rejected_logps"] for o in out])
    torch.testing.assert_close(got_c, want[0], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(got_r, want[1], atol=3e-5, rtol=1e-5)


def test_hf_dataset_columns(model, exs, want):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(exs)
    out = precompute_reference_logps(model, ds, batch_size=5, progress=False)
    assert set(reference.REF_COLUMNS) <= set(out.column_names)
    torch.testing.assert_close(torch.tensor(out["ref_chosen_logps"]), want[0], atol=3e-5, rtol=1e-5)
    again = precompute_reference_logps(model, out, batch_size=5, progress=False)  # columns replaced, not doubled
    assert again.column_names.count("ref_chosen_logps") == 1


def test_old_trl_keys(model):
    exs = examples(4, keys=("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    out = precompute_reference_logps(model, exs, progress=False)
    assert all("ref_rejected_logps" in o for o in out)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_pair_collator_loader(model, exs, want, mode):
    loader = torch.utils.data.DataLoader(exs, batch_size=4, collate_fn=dpo_fast.PairCollator(max_tokens=64, mode=mode))
    out = precompute_reference_logps(model, loader, progress=False)
    torch.testing.assert_close(out["ref_chosen_logps"], want[0], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(out["ref_rejected_logps"], want[1], atol=3e-5, rtol=1e-5)


def test_trl_collator_loader(model, exs, want):
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    loader = torch.utils.data.DataLoader(exs, batch_size=3,
                                         collate_fn=trl_dpo.DataCollatorForPreference(pad_token_id=0))
    out = precompute_reference_logps(model, loader, progress=False)
    torch.testing.assert_close(out["ref_chosen_logps"], want[0], atol=3e-5, rtol=1e-5)


def test_progress_bar_and_train_mode_restored(model, exs, capsys):
    model.train()
    precompute_reference_logps(model, exs, batch_size=4, desc="ref-bar")
    assert model.training
    assert "ref-bar" in capsys.readouterr().err
    model.eval()


def test_bad_arguments(model, exs):
    with pytest.raises(ValueError, match="mode"):
        precompute_reference_logps(model, exs, mode="ragged")
    with pytest.raises(ValueError, match="batch_size"):
        precompute_reference_logps(model, exs, batch_size=0)
    loader = torch.utils.data.DataLoader(exs, batch_size=4, collate_fn=dpo_fast.PairCollator(max_tokens=64))
    with pytest.raises(ValueError, match="fingerprint"):
        precompute_reference_logps(model, loader, cache_dir="/nonexistent")


# ------------------------------------------------------------------------------------------------ cache


def _count_calls(model):
    calls = []
    h = model.model.register_forward_hook(lambda *a: calls.append(1))
    return calls, h


def test_cache_hit_skips_model(tmp_path, exs):
    model = tiny_model()
    first = precompute_reference_logps(model, exs, batch_size=4, cache_dir=tmp_path, progress=False)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("ref_logps-") and files[0].endswith(".pt")
    calls, h = _count_calls(model)
    second = precompute_reference_logps(model, exs, batch_size=4, cache_dir=tmp_path, progress=False)
    h.remove()
    assert calls == [] and second == first
    # another model (different weights) or other data: a different key, recomputed
    other = tiny_model(seed=1)
    third = precompute_reference_logps(other, exs, batch_size=4, cache_dir=tmp_path, progress=False)
    assert third[0]["ref_chosen_logps"] != first[0]["ref_chosen_logps"]
    precompute_reference_logps(model, exs[:5], cache_dir=tmp_path, progress=False)
    assert len(os.listdir(tmp_path)) == 3
    # the model fingerprint can be given instead of hashed
    precompute_reference_logps(model, exs, cache_dir=tmp_path, model_fingerprint="ckpt-abc", progress=False)
    assert len(os.listdir(tmp_path)) == 4


def test_fingerprints_stable():
    a, b = tiny_model(), tiny_model()
    assert reference.model_fingerprint(a) == reference.model_fingerprint(b)
    with torch.no_grad():
        b.lm_head.weight[0, 0] += 1e-3
    assert reference.model_fingerprint(a) != reference.model_fingerprint(b)
    e = examples(3)
    assert reference.data_fingerprint(e) == reference.data_fingerprint(copy.deepcopy(e))
    e2 = copy.deepcopy(e)
    e2[1]["chosen_ids"].append(3)
    assert reference.data_fingerprint(e) != reference.data_fingerprint(e2)


def test_interrupted_write_leaves_no_cache(tmp_path, exs, monkeypatch):
    model = tiny_model()
    real_save = torch.save

    def half_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial")  # some bytes reach the temp file ...
        raise KeyboardInterrupt  # ... then Ctrl-C

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        precompute_reference_logps(model, exs, cache_dir=tmp_path, progress=False)
    assert os.listdir(tmp_path) == []  # neither a final file nor a temp file
    monkeypatch.setattr(torch, "save", real_save)
    out = precompute_reference_logps(model, exs, cache_dir=tmp_path, progress=False)
    assert len(os.listdir(tmp_path)) == 1 and "ref_chosen_logps" in out[0]


def test_interrupted_compute_writes_nothing(tmp_path, exs):
    model = tiny_model()
    calls = []

    def boom(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    h = model.model.register_forward_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        precompute_reference_logps(model, exs, batch_size=4, cache_dir=tmp_path, progress=False)
    h.remove()
    assert os.listdir(tmp_path) == []


def test_killed_process_mid_write(tmp_path, exs):
    """SIGKILL while the cache is being written: the final name never holds a partial file."""
    code = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from support.models import tiny_model, examples
        from dpo_fast.reference import precompute_reference_logps
        def dying_save(obj, f, *a, **k):
            f.write(b"x" * 1000); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        precompute_reference_logps(tiny_model(), examples(), cache_dir={str(tmp_path)!r}, progress=False)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".pt")]  # only a stray .tmp may remain
    model = tiny_model()
    out = precompute_reference_logps(model, exs, cache_dir=tmp_path, progress=False)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".pt")]) == 1
    calls, h = _count_calls(model)
    assert precompute_reference_logps(model, exs, cache_dir=tmp_path, progress=False) == out
    h.remove()
    assert calls == []


def test_corrupt_cache_file_is_recomputed(tmp_path, exs):
    model = tiny_model()
    out = precompute_reference_logps(model, exs, cache_dir=tmp_path, progress=False)
    (f,) = os.listdir(tmp_path)
    path = tmp_path / f
    path.write_bytes(path.read_bytes()[:50])  # damaged on disk (not by us)
    with pytest.warns(UserWarning, match="ignoring unusable"):
        again = precompute_reference_logps(model, exs, cache_dir=tmp_path, progress=False)
    assert again == out
    calls, h = _count_calls(model)
    precompute_reference_logps(model, exs, cache_dir=tmp_path, progress=False)  # rewritten: a hit again
    h.remove()
    assert calls == []
