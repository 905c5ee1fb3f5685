"""The harness's example in docs/train.md runs (its docstring examples run in tests/test_docs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_trainer_example_in_docs_runs(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    doc = (Path(__file__).parents[2] / "docs" / "train.md").read_text()
    code = doc.split("## Inside Hugging Face `Trainer`", 1)[1].split("```python", 1)[1]
    code = code.split("```", 1)[0]
    assert "optimizers=(optimizer, scheduler)" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("max_steps=100", "max_steps=3"), "docs/train.md", "exec"), {})
