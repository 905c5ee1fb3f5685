"""The int8-weight quality report: perplexity table and loss curves, bf16 + SR beside int8 + SR.

Reads the JSON lines of ``benchmarks/lean_quality.py --modes bf16-sr,int8-sr`` and prints a
Markdown table (per preset: each seed's validation perplexity in both modes, the mean gap of int8
against bf16) and writes one figure with a panel per preset: the training loss of both modes,
each seed, smoothed over ``--smooth`` steps.

    python benchmarks/int8_report.py benchmarks/lean_quality_int8_32k.jsonl \\
        --plot benchmarks/lean_int8_curves.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

MODES = ("bf16-sr", "int8-sr")


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(rows: list[dict]) -> str:
    """One row per preset: the seeds run in both modes, each seed's perplexities, the mean gap."""
    by = defaultdict(dict)
    for r in rows:
        by[r["preset"]][(r["mode"], r["seed"])] = r["valid_ppl"]
    out = [
        "| preset | seed | bf16 + SR ppl | int8 + SR ppl | int8 vs bf16 |",
        "|---|---|---|---|---|",
    ]
    for preset, runs in by.items():
        seeds = sorted({s for (_, s) in runs})
        gaps = []
        for s in seeds:
            b, q = runs.get(("bf16-sr", s)), runs.get(("int8-sr", s))
            gap = f"{100 * (q / b - 1):+.2f}%" if b and q else "not run"
            if b and q:
                gaps.append(q / b - 1)
            cell = [f"{x:.2f}" if x else "not run" for x in (b, q)]
            out.append(f"| {preset} | {s} | {cell[0]} | {cell[1]} | {gap} |")
        if len(gaps) > 1:
            mean = 100 * sum(gaps) / len(gaps)
            out.append(f"| {preset} | mean of {len(gaps)} | | | {mean:+.2f}% |")
    return "\n".join(out)


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(rows: list[dict], path: str, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 4), squeeze=False)
    colors = {"bf16-sr": "tab:blue", "int8-sr": "tab:red"}
    for ax, preset in zip(axes[0], presets):
        for r in rows:
            if r["preset"] != preset or "losses" not in r:
                continue
            style = "-" if r["seed"] == 0 else "--"
            ax.plot(
                _smooth(r["losses"], smooth),
                style,
                color=colors.get(r["mode"], "gray"),
                label=f"{r['mode']} seed {r['seed']} (ppl {r['valid_ppl']:.1f})",
                linewidth=1,
            )
        ax.set_title(f"{preset}")
        ax.set_xlabel("step (8 x 256 tokens)")
        ax.set_ylabel(f"training loss ({smooth}-step mean)")
        ax.set_ylim(bottom=None, top=9)
        ax.legend(fontsize=7)
    vocab = rows[0].get("vocab_size")
    fig.suptitle(f"llama-tiny, enwiki, {vocab} vocabulary: int8 weights + SR against bf16 + SR")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl")
    ap.add_argument("--plot", default=None, help="write the loss curves to this PNG")
    ap.add_argument("--smooth", type=int, default=20)
    args = ap.parse_args(argv)
    rows = [r for r in load(args.jsonl) if r["mode"] in MODES]
    if not rows:
        raise SystemExit(f"{args.jsonl}: no {' or '.join(MODES)} runs")
    print(table(rows))
    if args.plot:
        plot(rows, args.plot, args.smooth)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
