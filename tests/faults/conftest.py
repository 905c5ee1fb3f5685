"""Fixtures of the fault-injection suite: a shared token cache and tiny run configs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from fault_helpers import DATA, TINY

from slimopt.train import TrainConfig


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the suite, filled once (never the user's ~/.cache)."""
    cache = str(tmp_path_factory.mktemp("slimopt-cache"))
    from slimopt.train.data import prepare_data

    prepare_data(DATA, vocab_size=512, cache_dir=cache)
    return cache


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, cache_dir):
    monkeypatch.setenv("SLIMOPT_CACHE", cache_dir)


@pytest.fixture
def make_config(tmp_path, cache_dir) -> Callable[..., TrainConfig]:
    counter = iter(range(1000))

    def make(**overrides) -> TrainConfig:
        base = TrainConfig(**TINY, max_steps=8, save_every=0, cache_dir=cache_dir,
                           out=str(tmp_path / f"run{next(counter)}"))  # fmt: skip
        return dataclasses.replace(base, **overrides)

    return make
