"""Importing this module registers ``<model>_slimopt`` for every torchtitan 0.2 model (torchtitan
0.3 has no train specs: its jobs name ``--module slimopt.integrations.torchtitan``).

A torchtitan job names it so its optimizer builder knows slimopt, with no code of its own::

    torchrun ... -m torchtitan.train --job.config_file llama3_debug.toml \\
        --experimental.custom_import slimopt.integrations.torchtitan_register \\
        --job.custom_config_module slimopt.integrations.torchtitan \\
        --model.name llama3_slimopt --optimizer.name sage-hybrid --optimizer.lr 4e-3

A model whose module cannot be imported here (a missing optional dependency of that model) is
skipped; ``REGISTERED`` lists the names that were registered.
"""

from __future__ import annotations

from slimopt.integrations.torchtitan import TORCHTITAN_API, register

if TORCHTITAN_API >= (0, 3):
    raise ImportError(
        "torchtitan 0.3 has no train specs to register: run torchtitan.train with "
        "--module slimopt.integrations.torchtitan --config <torchtitan config name>"
    )

REGISTERED: list[str] = []


def _register_all() -> None:
    from torchtitan.models import _supported_models

    for model in sorted(_supported_models):
        try:
            REGISTERED.append(register(model))
        except ImportError:
            continue


_register_all()

__all__ = ["REGISTERED"]
