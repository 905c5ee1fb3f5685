"""slimopt presets in the Hugging Face ``Trainer``, selected by configuration.

``Trainer(optimizer_cls_and_kwargs=(factory, kwargs))`` (transformers 5.x) calls
``factory()(model, **kwargs)`` when ``factory`` is not a ``torch.optim.Optimizer`` subclass, so the
optimizer is built on the model itself and every parameter gets its role (embedding, lm_head,
matrix, vector), not the two unnamed parameter groups the Trainer builds for its own optimizers.
:func:`optimizer_cls_and_kwargs` returns that pair with the ``TrainingArguments`` honoured:

- ``learning_rate`` is the preset's primary-rule rate (SAGE in ``sage-hybrid``, ...); the preset's
  other rules keep their ratio to it, exactly as ``create_optimizer(preset, model, lr=...)``.
  A ``learning_rate`` left at the Trainer's default (5e-5, a rate for fine-tuning with AdamW, 160x
  below SAGE's 8e-3 in ``sage-hybrid``) was never chosen for the preset: the preset's own rates
  are used, with a warning that says so. Pass ``lr=`` to use 5e-5 on purpose.
- ``weight_decay`` applies to the embedding, the head and the matrices, and not to vectors (biases
  and norm weights), as the Trainer's own optimizers do.

The Trainer then builds its scheduler from ``lr_scheduler_type``/``warmup_steps`` on this optimizer
and saves/restores its state in checkpoints; ``resume_from_checkpoint`` continues exactly.

Example:
    >>> from transformers import Trainer, TrainingArguments  # doctest: +SKIP
    >>> from slimopt.integrations.hf import optimizer_cls_and_kwargs  # doctest: +SKIP
    >>> args = TrainingArguments("out", learning_rate=4e-3, weight_decay=0.1)  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=args, train_dataset=data,  # doctest: +SKIP
    ...                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, "sage-hybrid"))
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from torch import nn

from slimopt.optimizer import SlimOptimizer
from slimopt.presets import PRIMARY_RULE, check_preset, create_optimizer, preset_lrs


class SlimoptFactory:
    """The optimizer factory the ``Trainer`` instantiates and calls with the model.

    ``SlimoptFactory()(model, preset=..., lr=..., weight_decay=..., roles=..., **overrides)``
    returns ``create_optimizer(preset, model, lr=lr, roles=roles, **overrides)`` with
    ``weight_decay`` (when given) set on every group except the vector role's, which gets 0.

    Example:
        >>> import torch
        >>> from slimopt.integrations.hf import SlimoptFactory
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
        >>> opt = SlimoptFactory()(model, preset="sage-hybrid", lr=1e-3, weight_decay=0.1)
        >>> sorted((g["role"], g["algorithm"], g["weight_decay"]) for g in opt.param_groups)
        [('embedding', 'sage', 0.1), ('lm_head', 'sage', 0.1), ('vector', 'sage', 0.0)]
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            raise TypeError(
                "SlimoptFactory was called as an optimizer class with parameter groups: this "
                "transformers version predates optimizer factories in Trainer("
                "optimizer_cls_and_kwargs=...). Pass optimizers=(slimopt.create_optimizer(preset, "
                "model), scheduler) instead, or upgrade transformers."
            )

    def __call__(
        self,
        model: nn.Module,
        preset: str = "sage-hybrid",
        lr: float | None = None,
        weight_decay: float | None = None,
        roles: dict[str, str] | None = None,
        **overrides: Any,
    ) -> SlimOptimizer:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SlimoptFactory needs the model (an nn.Module), got {type(model)}")
        optimizer = create_optimizer(preset, model, lr=lr, roles=roles, **overrides)
        if weight_decay is not None:
            if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
                raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
            for group in optimizer.param_groups:
                group["weight_decay"] = 0.0 if group["role"] == "vector" else float(weight_decay)
        return optimizer


def optimizer_cls_and_kwargs(
    args: Any = None,
    preset: str = "sage-hybrid",
    *,
    roles: dict[str, str] | None = None,
    **overrides: Any,
) -> tuple[type[SlimoptFactory], dict[str, Any]]:
    """The ``optimizer_cls_and_kwargs`` pair for ``Trainer`` that builds ``preset`` on the model.

    Args:
        args: the run's ``TrainingArguments``; its ``learning_rate`` becomes the preset's primary
            rate (unless it is the Trainer's default: then the preset's rates, with a warning) and
            its ``weight_decay`` the decay of every non-vector group. ``None`` keeps the preset's
            own rates and decays.
        preset: one of :data:`slimopt.PRESETS`.
        roles: role overrides by parameter name (see :func:`slimopt.create_optimizer`).
        **overrides: preset overrides such as ``sinkgd_lr=5e-4``; an explicit ``lr=`` or
            ``weight_decay=`` here wins over ``args``.

    Example:
        >>> from slimopt.integrations.hf import SlimoptFactory, optimizer_cls_and_kwargs
        >>> cls, kwargs = optimizer_cls_and_kwargs(None, "scale", lm_head_momentum=0.8)
        >>> cls is SlimoptFactory, kwargs
        (True, {'preset': 'scale', 'roles': None, 'lm_head_momentum': 0.8})
    """
    preset = check_preset(preset)
    kwargs: dict[str, Any] = {"preset": preset, "roles": roles}
    if args is not None:
        for attr in ("learning_rate", "weight_decay"):
            if not hasattr(args, attr):
                raise TypeError(f"args must be a TrainingArguments (no {attr!r}), got {type(args)}")
        default = _field_default(args, "learning_rate")
        if "lr" in overrides:
            pass  # an explicit lr= wins
        elif default is not None and float(args.learning_rate) == float(default):
            rates = ", ".join(f"{rule} {lr:g}" for rule, lr in preset_lrs(preset).items())
            warnings.warn(
                f"slimopt: TrainingArguments.learning_rate is the Trainer's default "
                f"{args.learning_rate:g}, not a rate chosen for {preset!r}; using the preset's "
                f"rates ({rates}). Set learning_rate (the {PRIMARY_RULE[preset]} rate) to choose "
                f"one, or pass lr={args.learning_rate:g} to use the default on purpose",
                UserWarning,
                stacklevel=2,
            )
        else:
            kwargs["lr"] = float(args.learning_rate)
        kwargs["weight_decay"] = float(args.weight_decay)
    kwargs.update(overrides)
    return SlimoptFactory, kwargs


def _field_default(args: Any, name: str) -> Any:
    """The class default of a dataclass field (``TrainingArguments.learning_rate``: 5e-5), or
    None where ``args`` is not a dataclass or has no plain default."""
    if not dataclasses.is_dataclass(args):
        return None
    for field in dataclasses.fields(args):
        if field.name == name and field.default is not dataclasses.MISSING:
            return field.default
    return None


__all__ = ["SlimoptFactory", "optimizer_cls_and_kwargs"]
