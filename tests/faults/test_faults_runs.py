"""Runs that cannot be served or have nothing left to do: mostly skipped steps end as "nonfinite"
with a non-zero exit, impossible budgets are refused naming the bound, resuming a finished run
changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fault_helpers import cli_args

from slimopt.cli import main
from slimopt.train import TrainConfig, train
from slimopt.train.loop import MAX_STEPS, ConfigError


def _nan_from_training_call(monkeypatch, first: int):
    """Every training loss (not evaluation) from the ``first``-th on is NaN."""
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def patched(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= first:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", patched)


def test_skipping_most_steps_ends_nonfinite_with_exit_1(make_config, monkeypatch, capsys):
    cfg = make_config(max_steps=40, on_nonfinite="skip")
    _nan_from_training_call(monkeypatch, 2)
    code = main(["train", *cli_args(cfg), "--on-nonfinite", "skip"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slimopt train: stopped: 5 of 6 steps were skipped")
    assert "more than the 4 (10% of 40) that on_nonfinite='skip' tolerates" in err
    final = json.loads((Path(cfg.out) / "final.json").read_text())
    assert final["status"] == "nonfinite" and final["skipped_steps"] == 5


def test_a_few_skipped_steps_are_tolerated(make_config, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def one_nan(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in (3, 7):
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", one_nan)
    result = train(make_config(max_steps=20, on_nonfinite="skip"))
    assert result["status"] == "completed" and result["skipped_steps"] == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tokens", "1e99"], f"is beyond the {MAX_STEPS:,} steps a run can take"),
        (["--max-steps", str(MAX_STEPS + 1)], f"is beyond the {MAX_STEPS:,} steps"),
        (["--max-steps", "10", "--warmup", "50"], "warmup of 50 steps is longer than the run's 10"),
        (["--keep-checkpoints", "0"], "keep_checkpoints must be a positive integer"),
    ],
)
def test_budgets_nothing_can_serve_are_refused(make_config, capsys, flags, message):
    cfg = make_config()
    args = [a for a in cli_args(cfg)]
    i = args.index("--max-steps")
    del args[i : i + 2]
    assert main(["train", *args, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimopt train: error:") and message in err, err
    assert "Traceback" not in err and not Path(cfg.out).exists()


def test_tokens_1e99_in_python_too(make_config):
    with pytest.raises(
        ConfigError, match=r"tokens 1e\+99 \(7.81e\+96 steps of 128 tokens\) is beyond"
    ):
        train(make_config(max_steps=None, tokens=10**99))


def test_resuming_a_finished_run_says_so_and_changes_nothing(make_config, capsys):
    cfg = make_config(max_steps=3, save_every=3, eval_every=3)
    first = train(cfg)
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(cfg.out).rglob("*")
             if p.is_file() and p.name != ".train.lock"}  # fmt: skip
    again = train(TrainConfig(**{**cfg.__dict__, "resume": True, "progress": "log"}))
    assert again == first
    assert f"{cfg.out} already finished at step 3; nothing to do" in capsys.readouterr().err
    now = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    assert now == files
    assert main(["train", *cli_args(cfg), "--resume"]) == 0  # the CLI too
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == files
