"""Fixtures for the harness tests: a small slice of the stdlib corpus, tokenized once per session."""

from __future__ import annotations

import dataclasses

import pytest

from slimopt.train import TrainConfig

# A slice of the built-in corpus: the stdlib's email package (about 0.35 MB of train text).
DATA = "stdlib:email"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the whole session, never the user's ~/.cache."""
    return str(tmp_path_factory.mktemp("slimopt-cache"))


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, cache_dir):
    monkeypatch.setenv("SLIMOPT_CACHE", cache_dir)


@pytest.fixture
def make_config(tmp_path, cache_dir):
    """A TrainConfig for a seconds-long llama-tiny run in a fresh directory under tmp_path."""
    counter = iter(range(1000))

    def make(**overrides) -> TrainConfig:
        base = TrainConfig(
            model="llama-tiny",
            preset="adamw",
            data=DATA,
            vocab_size=512,
            seq_len=64,
            batch_size=4,
            max_steps=12,
            eval_every=0,
            eval_tokens=2048,
            save_every=0,
            log_every=1,
            progress="none",
            cache_dir=cache_dir,
            out=str(tmp_path / f"run{next(counter)}"),
        )
        return dataclasses.replace(base, **overrides)

    return make
