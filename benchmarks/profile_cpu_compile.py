"""Time ``torch.compile(opt.step)`` (inductor) against the eager default step on a CPU.

    python benchmarks/profile_cpu_compile.py --presets lion,sage-hybrid

For each preset: the optimizer as a user builds it (``create_optimizer(preset, model)``), its
eager step (the default tiers: the native CPU kernels), then ``torch.compile(opt.step)`` with the
inductor backend on a second optimizer over the same parameters (inside a compiled region each
rule runs its traceable multi-tensor path). Reported: the compile time (the first compiled call),
the median of the following compiled steps, and the eager median, side by side with
``torch.optim.AdamW(fused=True)`` in the same process. Writes ``profile_cpu_compile.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from slimopt import create_optimizer
from slimopt.bench.profile import build_profile_model


def _median_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--presets", default="lion,sage-hybrid")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).with_name("profile_cpu_compile.md")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_profile_model(args.model, torch.device("cpu"), torch.float32)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    base.step()
    load = [os.getloadavg()[0]]
    rows = []
    for preset in args.presets.split(","):
        print(preset, file=sys.stderr, flush=True)
        eager = create_optimizer(preset, model)
        eager.step()
        eager_ms = _median_ms(eager.step, args.steps)
        adamw_ms = _median_ms(base.step, args.steps)
        compiled_opt = create_optimizer(preset, model)
        step = torch.compile(compiled_opt.step)
        t0 = time.perf_counter()
        step()
        step()  # the state exists from here: the second call may compile once more
        compile_s = time.perf_counter() - t0
        compiled_ms = _median_ms(step, args.steps)
        rows.append((preset, compile_s, compiled_ms, eager_ms, adamw_ms))
        print(rows[-1], file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])
    lines = [
        f"# `torch.compile(opt.step)` (inductor) on {args.model}, fp32, CPU, "
        f"{args.threads} thread(s)",
        "",
        f"Recorded {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        f"`python benchmarks/profile_cpu_compile.py {' '.join(argv or sys.argv[1:])}`; "
        f"load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores (shared).",
        "",
        "| preset | first two compiled calls s | compiled step ms | eager default step ms | "
        "fused AdamW ms | compiled x fused AdamW | eager x fused AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, compile_s, compiled_ms, eager_ms, adamw_ms in rows:
        lines.append(
            f"| `{preset}` | {compile_s:.1f} | {compiled_ms:.1f} | {eager_ms:.1f} | "
            f"{adamw_ms:.1f} | {compiled_ms / adamw_ms:.2f} | {eager_ms / adamw_ms:.2f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
