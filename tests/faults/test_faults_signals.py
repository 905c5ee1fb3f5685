"""SIGTERM and SIGINT save at the next step boundary and say how to resume; kill -9 at any moment,
mid-checkpoint included, loses nothing but the steps since the last checkpoint."""

from __future__ import annotations

import json
import os
import shlex
import signal
from pathlib import Path

import pytest
from fault_helpers import start, steps_logged, train_rows, wait_for

from slimopt.cli import main
from slimopt.train import TrainConfig, train
from slimopt.train.checkpoint import checkpoint_dir
from slimopt.train.faults import Interrupted


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The uninterrupted 12-step run every interrupted one must equal."""
    from fault_helpers import TINY

    cfg = TrainConfig(**TINY, max_steps=12, save_every=0, cache_dir=cache_dir,
                      out=str(tmp_path_factory.mktemp("ref") / "run"))  # fmt: skip
    train(cfg)
    return train_rows(cfg.out)


def _resume(cfg: TrainConfig) -> dict:
    return train(TrainConfig(**{**cfg.__dict__, "resume": True}))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_step_boundary_and_resumes_exactly(make_config, reference, signum):
    # save_every=0: the only checkpoint is the one the signal causes
    cfg = make_config(max_steps=12, save_every=0)
    before = signal.getsignal(signum)

    def send_at_step_3(row):
        if row.get("step") == 3 and "loss" in row:
            os.kill(os.getpid(), signum)

    with pytest.raises(Interrupted) as info:
        train(cfg, callback=send_at_step_3)
    name = signal.Signals(signum).name
    assert str(info.value).startswith(f"{name} received; saved step 3 to ")
    assert f"--config {Path(cfg.out) / 'config.json'} --resume" in str(info.value)
    assert [p.name for p in checkpoint_dir(cfg.out).glob("step-*")] == ["step-00000003"]
    final = json.loads((Path(cfg.out) / "final.json").read_text())
    assert final["status"] == "interrupted" and final["steps"] == 3
    assert signal.getsignal(signum) is before  # the handlers were restored
    resumed = _resume(cfg)
    assert resumed["resumed_from_step"] == 3 and resumed["status"] == "completed"
    assert train_rows(cfg.out) == reference


def test_sigterm_from_outside_exits_143_naming_the_resume_command(make_config):
    cfg = make_config(max_steps=40, save_every=0)
    proc = start(cfg)
    wait_for(proc, lambda: steps_logged(cfg.out) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("slimopt train: stopped: SIGTERM received; saved step ")
    assert f"slimopt train --config {Path(cfg.out) / 'config.json'} --resume" in last
    assert "Traceback" not in err
    saved = json.loads((Path(cfg.out) / "final.json").read_text())
    assert saved["status"] == "interrupted" and 2 <= saved["steps"] < 40
    assert (checkpoint_dir(cfg.out) / f"step-{saved['steps']:08d}").is_dir()
    # the command it names finishes the run
    command = last.split("Continue with: ", 1)[1]
    assert main(shlex.split(command)[1:] + ["--progress", "none"]) == 0
    final = json.loads((Path(cfg.out) / "final.json").read_text())
    assert final["status"] == "completed" and final["steps"] == 40
    assert final["resumed_from_step"] == saved["steps"]


def test_kill_9_mid_checkpoint_and_mid_step_resume_exactly(make_config, reference):
    """SIGKILL while a checkpoint is half written (its temporary directory exists), then again
    between checkpoints; each resume continues from the last complete checkpoint."""
    cfg = make_config(max_steps=12, save_every=1)
    ckpts = checkpoint_dir(cfg.out)
    proc = start(cfg)
    # mid-checkpoint: a save in progress after at least one complete checkpoint
    wait_for(proc, lambda: (ckpts / "latest").exists() and any(ckpts.glob(".tmp-step-*")))
    proc.kill()
    proc.communicate()
    half = list(ckpts.glob(".tmp-step-*"))
    latest = (ckpts / "latest").read_text().strip()
    assert (ckpts / latest / "slimopt.json").is_file()  # latest names a complete checkpoint
    result = _resume(cfg)
    assert result["resumed_from_step"] == int(latest.split("-")[1])
    assert not any(p.exists() for p in half)  # the next save swept the half-written one
    assert train_rows(cfg.out) == reference

    again = make_config(max_steps=12, save_every=3)
    proc = start(again)
    wait_for(proc, lambda: steps_logged(again.out) >= 4)  # past the step-3 checkpoint
    proc.kill()
    proc.communicate()
    result = _resume(again)
    assert result["resumed_from_step"] in (3, 6, 9)
    assert train_rows(again.out) == reference


def test_a_signal_ignored_at_start_stays_ignored():
    """Started with SIGINT ignored (``nohup``, a background job), the run leaves it so."""
    from slimopt.train.faults import StopSignals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize(
    ("world", "per_node", "launch"),
    [
        (2, "2", "torchrun --nproc-per-node 2 -m slimopt train"),
        (8, "4", "torchrun --nnodes 2 --nproc-per-node 4 -m slimopt train"),
    ],
)
def test_the_resume_hint_under_torchrun_is_a_torchrun_command(monkeypatch, world, per_node, launch):
    """A run launched by torchrun resumes under torchrun: ``slimopt train --config ... --resume``
    alone would refuse its recorded dist (no torchrun environment)."""
    from slimopt.train import loop, parallel

    monkeypatch.setattr(parallel, "world", lambda: (0, world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", per_node)
    hint = loop.resume_command(Path("runs/x/config.json"), "fsdp2")
    assert hint.startswith(f"{launch} --config {Path('runs/x/config.json')} --resume")
    assert loop.resume_command("c.json", "none") == "slimopt train --config c.json --resume"


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False)])
def test_only_rank_0_prints_the_resume_hint(monkeypatch, capsys, rank, printed):
    from slimopt.train import loop

    def interrupted(*args, **kwargs):
        raise Interrupted("SIGTERM received; saved step 3 to X. Continue with: torchrun ...", 15)

    monkeypatch.setattr(loop, "train", interrupted)
    monkeypatch.setenv("RANK", rank)
    assert main(["train", "--progress", "none"]) == 143
    err = capsys.readouterr().err
    assert ("Continue with: torchrun" in err) == printed
    if not printed:
        assert err == ""
