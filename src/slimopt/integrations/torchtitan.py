"""slimopt presets in torchtitan: an optimizer container, its config section and its builder.

torchtitan builds optimizers with its train spec's ``build_optimizers_fn(model_parts,
optimizer_config, parallel_dims, ...)``, which knows only Adam and AdamW. This module gives it:

- :class:`SlimoptOptimizersContainer`: one slimopt optimizer per model part (each built with
  :func:`slimopt.create_optimizer`, so every parameter gets its role), behaving as torchtitan's
  ``OptimizersContainer``: ``step``/``zero_grad`` on all, LR schedulers per part, and a flat
  ``state_dict`` keyed by parameter name through ``torch.distributed.checkpoint``'s helpers, so
  torchtitan's checkpointer saves and reshards it.
- :class:`JobConfig` (with :class:`Optimizer`): the config fields a job sets,
  ``--job.custom_config_module slimopt.integrations.torchtitan`` adds ``optimizer.preset``,
  ``optimizer.overrides``, ``optimizer.roles`` and ``optimizer.use_preset_lr``.
- :func:`build_optimizers`: torchtitan's builder signature; ``optimizer.name`` ``slimopt`` (with
  ``optimizer.preset``) or a preset name (``sage-hybrid``, ...) selects slimopt, anything else
  goes to torchtitan's own builder unchanged.
- :func:`with_slimopt` / :func:`register`: a train spec whose builder is :func:`build_optimizers`;
  ``--experimental.custom_import slimopt.integrations.torchtitan_register`` registers
  ``<model>_slimopt`` for every torchtitan model, so a job names ``--model.name llama3_slimopt``.

Job config mapping: ``optimizer.lr`` is the preset's primary-rule peak rate (the other rules keep
their ratio; ``use_preset_lr = true`` keeps the preset's own rates), ``optimizer.weight_decay``
is set in every group (torchtitan's AdamW decays every parameter too), ``implementation =
"for-loop"`` selects the single-tensor reference path. ``beta1``/``beta2``/``eps`` are torchtitan's
AdamW settings and are not applied (each rule keeps the preset's); set them per rule with
``overrides = "adamw_betas=(0.9, 0.95)"``.

Supported: torchtitan 0.2.x (0.2.2 tested); 0.3 replaced this builder API and is refused with a
clear error.

Example:
    >>> import torch
    >>> from slimopt.integrations.torchtitan import SlimoptOptimizersContainer
    >>> parts = [torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))]
    >>> opt = SlimoptOptimizersContainer(parts, "sage-hybrid", lr=1e-3)
    >>> parts[0](torch.tensor([1, 2])).sum().backward()
    >>> opt.step(); opt.zero_grad()
    >>> sorted(k for k in opt.state_dict() if k.startswith("state.0.weight"))
    ['state.0.weight.S', 'state.0.weight.exp_avg', 'state.0.weight.step']
"""

# No ``from __future__ import annotations``: torchtitan merges the dataclasses below into its
# JobConfig by their field types, which must be classes, not strings.
import ast
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimopt._extras import require
from slimopt.presets import PRESETS, check_preset, create_optimizer

require("torchtitan")


def _check_torchtitan_version() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("torchtitan")
    except PackageNotFoundError:  # a source checkout on the path: trust its API
        return
    major_minor = tuple(int(x) for x in installed.split(".")[:2] if x.isdigit())
    if major_minor >= (0, 3):
        raise ImportError(
            f"slimopt.integrations.torchtitan supports torchtitan 0.2.x (builder "
            f"build_optimizers_fn(model_parts, optimizer_config, parallel_dims)); torchtitan "
            f"{installed} configures optimizers differently: pip install 'torchtitan>=0.2.2,<0.3'"
        )


_check_torchtitan_version()

from torchtitan.components import optimizer as _tt_optimizer  # noqa: E402

#: ``optimizer.name`` values that select slimopt (besides the preset names themselves).
NAME = "slimopt"


@dataclass
class Optimizer:
    """The fields slimopt adds to torchtitan's ``[optimizer]`` config section."""

    preset: str = "sage-hybrid"
    """slimopt preset, used when ``optimizer.name`` is ``slimopt``"""

    overrides: str = ""
    """preset overrides, comma-separated ``key=value`` (values are Python literals), e.g.
    ``sinkgd_lr=5e-4,adamw_betas=(0.9, 0.95)``"""

    roles: str = ""
    """role overrides, comma-separated ``param_name=role`` (embedding, lm_head, matrix, vector)"""

    use_preset_lr: bool = False
    """keep the preset's own learning rates and weight decays instead of ``lr``/``weight_decay``"""


@dataclass
class JobConfig:
    """Named by ``--job.custom_config_module slimopt.integrations.torchtitan``; torchtitan merges
    these fields into its own ``JobConfig``."""

    optimizer: Optimizer = field(default_factory=Optimizer)


def parse_overrides(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """``"sinkgd_lr=5e-4,adamw_betas=(0.9, 0.95)"`` -> ``{"sinkgd_lr": 0.0005, "adamw_betas":
    (0.9, 0.95)}``; a dict is returned as is.

    Example:
        >>> parse_overrides("sinkgd_lr=5e-4, adamw_betas=(0.9, 0.95)")
        {'sinkgd_lr': 0.0005, 'adamw_betas': (0.9, 0.95)}
    """
    if text is None:
        return {}
    if isinstance(text, dict):
        return dict(text)
    out: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"optimizer.overrides: expected key=value, got {item.strip()!r}")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(
                f"optimizer.overrides: {key}={value.strip()!r} is not a Python literal"
            ) from None
    return out


def parse_roles(text: str | dict[str, str] | None) -> dict[str, str] | None:
    """``"output.weight=lm_head,pos.weight=vector"`` -> a role-override dict (None when empty).

    Example:
        >>> parse_roles("output.weight=lm_head")
        {'output.weight': 'lm_head'}
    """
    if text is None or isinstance(text, dict):
        return text or None
    out: dict[str, str] = {}
    for item in _split_top_level(text):
        name, sep, role = item.partition("=")
        if not sep or not name.strip() or not role.strip():
            raise ValueError(f"optimizer.roles: expected param_name=role, got {item.strip()!r}")
        out[name.strip()] = role.strip()
    return out or None


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets (``a=(1, 2),b=3`` -> two items)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]


class SlimoptOptimizersContainer(_tt_optimizer.OptimizersContainer):
    """torchtitan's optimizer container holding one slimopt optimizer per model part.

    Args:
        model_parts: the model (or its pipeline stages); frozen parameters are left out.
        preset: one of :data:`slimopt.PRESETS`.
        lr: the preset's primary-rule peak rate (None: the preset's own).
        roles: role overrides by parameter name.
        foreach: ``False`` selects every rule's single-tensor reference path.
        **overrides: preset overrides (``weight_decay=0.1``, ``sinkgd_lr=5e-4``, ...).

    ``state_dict()`` and ``load_state_dict()`` go through
    ``torch.distributed.checkpoint.state_dict`` (flattened, keyed by parameter name), as
    torchtitan's own container does. Before the first step the state is allocated with
    ``SlimOptimizer.init_state()``, not with torch's zero-gradient step, which would count a step
    (and fix SGD-SaI's gsnr from a zero gradient) and so change the run.
    """

    def __init__(
        self,
        model_parts: list[nn.Module],
        preset: str = "sage-hybrid",
        *,
        lr: float | None = None,
        roles: dict[str, str] | None = None,
        foreach: bool = True,
        **overrides: Any,
    ) -> None:
        check_preset(preset)
        if isinstance(model_parts, nn.Module):
            model_parts = [model_parts]
        if not model_parts:
            raise ValueError("model_parts is empty: nothing to optimize")
        self.model_parts = list(model_parts)
        self.preset = preset
        self.optimizers = [
            create_optimizer(preset, part, lr=lr, roles=roles, foreach=foreach, **overrides)
            for part in self.model_parts
        ]
        all_params = [p for part in self.model_parts for p in part.parameters() if p.requires_grad]
        self._validate_length(len(self.model_parts))
        defaults = {"lr": self.optimizers[0].param_groups[0]["lr"], "preset": preset}
        self._post_init(all_params, defaults)

    def _init_states(self) -> None:
        for opt in self.optimizers:
            if not opt.state:
                opt.init_state()

    def state_dict(self) -> dict[str, Any]:
        self._init_states()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._init_states()
        super().load_state_dict(state_dict)


def _is_slimopt(name: str) -> bool:
    return name == NAME or name in PRESETS


def build_optimizers(
    model_parts: list[nn.Module],
    optimizer_config: Any,
    parallel_dims: Any = None,
    ft_manager: Any = None,
) -> Any:
    """torchtitan's ``build_optimizers_fn``: slimopt for a slimopt ``optimizer.name``, torchtitan's
    own builder otherwise.

    Args:
        model_parts: the model parts to optimize.
        optimizer_config: the job's ``optimizer`` section (torchtitan's fields, plus
            :class:`Optimizer`'s when the job names this module as ``custom_config_module``).
        parallel_dims: torchtitan's ``ParallelDims`` (passed on to torchtitan's builder).
        ft_manager: torchtitan's fault-tolerance manager (not supported with slimopt).
    """
    name = optimizer_config.name
    if not _is_slimopt(name):
        return _tt_optimizer.build_optimizers(
            model_parts, optimizer_config, parallel_dims, ft_manager=ft_manager
        )
    if getattr(optimizer_config, "early_step_in_backward", False):
        raise NotImplementedError(
            "optimizer.early_step_in_backward is not supported with slimopt in torchtitan"
        )
    if ft_manager is not None and getattr(ft_manager, "enabled", False):
        raise NotImplementedError("TorchFT is not supported with slimopt optimizers in torchtitan")
    preset = getattr(optimizer_config, "preset", "sage-hybrid") if name == NAME else name
    use_preset_lr = getattr(optimizer_config, "use_preset_lr", False)
    overrides = parse_overrides(getattr(optimizer_config, "overrides", ""))
    if not use_preset_lr:
        overrides.setdefault("weight_decay", optimizer_config.weight_decay)
    implementation = getattr(optimizer_config, "implementation", "foreach")
    return SlimoptOptimizersContainer(
        model_parts,
        preset,
        lr=None if use_preset_lr else optimizer_config.lr,
        roles=parse_roles(getattr(optimizer_config, "roles", "")),
        foreach=implementation != "for-loop",
        **overrides,
    )


def with_slimopt(train_spec: Any) -> Any:
    """A copy of a torchtitan ``TrainSpec`` whose optimizer builder also knows slimopt (other
    optimizer names still go to the spec's own builder, MoE load balancing included)."""
    original = train_spec.build_optimizers_fn

    def build(model_parts, optimizer_config, parallel_dims=None, *args: Any, **kwargs: Any):
        if _is_slimopt(optimizer_config.name):
            return build_optimizers(model_parts, optimizer_config, parallel_dims, *args, **kwargs)
        return original(model_parts, optimizer_config, parallel_dims, *args, **kwargs)

    return dataclasses.replace(train_spec, build_optimizers_fn=build)


def register(model: str, name: str | None = None) -> str:
    """Register ``with_slimopt(get_train_spec(model))`` as ``name`` (default ``<model>_slimopt``)
    and return the name; a job then sets ``--model.name`` to it. Registering twice is a no-op."""
    from torchtitan.protocols import train_spec as ts

    name = name or f"{model}_slimopt"
    if name not in ts._extra_train_specs:
        ts.register_train_spec(name, with_slimopt(ts.get_train_spec(model)))
    return name


__all__ = [
    "NAME",
    "JobConfig",
    "Optimizer",
    "SlimoptOptimizersContainer",
    "build_optimizers",
    "parse_overrides",
    "parse_roles",
    "register",
    "with_slimopt",
]
