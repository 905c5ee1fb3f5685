"""slimopt presets in torchtitan 0.3.x and 0.2.x: an optimizer container, its config and builder.

The installed torchtitan decides which API this module offers (``TORCHTITAN_API`` is ``(0, 3)``
or ``(0, 2)``); in both, :class:`SlimoptOptimizersContainer` holds one slimopt optimizer per model
part (each built with :func:`slimopt.create_optimizer`), behaves as torchtitan's
``OptimizersContainer`` (``step``/``zero_grad`` on all, one LR scheduler per optimizer, a flat
``state_dict`` keyed by parameter name that torchtitan's checkpointer saves and reshards), and
``SlimoptOptimizersContainer.from_preset(model_parts, preset, lr=..., roles=..., **overrides)``
builds it the same way. Roles come from torchtitan's parameter names
(:func:`torchtitan_roles`: ``tok_embeddings`` -> embedding, ``output``/``lm_head`` -> lm_head,
norms and other 1-D parameters -> vector, the rest -> matrix). Before the first step the state is
allocated with ``SlimOptimizer.init_state()``, never with torchtitan's zero-gradient, zero-lr
step, so saving a checkpoint before training does not change the run.

torchtitan 0.3 (0.3.0 tested): a job's optimizer is a config object the ``Trainer`` builds.

- ``SlimoptOptimizersContainer.Config`` (a subclass of ``OptimizersContainer.Config``) adds
  ``preset``, ``lr`` (the preset's primary-rule peak rate, the other rules keep their ratio; None:
  the preset's own; a one-element tensor is accepted), ``weight_decay`` (every slimopt group;
  None: the preset's), ``overrides`` (``"sinkgd_lr=5e-4,adamw_betas=(0.9, 0.95)"``) and
  ``roles`` (``"norm.weight=vector"``). Its ``param_groups`` entries name ``"slimopt"`` (with
  ``optimizer_kwargs={"role": ...}`` at most) or torchtitan's own optimizers (``AdamW``, ...),
  so parts of a model can stay on AdamW; no entries: every parameter goes to the preset.
  ``implementation = "for-loop"`` selects every rule's single-tensor reference path.
- :func:`slimopt_config` / :func:`with_slimopt` build that config or put it into any
  ``Trainer.Config``; every torchtitan model config function is available from this module by
  its own name (:func:`llama3_debugmodel`, ``qwen3_debugmodel``, ``llama3_8b``, ...), so::

      torchrun --nproc-per-node 8 -m torchtitan.train \\
          --module slimopt.integrations.torchtitan --config llama3_8b \\
          --optimizer.preset sage-hybrid --optimizer.lr 2e-3 --optimizer.overrides "sinkgd_lr=5e-4"

torchtitan 0.2 (0.2.2 tested): the train spec's ``build_optimizers_fn``.

- :class:`JobConfig` (with :class:`Optimizer`): ``--job.custom_config_module
  slimopt.integrations.torchtitan`` adds ``optimizer.preset``, ``optimizer.overrides``,
  ``optimizer.roles`` and ``optimizer.use_preset_lr``; ``optimizer.lr`` is the primary-rule peak
  rate and ``optimizer.weight_decay`` is set in every group unless ``use_preset_lr``.
- :func:`build_optimizers`: ``optimizer.name`` ``slimopt`` (with ``optimizer.preset``) or a preset
  name selects slimopt, anything else goes to torchtitan's own builder unchanged.
- :func:`with_slimopt` / :func:`register`: a train spec whose builder is :func:`build_optimizers`;
  ``--experimental.custom_import slimopt.integrations.torchtitan_register`` registers
  ``<model>_slimopt`` for every torchtitan model.

In both, torchtitan's AdamW settings (``beta1``/``beta2``/``eps``) are not applied to slimopt's
rules (each keeps the preset's); set them per rule with ``overrides = "adamw_betas=(0.9, 0.95)"``.
torchtitan 0.4 and later are refused at import.

Example:
    >>> import torch
    >>> from slimopt.integrations.torchtitan import SlimoptOptimizersContainer
    >>> parts = [torch.nn.ModuleDict({"tok_embeddings": torch.nn.Embedding(10, 4),
    ...                               "output": torch.nn.Linear(4, 10)})]
    >>> opt = SlimoptOptimizersContainer.from_preset(parts, "sage-hybrid", lr=1e-3)
    >>> parts[0]["output"](parts[0]["tok_embeddings"](torch.tensor([1, 2]))).sum().backward()
    >>> opt.step(); opt.zero_grad()
    >>> sorted({g["role"] for g in opt.optimizers[0].param_groups})
    ['embedding', 'lm_head', 'vector']
"""

from __future__ import annotations

from typing import Any

from slimopt._extras import require

require("torchtitan")


def _check_torchtitan_version() -> tuple[int, int]:
    """The torchtitan API to serve, ``(0, 2)`` or ``(0, 3)``; ImportError for any other release.
    A source checkout without package metadata is judged by its API."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("torchtitan")
    except PackageNotFoundError:
        installed = None
    if installed is not None:
        major_minor = tuple(int(x) for x in installed.split(".")[:2] if x.isdigit())
        if major_minor < (0, 2) or major_minor >= (0, 4):
            raise ImportError(
                f"slimopt.integrations.torchtitan supports torchtitan 0.2.x and 0.3.x, not "
                f"torchtitan {installed}: pip install 'torchtitan>=0.2.2,<0.4'"
            )
        return (0, 3) if major_minor >= (0, 3) else (0, 2)
    from torchtitan.components import optimizer as tt_optimizer

    return (0, 3) if hasattr(tt_optimizer.OptimizersContainer, "Config") else (0, 2)


TORCHTITAN_API = _check_torchtitan_version()

from slimopt.integrations._torchtitan_common import (  # noqa: E402
    NAME,
    clean_name,
    init_states,
    parse_overrides,
    parse_roles,
    torchtitan_roles,
)

if TORCHTITAN_API >= (0, 3):
    # ``name as name``: re-exported (listed in __all__ through _VERSION_NAMES)
    from slimopt.integrations._torchtitan_v03 import (
        SlimoptOptimizersContainer,
        register,
        slimopt_config_fn,
        with_slimopt,
    )
    from slimopt.integrations._torchtitan_v03 import llama3_debugmodel as llama3_debugmodel
    from slimopt.integrations._torchtitan_v03 import slimopt_config as slimopt_config
    from slimopt.integrations._torchtitan_v03 import torchtitan_config as torchtitan_config

    _VERSION_NAMES = [
        "llama3_debugmodel",
        "slimopt_config",
        "slimopt_config_fn",
        "torchtitan_config",
    ]

    def __getattr__(name: str) -> Any:
        """``--config <name>``: any torchtitan model config function, with slimopt."""
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return slimopt_config_fn(name)
        except AttributeError:
            raise AttributeError(
                f"module {__name__!r} has no attribute {name!r} (nor is it a torchtitan model "
                f"config function)"
            ) from None

else:
    from slimopt.integrations._torchtitan_v02 import JobConfig as JobConfig
    from slimopt.integrations._torchtitan_v02 import Optimizer as Optimizer
    from slimopt.integrations._torchtitan_v02 import (
        SlimoptOptimizersContainer,
        register,
        with_slimopt,
    )
    from slimopt.integrations._torchtitan_v02 import build_optimizers as build_optimizers

    _VERSION_NAMES = ["JobConfig", "Optimizer", "build_optimizers"]

__all__ = [
    "NAME",
    "TORCHTITAN_API",
    "SlimoptOptimizersContainer",
    "clean_name",
    "init_states",
    "parse_overrides",
    "parse_roles",
    "register",
    "torchtitan_roles",
    "with_slimopt",
    *_VERSION_NAMES,
]
