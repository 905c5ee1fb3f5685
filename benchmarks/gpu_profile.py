"""The GPU run of the Triton kernels, in one command that fits a short GPU session.

    python benchmarks/gpu_profile.py                       # everything below, about 6-8 minutes
    python benchmarks/gpu_profile.py --parts profile-1b    # one part
    python benchmarks/gpu_profile.py --out results/        # where the JSON and Markdown go

Parts, in order (each is skipped with a note once ``--budget-s`` is spent, so a time-boxed
session still gets the earlier parts' results):

1. ``checks``: the CUDA tests of ``tests/test_triton.py`` (CUDA graph capture of every rule's
   step, the self-check) and each rule's first-use self-check on this device;
2. ``profile-1b``: ``slimopt profile --device cuda`` on llama-1b, fp32 and bf16, every preset
   beside torch's fused AdamW (GB/s, share of a large copy, floor, ratio, targets);
3. ``profile-7b``: llama-7b in bf16 for the five presets with targets (fp32 does not fit beside
   the baseline's state on one device);
4. ``train-1b``: whole training steps of llama-1b in bf16 (forward, backward, step) in tokens/s,
   per preset against fused AdamW;
5. ``multi-tensor-1b``: llama-1b in bf16 on the rules' multi-tensor path (no Triton), to show
   what the kernels change.

It writes ``gpu_profile.json`` (every row and the conditions) and ``gpu_profile.md`` (the tables)
to ``--out`` (default: ``$OUT`` when set, else ``benchmarks/``), and prints the tables as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimopt.bench.profile_cuda import (  # noqa: E402
    TARGET_X_FUSED,
    format_cuda_table,
    profile_cuda,
    training_rate,
)
from slimopt.presets import PRESETS  # noqa: E402

PARTS = ("checks", "profile-1b", "profile-7b", "train-1b", "multi-tensor-1b")
TARGETED = list(TARGET_X_FUSED)


def _log(msg: str) -> None:
    print(f"[gpu_profile {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _checks(report: dict) -> str:
    from slimopt.kernels import triton_ops

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
           "cuda_graph or profile_cuda_table", str(ROOT / "tests" / "test_triton.py")]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = (run.stdout + run.stderr)[-3000:]
    from slimopt.algorithms.kernel_check import self_check

    checks = {rule: self_check(rule) for rule in triton_ops.STEPS}
    report["checks"] = {"pytest_rc": run.returncode, "pytest_tail": tail, "self_check": checks}
    return (
        f"### CUDA tests and self-checks\n\n`pytest -k 'cuda_graph or profile_cuda_table'`: "
        f"exit {run.returncode}\n\n```\n{tail.strip()[-1500:]}\n```\n\n"
        f"self-check: {', '.join(f'{k} {v}' for k, v in checks.items())}\n"
    )


def _profile(
    report: dict, key: str, model: str, dtype: str, presets: list[str], steps: int, triton=True
) -> str:
    result = profile_cuda(
        model, presets, dtype=dtype, steps=steps, warmup=3, triton=triton, log=_log
    )
    report[key] = {
        "conditions": result.conditions,
        "copy_gbps": result.copy_gbps,
        "rows": [asdict(r) for r in result.rows],
    }
    table = format_cuda_table(result)
    print(table, flush=True)
    path = "Triton kernels" if triton else "multi-tensor path"
    lines = [f"### {model}, {dtype}, {path}\n", "```", table, "```", ""]
    met = []
    for r in result.rows:
        if r.target_x_fused is not None:
            ok = r.x_fused_adamw <= r.target_x_fused
            met.append(
                f"- `{r.preset}`: {r.x_fused_adamw:.2f}x fused AdamW (target <= "
                f"{r.target_x_fused}) {'met' if ok else '**missed**'}; {r.x_floor:.2f}x floor "
                f"({'met' if r.x_floor <= 1.25 else '**missed**'} <= 1.25)"
            )
    return "\n".join(lines + met) + "\n"


def _train(report: dict) -> str:
    presets = TARGETED
    rates = training_rate("llama-1b", presets, dtype="bf16", batch=4, seq_len=1024, steps=5)
    report["train-1b"] = {"tokens_per_s": rates, "batch": 4, "seq_len": 1024, "dtype": "bf16"}
    base = rates["torch-adamw-fused"]
    lines = ["### llama-1b training step, bf16, batch 4 x 1024 tokens\n",
             "| optimizer | tokens/s | x fused AdamW |", "|---|---|---|"]  # fmt: skip
    lines += [f"| `{k}` | {v:,.0f} | {v / base:.3f} |" for k, v in rates.items()]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {', '.join(PARTS)}")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks"))
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip parts after this")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds per profile")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device here; nothing measured", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    cmd = " ".join([Path(sys.executable).name, *sys.argv])
    report: dict = {
        "command": cmd,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    sections = [
        f"# Triton kernels on {report['device']}\n",
        f"Recorded {report['date_utc']} UTC with `{cmd}`; torch {torch.__version__}.\n",
    ]
    jobs = {
        "checks": lambda: _checks(report),
        "profile-1b": lambda: "\n".join(
            _profile(report, f"profile-1b-{dt}", "llama-1b", dt, list(PRESETS), args.steps)
            for dt in ("fp32", "bf16")
        ),
        "profile-7b": lambda: _profile(
            report, "profile-7b-bf16", "llama-7b", "bf16", TARGETED, args.steps
        ),
        "train-1b": lambda: _train(report),
        "multi-tensor-1b": lambda: _profile(
            report, "multi-tensor-1b-bf16", "llama-1b", "bf16", TARGETED, args.steps, triton=False
        ),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        spent = time.perf_counter() - t0
        if spent > args.budget_s:
            sections.append(
                f"### {part}\n\nskipped: {spent:.0f} s of the {args.budget_s} s spent\n"
            )
            continue
        _log(f"{part} (after {spent:.0f} s)")
        try:
            sections.append(jobs[part]())
        except Exception as exc:  # record it and go on: one failed part must not lose the rest
            sections.append(f"### {part}\n\nfailed: `{type(exc).__name__}: {exc}`\n")
            report[f"{part}-error"] = traceback.format_exc()
            _log(traceback.format_exc())
        torch.cuda.empty_cache()
        (out / "gpu_profile.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_profile.md").write_text("\n".join(sections))
    _log(f"done in {time.perf_counter() - t0:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
