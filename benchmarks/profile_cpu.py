"""Record ``slimopt profile`` on a CPU: every preset's step time against torch's fused AdamW and
against its bytes floor, over several independent side-by-side runs.

    python benchmarks/profile_cpu.py                      # llama-60m, fp32, 3 default runs + 1 multi-tensor
    python benchmarks/profile_cpu.py --runs 5 --steps 30 --out /tmp/profile.md

Each run is one ``slimopt.bench.profile.profile_model`` call: all rows step on the same model in
rotating order, one step each per round, so the ratios of one run are measured side by side under
the same machine load. The report (``benchmarks/profile_cpu.md`` by default, with the raw rows
in a ``.json`` next to it) lists, per run, every row's median step time, its ratio to
``torch-adamw-fused`` and to its floor, then the targets against the median over runs of each ratio.
The machine this runs on is often shared, so the load average before and after each run is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from slimopt.bench.profile import BASELINE, ProfileResult, ProfileRow, format_table, profile_model
from slimopt.presets import PRESETS

# step-time ratio to torch's fused AdamW, measured side by side (llama-60m, fp32, CPU)
TARGETS = {
    "sgd-sai": 0.8,
    "lion": 0.8,
    "scale": 0.7,
    "sage-hybrid": 1.2,
    "sinkgd-pure": 1.6,
    **{p: 1.4 for p in ("adamw", "sage-pure", "lion-hybrid", "sinkgd-hybrid")},
}
FLOOR_TARGET = 2.0  # every preset within 2x its bytes floor


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = fields.get("Model name", "").strip()
        caches = ", ".join(
            f"{k.strip()} {fields[k].strip()}" for k in ("L2 cache", "L3 cache") if k in fields
        )
        return f"{name} ({caches})" if caches else name
    except OSError:
        return platform.processor() or platform.machine()


def ratios(result: ProfileResult) -> dict[str, tuple[float, float]]:
    """preset -> (median / fused AdamW's median, median / floor)."""
    base = result.row(BASELINE).step_ms_median
    return {r.preset: (r.step_ms_median / base, r.step_ms_median / r.floor_ms) for r in result.rows}


def summary(runs: list[ProfileResult], presets: list[str]) -> list[str]:
    per_run = [ratios(r) for r in runs]
    lines = [
        "| preset | target x fused AdamW | x fused AdamW, per run | median | met | "
        "x floor, median | within 2x floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset in presets:
        rs = [r[preset][0] for r in per_run]
        fs = [r[preset][1] for r in per_run]
        target = TARGETS.get(preset)
        med, fmed = statistics.median(rs), statistics.median(fs)
        met = "" if target is None else ("yes" if med <= target else "**no**")
        lines.append(
            f"| `{preset}` | {'' if target is None else f'<= {target}'} | "
            f"{', '.join(f'{x:.2f}' for x in rs)} | {med:.2f} | {met} | {fmed:.2f} | "
            f"{'yes' if fmed <= FLOOR_TARGET else '**no**'} |"
        )
    return lines


def _plural(t: str) -> str:
    return f"{t} thread" + ("" if t == "1" else "s")


def render(results: dict[str, list[ProfileResult]], meta: dict) -> str:
    """The Markdown report of a set of runs (``meta``: how and where they were made)."""
    presets = list(PRESETS)
    cores = meta.get("cores") or 1
    loads = [x for runs in results.values() for r in runs for x in r.conditions["load_average"]]
    lines = [
        f"# `slimopt profile` on {meta['model']}, {meta['dtype']}, CPU",
        "",
        f"Recorded {meta['started']} with `{meta['command']}`.",
        "",
        f"- CPU: {meta['cpu']}, {cores} cores; torch threads per run: {meta['threads']}",
        f"- torch {meta['torch']}, Python {meta['python']}",
        "- each run: every row steps once per round, rotating order, "
        f"{meta['steps']} rounds after {meta['warmup']} warm-up steps; median/min/max over "
        "rounds; ratios are of medians within one run, then the median over runs",
        f"- load average during the runs: {min(loads):.1f} to {max(loads):.1f}"
        + (" (the machine was shared with other work)" if max(loads) > cores else ""),
        "",
    ]
    if max(loads) > cores:
        lines += [
            f"**Caveat.** The load average exceeded the {cores} cores during these runs. torch's",
            "multi-threaded kernels (fused AdamW included) and slimopt's native loops (threaded in",
            "torch's OpenMP runtime) synchronise their threads at OpenMP barriers, which a busy",
            "machine stalls from run to run: runs with more than one thread say more about the",
            "load than about the optimizers, and understate the bandwidth (so floors come out too",
            "low). The single-thread runs are the fair side-by-side comparison on a shared machine.",
            "",
        ]
    for kind, runs in results.items():
        if not runs:
            continue
        mode, t = kind.split("-")
        what = "default tiers" if mode == "fused" else "multi-tensor path (fused=False)"
        title = f"{what}, {_plural(t)}"
        lines += [f"## Targets, {title} (median over {len(runs)} run{'s' * (len(runs) > 1)})"]
        lines += ["", *summary(runs, ["torch-adamw-foreach", *presets]), ""]
    for kind, runs in results.items():
        mode, t = kind.split("-")
        for k, result in enumerate(runs):
            state = "default tiers" if mode == "fused" else "multi-tensor path"
            lines += [f"### Run {k + 1}, {state}, {_plural(t)}", ""]
            lines += ["```", format_table(result), "```", ""]
    return "\n".join(lines)


def load(path: Path) -> tuple[dict[str, list[ProfileResult]], dict]:
    """Runs saved by :func:`main` (the ``.json`` next to the report)."""
    raw = json.loads(path.read_text())
    results = {
        kind: [
            ProfileResult(
                rows=[ProfileRow(**row) for row in run["rows"]],
                bandwidth_gbps=run["bandwidth_gbps"],
                conditions=run["conditions"],
            )
            for run in runs
        ]
        for kind, runs in raw["runs"].items()
    }
    return results, raw["meta"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--runs", type=int, default=3, help="runs of the defaults (default 3)")
    parser.add_argument(
        "--eager-runs", type=int, default=1, help="runs of the multi-tensor path (--no-fused)"
    )
    parser.add_argument(
        "--threads",
        default="2,1",
        help="comma-separated torch thread counts; each gets the runs (default 2,1)",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("profile_cpu.md")))
    parser.add_argument(
        "--render", metavar="JSON", help="only re-write the report from runs saved in JSON"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)

    if args.render:
        results, meta = load(Path(args.render))
        out.write_text(render(results, meta))
        print(f"wrote {out}", file=sys.stderr)
        return 0

    meta = {
        "model": args.model,
        "dtype": args.dtype,
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/profile_cpu.py " + " ".join(argv or sys.argv[1:]),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "steps": args.steps,
        "warmup": args.warmup,
    }
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    results: dict[str, list[ProfileResult]] = {}
    plan = []
    for t in threads:
        results[f"fused-{t}"], results[f"eager-{t}"] = [], []
        plan += [(f"fused-{t}", None, t)] * args.runs + [(f"eager-{t}", False, t)] * args.eager_runs
    for k, (kind, fused, t) in enumerate(plan):
        print(f"run {k + 1}/{len(plan)} ({kind})", file=sys.stderr, flush=True)
        torch.set_num_threads(t)
        result = profile_model(
            args.model,
            list(PRESETS),
            dtype=args.dtype,
            steps=args.steps,
            warmup=args.warmup,
            fused=fused,
            log=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True),
        )
        print(format_table(result), file=sys.stderr, flush=True)
        results[kind].append(result)

    out.write_text(render(results, meta))
    raw = {
        "meta": meta,
        "runs": {
            kind: [
                {
                    "rows": [asdict(r) for r in res.rows],
                    "bandwidth_gbps": res.bandwidth_gbps,
                    "conditions": res.conditions,
                }
                for res in runs
            ]
            for kind, runs in results.items()
        },
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
