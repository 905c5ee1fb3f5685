"""``slimopt train --precision bf16 --step-in-backward --grad-checkpointing`` (slimopt.lean)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimopt.train import train
from slimopt.train.loop import ConfigError


def test_lean_modes_train_and_report_peak_beside_the_plan(make_config):
    cfg = make_config(preset="sage-hybrid", max_steps=3)
    plain = train(cfg)
    sib = train(make_config(preset="sage-hybrid", max_steps=3, step_in_backward=True))
    # fp32 updates during backward are the ordinary step: the same losses, bit for bit
    assert sib["val_loss"] == plain["val_loss"]
    rows = [
        json.loads(line) for line in (Path(sib["out"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r.get("grad_norm") is None for r in rows if "loss" in r)

    lean = train(
        make_config(
            preset="scale",
            max_steps=3,
            precision="bf16",
            step_in_backward=True,
            grad_checkpointing=True,
        )
    )
    assert lean["status"] == "completed" and lean["precision"] == "bf16"
    assert lean["step_in_backward"] and lean["grad_checkpointing"]
    assert lean["planned_peak_bytes"] > 0 and lean["peak_memory_above_baseline_bytes"] > 0
    final = json.loads((Path(lean["out"]) / "final.json").read_text())
    assert final["planned_peak_bytes"] == lean["planned_peak_bytes"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"grad_accum": 2}, "gradient accumulation"),
        ({"grad_clip": 1.0}, "gradient-norm clip"),
        ({"on_nonfinite": "skip"}, "on_nonfinite 'skip'"),
    ],
)
def test_step_in_backward_refuses_what_cannot_hold(make_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(make_config(step_in_backward=True, **overrides))


def test_lean_modes_on_cpu_return_freed_memory_unless_told_not_to(make_config, monkeypatch):
    from slimopt import lean

    calls = []
    monkeypatch.setattr(lean, "return_freed_memory", lambda *a: calls.append(a) or True)
    train(make_config(preset="scale", max_steps=1, precision="bf16"))
    assert len(calls) == 1
    train(make_config(preset="scale", max_steps=1, precision="bf16", keep_freed_memory=True))
    train(make_config(preset="scale", max_steps=1))  # fp32, ordinary step: not a lean mode
    assert len(calls) == 1


def test_keep_freed_memory_flag_parses():
    import argparse

    from slimopt.train.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--precision", "bf16", "--keep-freed-memory"])
    assert config_from_args(args).keep_freed_memory is True
