"""The pretraining harness: named models, corpora and tokenized shards, the training loop, checkpoints.

Submodules are imported on use (``from slimopt.train.models import build_model``) so that building a
model on the meta device does not pay for the tokenizer or the loop.
"""

from __future__ import annotations

from typing import Any

from slimopt._extras import check_installed

check_installed(("numpy", "transformers", "tokenizers", "tqdm"))  # one line naming the extra

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from slimopt.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
