"""Write the "Large vocabulary" section of ``docs/results.md`` from a finished (or unfinished)
32,000-token-vocabulary comparison, with the 8,192-vocabulary results beside it.

    python benchmarks/compare_32k_report.py runs/compare-32k --results docs/results.md

The verdicts follow the rules in ``benchmarks/compare_32k.md``, committed before the full runs;
every number comes from the comparison directory (``results.csv``, ``results.md``, the runs'
``final.json`` and ``metrics.jsonl``) or, for the 8k vocabulary, from the ``## Results`` table of
``docs/results.md`` itself. The section sits between two HTML comments and replaces the previous
one, so rerunning after more runs finish updates it in place; ``compare_claims.py`` carries it
over when it rewrites the rest of the file.

While runs are missing, every verdict says *pending* and the section says how many runs are in.
Where a verdict turns on one of the tie rule's two conditions alone (the means more than 2% apart
but the seeds' ranges overlapping, or the ranges apart but the means within 2%), the committed
rules ask for a third seed before it is written: the verdict then reads *needs a third seed*.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_claims import (  # noqa: E402
    LARGE_VOCAB_POINTER,
    _pct,
    _section,
    budget,
    compare_ppl,
    load_rows,
    stateless_fails,
)

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "benchmarks" / "compare_32k.md"
BEGIN = "<!-- large-vocabulary section: written by benchmarks/compare_32k_report.py -->"
END = "<!-- end of the large-vocabulary section -->"
PREFIX = "results32k_"
PLOTS = (
    "ppl_vs_tokens.png",
    "loss_by_frequency.png",
    "embedding_rows_touched.png",
    "sweep.png",
    "ppl_vs_memory.png",
)
NAMES = {
    "adamw": "AdamW",
    "lion": "Lion",
    "sage-hybrid": "SAGE-Hybrid",
    "lion-hybrid": "Lion-Hybrid",
    "sinkgd-hybrid": "SinkGD-Hybrid",
    "scale": "SCALE",
    "sinkgd-pure": "SinkGD-Pure",
}
# (first, second): the pairs the committed rules compare; the regime change is read for each
PAIRS = (
    ("sage-hybrid", "lion-hybrid"),
    ("sage-hybrid", "sinkgd-hybrid"),
    ("sage-hybrid", "adamw"),
    ("sinkgd-pure", "sage-hybrid"),
    ("sinkgd-pure", "sinkgd-hybrid"),
    ("scale", "adamw"),
)


# ----------------------------------------------------------------------------- inputs


def rows_8k(results_md: str) -> dict[str, dict[str, Any]]:
    """The 8k comparison's perplexities from the ``## Results`` table of ``docs/results.md``.

    That table gives mean ± sample standard deviation over its seeds; with two seeds the range
    (min to max) is exactly mean ∓ std / √2, which is what the range rules need."""
    seeds_m = re.search(r"seeds: (\d+)", _section(results_md, "Setup"))
    seeds = int(seeds_m.group(1)) if seeds_m else 2
    rows: dict[str, dict[str, Any]] = {}
    for line in _section(results_md, "Results").splitlines():
        m = re.match(r"\| ([a-z0-9-]+) \| ([0-9.]+)(?: ± ([0-9.]+))? \|", line)
        if not m:
            continue
        mean, std = float(m.group(2)), float(m.group(3) or 0.0)
        half = std / math.sqrt(2) if seeds == 2 else std
        rows[m.group(1)] = {
            "preset": m.group(1),
            "status": "ok",
            "ppl": mean,
            "std": std,
            "lo": mean - half,
            "hi": mean + half,
            "seeds_done": seeds,
            "seeds": seeds,
        }
    return rows


def seed_records(out: Path, preset: str) -> list[dict[str, Any]]:
    """Each finished full run's ``final.json`` for one preset, by seed."""
    records = []
    for final in sorted((out / "runs" / preset).glob("seed-*/final.json")):
        data = json.loads(final.read_text())
        if data.get("status") in ("completed", "diverged"):
            records.append(data)
    return records


def rare_losses(out: Path, preset: str, bucket: int = -1) -> list[float]:
    """The validation loss on one frequency bucket (the rarest by default), one value per seed."""
    values = []
    for data in seed_records(out, preset):
        split = data.get("val_loss_by_frequency") or []
        if split and math.isfinite(split[bucket]["loss"]):
            values.append(split[bucket]["loss"])
    return values


def table_share(header: str) -> str:
    """', so the embedding and head hold N% of the P parameters', read from the comparison's
    model line ("hidden 128, 4 layers, vocabulary 32,000, 9.00M parameters"), or ''."""
    m = re.search(r"hidden (\d+),.*?vocabulary ([\d,]+), ([\d.]+)M parameters", header)
    if not m:
        return ""
    hidden, vocab, params = int(m.group(1)), int(m.group(2).replace(",", "")), float(m.group(3))
    share = 2 * hidden * vocab / (params * 1e6)
    return f", so the embedding and head hold {share:.0%} of the {params:.1f}M parameters"


def busy_hours(out: Path) -> float:
    """Training time of every run at its own median throughput (tokens / median tokens/s of its
    logged intervals): the sum of wall times would also count time a process was stopped."""
    total = 0.0
    for metrics in out.glob("*/*/*/metrics.jsonl"):
        rates, tokens = [], 0
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "tokens_per_s" in rec:
                rates.append(rec["tokens_per_s"])
                tokens = max(tokens, rec["tokens"])
        if rates:
            total += tokens / statistics.median(rates)
    return total / 3600


# ----------------------------------------------------------------------------- verdicts


def third_seed_needed(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """True when the tie rule's two conditions disagree: the means more than 2% apart while the
    seeds' ranges overlap, or the ranges apart while the means are within 2%."""
    if not complete(a) or not complete(b) or a["status"] == "diverged" or b["status"] == "diverged":
        return False
    ratio = a["ppl"] / b["ppl"]
    apart = a["hi"] < b["lo"] or b["hi"] < a["lo"]
    return (abs(ratio - 1) > 0.02) != apart


def complete(row: dict[str, Any] | None) -> bool:
    return (
        row is not None
        and (row.get("ppl") is not None or row.get("status") == "diverged")
        and int(row.get("seeds_done") or 0) >= int(row.get("seeds") or 1)
    )


def pair_verdict(a: dict[str, Any] | None, b: dict[str, Any] | None) -> tuple[str, float | None]:
    """compare_claims' better / worse / tie, or 'pending' while either preset lacks seeds, or
    'needs a third seed' where the committed rules ask for one."""
    verdict, ratio = compare_ppl(a, b)
    if not complete(a) or not complete(b):
        return "pending", ratio
    if third_seed_needed(a, b):
        return "needs a third seed", ratio
    return verdict, ratio


def _ppl(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if row.get("status") == "diverged":
        return "diverged"
    if row.get("ppl") is None:
        return "pending"
    text = f"{row['ppl']:.1f}"
    if row.get("lo") is not None and row.get("hi") is not None and row["hi"] > row["lo"]:
        text += f" ({row['lo']:.1f}–{row['hi']:.1f})"
    done, want = int(row.get("seeds_done") or 0), int(row.get("seeds") or 0)
    if want and done < want:
        text += f" [{done} of {want} seeds]"
    return text


def _matches(verdict: str, ratio: float | None) -> str:
    """'X matches Y': better, tied, or worse by at most 5%."""
    if verdict in ("better", "tie") or (verdict == "worse" and ratio is not None and ratio <= 1.05):
        return "**holds**"
    return "**does not hold**" if verdict == "worse" else verdict


def claims(rows: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(claim, measured, verdict) for the committed rules, in their order."""
    g = rows.get
    sage, lion_h, sink_h = g("sage-hybrid"), g("lion-hybrid"), g("sinkgd-hybrid")
    adamw, pure, scale = g("adamw"), g("sinkgd-pure"), g("scale")
    out = []

    v, r = pair_verdict(sage, lion_h)
    holds = {"better": "**holds**", "tie": "**not seen** (a tie)", "worse": "**fails**"}
    out.append((
        "The damping pays at a large vocabulary: SAGE-Hybrid better than Lion-Hybrid (the same "
        "SinkGD matrices; sign updates with and without SAGE's damping on embedding and head)",
        f"SAGE-Hybrid {_ppl(sage)} vs Lion-Hybrid {_ppl(lion_h)} ({_pct(r)}, {v})",
        holds.get(v, v),
    ))  # fmt: skip

    v, r = pair_verdict(sage, sink_h)
    out.append((
        "SAGE-Hybrid matches AdamW on the embedding at a fraction of its state: against "
        "SinkGD-Hybrid (the same SinkGD matrices, AdamW on embedding and head), better, tied or "
        "at most 5% worse",
        f"SAGE-Hybrid {_ppl(sage)} vs SinkGD-Hybrid {_ppl(sink_h)} ({_pct(r)}, {v})",
        _matches(v, r),
    ))  # fmt: skip

    v, r = pair_verdict(sage, adamw)
    verdict = {"better": "**holds**", "tie": "**does not hold** (a tie)"}.get(v)
    verdict = verdict or ("**does not hold**" if v == "worse" else v)
    out.append((
        "SAGE-Hybrid beats AdamW",
        f"SAGE-Hybrid {_ppl(sage)} vs AdamW {_ppl(adamw)} ({_pct(r)}, {v})",
        verdict,
    ))  # fmt: skip

    _, r1 = compare_ppl(pure, sage)
    _, r2 = compare_ppl(pure, sink_h)
    if not (complete(pure) and complete(sage) and complete(sink_h)):
        verdict = "pending"
    else:
        verdict = {
            "diverged": "**holds**: SinkGD-Pure diverged",
            "holds": "**holds**",
            "weakly": "**weakly** (5–25% worse than both)",
            "no": "**does not hold**",
        }.get(stateless_fails(pure, r1, r2), "not measured")
    out.append((
        "Stateless fails on the embedding: SinkGD-Pure diverges or is at least 25% worse than "
        "both SAGE-Hybrid and SinkGD-Hybrid (5–25%: weakly)",
        f"SinkGD-Pure {_ppl(pure)}: {_pct(r1)} vs SAGE-Hybrid, {_pct(r2)} vs SinkGD-Hybrid",
        verdict,
    ))  # fmt: skip

    v, r = pair_verdict(scale, adamw)
    out.append((
        "SCALE matches AdamW: better, tied or at most 5% worse",
        f"SCALE {_ppl(scale)} vs AdamW {_ppl(adamw)} ({_pct(r)}, {v})",
        _matches(v, r),
    ))  # fmt: skip
    return out


def _half(row: dict[str, Any]) -> float:
    """The relative half-range of a preset's perplexity over its seeds."""
    return (row["hi"] - row["lo"]) / 2 / row["ppl"]


def regime_change(
    rows32: dict[str, dict[str, Any]], rows8: dict[str, dict[str, Any]], a: str, b: str
) -> tuple[float | None, float | None, str]:
    """(ratio a/b at 8k, ratio at 32k, reading): the gap *moves toward* a when the ratio falls by
    more than the two ratios' combined relative half-ranges, *away from* a when it rises by more,
    and is *unchanged* otherwise."""
    x32, y32, x8, y8 = rows32.get(a), rows32.get(b), rows8.get(a), rows8.get(b)
    if any(r is None or r.get("ppl") is None or r.get("status") == "diverged"
           for r in (x32, y32, x8, y8)):  # fmt: skip
        return None, None, "not measured"
    r8, r32 = x8["ppl"] / y8["ppl"], x32["ppl"] / y32["ppl"]
    if not (complete(x32) and complete(y32)):
        return r8, r32, "pending"
    spread = _half(x32) + _half(y32) + _half(x8) + _half(y8)
    change = r32 / r8 - 1
    if change < -spread:
        return r8, r32, f"moves toward {NAMES.get(a, a)}"
    if change > spread:
        return r8, r32, f"moves away from {NAMES.get(a, a)}"
    return r8, r32, "unchanged"


def mechanism(out: Path, a: str, b: str, seeds: int) -> tuple[str, str]:
    """(measured, reading) for the rarest bucket: *lower*/*higher* when the mean losses differ by
    more than 0.02 nats and the seeds' ranges do not overlap, else *tied*."""
    la, lb = rare_losses(out, a), rare_losses(out, b)
    if not la or not lb:
        return "not run", "pending"
    ma, mb = sum(la) / len(la), sum(lb) / len(lb)

    def span(v: list[float]) -> str:
        return f"{sum(v) / len(v):.3f}" + (f" ({min(v):.3f}–{max(v):.3f})" if len(v) > 1 else "")

    measured = f"{NAMES[a]} {span(la)} vs {NAMES[b]} {span(lb)} ({ma - mb:+.3f} nats)"
    if len(la) < seeds or len(lb) < seeds:
        return measured + f" [{min(len(la), len(lb))} of {seeds} seeds]", "pending"
    apart = max(la) < min(lb) or max(lb) < min(la)
    if abs(ma - mb) > 0.02 and apart:
        return measured, "**lower**" if ma < mb else "**higher**"
    return measured, "**tied**"


# ----------------------------------------------------------------------------- the section


def full_runs(rows: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """(finished, planned) full runs: the seeds each preset was planned with, so a seed added past
    ``--seeds`` to one preset does not hide a seed still missing from another."""
    done = sum(min(r["seeds_done"], r["seeds"]) for r in rows.values())
    return done, sum(r["seeds"] for r in rows.values())


def section(src: Path, results_md: str, docs: Path) -> str:
    """The Markdown of the section; copies the comparison's plots into ``docs``."""
    rows = load_rows(src)
    for row in rows.values():  # load_rows keeps the CSV's strings for these
        row["seeds_done"] = int(row.get("seeds_done") or 0)
        row["seeds"] = int(row.get("seeds") or 0)
        if row["std"] is None and row["ppl"] is not None and row["seeds_done"] == 1:
            row["lo"] = row["hi"] = row["ppl"]
    rows8 = rows_8k(results_md)
    cmp_md = (src / "results.md").read_text()
    header = cmp_md.split("## Results")[0].split("\n", 1)[1].strip()
    # the training time of the call that wrote results.md (here: --report-only) says nothing
    header = re.sub(r"; [^;\n]* of training in this invocation", "", header)
    seeds = max((r["seeds"] for r in rows.values()), default=2)
    done, wanted = full_runs(rows)
    spent = budget(src)

    plots = {}
    for name in PLOTS:
        if (src / name).exists():
            plots[name] = PREFIX + name
            shutil.copyfile(src / name, docs / plots[name])

    def relink(md: str) -> str:
        for name, new in plots.items():
            md = md.replace(f"]({name})", f"]({new})")
        return md

    lines = [
        BEGIN,
        "## Large vocabulary: the SAGE claim in its regime (32,000 tokens)",
        "",
        "The SAGE paper's argument is about the embedding of a large vocabulary, where Zipfian "
        "token frequencies leave most rows updated rarely. The comparison above used 8,192 tokens, "
        "where every row is updated often. This one keeps llama-tiny's widths and gives it a "
        "32,000-token BPE vocabulary trained on the same enwiki text (the GaLore/SCALE LLaMA "
        f"vocabulary size){table_share(header)}. Generated by "
        "`bash benchmarks/compare_32k.sh` (the comparison, resumable), then "
        "`python benchmarks/compare_32k_report.py runs/compare-32k`; the verdict rules in "
        "`benchmarks/compare_32k.md` were committed before any full-budget run finished.",
        "",
        f"Compute actually used: {spent['runs']} training runs ({spent['sweep_runs']} of them in "
        f"the learning-rate sweep), {spent['tokens'] / 1e6:.1f}M training tokens, "
        f"{busy_hours(src):.1f} hours of training at each run's median throughput (runs went two "
        "at a time, one torch thread each, on a 2-core CPU; no GPU).",
        "",
    ]
    if done < wanted:
        lines += [
            f"**Unfinished: {done} of {wanted} full runs are in.** Verdicts that need the missing "
            "runs say *pending*; the numbers marked [k of n seeds] are means over the seeds "
            "finished so far.",
            "",
        ]
    lines += [
        "### Setup",
        "",
        header.replace("Command: `", "Comparison command: `"),
        "",
        "### Verdicts",
        "",
        "| claim | measured at 32k (perplexity, mean and seeds' range) | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {m} | {v} |" for c, m, v in claims(rows)]
    lines += [
        "",
        "Rules (`benchmarks/compare_32k.md`): two presets differ when their mean perplexities "
        "differ by more than 2% and their seeds' ranges do not overlap, otherwise they tie; where "
        "only one of those two conditions holds, a third seed is run before the verdict is written.",
        "",
        "### Beside the 8,192-token vocabulary",
        "",
        "| pair (first / second) | perplexity ratio at 8k | at 32k | the gap |",
        "|---|---|---|---|",
    ]
    for a, b in PAIRS:
        r8, r32, reading = regime_change(rows, rows8, a, b)
        f8 = "–" if r8 is None else f"{r8:.3f}"
        f32 = "–" if r32 is None else f"{r32:.3f}"
        lines.append(f"| {NAMES[a]} / {NAMES[b]} | {f8} | {f32} | {reading} |")
    lines += [
        "",
        "A ratio below 1 means the first preset has the lower perplexity. The gap moves toward "
        "the first preset when its ratio falls from 8k to 32k by more than the two comparisons' "
        "combined seed spread (the sum of the four perplexities' relative half-ranges; the 8k "
        "ranges are mean ∓ std/√2, exact for its two seeds), away when it rises by more.",
        "",
        "| preset | perplexity at 8k | at 32k | state vs AdamW at 32k |",
        "|---|---|---|---|",
    ]
    for name in NAMES:
        r32, r8 = rows.get(name), rows8.get(name)
        ratio = "–" if r32 is None or r32["ratio"] is None else f"{r32['ratio']:.2f}×"
        lines.append(f"| {name} | {_ppl(r8)} | {_ppl(r32)} | {ratio} |")
    lines += [
        "",
        "### The mechanism: rare tokens",
        "",
        "| rarest bucket (training-frequency rank 8,000 and beyond) | mean validation loss | "
        "reading |",
        "|---|---|---|",
    ]
    for b in ("lion-hybrid", "sinkgd-hybrid"):
        measured, reading = mechanism(src, "sage-hybrid", b, seeds)
        lines.append(f"| SAGE-Hybrid vs {NAMES[b]} | {measured} | {reading} |")
    lines += [
        "",
        "*Lower*/*higher*: the means differ by more than 0.02 nats and the seeds' ranges do not "
        "overlap; otherwise *tied*.",
        "",
    ]
    rare = _section(cmp_md, "Rare tokens")
    if rare:
        lines += [relink(rare), ""]
    lines += ["### Results", "", relink(_section(cmp_md, "Results")), ""]
    sweep = _section(cmp_md, "Learning-rate sweep")
    if sweep:
        lines += ["### Learning-rate sweep", "", relink(sweep), ""]
    notes = _section(RULES.read_text(), "Discussion") if RULES.is_file() else ""
    if notes:
        lines += ["### Discussion", "", notes, ""]
    lines.append(END)
    return "\n".join(lines)


def replace_section(text: str, new: str) -> str:
    """``text`` with its large-vocabulary section replaced by ``new`` (appended when absent), and
    the line at the top that points to it (before ``## Claims``, once)."""
    if LARGE_VOCAB_POINTER not in text and "\n## Claims\n" in text:
        text = text.replace("\n## Claims\n", f"\n{LARGE_VOCAB_POINTER}\n\n## Claims\n", 1)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + new + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + new + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_dir", type=Path, nargs="?", default=ROOT / "runs/compare-32k")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)
    text = args.results.read_text()
    new = section(args.compare_dir, text, args.results.parent)
    args.results.write_text(replace_section(text, new))
    print(f"wrote the large-vocabulary section of {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
