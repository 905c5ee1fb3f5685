"""Helpers of the fault-injection suite: tiny runs as `slimopt train` subprocesses that the tests
kill, signal, lock out or starve of disk, and the markers they wait for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import slimopt
from slimopt.train import TrainConfig

DATA = "stdlib:email"
# llama-tiny at vocabulary 512, 4 x 32 tokens a step: about a tenth of a second a step.
TINY = dict(model="llama-tiny", preset="adamw", data=DATA, vocab_size=512, seq_len=32,
            batch_size=4, eval_every=0, eval_tokens=512, log_every=1, progress="none",
            save_model=False)  # fmt: skip


def cli_args(cfg: TrainConfig) -> list[str]:
    """The ``slimopt train`` flags of ``cfg``."""
    return [
        "--model", cfg.model, "--preset", cfg.preset, "--data", cfg.data,
        "--vocab-size", str(cfg.vocab_size), "--seq-len", str(cfg.seq_len),
        "--batch-size", str(cfg.batch_size), "--max-steps", str(cfg.max_steps),
        "--eval-every", str(cfg.eval_every), "--eval-tokens", str(cfg.eval_tokens),
        "--save-every", str(cfg.save_every), "--log-every", "1", "--progress", "log",
        "--no-save-model", "--cache-dir", str(cfg.cache_dir), "--out", str(cfg.out),
    ]  # fmt: skip


def start(cfg: TrainConfig, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """``slimopt train`` for ``cfg`` in a new process (stderr captured as text)."""
    env = {**os.environ, "PYTHONPATH": str(Path(slimopt.__file__).parents[1]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [*prefix, sys.executable, "-m", "slimopt", "train", *cli_args(cfg), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    """Poll ``ready`` until it holds (a marker: a metrics row, a checkpoint file); fails if the
    process ends first. No wall-clock assertion on the run itself: the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (status {proc.returncode}) before the marker:\n{err}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("timed out waiting for the marker")


def steps_logged(out: str | Path) -> int:
    """The newest training step in ``metrics.jsonl`` (0 when none)."""
    path = Path(out) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    steps = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a row being written
            continue
        if "loss" in row:
            steps.append(row["step"])
    return max(steps, default=0)


def train_rows(out: str | Path) -> list[dict]:
    """Training rows without their timing: the part a resumed run must repeat exactly."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows if "loss" in r]
