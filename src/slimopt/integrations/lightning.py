"""slimopt presets in Lightning's ``configure_optimizers``.

A ``LightningModule`` returns the optimizer (and its scheduler) from ``configure_optimizers``;
:func:`configure_optimizers` builds the preset on the module and wraps a scheduler in the dict
Lightning expects. A preset has several rules with different peak rates (SAGE 8e-3 and SinkGD 1e-3
in ``sage-hybrid``), so a scheduler that takes ``max_lr`` (``OneCycleLR``, ``CyclicLR``) should get
one per group: :func:`peak_lrs` gives them. Lightning checkpoints save and restore the optimizer and
scheduler state as for any torch optimizer, so ``Trainer.fit(ckpt_path=...)`` continues exactly.

This module does not import Lightning; it returns plain objects Lightning understands.

Example:
    >>> import torch
    >>> from slimopt.integrations.lightning import configure_optimizers, peak_lrs
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    >>> config = configure_optimizers(
    ...     model, "sage-hybrid", lr=1e-3,
    ...     scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    >>> sorted(config), config["lr_scheduler"]["interval"]
    (['lr_scheduler', 'optimizer'], 'step')
    >>> peak_lrs(config["optimizer"])
    [0.001, 0.001, 0.001]

In a ``LightningModule``::

    def configure_optimizers(self):
        return configure_optimizers(
            self, "sage-hybrid",
            scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=peak_lrs(opt), total_steps=self.trainer.estimated_stepping_batches))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimopt.optimizer import SlimOptimizer
from slimopt.presets import create_optimizer

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def peak_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each param group's peak learning rate (``initial_lr`` once a scheduler has set it), in
    group order: the ``max_lr`` list for ``OneCycleLR``/``CyclicLR`` that keeps the preset's
    per-rule rates.

    Example:
        >>> import torch, slimopt
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4),
        ...                             torch.nn.Linear(4, 10))
        >>> peak_lrs(slimopt.create_optimizer("sage-hybrid", model))
        [0.008, 0.008, 0.001, 0.008]
    """
    return [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]


def configure_optimizers(
    module: nn.Module,
    preset: str = "sage-hybrid",
    *,
    lr: float | None = None,
    roles: dict[str, str] | None = None,
    scheduler: SchedulerFactory | None = None,
    interval: str = "step",
    frequency: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """The return value of ``LightningModule.configure_optimizers`` for ``preset``.

    Args:
        module: the LightningModule (or any ``nn.Module``) whose trainable parameters to optimize.
        preset: one of :data:`slimopt.PRESETS`.
        lr: the preset's primary-rule peak rate (see :func:`slimopt.create_optimizer`).
        roles: role overrides by parameter name.
        scheduler: called with the optimizer, returns an LR scheduler (or None for no scheduler).
        interval: ``"step"`` (default) or ``"epoch"``: when Lightning steps the scheduler.
        frequency: step the scheduler every ``frequency`` intervals.
        **overrides: preset overrides such as ``weight_decay=0.1`` or ``sinkgd_lr=5e-4``.

    Returns:
        ``{"optimizer": opt}`` or ``{"optimizer": opt, "lr_scheduler": {"scheduler": ...,
        "interval": ..., "frequency": ...}}``.
    """
    if interval not in ("step", "epoch"):
        raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
    if not (isinstance(frequency, int) and frequency >= 1):
        raise ValueError(f"frequency must be an int >= 1, got {frequency!r}")
    optimizer: SlimOptimizer = create_optimizer(preset, module, lr=lr, roles=roles, **overrides)
    config: dict[str, Any] = {"optimizer": optimizer}
    if scheduler is not None:
        sched = scheduler(optimizer)
        if getattr(sched, "optimizer", None) is not optimizer:
            raise ValueError("scheduler(optimizer) must return a scheduler of that optimizer")
        config["lr_scheduler"] = {"scheduler": sched, "interval": interval, "frequency": frequency}
    return config


__all__ = ["configure_optimizers", "peak_lrs"]
