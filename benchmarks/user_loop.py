"""Time a plain user loop: ``opt = create_optimizer(preset, model)`` with no options and no
environment variable, then ``opt.step()``, side by side with ``torch.optim.AdamW(fused=True)``.

    python benchmarks/user_loop.py                     # llama-60m, fp32, threads 1 and 2, 3 runs
    python benchmarks/user_loop.py --threads 1 --runs 1 --steps 5 --out /tmp/loop.md

What a user gets is measured as a user gets it: each preset's optimizer is built fresh in every run
(its first step, which loads the native kernels, is reported apart), then it and a fused AdamW on
the same parameters step in alternation, one step each per round; the ratio of their median step
times is one run's number, and the table reports the median over runs. The gradients are filled
once (as in ``slimopt profile``), so only ``opt.step()`` is timed. The machine may be shared:
the load average before and after every run is recorded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from slimopt import create_optimizer
from slimopt.bench.profile import build_profile_model
from slimopt.presets import PRESETS

TARGETS = {
    "sgd-sai": 0.8,
    "lion": 0.8,
    "scale": 0.7,
    "sage-hybrid": 1.2,
    "sinkgd-pure": 1.6,
    **{p: 1.4 for p in ("adamw", "sage-pure", "lion-hybrid", "sinkgd-hybrid")},
}


# What each rule's math must move per parameter entry (fp32: 4 bytes a pass), read (r) or written
# (w), when every tensor is touched as few times as the math allows. Torch's fused AdamW is 7.
FLOORS = [
    ("AdamW", "p r/w, g r, m r/w, v r/w", "7"),
    ("Lion", "p r/w, g r, m r/w", "5"),
    ("SGD-SaI", "p r/w, g r, m r/w (its first step reads g once more for gsnr)", "5"),
    (
        "SAGE, matrix",
        "g r for the column statistic (H needs every row), then p r/w, g r, m r/w",
        "6",
    ),
    ("SAGE, vector", "p r/w, g r, m r/w, S r/w", "7"),
    (
        "SinkGD, matrix",
        "iters sweeps of g (each needs the previous one's column scales), then p r/w, g r: "
        "3 passes from memory when the matrix stays in cache between sweeps, iters + 3 when not "
        "(llama-60m: the 65 MB embedding and head never fit; the 1-3 MB layer matrices fit an "
        "idle 32 MB L3)",
        "3 or 8",
    ),
    ("SCALE, rows (norm_dim 1)", "p r/w, g r (a row's RMS from L1); + m r/w on the head", "3 (5)"),
    ("SCALE, columns (embedding)", "g r for the column RMS, then p r/w, g r", "4"),
]


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def one_run(model: torch.nn.Module, steps: int) -> dict[str, dict[str, float]]:
    """preset -> {ratio, median_ms, adamw_ms, first_ms} for one side-by-side run."""
    out = {}
    for preset in PRESETS:
        opt = create_optimizer(preset, model)
        base = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
        first = _ms(opt.step)
        base.step()
        mine, theirs = [], []
        gc.collect()
        gc.disable()
        try:
            for k in range(steps):
                pair = [(opt, mine), (base, theirs)]
                for o, times in pair if k % 2 == 0 else pair[::-1]:
                    times.append(_ms(o.step))
        finally:
            gc.enable()
        med, ref = statistics.median(mine), statistics.median(theirs)
        out[preset] = {"ratio": med / ref, "median_ms": med, "adamw_ms": ref, "first_ms": first}
        del opt, base
        gc.collect()
    return out


def render(results: dict[int, list[dict]], meta: dict) -> str:
    loads = [float(x) for pair in meta["loads"] for x in pair.split("/")]
    busy = bool(loads) and max(loads) > meta["cores"]
    lines = [
        f"# A plain user loop on {meta['model']}, fp32, CPU: `create_optimizer(preset, model)`, "
        "`opt.step()`",
        "",
        f"Recorded {meta['started']} with `{meta['command']}`.",
        "",
        f"- CPU: {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}",
        f"- each run: every preset's optimizer built fresh with no options, then {meta['steps']} "
        "rounds of one step of it and one of `torch.optim.AdamW(fused=True)` on the same "
        "parameters, alternating; ratio of the two medians; the table's median is over runs",
        f"- load average (1 min) before/after each run: {meta['loads']} on {meta['cores']} cores"
        + (" (above the core count: other work shared the machine)" if busy else ""),
        "",
    ]
    if busy:
        lines += [
            f"**Caveat.** The load average exceeded the {meta['cores']} cores during these runs.",
            "With 2 threads on an oversubscribed machine, torch's fused AdamW and the native loops",
            "(both OpenMP teams whose threads wait for each other at every barrier) slow down from",
            "run to run by different amounts, so the 2-thread ratios below say more about the",
            "machine's load than about the optimizers. The 1-thread runs are the fair side-by-side",
            "comparison here.",
            "",
        ]
    lines += [
        "## Floors: passes over memory per parameter entry that each rule's math allows",
        "",
        "| rule | tensors | passes |",
        "|---|---|---|",
        *(f"| {r} | {t} | {n} |" for r, t, n in FLOORS),
        "",
        "x floor per preset (median step time over its bytes at the best bandwidth measured in the "
        "same run) is in `benchmarks/profile_cpu.md`, whose bytes count one pass per tensor.",
        "",
    ]
    for threads, runs in results.items():
        lines += [
            f"## {threads} thread{'s' * (threads > 1)} (median over {len(runs)} runs)",
            "",
            "| preset | target x fused AdamW | x fused AdamW, per run | median | met | "
            "median step ms | fused AdamW ms | first step ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for preset in PRESETS:
            rs = [r[preset]["ratio"] for r in runs]
            med = statistics.median(rs)
            target = TARGETS.get(preset)
            met = "" if target is None else ("yes" if med <= target else "**no**")
            ms = statistics.median(r[preset]["median_ms"] for r in runs)
            ref = statistics.median(r[preset]["adamw_ms"] for r in runs)
            first = statistics.median(r[preset]["first_ms"] for r in runs)
            lines.append(
                f"| `{preset}` | {'' if target is None else f'<= {target}'} | "
                f"{', '.join(f'{x:.2f}' for x in rs)} | {med:.2f} | {met} | {ms:.1f} | "
                f"{ref:.1f} | {first:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).with_name("user_loop_cpu.md")))
    parser.add_argument(
        "--render", metavar="JSON", help="only re-write the report from runs saved in JSON"
    )
    args = parser.parse_args(argv)
    if args.render:
        raw = json.loads(Path(args.render).read_text())
        runs = {int(t): r for t, r in raw["runs"].items()}
        Path(args.out).write_text(render(runs, raw["meta"]))
        return 0
    meta = {
        "model": args.model,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/user_loop.py " + " ".join(argv or sys.argv[1:]),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "steps": args.steps,
        "loads": [],
    }
    results: dict[int, list[dict]] = {}
    for t in (int(x) for x in args.threads.split(",") if x.strip()):
        torch.set_num_threads(t)
        results[t] = []
        for k in range(args.runs):
            print(f"threads {t}, run {k + 1}/{args.runs}", file=sys.stderr, flush=True)
            before = os.getloadavg()[0]
            model = build_profile_model(args.model, torch.device("cpu"), torch.float32)
            results[t].append(one_run(model, args.steps))
            del model
            meta["loads"].append(f"{before:.1f}/{os.getloadavg()[0]:.1f}")
            summary = {p: round(v["ratio"], 2) for p, v in results[t][-1].items()}
            print(summary, file=sys.stderr, flush=True)
    out = Path(args.out)
    out.write_text(render(results, meta))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
