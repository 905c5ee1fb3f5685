"""``frequency_eval``: the validation loss per bucket of training frequency, and the share of
embedding rows that receive a gradient per step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from slimopt.train import train
from slimopt.train.loop import ConfigError


def test_a_run_reports_loss_by_frequency_and_rows_touched(make_config):
    cfg = make_config(max_steps=4, frequency_eval=(16, 128))
    final = train(cfg)
    split = {b["bucket"]: b for b in final["val_loss_by_frequency"]}
    assert list(split) == ["top 16", "16-128", "128-512"]
    counted = sum(b["tokens"] for b in split.values())
    assert counted == final["eval_tokens"]
    # the buckets' token-weighted mean is the validation loss itself
    mean = sum(b["loss"] * b["tokens"] for b in split.values() if b["tokens"]) / counted
    assert mean == pytest.approx(final["val_loss"], rel=1e-5)
    # frequent targets are easier than rare ones after a few steps of any optimizer
    assert split["top 16"]["loss"] < split["128-512"]["loss"]
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    shares = [r["embedding_rows_touched"] for r in rows if "loss" in r]
    assert len(shares) == 4 and all(0 < s <= 1 for s in shares)
    # 4 sequences x 64 tokens cannot touch more rows than they hold distinct tokens
    assert max(shares) <= 256 / 512


@pytest.mark.parametrize("edges", [(), (8, 4), (0, 4), ("a",), "16,128"])
def test_bad_ranks_are_refused_before_training(make_config, edges):
    with pytest.raises(ConfigError, match="frequency_eval"):
        train(make_config(frequency_eval=edges))


def test_off_by_default(make_config):
    final = train(make_config(max_steps=2))
    assert "val_loss_by_frequency" not in final and math.isfinite(final["val_loss"])
