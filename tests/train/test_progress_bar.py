"""The tqdm progress bar (what a terminal gets) runs to the end and closes."""

from __future__ import annotations

import json

from slimopt.train import TrainConfig, train


def test_progress_bar_run_completes(tmp_path, capsys):
    result = train(
        TrainConfig(
            preset="adamw",
            data="stdlib:json",
            vocab_size=512,
            seq_len=32,
            max_steps=3,
            out=str(tmp_path / "run"),
            cache_dir=str(tmp_path / "cache"),
            progress="bar",
        )
    )
    assert result["status"] == "completed"
    assert json.loads((tmp_path / "run" / "final.json").read_text())["steps"] == 3
    assert "3/3" in capsys.readouterr().err
