"""The documentation runs: docstring examples of the library and the README's training loop."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

LIBRARY_MODULES = [
    "slimopt",
    "slimopt.optimizer",
    "slimopt.presets",
    "slimopt.roles",
    "slimopt.memory",
]


@pytest.mark.parametrize("name", LIBRARY_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_readme_training_loop_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Use it in any training loop", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert 'create_optimizer("sage-hybrid", model)' in code
    exec(compile(code.replace("range(1000)", "range(3)"), "README.md", "exec"), {})
