"""``slimopt train`` from the command line: the same run, one clear line for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimopt.cli import main

SMALL = [
    "--data", "stdlib:email", "--vocab-size", "512", "--seq-len", "64", "--batch-size", "4",
    "--eval-tokens", "2048", "--eval-every", "0", "--progress", "log",
]  # fmt: skip


def test_train_prints_validation_perplexity(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", *SMALL, "--max-steps", "3", "--out", str(out), "--opt", "weight_decay=0.1"])
        == 0
    )
    captured = capsys.readouterr()
    final = json.loads((out / "final.json").read_text())
    assert f"perplexity {final['val_ppl']:.2f}" in captured.out
    assert "step 3/3 | loss" in captured.err  # plain log lines when not on a terminal
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer_args"] == {"weight_decay": 0.1} and config["preset"] == "sage-hybrid"
    # the same command again refuses to clobber the run; --resume finds it complete
    assert (
        main(["train", *SMALL, "--max-steps", "3", "--out", str(out), "--opt", "weight_decay=0.1"])
        == 2
    )
    assert "already holds a run" in capsys.readouterr().err
    args = ["train", *SMALL, "--max-steps", "3", "--out", str(out), "--opt", "weight_decay=0.1"]
    assert main([*args, "--resume"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "llama-9m"], "unknown model 'llama-9m'"),
        (["--preset", "adam"], "unknown preset 'adam'"),
        (["--data", "/no/such/dir"], "data '/no/such/dir' not found"),
        (["--seq-len", "100000000"], "seq_len 100000000 is longer than the train split"),
        (["--tokenizer", "/no/tokenizer.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    assert main(["train", *SMALL, "--max-steps", "1", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimopt train: error:") and message in err
    assert "Traceback" not in err


def test_model_config_file(tmp_path, capsys):
    cfg = tmp_path / "small-gpt2.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}))
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--model-config", str(cfg), "--preset", "adamw",
                 "--max-steps", "2", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "final.json").read_text())["model"] == str(cfg)
    assert Path(out / "tokenizer.json").is_file()


def test_budget_flags_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--tokens", "1e6", "--max-steps", "10"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_counts_take_suffixes_and_refuse_fractions(capsys):
    from slimopt.train.cli import _positive_int

    assert [_positive_int(t) for t in ("250k", "1.5M", "2e6", "1_000", "0")] == [
        250_000, 1_500_000, 2_000_000, 1000, 0,
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        main(["train", "--tokens", "1.5"])
    assert "expected a non-negative whole number, got '1.5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--tokens", "lots"])
    assert "expected an integer (e.g. 250000" in capsys.readouterr().err
