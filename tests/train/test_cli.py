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


def test_config_json_reruns_a_recorded_run(tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["train", *SMALL, "--preset", "adamw", "--max-steps", "3", "--seed", "3",
                 "--opt", "weight_decay=0.05", "--out", str(first)]) == 0  # fmt: skip
    capsys.readouterr()
    again = tmp_path / "again"
    # the recorded settings come back; a flag given here (the output directory) overrides
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again),
                 "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    a, b = (json.loads((d / "config.json").read_text()) for d in (first, again))
    assert {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}
    assert summary == json.loads((again / "final.json").read_text())
    assert summary["val_loss"] == json.loads((first / "final.json").read_text())["val_loss"]
    assert summary["preset"] == "adamw" and summary["steps"] == 3
    # a new budget replaces the recorded one instead of clashing with it
    assert main(["train", "--config", str(first / "config.json"), "--tokens", "1024",
                 "--out", str(tmp_path / "budget"), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["tokens_seen"] == 1024
    (tmp_path / "broken.json").write_text("{")
    assert main(["train", "--config", str(tmp_path / "broken.json")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    (tmp_path / "odd.json").write_text('{"preset": "adamw", "learning_rate": 1}')
    assert main(["train", "--config", str(tmp_path / "odd.json")]) == 2
    assert "unknown settings: learning_rate" in capsys.readouterr().err


def test_resume_with_nothing_to_resume_is_an_error_naming_what_it_looked_for(tmp_path, capsys):
    """As HF's resume_from_checkpoint: no silent fresh run under --resume."""
    from slimopt.train import TrainConfig, train
    from slimopt.train.outputs import RunDirError

    missing = tmp_path / "missing"
    assert main(["train", *SMALL, "--resume", "--out", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slimopt train: error: nothing to resume in {missing}: no checkpoint ")
    assert f"({missing / 'checkpoints'}/step-*)" in err and "does not exist" in err
    assert "Traceback" not in err and not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match="nothing to resume in .*drop resume to start a new run"):
        train(TrainConfig(resume=True, out=str(empty)))
    assert list(empty.iterdir()) == []
    # a run killed before its first checkpoint: overwrite starts it over
    (empty / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="stopped before its first checkpoint.*pass overwrite"):
        train(TrainConfig(resume=True, out=str(empty)))


def test_the_trained_model_loads_with_from_pretrained(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from slimopt.train.checkpoint import load_checkpoint_dcp, newest_checkpoint
    from slimopt.train.models import build_model

    out = tmp_path / "run"
    assert main(["train", *SMALL, "--preset", "adamw", "--max-steps", "2", "--save-every", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    trained = build_model("llama-tiny", vocab_size=512)
    load_checkpoint_dcp(newest_checkpoint(out), trained)  # the weights of the last step
    for (name, p), (_, q) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    _check_the_export_generates_and_stops(out)


def _check_the_export_generates_and_stops(out: Path) -> None:
    """The exported model names <|endoftext|> (the token between the training documents) as eos,
    bos and pad, ships a tokenizer_config.json, and generate stops there."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, pipeline

    eot = Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|endoftext|>")
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["use_cache"] is True
    assert [config[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id")] == [eot] * 3
    generation = json.loads((out / "model" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eot and generation["pad_token_id"] == eot
    assert (out / "model" / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|endoftext|>",) * 3
    text = "def main():\n    return"
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok(text)["input_ids"] == ours.encode(text).ids  # the same tokenizer
    generate = pipeline("text-generation", model=str(out / "model"), device="cpu")
    result = generate(text, max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith(text)
    # a model whose every next token is <|endoftext|> (id 0: all-zero logits, greedy) stops there
    assert eot == 0
    with torch.no_grad():
        generate.model.lm_head.weight.zero_()
    ids = tok(text, return_tensors="pt")["input_ids"]
    new = generate.model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert new.tolist() == [eot]


def test_report_to_tensorboard(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = ["train", *SMALL, "--max-steps", "2", "--log-every", "1", "--report-to", "tensorboard",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/val_loss")] == [2]

    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        'slimopt train: error: report_to="tensorboard" needs the tensorboard package: '
        'pip install "slimopt[tensorboard]"'
    )
