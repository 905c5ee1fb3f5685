"""The harness's docstring examples run."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

MODULES = [
    "slimopt.train.models",
    "slimopt.train.data",
    "slimopt.train.checkpoint",
    "slimopt.train.loop",
    "slimopt.train.cli",
    "slimopt.train.parallel",
    "slimopt.train.faults",
    "slimopt.train.outputs",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_trainer_example_in_docs_runs(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    doc = (Path(__file__).parents[2] / "docs" / "train.md").read_text()
    code = doc.split("## Inside Hugging Face `Trainer`", 1)[1].split("```python", 1)[1]
    code = code.split("```", 1)[0]
    assert "optimizers=(optimizer, scheduler)" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("max_steps=100", "max_steps=3"), "docs/train.md", "exec"), {})
