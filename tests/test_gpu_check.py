"""``benchmarks/gpu_check.sh``, the one-run GPU check, on a CPU: the script parses, its dry run
imports everything and stops at the first CUDA check, and its summary reads the records the GPU
run writes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses_and_its_dry_run_stops_at_the_first_cuda_check(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        cwd=tmp_path,  # the script finds the repository by itself
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "gpu-check"
    log = (out / "log.txt").read_text()
    assert "dry run: parts triton, graphs, bandwidth, memory-7b" in log
    if torch.cuda.is_available():
        assert "stopping before the first measurement" in log
    else:
        assert "no CUDA device here (dry run)" in log and "stopping before the first CUDA" in log
    assert not (out / "gpu_check.jsonl").exists()  # nothing measured


def test_without_a_gpu_and_without_dry_run_nothing_is_measured(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _module().main(["--parts", "triton"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_summary_of_every_part(tmp_path):
    g = _module()
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase name="test_kernel_matches_reference[fp32-lion-{}]"/>'
        '<testcase name="test_kernel_matches_reference[bf16-lion-{}]">'
        '<failure message="AssertionError: param 0: 3 of 91 differ"/></testcase>'
        '<testcase name="test_interpreter_battery"><skipped message="deselected"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = g.junit_summary(junit)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["kernel_battery_passed"] == 1 and "3 of 91 differ" in counts["failed_tests"][0]
    row = dict(preset="lion", step_ms_median=1.5, bytes_moved=6_000_000, gbps=4000.0,
               copy_share=0.9, x_fused_adamw=0.7, copy_same_bytes_ms=1.4,
               x_copy_same_bytes=1.07, kernels="triton")  # fmt: skip
    records = [
        {"part": "triton", "command": "pytest", "rc": 1, "wall_s": 80.0, **counts},
        {"part": "graphs", "preset": "lion", "dtype": "fp32", "counters": "device",
         "captured": True, "replay_matches_eager": True, "bit_identical": True,
         "max_rel_diff": 0.0, "replay_ms": 0.1, "eager_ms": 0.9},
        {"part": "graphs", "preset": "sgd-sai", "dtype": "fp32", "counters": "host",
         "captured": False, "error": "RuntimeError: operation not permitted when capturing"},
        {"part": "bandwidth", "dtype": "bf16", "copy_gbps": 4300.0, "rows": [row]},
        {"part": "memory-7b", "command": "lean_step.py", "rc": 0,
         "max_memory_allocated_gib": 14.2, "predicted_gib": 14.9},
        {"part": "skipped", "of": "memory-7b", "why": "the 450 s budget is spent"},
    ]  # fmt: skip
    text = g.summarize(records, {"device": "H200", "torch": "2.x"})
    assert "1 passed, 1 failed, 1 skipped" in text
    assert "| `lion` | fp32 | device | True | True | True |" in text
    assert "operation not permitted" in text
    assert "| `lion` | 1.500 | 6.0 | 4000 | 90.0% | 0.70 | <=0.75 | 1.400 | 1.07 | triton |" in text
    assert "**14.20 GiB**" in text and "budget is spent" in text
