"""The harness's docstring examples run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "slimopt.train.models",
    "slimopt.train.data",
    "slimopt.train.checkpoint",
    "slimopt.train.loop",
    "slimopt.train.cli",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
