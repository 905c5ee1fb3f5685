"""``slimopt train --precision bf16 --step-in-backward --grad-checkpointing`` (slimopt.lean)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

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
    ratio = lean["planned_peak_bytes"] / lean["peak_memory_above_baseline_bytes"]
    assert lean["planned_over_measured"] == round(ratio, 3)
    assert ("planned_peak_note" in lean) == (not 0.85 <= ratio <= 1.15)
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


def test_int8_weights_train_resume_bit_for_bit_and_export_a_bf16_model(make_config):
    from slimopt.train.checkpoint import CheckpointError

    lean = dict(preset="scale", precision="bf16", step_in_backward=True, grad_checkpointing=True,
                weights="int8", weights_block=32)  # fmt: skip
    whole = train(make_config(max_steps=4, **lean))
    assert whole["weights"] == "int8" and whole["planned_peak_bytes"] > 0
    cut = make_config(max_steps=4, save_every=2, **lean)
    _keep_only_step_2(train(cut))
    resumed = train(dataclasses.replace(cut, resume=True))
    assert resumed["resumed_from_step"] == 2 and resumed["val_loss"] == whole["val_loss"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(whole["out"]) / "model")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    bf16 = make_config(max_steps=4, save_every=2, **{**lean, "weights": "auto"})
    _keep_only_step_2(train(bf16))
    with pytest.raises(CheckpointError, match="weights"):  # a bf16 run's checkpoint
        train(dataclasses.replace(bf16, weights="int8", weights_block=32, resume=True))


def _keep_only_step_2(result: dict) -> None:
    """Leave the run as if it had stopped after its checkpoint at step 2."""
    import shutil

    out = Path(result["out"])
    (out / "final.json").unlink()
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "latest").write_text("step-00000002")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"precision": "fp32"}, "precision bf16"),
        ({"step_in_backward": False}, "step_in_backward"),
        ({"dist": "fsdp2"}, "dist none"),
        ({"model": "gpt2-small"}, "outside nn.Linear"),
    ],
)
def test_int8_weights_refuse_what_cannot_hold(make_config, overrides, message):
    base = dict(precision="bf16", step_in_backward=True, weights="int8", max_steps=1)
    with pytest.raises(ConfigError, match=message):
        train(make_config(**{**base, **overrides}))
