"""torchtitan 0.3.x: an ``OptimizersContainer`` subclass with its own ``Config`` (built by
torchtitan's ``Trainer`` as ``config.optimizer.build(model_parts=...)``) and config functions for
``--module slimopt.integrations.torchtitan --config <name>``. Imported by
:mod:`slimopt.integrations.torchtitan` when torchtitan 0.3 is installed."""

# No ``from __future__ import annotations``: tyro reads the Config's field types.
import contextlib
import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan.tools.logging import logger

from slimopt.integrations._torchtitan_common import (
    NAME,
    clean_name,
    init_states,
    parse_overrides,
    parse_roles,
    torchtitan_roles,
)
from slimopt.presets import PRESETS, check_preset, create_optimizer
from slimopt.roles import ROLES


def _number(value: Any, what: str) -> float | None:
    """A float from a float, an int or a one-element tensor (torchtitan may hand lr as a tensor)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{what} must be a number >= 0, got {value!r}")
    return float(value)


@contextlib.contextmanager
def _only_trainable(model: nn.Module, names: set[str]) -> Iterator[None]:
    """Within the block only the parameters named in ``names`` require grad, so
    ``create_optimizer(model)`` takes just those; the flags are restored after."""
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in names]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class SlimoptOptimizersContainer(OptimizersContainer):
    """torchtitan 0.3's optimizer container with slimopt optimizers (one per model part).

    Built by torchtitan from :class:`SlimoptOptimizersContainer.Config`; ``param_groups`` entries
    whose ``optimizer_name`` is ``"slimopt"`` go to the preset (``optimizer_kwargs`` may hold only
    ``{"role": ...}``, which forces the role of the parameters the pattern matches), entries with
    torchtitan's own names (``AdamW``, ...) build torchtitan's optimizers as usual. Patterns are
    regular expressions searched in parameter names, first match wins; with no entries every
    trainable parameter goes to the preset.

    Roles come from torchtitan's parameter names (:func:`torchtitan_roles`), so a pipeline stage
    holding only the head still gets it right. The state is allocated with
    ``SlimOptimizer.init_state()`` before torchtitan reads or loads it (so torchtitan's
    zero-gradient, zero-lr step never runs on a slimopt optimizer and taking a checkpoint does not
    change the run); ``state_dict()`` is torchtitan's flat, name-keyed dict.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        preset: str = "sage-hybrid"
        """slimopt preset (sage-hybrid, sinkgd-hybrid, scale, sgd-sai, lion, adamw, ...)"""

        lr: float | None = None
        """peak rate of the preset's primary rule; the other rules keep their ratio (None: the
        preset's own rates). A one-element tensor is accepted."""

        weight_decay: float | None = None
        """weight decay set in every slimopt group (None: the preset's own)"""

        overrides: str = ""
        """preset overrides, comma-separated ``key=value`` (values are Python literals), e.g.
        ``sinkgd_lr=5e-4,adamw_betas=(0.9, 0.95)``"""

        roles: str = ""
        """role overrides, comma-separated ``param_name=role`` (embedding, lm_head, matrix,
        vector)"""

    optimizers: list[Any]

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        check_preset(config.preset)
        if isinstance(model_parts, nn.Module):
            model_parts = [model_parts]
        if not model_parts:
            raise ValueError("model_parts is empty: nothing to optimize")
        self.model_parts = list(model_parts)
        self.preset = config.preset
        entries = list(config.param_groups) or [
            ParamGroupConfig(pattern=r".*", optimizer_name=NAME)
        ]
        _check_entries(entries)
        lr = _number(config.lr, "optimizer.lr")
        overrides = parse_overrides(config.overrides)
        if config.weight_decay is not None:
            overrides.setdefault("weight_decay", _number(config.weight_decay, "weight_decay"))
        user_roles = parse_roles(config.roles) or {}
        loop = config.implementation == "for-loop"
        impl_kwargs = self._build_impl_kwargs(config)

        self.optimizers = []
        all_params: list[nn.Parameter] = []
        matched = [False] * len(entries)
        used_roles: set[str] = set()
        for part_idx, part in enumerate(self.model_parts):
            claims = _claim(part, entries)
            slim: dict[str, str | None] = {}  # name -> forced role
            torch_groups: dict[str, list[dict[str, Any]]] = {}
            for i, (entry, named) in enumerate(zip(entries, claims)):
                matched[i] = matched[i] or bool(named)
                if not named:
                    continue
                all_params.extend(p for _, p in named)
                if entry.optimizer_name == NAME:
                    slim.update((n, entry.optimizer_kwargs.get("role")) for n, _ in named)
                    continue
                torch_groups.setdefault(entry.optimizer_name, []).append(
                    {
                        "params": [p for _, p in named],
                        "param_names": [canonical_fqn(n) for n, _ in named],
                        **impl_kwargs,
                        **entry.optimizer_kwargs,
                    }
                )
            if slim:
                present = set(slim) | {clean_name(n) for n in slim}
                part_roles = {k: v for k, v in user_roles.items() if k in present}
                used_roles |= part_roles.keys()
                part_roles.update({n: r for n, r in slim.items() if r is not None})
                roles = {n: r for n, r in torchtitan_roles(part, part_roles).items() if n in slim}
                with _only_trainable(part, set(slim)):
                    opt = create_optimizer(
                        self.preset,
                        part,
                        lr=lr,
                        roles=roles,
                        foreach=False if loop else None,
                        fused=False if loop else None,
                        **overrides,
                    )
                for group in opt.param_groups:
                    group["param_names"] = [canonical_fqn(n) for n in group["param_names"]]
                    logger.info(
                        f"slimopt {self.preset} (model_part={part_idx}): "
                        f"{len(group['params'])} {group['role']} params, {group['algorithm']} "
                        f"lr={group['lr']:g} weight_decay={group.get('weight_decay', 0):g}"
                    )
                self.optimizers.append(opt)
            for name, groups in torch_groups.items():
                factory = self._resolve_optimizer_factory(name)
                kwargs = config.optimizer_factory_kwargs_by_name.get(name, {})
                optimizer = factory(groups, **kwargs)
                self.optimizers.append(optimizer)
                self._log_optimizer(optimizer, part_idx, [e.pattern for e in entries])

        for entry, hit in zip(entries, matched):
            if not hit:
                raise ValueError(
                    f"optimizer param_groups pattern {entry.pattern!r} matched no parameters"
                )
        unknown = set(user_roles) - used_roles
        if unknown:
            raise ValueError(
                f"optimizer.roles name parameters no slimopt group holds: {sorted(unknown)}"
            )
        self._validate_params(all_params)
        if config.implementation == "fused_opt_states_bf16":
            self._register_bf16_optimizer_state_hook()  # torch Adam/AdamW groups only
        self._post_init(all_params)

    @classmethod
    def from_preset(
        cls,
        model_parts: list[nn.Module],
        preset: str = "sage-hybrid",
        *,
        lr: float | None = None,
        roles: dict[str, str] | None = None,
        foreach: bool = True,
        **overrides: Any,
    ) -> "SlimoptOptimizersContainer":
        """The same call on torchtitan 0.2 and 0.3: ``from_preset(parts, "lion", lr=1e-4)``."""
        config = cls.Config(
            preset=preset,
            lr=lr,
            roles=roles or "",  # type: ignore[arg-type]  # parse_roles takes a dict too
            overrides=overrides,  # type: ignore[arg-type]
            implementation="foreach" if foreach else "for-loop",
        )
        return cls(config, model_parts=model_parts)

    def state_dict(self) -> dict[str, Any]:
        init_states(self.optimizers)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        init_states(self.optimizers)
        super().load_state_dict(state_dict)


def _check_entries(entries: list[ParamGroupConfig]) -> None:
    for entry in entries:
        if entry.optimizer_name in PRESETS:
            raise ValueError(
                f"param_groups: optimizer_name {entry.optimizer_name!r} is a slimopt preset; name "
                f"the entry {NAME!r} and set the container's preset={entry.optimizer_name!r}"
            )
        if entry.optimizer_name != NAME:
            continue
        extra = set(entry.optimizer_kwargs) - {"role"}
        if extra:
            raise ValueError(
                f"param_groups: a {NAME!r} entry takes only optimizer_kwargs={{'role': ...}}, got "
                f"{sorted(extra)}; set slimopt hyperparameters with lr, weight_decay and overrides"
            )
        role = entry.optimizer_kwargs.get("role")
        if role is not None and role not in ROLES:
            raise ValueError(f"param_groups: unknown role {role!r}; roles are {ROLES}")


def _claim(
    model: nn.Module, entries: list[ParamGroupConfig]
) -> list[list[tuple[str, nn.Parameter]]]:
    """Each entry's trainable parameters: the first entry whose pattern is found in a name wins
    (searched in the name and in the name without wrapper segments)."""
    patterns = [re.compile(entry.pattern) for entry in entries]
    claims: list[list[tuple[str, nn.Parameter]]] = [[] for _ in entries]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = canonical_fqn(name)
        for i, pattern in enumerate(patterns):
            if pattern.search(name) or pattern.search(clean):
                claims[i].append((name, p))
                break
    return claims


def slimopt_config(preset: str = "sage-hybrid", **fields: Any) -> SlimoptOptimizersContainer.Config:
    """``SlimoptOptimizersContainer.Config(preset=preset, **fields)``: the optimizer entry of a
    torchtitan ``Trainer.Config`` (the counterpart of torchtitan's ``default_adamw``)."""
    return SlimoptOptimizersContainer.Config(preset=preset, **fields)


def with_slimopt(config: Any, preset: str = "sage-hybrid", **fields: Any) -> Any:
    """``config`` (a torchtitan ``Trainer.Config``) with its optimizer replaced by the slimopt
    container (keeping its ``implementation``); returns the same object."""
    fields.setdefault("implementation", config.optimizer.implementation)
    config.optimizer = slimopt_config(preset, **fields)
    return config


def torchtitan_config(name: str) -> Callable[[], Any]:
    """torchtitan's own config function ``name`` (``llama3_debugmodel``, ``qwen3_0_6b``, ...),
    looked up in the config registry of the model whose name it starts with."""
    from torchtitan.models import _supported_models

    for model in sorted(_supported_models, key=len, reverse=True):
        if name != model and not name.startswith(model + "_"):
            continue
        try:
            registry = importlib.import_module(f"torchtitan.models.{model}.config_registry")
        except ImportError:
            continue
        fn = getattr(registry, name, None)
        if callable(fn):
            return fn
    raise AttributeError(f"no torchtitan model config function named {name!r}")


def slimopt_config_fn(name: str) -> Callable[[], Any]:
    """A config function for ``--config name``: torchtitan's ``name`` with the slimopt optimizer
    (preset sage-hybrid at its own rates; ``--optimizer.preset``, ``--optimizer.lr``, ...
    change it on the command line)."""
    base = torchtitan_config(name)

    def config_fn() -> Any:
        return with_slimopt(base())

    config_fn.__name__ = config_fn.__qualname__ = name
    config_fn.__doc__ = f"torchtitan's {name} with the slimopt optimizer container."
    return config_fn


def llama3_debugmodel() -> Any:
    """torchtitan's ``llama3_debugmodel`` with the slimopt optimizer container."""
    return with_slimopt(torchtitan_config("llama3_debugmodel")())


def register(*_args: Any, **_kwargs: Any) -> None:
    raise NotImplementedError(
        "torchtitan 0.3 has no train specs to register: run torchtitan.train with "
        "--module slimopt.integrations.torchtitan --config <torchtitan config name>"
    )
