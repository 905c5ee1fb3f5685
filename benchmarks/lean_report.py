"""Render the recorded lean benchmarks (JSON lines) as the markdown tables of lean_*.md.

python benchmarks/lean_report.py benchmarks/lean_step.jsonl benchmarks/lean_quality.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def step_table(rows: list[dict]) -> str:
    lines = [
        "| model | preset | freed memory | measured peak GB | planner GB | planner / measured "
        "| build peak GB | step s | AdamW fp32 by the planner GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        freed = "returned" if r.get("freed_memory_returned") else "kept"
        lines.append(
            f"| {r['model']} | {r['preset']} | {freed} | {_gb(r['measured_peak_bytes'])} | "
            f"{_gb(r['predicted_peak_bytes'])} | {r['predicted_over_measured']:.2f} | "
            f"{_gb(r.get('build_peak_bytes', 0))} | {r['step_s'][0]:.0f} | "
            f"{_gb(r['adamw_fp32_predicted_bytes'])} |"
        )
    return "\n".join(lines)


def quality_table(rows: list[dict]) -> str:
    by = defaultdict(list)
    curves = {}
    for r in rows:
        by[r["preset"], r["mode"]].append(r)
        curves[r["preset"], r["mode"], r["seed"]] = r["losses"]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    lines = [
        "| preset | seeds | tokens | fp32 ppl | bf16 + SR ppl | SR vs fp32 (per seed) "
        "| bf16 round-to-nearest ppl | RTN vs fp32 (per seed) | fp32 step-in-backward: loss curve |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset in presets:

        def mean(mode: str, preset: str = preset) -> float | None:
            got = [r["valid_ppl"] for r in by.get((preset, mode), [])]
            return statistics.mean(got) if got else None

        fp32, sr, rtn = mean("fp32"), mean("bf16-sr"), mean("bf16-rtn")
        seeds = sorted({r["seed"] for r in by.get((preset, "fp32"), [])})
        tokens = by[preset, "fp32"][0]["tokens"] if by.get((preset, "fp32")) else 0
        same = []
        for seed in seeds:
            a, b = curves.get((preset, "fp32", seed)), curves.get((preset, "fp32-sib", seed))
            if a is not None and b is not None:
                diff = max(abs(x - y) for x, y in zip(a, b))
                same.append("bit for bit" if a == b else f"max diff {diff:.2e}")

        def per_seed(mode: str, preset: str = preset, seeds: list = seeds) -> str:
            ppl = {(r["mode"], r["seed"]): r["valid_ppl"] for r in rows if r["preset"] == preset}
            got = [
                f"{100 * (ppl[mode, s] / ppl['fp32', s] - 1):+.1f}%"
                for s in seeds
                if (mode, s) in ppl and ("fp32", s) in ppl
            ]
            return "; ".join(got)

        lines.append(
            f"| {preset} | {','.join(map(str, seeds))} | {tokens:,} | "
            f"{fp32:.2f} | {sr:.2f} | {100 * (sr / fp32 - 1):+.2f}% ({per_seed('bf16-sr')}) | "
            f"{rtn:.2f} | {100 * (rtn / fp32 - 1):+.2f}% ({per_seed('bf16-rtn')}) | "
            f"{'; '.join(same) or '-'} |"
            if fp32 and sr and rtn
            else f"| {preset} | incomplete |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    for path in argv:
        rows = [json.loads(line) for line in open(path) if line.strip()]
        if not rows:
            continue
        print(step_table(rows) if "measured_peak_bytes" in rows[0] else quality_table(rows))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
