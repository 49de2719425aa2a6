"""`dpo-fast demo`: the quick version trains, reports above-chance reward accuracy, writes the PNG."""

import io

import pytest

from dpo_fast.demo import data, main, run  # transformers and matplotlib come with `pip install ".[test]"`


def test_rule_and_tokenizer():
    pairs = data.make_pairs(9, seed=0)
    assert len(pairs) == 100 and len({p.prompt for p in pairs}) == 100
    for p in pairs:
        a, b = map(int, p.prompt[:-1].split("+"))
        assert p.chosen == f"{a + b};" and p.rejected != p.chosen and int(p.rejected[:-1]) >= 0
        assert int(p.rejected[:-1]) - (a + b) in data.WRONG_OFFSETS
    train, held = data.split_pairs(pairs)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    tok = data.CharTokenizer()
    assert tok.decode(tok.encode("12+7=19;")) == "12+7=19;" and 0 not in tok.encode("0123456789+=;")
    with pytest.raises(ValueError, match="character"):
        tok.encode("a")


def test_quick_demo_trains(tmp_path):
    png = tmp_path / "demo.png"
    buf = io.StringIO()
    res = run(["--quick", "--no-progress", "--plot", str(png), "--seed", "0"], out=buf)
    text = buf.getvalue()
    assert "step    1" in text and "rewards/accuracies" in text and "done in" in text
    hist = res["history"]
    assert hist[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    train = res["train_final"]
    assert train["rewards/accuracies"] >= 0.8 and train["rewards/margins"] > 0.2 and train["loss"] < 0.6
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert res["seconds"] < 60


def test_main_via_cli(tmp_path, capsys):
    from dpo_fast.cli import main as cli_main

    assert cli_main(["demo", "--quick", "--steps", "3", "--no-progress", "--plot", ""]) == 0
    assert "held-out" in capsys.readouterr().out
    assert main(["--quick", "--steps", "2", "--no-progress", "--plot", str(tmp_path / "x.png")]) == 0
