"""`slimopt train --dist ddp|fsdp2` under torchrun (2 CPU processes, gloo): the same losses as one
process on the same global batch, files from rank 0 only, and DCP checkpoints saved on 2 ranks that
resume on 1 and on 2 ranks and continue like the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from slimopt.train import TrainConfig, train
from slimopt.train.loop import ConfigError

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

STEPS, SAVE_EVERY = 8, 4
ARGS = [
    "--data", "stdlib:email", "--vocab-size", "512", "--seq-len", "32", "--batch-size", "4",
    "--max-steps", str(STEPS), "--eval-every", "0", "--eval-tokens", "1024", "--log-every", "1",
    "--progress", "none", "--grad-clip", "1.0",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, cache: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIMOPT_CACHE": cache}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "slimopt", "train", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def losses(out, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if "loss" in r}


def max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """One single-process run, a 2-rank FSDP2 run (checkpoints at steps 4 and 8), a 2-rank DDP run,
    and the FSDP2 run resumed from step 4 on 1 rank (FSDP2) and on 2 ranks (DDP)."""
    root = tmp_path_factory.mktemp("dist")
    out = {name: root / name for name in ("single", "fsdp2", "ddp", "resume1", "resume2")}
    train(
        TrainConfig(
            model="llama-tiny", data="stdlib:email", vocab_size=512, seq_len=32, batch_size=4,
            max_steps=STEPS, eval_every=0, eval_tokens=1024, log_every=1, save_every=0,
            progress="none", grad_clip=1.0, cache_dir=cache_dir, out=str(out["single"]),
        )
    )  # fmt: skip
    save = ["--save-every", str(SAVE_EVERY)]
    torchrun(2, *ARGS, *save, "--dist", "fsdp2", "--out", str(out["fsdp2"]), cache=cache_dir)
    torchrun(
        2, *ARGS, "--save-every", "0", "--dist", "ddp", "--out", str(out["ddp"]), cache=cache_dir
    )
    # the state after step 4: the uninterrupted run's directory with its step-8 checkpoint gone
    for name in ("resume1", "resume2"):
        shutil.copytree(out["fsdp2"], out[name])
        ckpts = out[name] / "checkpoints"
        shutil.rmtree(ckpts / f"step-{STEPS:08d}")
        (ckpts / "latest").write_text(f"step-{SAVE_EVERY:08d}\n")
        (out[name] / "final.json").unlink()
    resume = ["--resume", *save]
    torchrun(1, *ARGS, *resume, "--dist", "fsdp2", "--out", str(out["resume1"]), cache=cache_dir)
    torchrun(2, *ARGS, *resume, "--dist", "ddp", "--out", str(out["resume2"]), cache=cache_dir)
    return out


@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_two_ranks_match_one_process(runs, mode):
    final = json.loads((runs[mode] / "final.json").read_text())
    single = json.loads((runs["single"] / "final.json").read_text())
    assert final["status"] == "completed" and final["steps"] == STEPS
    assert final["dist"] == mode and final["world_size"] == 2
    assert final["tokens_seen"] == single["tokens_seen"] and final["eval_tokens"] == 1023
    # rank 0 alone writes: one row per step, no second copy from rank 1
    dist_losses = losses(runs[mode])
    assert sorted(dist_losses) == list(range(1, STEPS + 1))
    assert max_rel(dist_losses, losses(runs["single"])) < 1e-4
    # the global gradient norm (clipped at 1.0: FSDP2's is a DTensor over the ranks' shards)
    norms = losses(runs[mode], "grad_norm")
    assert max(norms.values()) > 1.0  # so clipping was active
    assert max_rel(norms, losses(runs["single"], "grad_norm")) < 1e-4
    assert final["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)


def test_dcp_checkpoints_written(runs):
    ckpts = runs["fsdp2"] / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step-{STEPS:08d}"
    for step in (SAVE_EVERY, STEPS):
        assert (ckpts / f"step-{step:08d}" / ".metadata").is_file()
    meta = json.loads((ckpts / f"step-{STEPS:08d}" / "slimopt.json").read_text())
    assert meta["world_size"] == 2 and len([f for f in meta["files"] if f.endswith(".distcp")]) == 2


@pytest.mark.parametrize("name, ranks", [("resume1", 1), ("resume2", 2)])
def test_resume_on_other_world_size(runs, name, ranks):
    final = json.loads((runs[name] / "final.json").read_text())
    assert final["resumed_from_step"] == SAVE_EVERY and final["world_size"] == ranks
    resumed, whole = losses(runs[name]), losses(runs["fsdp2"])
    assert max_rel(resumed, whole) < 1e-5  # steps 1-4 kept from before, 5-8 trained again
    assert final["val_loss"] == pytest.approx(
        json.loads((runs["fsdp2"] / "final.json").read_text())["val_loss"], rel=1e-5
    )


def test_dist_without_torchrun_is_refused(make_config, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        train(make_config(dist="fsdp2"))
    with pytest.raises(ConfigError, match="dist must be one of"):
        train(make_config(dist="fsdp"))


def test_indivisible_batch_is_refused(make_config, monkeypatch):
    # refused from the torchrun environment alone, before any process group is created
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    msg = r"batch_size 3 \(the global batch\) does not split evenly over 2 ranks"
    with pytest.raises(ConfigError, match=msg):
        train(make_config(dist="ddp", batch_size=3))
    assert not dist.is_initialized()
