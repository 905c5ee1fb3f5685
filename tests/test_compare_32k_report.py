"""The verdict rules of the 32k-vocabulary report (benchmarks/compare_32k_report.py), on made-up
rows: the tie rule, the third-seed rule, pending verdicts, the regime change and the rare-token
reading, and the section's in-place replacement in docs/results.md."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rep():
    path = ROOT / "benchmarks" / "compare_32k_report.py"
    spec = importlib.util.spec_from_file_location("compare_32k_report", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_32k_report"] = module
    spec.loader.exec_module(module)
    return module


def row(ppl: float, lo: float | None = None, hi: float | None = None, done: int = 2, want: int = 2):
    return {
        "status": "ok",
        "ppl": ppl,
        "std": None,
        "lo": ppl if lo is None else lo,
        "hi": ppl if hi is None else hi,
        "seeds_done": done,
        "seeds": want,
        "ratio": 0.5,
    }


def test_tie_rule_and_third_seed(rep):
    # 5% apart, ranges apart: better, no third seed
    assert rep.pair_verdict(row(95, 94, 96), row(100, 99, 101)) == ("better", pytest.approx(0.95))
    # 5% apart, ranges overlapping: only one condition holds -> a third seed
    assert rep.pair_verdict(row(95, 90, 100), row(100, 99, 101))[0] == "needs a third seed"
    # 1% apart, ranges apart: only one condition holds -> a third seed
    assert rep.pair_verdict(row(99, 98.9, 99.1), row(100, 99.9, 100.1))[0] == "needs a third seed"
    # 1% apart, ranges overlapping: a plain tie
    assert rep.pair_verdict(row(99, 97, 101), row(100, 98, 102))[0] == "tie"
    # a preset with a seed missing keeps every verdict on it pending
    assert rep.pair_verdict(row(95, done=1), row(100))[0] == "pending"


def test_claims_use_the_committed_thresholds(rep):
    rows = {
        "sage-hybrid": row(100, 99, 101),
        "lion-hybrid": row(110, 109, 111),
        "sinkgd-hybrid": row(96, 95.5, 96.5),  # SAGE 4.2% worse: still "matches"
        "adamw": row(100.5, 98, 103),
        "sinkgd-pure": row(115, 114, 116),  # 15% and 20% worse: weakly
        "scale": row(120, 119, 121),
    }
    verdicts = {c.split(":")[0]: v for c, _, v in rep.claims(rows)}
    assert verdicts["The damping pays at a large vocabulary"] == "**holds**"
    assert verdicts["SAGE-Hybrid matches AdamW on the embedding at a fraction of its state"] == (
        "**holds**"
    )
    assert verdicts["SAGE-Hybrid beats AdamW"] == "**does not hold** (a tie)"
    assert verdicts["Stateless fails on the embedding"].startswith("**weakly**")
    assert verdicts["SCALE matches AdamW"] == "**does not hold**"
    rows["sinkgd-hybrid"] = row(90, 89.5, 90.5)  # SAGE 11% worse
    verdicts = {c.split(":")[0]: v for c, _, v in rep.claims(rows)}
    assert verdicts["SAGE-Hybrid matches AdamW on the embedding at a fraction of its state"] == (
        "**does not hold**"
    )


def test_regime_change_against_the_combined_spread(rep):
    r8 = {"a": row(100, 99, 101), "b": row(100, 99, 101)}  # ratio 1.00, half-ranges 1% each
    toward = {"a": row(90, 89, 91), "b": row(100, 99, 101)}  # 0.90: falls 10% > ~4.1%
    same = {"a": row(98, 97, 99), "b": row(100, 99, 101)}  # 0.98: falls 2% < ~4.0%
    away = {"a": row(110, 109, 111), "b": row(100, 99, 101)}
    assert rep.regime_change(toward, r8, "a", "b")[2] == "moves toward a"
    assert rep.regime_change(same, r8, "a", "b")[2] == "unchanged"
    assert rep.regime_change(away, r8, "a", "b")[2] == "moves away from a"
    pending = {"a": row(90, done=1), "b": row(100)}
    assert rep.regime_change(pending, r8, "a", "b")[2] == "pending"


def test_8k_rows_come_from_the_committed_results_table(rep):
    text = (ROOT / "docs" / "results.md").read_text()
    rows = rep.rows_8k(text)
    assert {"adamw", "sage-hybrid", "lion-hybrid", "sinkgd-hybrid", "sinkgd-pure", "scale"} <= set(
        rows
    )
    assert "galore" not in rows  # the baselines' rows are not presets
    sage = rows["sage-hybrid"]
    # two seeds: the range is mean -/+ std / sqrt(2)
    assert sage["hi"] - sage["lo"] == pytest.approx(2 * sage["std"] / math.sqrt(2))


def _run(out: Path, preset: str, seed: int, rare: float) -> None:
    d = out / "runs" / preset / f"seed-{seed}"
    d.mkdir(parents=True)
    split = [{"bucket": "top 1k", "loss": 5.0, "tokens": 10}, {"bucket": "8k-32k", "loss": rare}]
    final = {"status": "completed", "val_loss_by_frequency": split}
    (d / "final.json").write_text(json.dumps(final))


def test_rare_bucket_reading(rep, tmp_path):
    for seed, (s, lh, sh) in enumerate([(11.50, 11.60, 11.51), (11.52, 11.62, 11.55)]):
        _run(tmp_path, "sage-hybrid", seed, s)
        _run(tmp_path, "lion-hybrid", seed, lh)
        _run(tmp_path, "sinkgd-hybrid", seed, sh)
    assert rep.mechanism(tmp_path, "sage-hybrid", "lion-hybrid", 2)[1] == "**lower**"
    # 0.02 nats apart, ranges overlapping: tied
    assert rep.mechanism(tmp_path, "sage-hybrid", "sinkgd-hybrid", 2)[1] == "**tied**"
    assert rep.mechanism(tmp_path, "sage-hybrid", "lion-hybrid", 3)[1] == "pending"


def test_section_is_replaced_in_place(rep):
    text = "# Title\n\nintro\n\n## Claims\n\ntable\n\n## Discussion\n\nwords\n"
    once = rep.replace_section(text, f"{rep.BEGIN}\nfirst\n{rep.END}")
    twice = rep.replace_section(once, f"{rep.BEGIN}\nsecond\n{rep.END}")
    assert twice.count(rep.BEGIN) == 1 and "second" in twice and "first" not in twice
    assert twice.count(rep.LARGE_VOCAB_POINTER) == 1
    assert twice.index(rep.LARGE_VOCAB_POINTER) < twice.index("## Claims")
    assert twice.replace(rep.LARGE_VOCAB_POINTER + "\n\n", "").startswith(text.rstrip("\n"))


def test_stateless_rule_levels(rep):
    fails = sys.modules["compare_claims"].stateless_fails
    assert fails({"status": "diverged"}, None, None) == "diverged"
    assert fails(row(130), 1.30, 1.26) == "holds"
    assert fails(row(130), 1.30, 1.10) == "weakly"
    assert fails(row(130), 1.30, 1.01) == "no"
    assert fails(row(130), None, 1.3) == "missing"


def test_an_added_seed_does_not_hide_a_missing_one(rep):
    rows = {"sage-hybrid": row(100, done=3), "scale": row(120, done=1)}
    assert rep.full_runs(rows) == (3, 4)  # scale's second seed is still missing
    rows["scale"] = row(120)
    assert rep.full_runs(rows) == (4, 4)
