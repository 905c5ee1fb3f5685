"""Shared fixtures for the library tests."""

from __future__ import annotations

import pytest
from lm_models import tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()
