"""`slimopt train --dist fsdp2|ddp --precision bf16 --step-in-backward --grad-checkpointing` under
torchrun (2 CPU processes, gloo): the lean modes run, write DCP checkpoints whose resume on the same
world size continues bit for bit (same losses, same weights), and resume on another world size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file
from test_dist_train import ARGS, losses, torchrun

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

STEPS, SAVE_EVERY = 6, 3
LEAN = ["--precision", "bf16", "--step-in-backward", "--grad-checkpointing", "--grad-clip", "0"]
LEAN_ARGS = [a for a in ARGS if a not in ("--grad-clip", "1.0")]
LEAN_ARGS[LEAN_ARGS.index("--max-steps") + 1] = str(STEPS)


def _cut_to(src: Path, dst: Path, step: int) -> None:
    """``dst``: ``src`` as it was after ``step`` (its later checkpoint and final files gone)."""
    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    for later in ckpts.glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (ckpts / "latest").write_text(f"step-{step:08d}\n")
    (dst / "final.json").unlink()
    shutil.rmtree(dst / "model", ignore_errors=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("lean-dist")
    out = {}
    for mode, preset in (("fsdp2", "sage-hybrid"), ("ddp", "scale")):
        out[mode] = root / mode
        torchrun(2, *LEAN_ARGS, *LEAN, "--preset", preset, "--save-every", str(SAVE_EVERY),
                 "--dist", mode, "--out", str(out[mode]), cache=cache_dir)  # fmt: skip
        again = root / f"{mode}-resume2"
        _cut_to(out[mode], again, SAVE_EVERY)
        torchrun(2, *LEAN_ARGS, *LEAN, "--preset", preset, "--save-every", str(SAVE_EVERY),
                 "--dist", mode, "--resume", "--out", str(again), cache=cache_dir)  # fmt: skip
        out[f"{mode}-resume2"] = again
    one = root / "fsdp2-resume1"
    _cut_to(out["fsdp2"], one, SAVE_EVERY)
    torchrun(1, *LEAN_ARGS, *LEAN, "--preset", "sage-hybrid", "--save-every", str(SAVE_EVERY),
             "--dist", "fsdp2", "--resume", "--out", str(one), cache=cache_dir)  # fmt: skip
    out["fsdp2-resume1"] = one
    return out


@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_lean_modes_run_under_data_parallelism(runs, mode):
    final = json.loads((runs[mode] / "final.json").read_text())
    assert final["status"] == "completed" and final["steps"] == STEPS
    assert final["dist"] == mode and final["world_size"] == 2
    assert final["precision"] == "bf16" and final["step_in_backward"] is True
    assert final["grad_checkpointing"] is True
    weights = load_file(str(runs[mode] / "model" / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"torch.bfloat16"}
    rows = losses(runs[mode])
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert rows[STEPS] < rows[1]  # it trains


@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_lean_dcp_resume_on_the_same_world_size_is_bit_exact(runs, mode):
    resumed = runs[f"{mode}-resume2"]
    final = json.loads((resumed / "final.json").read_text())
    assert final["resumed_from_step"] == SAVE_EVERY and final["status"] == "completed"
    assert losses(resumed) == losses(runs[mode])
    a = load_file(str(resumed / "model" / "model.safetensors"))
    b = load_file(str(runs[mode] / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_lean_fsdp2_checkpoint_resumes_on_another_world_size(runs):
    # the state (bf16 weights, each shard's optimizer state, the rounding seeds and counters) is
    # resharded; the gradients of one process are not the 2 ranks' bf16-reduced ones, so the
    # continuation is close, not equal
    resumed = runs["fsdp2-resume1"]
    final = json.loads((resumed / "final.json").read_text())
    assert final["resumed_from_step"] == SAVE_EVERY and final["world_size"] == 1
    got, want = losses(resumed), losses(runs["fsdp2"])
    assert {k: got[k] for k in range(1, SAVE_EVERY + 1)} == {
        k: want[k] for k in range(1, SAVE_EVERY + 1)
    }
    assert got[SAVE_EVERY + 1] == pytest.approx(want[SAVE_EVERY + 1], rel=2e-2)
