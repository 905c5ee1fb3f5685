"""Tables and plots for ``slimopt compare``: per-preset summaries, CSV, Markdown and PNG figures.

The input is one record per training run (what :mod:`slimopt.bench.compare` collects from the
harness's ``final.json`` and ``metrics.jsonl``)::

    {"preset": "adamw", "kind": "preset", "seed": 0, "status": "completed" | "diverged" | "pending",
     "val_loss": 3.9, "val_ppl": 49.4, "steps": 100, "train_time_s": 50.0,
     "train_tokens_per_s": 4096.0, "wall_time_s": 60.0, "resumed_from_step": None,
     "nonfinite_step": None, "state_bytes": 23_000_000, "lrs": {"adamw": 1e-3},
     "multipliers": {"adamw": 1.0}, "curve": [[tokens, val_ppl], ...]}

:func:`summarize` turns them into one row per preset (mean and spread over seeds); the writers
below never recompute anything, so the CSV, the Markdown and the plots always agree.

>>> runs = [
...     {"preset": "adamw", "seed": s, "status": "completed", "val_loss": 4.0 + s / 10,
...      "val_ppl": 50.0 + s, "steps": 10, "train_time_s": 5.0, "train_tokens_per_s": 4000.0,
...      "wall_time_s": 6.0, "state_bytes": 2_000_000, "lrs": {"adamw": 1e-3}}
...     for s in (0, 1)
... ] + [{"preset": "sinkgd-pure", "seed": 0, "status": "diverged", "nonfinite_step": 7,
...       "state_bytes": 0, "lrs": {"sinkgd": 1e-3}}]
>>> rows = summarize(runs, seeds=2, adamw_state_bytes=2_000_000)
>>> [(r["preset"], r["status"], r["val_ppl_mean"], r["state_vs_adamw"]) for r in rows]
[('adamw', 'ok', 50.5, 1.0), ('sinkgd-pure', 'diverged', None, 0.0)]
>>> print(markdown_table(rows).splitlines()[2])
| adamw | 50.50 ± 0.71 | 2.00 MB | 1.00× | 500 | 4,000 | 6 s | adamw 0.001 |
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CSV_FIELDS = (
    "rank",
    "preset",
    "kind",
    "status",
    "seeds_done",
    "seeds",
    "val_ppl_mean",
    "val_ppl_std",
    "val_ppl_min",
    "val_ppl_max",
    "val_loss_mean",
    "state_bytes",
    "state_vs_adamw",
    "step_time_ms",
    "tokens_per_s",
    "wall_time_s",
    "tokens",
    "diverged_seeds",
    "diverged_step",
    "lrs",
    "lr_multipliers",
)

PLOT_PPL_VS_TOKENS = "ppl_vs_tokens.png"
PLOT_PPL_VS_MEMORY = "ppl_vs_memory.png"
PLOT_SWEEP = "sweep.png"


# ----------------------------------------------------------------------------- formatting


def format_bytes(n: float | None) -> str:
    """Decimal units, as the papers print them.

    >>> format_bytes(0), format_bytes(8_398_848), format_bytes(2.1e9)
    ('0 B', '8.40 MB', '2.10 GB')
    """
    if n is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_seconds(s: float | None) -> str:
    """``42 s``, ``3m05s``, ``1h02m``.

    >>> format_seconds(42.4), format_seconds(185), format_seconds(3725)
    ('42 s', '3m05s', '1h02m')
    """
    if s is None:
        return "–"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_lrs(lrs: dict[str, float] | None) -> str:
    """``sage 0.002, sinkgd 0.0005``.

    >>> format_lrs({"sage": 0.002, "sinkgd": 0.0005, "lion": 1.6e-05})
    'sage 0.002, sinkgd 0.0005, lion 1.6e-05'
    """
    return ", ".join(f"{rule} {lr:.3g}" for rule, lr in (lrs or {}).items())


def format_multipliers(mults: dict[str, float] | None) -> str:
    """``sage ×2, sinkgd ×1``.

    >>> format_multipliers({"sage": 2.0, "sinkgd": 1.0})
    'sage ×2, sinkgd ×1'
    """
    return ", ".join(f"{rule} ×{m:g}" for rule, m in (mults or {}).items())


# ----------------------------------------------------------------------------- summaries


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(
    runs: Iterable[dict[str, Any]],
    *,
    seeds: int,
    adamw_state_bytes: int | None,
    order: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per preset: mean ± sample standard deviation over seeds, ranked by perplexity.

    ``status`` is ``ok`` (every seed finished), ``diverged`` (some seed's loss became non-finite;
    its perplexity is then left out of the mean rather than averaged in) or ``pending`` (seeds
    still to run). Rows are ordered by mean perplexity; diverged and pending rows come last in
    ``order`` (or first-seen) order.
    """
    by_preset: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_preset.setdefault(run["preset"], []).append(run)
    names = list(order) if order is not None else list(by_preset)
    names += [p for p in by_preset if p not in names]
    rows = []
    for preset in names:
        group = sorted(by_preset.get(preset, []), key=lambda r: r.get("seed", 0))
        done = [r for r in group if r.get("status") == "completed"]
        diverged = [r for r in group if r.get("status") == "diverged"]
        ppl = [r["val_ppl"] for r in done]
        finite = [p for p in ppl if math.isfinite(p)]
        status = "diverged" if diverged or len(finite) < len(ppl) else "ok"
        if status == "ok" and len(done) < seeds:
            status = "pending"
        step_ms = [
            1000 * r["train_time_s"] / (r["steps"] - (r.get("resumed_from_step") or 0))
            for r in done
            if r.get("train_time_s") and r["steps"] > (r.get("resumed_from_step") or 0)
        ]
        first = group[0] if group else {}
        state = first.get("state_bytes")
        row: dict[str, Any] = {
            "preset": preset,
            "kind": first.get("kind", "preset"),
            "status": status,
            "seeds_done": len(done) + len(diverged),
            "seeds": seeds,
            "val_ppl_mean": _mean(finite) if status != "diverged" else None,
            "val_ppl_std": statistics.stdev(finite) if len(finite) > 1 else None,
            "val_ppl_min": min(finite) if finite else None,
            "val_ppl_max": max(finite) if finite else None,
            "val_ppl_finished_mean": _mean(finite),
            "val_loss_mean": _mean([r["val_loss"] for r in done if math.isfinite(r["val_loss"])]),
            "state_bytes": state,
            "state_vs_adamw": (
                state / adamw_state_bytes if state is not None and adamw_state_bytes else None
            ),
            "step_time_ms": _mean(step_ms),
            "tokens_per_s": _mean(
                [r["train_tokens_per_s"] for r in done if r.get("train_tokens_per_s")]
            ),
            "wall_time_s": _mean([r["wall_time_s"] for r in done if r.get("wall_time_s")]),
            "tokens": first.get("tokens_seen") or (done[0].get("tokens_seen") if done else None),
            "diverged_seeds": len(diverged),
            "diverged_step": min((r.get("nonfinite_step") or 0 for r in diverged), default=None),
            "lrs": first.get("lrs") or {},
            "lr_multipliers": first.get("multipliers") or {},
            "curves": [r.get("curve") or [] for r in group],
        }
        rows.append(row)
    ranked = sorted(
        (r for r in rows if r["val_ppl_mean"] is not None), key=lambda r: r["val_ppl_mean"]
    )
    rest = [r for r in rows if r["val_ppl_mean"] is None]
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    for r in rest:
        r["rank"] = None
    return ranked + rest


def _ppl_cell(row: dict[str, Any]) -> str:
    if row["status"] == "diverged":
        text = f"diverged ({row['diverged_seeds']}/{row['seeds']} seeds"
        if row["diverged_step"]:
            text += f", step {row['diverged_step']}"
        text += ")"
        if row["val_ppl_finished_mean"] is not None:
            text += f"; finished seeds {row['val_ppl_finished_mean']:.2f}"
        return text
    if row["val_ppl_mean"] is None:
        return "pending"
    cell = f"{row['val_ppl_mean']:.2f}"
    if row["val_ppl_std"] is not None:
        cell += f" ± {row['val_ppl_std']:.2f}"
    if row["status"] == "pending":
        cell += f" ({row['seeds_done']}/{row['seeds']} seeds)"
    elif row["seeds_done"] > row["seeds"]:  # seeds added past the comparison's own
        cell += f" ({row['seeds_done']} seeds)"
    return cell


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table (one line per preset, in the rows' order)."""
    lines = [
        "| preset | val perplexity | optimizer state | vs AdamW | step (ms) | tokens/s | wall/run "
        "| peak lr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['state_vs_adamw']:.2f}×" if r["state_vs_adamw"] is not None else "–"
        step = f"{r['step_time_ms']:.0f}" if r["step_time_ms"] is not None else "–"
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "–"
        name = r["preset"] + (" (baseline)" if r.get("kind") == "baseline" else "")
        lines.append(
            f"| {name} | {_ppl_cell(r)} | {format_bytes(r['state_bytes'])} | {ratio} | {step} "
            f"| {tps} | {format_seconds(r['wall_time_s'])} | {format_lrs(r['lrs'])} |"
        )
    return "\n".join(lines)


def text_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as aligned plain text, for the terminal."""
    header = ("preset", "val ppl", "state", "vs AdamW", "step ms", "tok/s", "wall/run", "peak lr")
    body = []
    for r in rows:
        body.append(
            (
                r["preset"],
                _ppl_cell(r),
                format_bytes(r["state_bytes"]),
                f"{r['state_vs_adamw']:.2f}x" if r["state_vs_adamw"] is not None else "-",
                f"{r['step_time_ms']:.0f}" if r["step_time_ms"] is not None else "-",
                f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "-",
                format_seconds(r["wall_time_s"]),
                format_lrs(r["lrs"]),
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    return "\n".join(
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip()
        for line in (header, *body)
    )


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """``results.csv``: the columns of :data:`CSV_FIELDS`, empty where there is no value."""

    def cell(key: str, value: Any) -> Any:
        if value is None:
            return ""
        if key == "lrs":
            return ";".join(f"{k}={v:.6g}" for k, v in value.items())
        if key == "lr_multipliers":
            return ";".join(f"{k}={v:g}" for k, v in value.items())
        if isinstance(value, float):
            return f"{value:.6g}"
        return value

    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        for r in rows:
            writer.writerow([cell(k, r.get(k)) for k in CSV_FIELDS])
    os.replace(tmp, path)


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a ``results.csv`` as dicts of strings."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def sweep_table(sweeps: dict[str, dict[str, Any]]) -> str:
    """The learning-rate sweep as Markdown: each candidate's validation loss, the chosen one bold.

    ``sweeps`` maps a preset to ``{"chosen": {rule: mult}, "lrs": {rule: lr},
    "trials": [{"multipliers": {...}, "val_loss": x, "status": s}, ...]}``.
    """
    lines = [
        "| preset | rule | multiplier → validation loss (short budget) | chosen lr |",
        "|---|---|---|---|",
    ]
    for preset, sweep in sweeps.items():
        for rule, per_rule in sweep.get("by_rule", {}).items():
            cells = []
            unfinished = any(status == "pending" for *_, status in per_rule)
            for mult, loss, status in per_rule:
                value = {"diverged": "diverged", "pending": "not finished"}.get(status)
                text = f"×{mult:g}: {value or f'{loss:.3f}'}"
                if mult == sweep["chosen"].get(rule) and not unfinished:
                    text = f"**{text}**"
                cells.append(text)
            lr = None if unfinished else sweep.get("lrs", {}).get(rule)
            lines.append(
                f"| {preset} | {rule} | {', '.join(cells)} | {'' if lr is None else f'{lr:.3g}'} |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    from slimopt._extras import require

    matplotlib = require("matplotlib", "bench")

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> list[tuple[float, float]]:
    """Mean perplexity at each token count present in every seed's curve (or the longest one)."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    common = set.intersection(*(set(t for t, _ in c) for c in curves))
    if not common:
        return [tuple(p) for p in max(curves, key=len)]
    out = []
    for t in sorted(common):
        vals = [p for c in curves for tt, p in c if tt == t]
        out.append((t, statistics.fmean(vals)))
    return out


def plot_ppl_vs_tokens(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = ""
) -> None:
    """Validation perplexity (log scale) against training tokens, one line per preset."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    finals = []
    for i, r in enumerate(rows):
        curve = _mean_curve(r["curves"])
        if not curve:
            continue
        xs = [t for t, _ in curve]
        ys = [p for _, p in curve]
        label = r["preset"]
        style = "--" if r.get("kind") == "baseline" else "-"
        if r["status"] == "diverged":
            label += " (diverged)"
        line = ax.plot(xs, ys, style, marker="o", ms=3, lw=1.5, label=label, color=f"C{i % 10}")[0]
        if r["status"] == "diverged":
            ax.plot(xs[-1:], ys[-1:], "x", ms=10, mew=2, color=line.get_color())
        else:
            finals.append(ys[-1])
    if finals:
        finite = [y for y in finals if math.isfinite(y)]
        if finite:
            ax.set_ylim(min(finite) * 0.9, min(max(finite) * 3, min(finite) * 30))
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title or "validation perplexity during training")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing finished yet (--report-only): no legend
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ppl_vs_memory(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = ""
) -> None:
    """Final perplexity against optimizer-state bytes, the Pareto front drawn (lower-left wins).

    Error bars span the seeds' min and max; a diverged preset sits on the top edge, marked x.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    points = [r for r in rows if r["val_ppl_mean"] is not None and r["state_bytes"] is not None]
    ys = [r["val_ppl_mean"] for r in points]
    top = max(ys) * 1.25 if ys else 10.0
    bottom = min(ys) * 0.9 if ys else 1.0
    for i, r in enumerate(rows):
        if r["state_bytes"] is None:
            continue
        x = r["state_bytes"] / 1e6
        color = f"C{i % 10}"
        marker = "s" if r.get("kind") == "baseline" else "o"
        if r["val_ppl_mean"] is None:
            if r["status"] != "diverged":
                continue
            ax.plot([x], [top], "x", ms=10, mew=2, color=color)
            ax.annotate(f"{r['preset']} (diverged)", (x, top), textcoords="offset points",
                        xytext=(5, -12), fontsize=8, color=color)  # fmt: skip
            continue
        y = r["val_ppl_mean"]
        err = None
        if r["val_ppl_min"] is not None and r["val_ppl_max"] is not None:
            err = [[y - r["val_ppl_min"]], [r["val_ppl_max"] - y]]
        ax.errorbar([x], [y], yerr=err, fmt=marker, ms=7, capsize=3, color=color)
        ax.annotate(r["preset"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = []
    best = math.inf
    for r in sorted(points, key=lambda r: (r["state_bytes"], r["val_ppl_mean"])):
        if r["val_ppl_mean"] < best:
            best = r["val_ppl_mean"]
            front.append((r["state_bytes"] / 1e6, best))
    if len(front) > 1:
        fx = [x for x, _ in front]
        fy = [y for _, y in front]
        ax.step(fx, fy, where="post", color="gray", lw=1, ls=":", label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_ylim(bottom, top * 1.08)
    ax.set_xlabel("optimizer state (MB, exact bytes of the state tensors)")
    ax.set_ylabel("final validation perplexity")
    ax.set_title(title or "perplexity against optimizer-state memory")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(sweeps: dict[str, dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """One panel per preset: short-budget validation loss against each rule's lr multiplier."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    names = [p for p, s in sweeps.items() if s.get("by_rule")]
    if not names:
        return
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), dpi=110, squeeze=False)
    for ax, preset in zip(axes.flat, names):
        sweep = sweeps[preset]
        finite_losses = []
        for j, (rule, per_rule) in enumerate(sweep["by_rule"].items()):
            # a trial not finished yet (--report-only) has no loss to draw
            pts = sorted(
                (m, loss) for m, loss, st in per_rule if st != "diverged" and math.isfinite(loss)
            )
            bad = [m for m, _, st in per_rule if st == "diverged"]
            if pts:
                ax.plot([m for m, _ in pts], [v for _, v in pts], "o-", color=f"C{j}", label=rule)
                finite_losses += [v for _, v in pts]
            chosen = sweep["chosen"].get(rule)
            hit = [v for m, v in pts if m == chosen]
            if hit:
                ax.plot([chosen], hit, "*", ms=14, color=f"C{j}")
            for m in bad:
                ax.axvline(m, color=f"C{j}", ls=":", lw=1)
        if finite_losses:
            lo, hi = min(finite_losses), max(finite_losses)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), min(hi, lo + 2.0) + 0.05 * (hi - lo + 1e-3))
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"×{v:g}"))
        ax.set_title(preset, fontsize=10)
        ax.set_xlabel("lr multiplier (dotted: diverged)", fontsize=8)
        ax.set_ylabel("val loss", fontsize=8)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = [
    "CSV_FIELDS",
    "format_bytes",
    "format_seconds",
    "markdown_table",
    "plot_ppl_vs_memory",
    "plot_ppl_vs_tokens",
    "plot_sweep",
    "read_csv",
    "summarize",
    "sweep_table",
    "text_table",
    "write_csv",
]
