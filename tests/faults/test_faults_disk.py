"""A full disk, a read-only run directory, a second process on the same run directory, damaged
checkpoints: one clear line each, and the run's checkpoints intact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fault_helpers import cli_args, start, steps_logged, train_rows, wait_for

import slimopt
from slimopt.cli import main
from slimopt.train import TrainConfig, train
from slimopt.train.checkpoint import CheckpointError, checkpoint_dir
from slimopt.train.faults import OutputError, RunLockedError
from slimopt.train.outputs import RunDir


def _resume(cfg: TrainConfig, **overrides) -> dict:
    return train(TrainConfig(**{**cfg.__dict__, "resume": True, **overrides}))


def _can_mount() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp && echo ok"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return probe.stdout.strip() == "ok"


needs_mount = pytest.mark.skipif(
    not _can_mount(), reason="needs unshare and mount in a user namespace"
)


def test_disk_full_mid_run_is_one_line_and_keeps_the_checkpoints(make_config, monkeypatch):
    """ENOSPC injected into the metrics file at step 5, after the checkpoints of steps 2 and 4."""
    cfg = make_config(max_steps=8, save_every=2)
    real_record = RunDir.record

    def record(self, row):
        if row.get("step") == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_record(self, row)

    monkeypatch.setattr(RunDir, "record", record)
    with pytest.raises(OutputError) as info:
        train(cfg)
    message = str(info.value)
    assert message == (
        f"cannot write {cfg.out}: No space left on device; the newest checkpoint, "
        f"{checkpoint_dir(cfg.out) / 'step-00000004'}, is intact"
    )
    monkeypatch.undo()
    assert _resume(cfg)["resumed_from_step"] == 4


@needs_mount
def test_a_real_full_disk_during_a_checkpoint(make_config, tmp_path):
    """A 28 MB tmpfs as the run directory: two adamw checkpoints fit (about 11 MB each), the third
    does not. The error is one line naming the path and the reason; the step-4 checkpoint is
    intact and resumes."""
    cfg = make_config(max_steps=12, save_every=2)
    mounted = tmp_path / "small-disk"
    mounted.mkdir()
    kept = tmp_path / "kept"
    inner = TrainConfig(**{**cfg.__dict__, "out": str(mounted)})
    flags = " ".join(f"'{a}'" for a in cli_args(inner))
    env = {**os.environ, "PYTHONPATH": str(Path(slimopt.__file__).parents[1])}
    script = (
        f"mount -t tmpfs -o size=28m tmpfs '{mounted}' && "
        f"'{sys.executable}' -m slimopt train {flags}; status=$?; "
        f"cp -a '{mounted}' '{kept}'; exit $status"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("slimopt train: error: cannot write checkpoint ")
    assert "No space left on device" in last and "still names the previous checkpoint" in last
    assert "Traceback" not in proc.stderr
    latest = (checkpoint_dir(kept) / "latest").read_text().strip()
    assert latest in ("step-00000002", "step-00000004")
    resumed = _resume(TrainConfig(**{**cfg.__dict__, "out": str(kept)}))
    assert resumed["resumed_from_step"] == int(latest.split("-")[1]) and resumed["steps"] == 12


def test_read_only_run_directory(make_config, tmp_path, monkeypatch):
    """An out directory that cannot be written: one line naming it and the reason; a resumed run's
    checkpoints untouched."""
    cfg = make_config(max_steps=4, save_every=2)
    train(cfg)
    (Path(cfg.out) / "final.json").unlink()  # as if stopped after its last checkpoint
    before = {p: p.read_bytes() for p in checkpoint_dir(cfg.out).rglob("*") if p.is_file()}
    if os.geteuid() != 0:  # a plain user cannot write a 0o555 directory
        Path(cfg.out).chmod(0o555)
    else:  # root can; inject what a read-only file system answers to the first write
        real_open = open

        def read_only(file, mode="r", *args, **kwargs):
            if str(file).startswith(cfg.out) and any(c in mode for c in "wax+"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", read_only)
    try:
        code = main(["train", *cli_args(cfg), "--resume"])
    finally:
        Path(cfg.out).chmod(0o755)
        monkeypatch.undo()
    assert code == 1
    assert {p: p.read_bytes() for p in before} == before
    assert _resume(cfg)["resumed_from_step"] == 4


def test_read_only_messages(make_config, capsys, monkeypatch):
    cfg = make_config(max_steps=2)
    Path(cfg.out).mkdir()
    real_open = open

    def read_only(file, mode="r", *args, **kwargs):
        if str(file).startswith(cfg.out) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    assert main(["train", *cli_args(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"slimopt train: error: cannot write {Path(cfg.out) / '.train.lock'}: Read-only file system"
    )


def test_a_second_run_on_the_same_directory_is_refused_naming_the_holder(make_config, capsys):
    cfg = make_config(max_steps=400, save_every=2)
    first = start(cfg)
    try:
        wait_for(first, lambda: steps_logged(cfg.out) >= 3)
        latest = (checkpoint_dir(cfg.out) / "latest").read_text()
        # the same command with --overwrite, which would delete the first run's files
        assert main(["train", *cli_args(cfg), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"slimopt train: error: {cfg.out} is in use by pid {first.pid} on ")
        assert "Traceback" not in err
        assert (checkpoint_dir(cfg.out) / "latest").exists() and latest  # nothing deleted
        rows_before = steps_logged(cfg.out)
        wait_for(first, lambda: steps_logged(cfg.out) > rows_before)  # the first one goes on
    finally:
        first.kill()
        first.communicate()
    steps = [r["step"] for r in train_rows(cfg.out)]
    assert steps == sorted(set(steps))  # no duplicated rows
    with pytest.raises(RunLockedError):  # the library call says the same
        with RunDir(cfg.out, resume=True, overwrite=False, progress="none"):
            train(TrainConfig(**{**cfg.__dict__, "resume": True}))


def test_corrupt_truncated_and_misnamed_checkpoints(make_config, capsys):
    full = make_config(max_steps=6, save_every=2, keep_checkpoints=3)
    train(full)
    reference = train_rows(full.out)

    def damaged(kind: str) -> TrainConfig:
        cfg = make_config(max_steps=6, save_every=2, keep_checkpoints=3)
        shutil.copytree(full.out, cfg.out)
        (Path(cfg.out) / "final.json").unlink()
        newest = checkpoint_dir(cfg.out) / "step-00000006"
        shard = next(newest.glob("*.distcp"))
        if kind == "truncated":
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        elif kind == "corrupt":
            data = bytearray(shard.read_bytes())
            data[100] ^= 0x55
            shard.write_bytes(bytes(data))
        elif kind == "latest-garbage":
            (checkpoint_dir(cfg.out) / "latest").write_text("\x00\x17garbage")
            shutil.rmtree(newest)
        return cfg

    for kind in ("truncated", "corrupt", "latest-garbage"):
        cfg = damaged(kind)
        result = _resume(cfg, progress="log")
        err = capsys.readouterr().err
        assert "warning:" in err, kind
        assert result["resumed_from_step"] == 4, kind
        assert train_rows(cfg.out) == reference, kind

    cfg = damaged("truncated")
    for ckpt in checkpoint_dir(cfg.out).glob("step-*"):
        (ckpt / "extra.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*extra.pt is corrupt"):
        _resume(cfg)
    assert json.loads((Path(full.out) / "final.json").read_text())["status"] == "completed"
