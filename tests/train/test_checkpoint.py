"""Checkpoints: atomic on disk, refused when corrupt or from another run."""

from __future__ import annotations

import json

import pytest
import torch

from slimopt.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    load_checkpoint,
    save_checkpoint,
)

FP = {"preset": "adamw", "seed": 0, "tuple": (1, 2)}


def _state(step):
    return {"step": step, "w": torch.full((3,), float(step)), "rng": torch.get_rng_state()}


def test_round_trip_keeps_only_the_newest(tmp_path):
    save_checkpoint(tmp_path, _state(1), step=1, fingerprint=FP)
    save_checkpoint(tmp_path, _state(2), step=2, fingerprint=FP)
    state = load_checkpoint(tmp_path, fingerprint=FP)
    assert state["step"] == 2 and torch.equal(state["w"], torch.full((3,), 2.0))
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["latest", "step-000002"]


def test_a_write_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _state(1), step=1, fingerprint=FP)
    # what a process killed while writing step 2 leaves: a half-written temporary directory
    partial = checkpoint_dir(tmp_path) / ".step-000002.abc123"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"\x80\x02trunc")
    assert load_checkpoint(tmp_path, fingerprint=FP)["step"] == 1
    save_checkpoint(tmp_path, _state(3), step=3, fingerprint=FP)  # and the next save sweeps it
    assert not partial.exists()


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, _state(1), step=1, fingerprint=FP) / "state.pt"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path, fingerprint=FP)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, _state(1), step=1, fingerprint=FP) / "state.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path)


def test_unloadable_state_with_matching_checksum_is_refused(tmp_path):
    ckpt = save_checkpoint(tmp_path, _state(1), step=1, fingerprint=FP)
    (ckpt / "state.pt").write_bytes(b"not a torch file")
    meta = json.loads((ckpt / "meta.json").read_text())
    import hashlib

    meta["sha256"] = hashlib.sha256(b"not a torch file").hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path)


def test_mismatched_run_is_refused_naming_the_setting(tmp_path):
    save_checkpoint(tmp_path, _state(1), step=1, fingerprint=FP)
    with pytest.raises(CheckpointError, match="preset: checkpoint 'adamw', this run 'lion'"):
        load_checkpoint(tmp_path, fingerprint={**FP, "preset": "lion"})


def test_missing_and_dangling(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, _state(1), step=1, fingerprint=FP)
    (checkpoint_dir(tmp_path) / "latest").write_text("step-000009\n")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path)
