"""``slimopt profile``: rows, keys, the bytes floor, and bad input (timings are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

import slimopt
from slimopt.bench.profile import TORCH_ROWS, profile_model, step_bytes
from slimopt.cli import main

KEYS = {
    "preset",
    "step_ms_median",
    "step_ms_min",
    "step_ms_max",
    "state_bytes",
    "bytes_moved",
    "floor_ms",
}


@pytest.fixture(scope="module")
def small_run():
    return profile_model(
        "llama-tiny", slimopt.PRESETS, steps=2, warmup=1, fused=False, vocab_size=256
    )


def test_rows_are_the_torch_baselines_then_the_presets(small_run):
    assert [r.preset for r in small_run.rows] == [*TORCH_ROWS, *slimopt.PRESETS]
    for r in small_run.rows:
        assert r.step_ms_min > 0
        assert r.floor_ms > 0 and r.bytes_moved > 0


def test_bytes_moved_reads_and_writes_each_tensor_once(small_run):
    param_bytes = small_run.conditions["param_bytes"]
    n_tensors = 4 * 9 + 3  # llama-tiny: 4 layers of 9 tensors, embedding, head, final norm
    rows = {r.preset: r for r in small_run.rows}
    # AdamW: p, exp_avg, exp_avg_sq read and written, g read; a float32 step count per tensor
    assert rows["torch-adamw-fused"].bytes_moved == 7 * param_bytes + 8 * n_tensors
    assert rows["torch-adamw-fused"].state_bytes == 2 * param_bytes + 4 * n_tensors
    assert rows["sinkgd-pure"].bytes_moved == 3 * param_bytes  # stateless
    assert rows["sgd-sai"].bytes_moved == 5 * param_bytes + 8 * n_tensors  # + float32 gsnr
    # the floor is the bytes at the best bandwidth measured in the run
    best = max(small_run.bandwidth_gbps.values())
    for r in small_run.rows:
        assert r.floor_ms == pytest.approx(r.bytes_moved / best / 1e6)


def test_state_bytes_match_slimopt_memory(small_run):
    from slimopt.bench.memory_cli import model_memory

    memory = {r.preset: r.state_bytes for r in model_memory("llama-tiny", vocab_size=256)}
    for r in small_run.rows:
        if r.preset not in TORCH_ROWS:
            assert r.state_bytes == memory[r.preset]


def test_step_bytes_of_a_torch_optimizer():
    w = torch.zeros(10, 3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)  # no gradient: not moved
    w.grad = torch.ones(10, 3)
    opt = torch.optim.SGD([w, b], lr=0.1, momentum=0.9)
    opt.step()
    assert step_bytes(opt) == 5 * 30 * 4


def test_cli_json_keys(capsys):
    argv = ["profile", "--model", "llama-tiny", "--vocab-size", "128", "--presets", "lion"]
    assert main([*argv, "--steps", "2", "--warmup", "1", "--no-fused", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["preset"] for r in rows] == [*TORCH_ROWS, "lion"]
    assert all(set(r) == KEYS for r in rows)


def test_cli_table(capsys):
    argv = ["profile", "--model", "llama-tiny", "--vocab-size", "128", "--presets", "adamw"]
    assert main([*argv, "--steps", "1", "--warmup", "0", "--no-fused"]) == 0
    out = capsys.readouterr().out
    assert "torch-adamw-fused" in out and "x floor" in out and "bandwidth" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    assert main(["profile", "--model", "llama-tiny", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "llama-2m"], "unknown model 'llama-2m'"),
        (["--model", "llama-tiny", "--presets", "adam"], "unknown preset 'adam'"),
        (["--model", "llama-tiny", "--steps", "0"], "--steps must be >= 1"),
        (["--model", "llama-tiny", "--device", "tpu"], "unsupported device"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
