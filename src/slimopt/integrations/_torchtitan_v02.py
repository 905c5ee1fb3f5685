"""torchtitan 0.2.x: the train spec's ``build_optimizers_fn``, a ``[optimizer]`` config section
merged through ``--job.custom_config_module`` and a ``<model>_slimopt`` train spec. Imported by
:mod:`slimopt.integrations.torchtitan` when torchtitan 0.2 is installed."""

# No ``from __future__ import annotations``: torchtitan merges the dataclasses below into its
# JobConfig by their field types, which must be classes, not strings.
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchtitan.components import optimizer as _tt_optimizer

from slimopt.integrations._torchtitan_common import (
    NAME,
    init_states,
    parse_overrides,
    parse_roles,
    torchtitan_roles,
)
from slimopt.presets import PRESETS, check_preset, create_optimizer


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


class SlimoptOptimizersContainer(_tt_optimizer.OptimizersContainer):
    """torchtitan's optimizer container holding one slimopt optimizer per model part.

    Args:
        model_parts: the model (or its pipeline stages); frozen parameters are left out.
        preset: one of :data:`slimopt.PRESETS`.
        lr: the preset's primary-rule peak rate (None: the preset's own).
        roles: role overrides by parameter name (the others come from torchtitan's names, see
            :func:`torchtitan_roles`).
        foreach: ``False`` selects every rule's single-tensor reference path.
        **overrides: preset overrides (``weight_decay=0.1``, ``sinkgd_lr=5e-4``, ...).

    ``state_dict()`` and ``load_state_dict()`` go through
    ``torch.distributed.checkpoint.state_dict`` (flattened, keyed by parameter name), as
    torchtitan's own container does. Before the first step the state is allocated with
    ``SlimOptimizer.init_state()`` (:func:`init_states`), not with a zero-gradient step.
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
            create_optimizer(
                preset,
                part,
                lr=lr,
                roles=torchtitan_roles(part, roles),
                foreach=foreach,
                **overrides,
            )
            for part in self.model_parts
        ]
        all_params = [p for part in self.model_parts for p in part.parameters() if p.requires_grad]
        self._validate_length(len(self.model_parts))
        defaults = {"lr": self.optimizers[0].param_groups[0]["lr"], "preset": preset}
        self._post_init(all_params, defaults)

    @classmethod
    def from_preset(
        cls, model_parts: list[nn.Module], preset: str = "sage-hybrid", **kwargs: Any
    ) -> "SlimoptOptimizersContainer":
        """The same call on torchtitan 0.2 and 0.3: ``from_preset(parts, "lion", lr=1e-4)``."""
        return cls(model_parts, preset, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        init_states(self.optimizers)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        init_states(self.optimizers)
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
