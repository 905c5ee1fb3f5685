"""The lean modes resume bit for bit: a pure-bf16 run (with and without updates during backward and
activation checkpointing), stopped by SIGTERM or killed with SIGKILL at a random step, continues
from its checkpoint to the same metrics, final loss and saved weight bytes as an uninterrupted run.
The state that makes the stochastic rounding resumable is each parameter's ``sr_seed`` and
``sr_step`` (the bits are a counter-based function of them), saved and loaded through
torch.distributed.checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from fault_helpers import TINY, start, steps_logged, train_rows, wait_for
from safetensors.torch import load_file

from slimopt.train import TrainConfig, train
from slimopt.train.faults import Interrupted

MODES = {
    "bf16": dict(precision="bf16"),
    "bf16-backward": dict(precision="bf16", step_in_backward=True),
    "bf16-backward-ckpt": dict(precision="bf16", step_in_backward=True, grad_checkpointing=True),
}
# one preset with state on every role (sage-hybrid) and one whose matrices keep none (scale:
# their rounding counter is the only state they have)
PRESETS = {"bf16": "scale", "bf16-backward": "sage-hybrid", "bf16-backward-ckpt": "scale"}
STEPS = 10


def _flags(mode: str) -> list[str]:
    out = ["--precision", "bf16"]
    if MODES[mode].get("step_in_backward"):
        out.append("--step-in-backward")
    if MODES[mode].get("grad_checkpointing"):
        out.append("--grad-checkpointing")
    return out


def _weights(out: str) -> dict:
    return load_file(str(Path(out) / "model" / "model.safetensors"))


def _final_loss(out: str) -> float:  # the final validation loss
    return json.loads((Path(out) / "final.json").read_text())["val_loss"]


@pytest.fixture(scope="module")
def references(tmp_path_factory, cache_dir):
    """Each mode's uninterrupted run: metrics rows, final loss and the saved weights."""
    refs = {}
    for mode, options in MODES.items():
        cfg = TrainConfig(**{**TINY, "preset": PRESETS[mode], "save_model": True}, **options,
                          max_steps=STEPS, save_every=0, cache_dir=cache_dir,
                          out=str(tmp_path_factory.mktemp("ref") / mode))  # fmt: skip
        train(cfg)
        refs[mode] = (train_rows(cfg.out), _final_loss(cfg.out), _weights(cfg.out))
    return refs


def _check_equal(out: str, reference) -> None:
    rows, loss, weights = reference
    assert train_rows(out) == rows
    assert _final_loss(out) == loss
    got = _weights(out)
    assert sorted(got) == sorted(weights)
    for name, w in weights.items():
        assert got[name].dtype == w.dtype == torch.bfloat16, name
        assert torch.equal(got[name].view(torch.int16), w.view(torch.int16)), name


@pytest.mark.parametrize("mode", list(MODES))
def test_sigterm_at_a_random_step_resumes_bit_for_bit(make_config, references, mode):
    at = random.Random(f"sigterm-{mode}").randint(1, STEPS - 2)
    cfg = make_config(preset=PRESETS[mode], max_steps=STEPS, save_every=0, save_model=True,
                      **MODES[mode])  # fmt: skip

    def stop(row):
        if row.get("step") == at and "loss" in row:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        train(cfg, callback=stop)
    result = train(dataclasses.replace(cfg, resume=True))
    assert result["resumed_from_step"] == at and result["status"] == "completed"
    _check_equal(cfg.out, references[mode])


@pytest.mark.parametrize("mode", list(MODES))
def test_kill_9_at_a_random_moment_resumes_bit_for_bit(make_config, references, mode):
    after = random.Random(f"kill-{mode}").randint(3, STEPS - 2)
    cfg = make_config(preset=PRESETS[mode], max_steps=STEPS, save_every=2, save_model=True,
                      **MODES[mode])  # fmt: skip
    proc = start(cfg, *_flags(mode))  # the resumed run below saves the model
    wait_for(proc, lambda: steps_logged(cfg.out) >= after)
    proc.kill()
    proc.communicate()
    result = train(dataclasses.replace(cfg, resume=True))
    assert result["status"] == "completed" and result["resumed_from_step"] >= 2
    _check_equal(cfg.out, references[mode])


def test_a_checkpoint_from_the_earlier_rounding_generator_is_refused_by_name(make_config):
    from torch.distributed.checkpoint import FileSystemReader

    from slimopt.train.checkpoint import CheckpointError, _check_rounding_scheme, checkpoint_dir

    cfg = make_config(preset="scale", max_steps=2, save_every=2, precision="bf16")
    train(cfg)
    ckpt = checkpoint_dir(cfg.out) / "step-00000002"
    saved = set(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    assert any(k.endswith(".sr_scheme") for k in saved)
    _check_rounding_scheme(ckpt, saved)  # this version's checkpoint: accepted
    old = {k for k in saved if not k.endswith(".sr_scheme")}
    with pytest.raises(CheckpointError, match="before the counter-based stochastic rounding"):
        _check_rounding_scheme(ckpt, old)
