"""Checkpoints: atomic on disk, the K newest kept, a damaged newest one skipped for the one before,
refused when from another run."""

from __future__ import annotations

import json

import pytest
import torch

from slimopt.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

FP = {"preset": "adamw", "seed": 0, "tuple": (1, 2)}


def _model_opt(fill: float = 0.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(fill)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def _save(run, step, keep=2):
    model, opt = _model_opt(float(step))
    return save_checkpoint(run, model, opt, {"step": step}, step=step, fingerprint=FP, keep=keep)


def _load(run, warnings=None):
    model, opt = _model_opt(-1.0)
    extra = load_checkpoint(
        run, model, opt, fingerprint=FP, warn=(warnings.append if warnings is not None else print)
    )
    return extra, model


def test_round_trip_keeps_the_k_newest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    extra, model = _load(tmp_path)
    assert extra["step"] == 3 and torch.equal(model.weight, _model_opt(3.0)[0].weight)
    names = sorted(p.name for p in checkpoint_dir(tmp_path).iterdir())
    assert names == ["latest", "step-00000002", "step-00000003"]
    _save(tmp_path, 4, keep=3)
    _save(tmp_path, 5, keep=3)
    assert len(list(checkpoint_dir(tmp_path).glob("step-*"))) == 3


def test_a_write_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 1)
    # what a process killed while writing step 2 leaves: a half-written temporary directory
    partial = checkpoint_dir(tmp_path) / ".tmp-step-00000002"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\x80\x02trunc")
    assert _load(tmp_path)[0]["step"] == 1
    _save(tmp_path, 3)  # and the next save sweeps it
    assert not partial.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete-metadata", "bad-json"])
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    shard = next(newest.glob("*.distcp"))
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "delete-metadata":
        (newest / ".metadata").unlink()
    else:
        (newest / "slimopt.json").write_text("{not json")
    warnings: list[str] = []
    extra, model = _load(tmp_path, warnings)
    assert extra["step"] == 1 and torch.equal(model.weight, _model_opt(1.0)[0].weight)
    assert len(warnings) >= 1 and "step-00000002" in warnings[-1]
    assert "trying the checkpoint before it" in warnings[-1]


def test_no_intact_checkpoint_is_an_error_naming_each(tmp_path):
    newest = _save(tmp_path, 1)
    (newest / "extra.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no intact checkpoint .*extra.pt is corrupt"):
        _load(tmp_path, [])


def test_a_checkpoint_of_another_run_is_refused_not_skipped(tmp_path):
    _save(tmp_path, 1)
    model, opt = _model_opt()
    with pytest.raises(CheckpointError, match="seed: checkpoint 0, this run 1"):
        load_checkpoint(tmp_path, model, opt, fingerprint={**FP, "seed": 1})


def test_empty_run_directory(tmp_path):
    assert not has_checkpoint(tmp_path)
    assert _load(tmp_path)[0] is None
    _save(tmp_path, 1)
    assert has_checkpoint(tmp_path)
    meta = json.loads((checkpoint_dir(tmp_path) / "step-00000001" / "slimopt.json").read_text())
    assert meta["step"] == 1 and meta["world_size"] == 1 and ".metadata" in meta["files"]


def test_disk_errors_name_the_path_and_keep_the_previous(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    import slimopt.train.checkpoint as ck

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(ck, "_publish", full)
    with pytest.raises(CheckpointError, match="No space left on device .*previous checkpoint"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert _load(tmp_path)[0]["step"] == 1
    assert not list(checkpoint_dir(tmp_path).glob(".tmp-*"))


def test_unreadable_checkpoints_are_an_error_not_a_fresh_start(tmp_path):
    # what an older slimopt left: checkpoints/step-000004/state.pt named by latest
    old = checkpoint_dir(tmp_path) / "step-000004"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"old format")
    (checkpoint_dir(tmp_path) / "latest").write_text("step-000004\n")
    with pytest.raises(CheckpointError, match="holds checkpoints but none this slimopt can read"):
        _load(tmp_path, [])
