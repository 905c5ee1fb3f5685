"""Presets: which update rule each parameter role gets, and with which hyperparameters.

| preset          | embedding | lm_head         | matrix  | vector  | source                        |
|-----------------|-----------|-----------------|---------|---------|-------------------------------|
| ``adamw``         | AdamW     | AdamW           | AdamW   | AdamW   | baseline                      |
| ``lion``          | Lion      | Lion            | Lion    | Lion    | baseline                      |
| ``sage-hybrid``   | SAGE      | SAGE            | SinkGD  | SAGE    | SAGE paper's main method      |
| ``sage-pure``     | SAGE      | SAGE            | SAGE    | SAGE    | SAGE ablation                 |
| ``lion-hybrid``   | Lion      | Lion            | SinkGD  | Lion    | SAGE ablation                 |
| ``sinkgd-hybrid`` | AdamW     | AdamW           | SinkGD  | AdamW   | SinkGD paper's hybrid         |
| ``sinkgd-pure``   | SinkGD    | SinkGD          | SinkGD  | SinkGD  | SAGE ablation                 |
| ``scale``         | SCALE     | SCALE+momentum  | SCALE   | AdamW   | SCALE paper                   |
| ``sgd-sai``       | SGD-SaI   | SGD-SaI         | SGD-SaI | SGD-SaI | SGD-SaI paper                 |

Learning rates (peak, before the schedule). The papers' values were the starting point; each was
then swept by ``benchmarks/compare_enwiki.sh`` (``slimopt compare --sweep lr=0.25,1,4`` per rule,
llama-tiny on the enwiki corpus, 100k tokens per trial, best validation loss wins; the trials are
listed in ``docs/results.md``) and the default is the sweep's winner:

=================  ==============================  ============================================
preset             default (x paper value)         paper value and source
=================  ==============================  ============================================
``adamw``          AdamW 4e-3 (x4)                 1e-3, GaLore/SCALE LLaMA setup, wd 0
``lion``           Lion 1.6e-3 (x16, grid edge)    1e-4, the SAGE paper's Lion baseline
``sage-hybrid``    SAGE 8e-3 (x4), SinkGD 1e-3     SAGE 2e-3 (20x Lion, SAGE scripts)
``sage-pure``      SAGE 2e-3 (x1)                  2e-3
``lion-hybrid``    Lion 1.6e-3 (x16), SinkGD 1e-3  Lion 1e-4, SinkGD 1e-3
``sinkgd-hybrid``  SinkGD 2.5e-4 (x0.25),          SinkGD 1e-3 = 0.05 x 0.02, AdamW 0.02
                   AdamW 2e-2 (x1)                 (SinkGD paper)
``sinkgd-pure``    SinkGD 4e-3 (x4)                1e-3
``scale``          SCALE 1e-3 (x1), AdamW 0.32     SCALE 1e-3, adam_lr 0.02 (SCALE paper at
                   (x16, grid edge) for vectors    <= 350M); momentum 0.9 on the head
``sgd-sai``        SGD-SaI 2.5e-3 (x0.25)          1e-2, the ``sgd-sai`` package (x1 blew up,
                                                   x4 diverged)
=================  ==============================  ============================================

Other hyperparameters are the rules' defaults (betas, eps, SGD-SaI's momentum 0.9 and weight
decay 1e-2), with AdamW's weight decay 0 as in the GaLore setup. The sweep ran 49 optimizer steps
of a 2.9M-parameter model, so these defaults favour short runs of small models; larger models
want smaller rates (the papers' values above are for 60M-1.3B parameters): pass ``lr=`` or sweep
your own with ``slimopt compare --sweep``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimopt import lean, quant
from slimopt.algorithms import ALGORITHMS, get_rule
from slimopt.optimizer import SlimOptimizer
from slimopt.roles import ROLES, norm_dim_of, param_roles

_ALL = dict.fromkeys(ROLES)


@dataclass(frozen=True)
class PresetSpec:
    """One preset, in one record.

    Attributes:
        rules: role -> the rule that updates parameters of that role.
        primary: the rule whose learning rate ``create_optimizer(lr=...)`` sets (the preset's
            other rules keep their ratio to it).
        hparams: rule -> hyperparameters that differ from the rule's defaults.
        role_hparams: role -> hyperparameters for that role only.
    """

    rules: dict[str, str]
    primary: str
    hparams: dict[str, dict[str, Any]]
    role_hparams: dict[str, dict[str, Any]] = field(default_factory=dict)


def _spec(rules: dict[str, str] | str, primary: str, **hparams: Any) -> PresetSpec:
    role_hparams = hparams.pop("role_hparams", {})
    by_role = {r: rules for r in _ALL} if isinstance(rules, str) else rules
    return PresetSpec(by_role, primary, hparams, role_hparams)


PRESET_SPECS: dict[str, PresetSpec] = {
    "adamw": _spec("adamw", "adamw", adamw={"lr": 4e-3, "weight_decay": 0.0}),
    "lion": _spec("lion", "lion", lion={"lr": 1.6e-3}),
    "sage-hybrid": _spec(
        {"embedding": "sage", "lm_head": "sage", "matrix": "sinkgd", "vector": "sage"},
        "sage",
        sage={"lr": 8e-3},
        sinkgd={"lr": 1e-3},
    ),
    "sage-pure": _spec("sage", "sage", sage={"lr": 2e-3}),
    "lion-hybrid": _spec(
        {"embedding": "lion", "lm_head": "lion", "matrix": "sinkgd", "vector": "lion"},
        "lion",
        lion={"lr": 1.6e-3},
        sinkgd={"lr": 1e-3},
    ),
    "sinkgd-hybrid": _spec(
        {"embedding": "adamw", "lm_head": "adamw", "matrix": "sinkgd", "vector": "adamw"},
        "sinkgd",
        adamw={"lr": 2e-2, "weight_decay": 0.0},
        sinkgd={"lr": 2.5e-4},
    ),
    "sinkgd-pure": _spec("sinkgd", "sinkgd", sinkgd={"lr": 4e-3}),
    "scale": _spec(
        {"embedding": "scale", "lm_head": "scale", "matrix": "scale", "vector": "adamw"},
        "scale",
        scale={"lr": 1e-3},
        adamw={"lr": 0.32, "weight_decay": 0.0},
        role_hparams={"lm_head": {"momentum": 0.9}},
    ),
    "sgd-sai": _spec("sgd_sai", "sgd_sai", sgd_sai={"lr": 2.5e-3}),
}

# views of PRESET_SPECS (the same dicts): preset -> role -> rule, preset -> rule -> hyperparameters,
# preset -> role -> hyperparameters, preset -> primary rule
PRESET_RULES: dict[str, dict[str, str]] = {k: v.rules for k, v in PRESET_SPECS.items()}
PRESET_HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    k: v.hparams for k, v in PRESET_SPECS.items()
}
PRESET_ROLE_HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    k: v.role_hparams for k, v in PRESET_SPECS.items() if v.role_hparams
}
PRIMARY_RULE: dict[str, str] = {k: v.primary for k, v in PRESET_SPECS.items()}

PRESETS: tuple[str, ...] = tuple(PRESET_RULES)


def normalize_preset(name: str) -> str:
    """The preset's canonical name: case, underscores and spaces do not matter.

    >>> normalize_preset("SAGE_Hybrid"), normalize_preset("sgd sai")
    ('sage-hybrid', 'sgd-sai')
    """
    return "-".join(name.strip().lower().replace("_", " ").replace("-", " ").split())


def check_preset(preset: str) -> str:
    """The canonical name of ``preset`` (see :func:`normalize_preset`); a ``ValueError`` that
    lists the presets (and the closest one) for anything else.

    >>> check_preset("Sage_Hybrid")
    'sage-hybrid'
    >>> check_preset("sage-hybird")
    Traceback (most recent call last):
    ...
    ValueError: unknown preset 'sage-hybird' (did you mean 'sage-hybrid'?); presets are adamw, ...
    """
    if not isinstance(preset, str):
        raise TypeError(
            f"a preset is a name (one of {', '.join(PRESETS)}), got {_describe(preset)}"
        )
    name = normalize_preset(preset)
    if name not in PRESET_RULES:
        close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown preset {preset!r}{hint}; presets are {', '.join(PRESETS)}")
    return name


def _describe(obj: Any) -> str:
    """A short description of ``obj`` for an error message (never a whole model's repr)."""
    if isinstance(obj, nn.Module):
        return f"a model ({type(obj).__name__})"
    text = repr(obj)
    return f"{type(obj).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _preset_and_model(first: Any, second: Any) -> tuple[str, nn.Module]:
    """``(preset, model)`` from either argument order; a clear error for parameters without
    their module."""
    if isinstance(second, str) and not isinstance(first, str):
        first, second = second, first  # model-first, as in timm and pytorch_optimizer
    preset = check_preset(first)
    if not isinstance(second, nn.Module):
        if isinstance(second, Iterable) and not isinstance(second, (str, bytes)):
            what = f"a {type(second).__name__} of parameters"
            raise TypeError(
                f"create_optimizer({preset!r}, ...) needs the model (an nn.Module), got {what}: "
                "a preset gives each parameter a rule by its role (embedding, lm_head, matrix, "
                "vector), which only the module structure tells. Pass the model, "
                f"create_optimizer({preset!r}, model), or, for one rule on a parameter list, "
                "an optimizer class such as slimopt.SAGE(params, lr=...)"
            )
        raise TypeError(
            f"create_optimizer needs a preset name and a model, got {_describe(second)}"
        )
    return preset, second


def preset_lrs(preset: str) -> dict[str, float]:
    """The peak learning rate of each rule the preset uses (before any override).

    >>> preset_lrs("sage-hybrid")
    {'sage': 0.008, 'sinkgd': 0.001}
    """
    preset = check_preset(preset)
    rules = dict.fromkeys(PRESET_RULES[preset].values())
    return {
        rule: PRESET_HPARAMS[preset].get(rule, {}).get("lr", get_rule(rule).DEFAULTS["lr"])
        for rule in rules
    }


def _parse_override(key: str) -> tuple[str | None, str]:
    """``lr`` -> (None, 'lr'); ``sinkgd_lr`` -> ('sinkgd', 'lr'); ``lm_head_lr`` -> ('lm_head', 'lr')."""
    for target in sorted((*ALGORITHMS, *ROLES), key=len, reverse=True):
        if key.startswith(target + "_"):
            return target, key[len(target) + 1 :]
    return None, key


def create_optimizer(
    preset: str | nn.Module,
    model: nn.Module | str,
    lr: float | None = None,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    roles: dict[str, str] | None = None,
    step_in_backward: bool = False,
    stochastic_rounding: bool | None = None,
    **overrides: Any,
) -> SlimOptimizer:
    """Build ONE optimizer for the whole model following the preset table.

    Args:
        preset: one of :data:`PRESETS`; case, ``_`` and ``-`` do not matter (``"SAGE_hybrid"``).
        model: any ``nn.Module`` (Hugging Face causal LMs, tied heads and PEFT models included);
            parameters with ``requires_grad=False`` are left out. The model may come first, as
            in timm and pytorch_optimizer: ``create_optimizer(model, "sage-hybrid")``. A list or
            generator of parameters is a ``TypeError``: the roles need the module.
        lr: the peak learning rate of the preset's primary rule (SAGE in ``sage-hybrid``, SinkGD in
            ``sinkgd-hybrid``, ...); the preset's other rules are scaled by the same factor.
        foreach: ``None`` (default) lets every group run its fastest tier; ``False`` selects
            the single-tensor reference path of every rule (see :class:`SlimOptimizer`).
        fused: ``None`` (default): each rule's fused kernel where it has one for the tensors'
            device and dtype; ``True``: insist (an error naming what is missing); ``False``: never.
        roles: role overrides by parameter name, for parameters the structure cannot decide.
        step_in_backward: update each parameter during backward, as soon as its gradient is
            complete, and free the gradient (:mod:`slimopt.lean`).
        stochastic_rounding: bf16 parameters are written back rounded stochastically (``None``,
            the default, or ``True``) or to nearest (``False``).
        **overrides: hyperparameters. ``weight_decay=0.1`` sets it in every group whose rule has it;
            ``sinkgd_lr=5e-4`` only in SinkGD groups (any rule name as prefix); ``lm_head_lr=1e-3``
            only in the lm_head groups (any role as prefix).

    Every param group carries ``"algorithm"``, ``"role"``, ``"param_names"`` and its
    hyperparameters.

    Example:
        >>> import torch, slimopt
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(cfg)
        >>> opt = slimopt.create_optimizer("sage-hybrid", model, sinkgd_lr=5e-4)
        >>> sorted({(g["role"], g["algorithm"]) for g in opt.param_groups})
        [('embedding', 'sage'), ('lm_head', 'sage'), ('matrix', 'sinkgd'), ('vector', 'sage')]
        >>> slimopt.create_optimizer(model, "SAGE_Hybrid").param_groups[0]["lr"]  # model first
        0.008
    """
    preset, model = _preset_and_model(preset, model)
    if type(model).__module__.split(".")[0] == "deepspeed":
        raise ValueError(
            f"create_optimizer: the model is a {type(model).__name__} (DeepSpeed); its ZeRO "
            "partitions are flat fp32 buffers the rules and the lean modes cannot step. Build "
            "the optimizer on the plain model and shard it with FSDP2 (fully_shard) or DDP"
        )
    ddp = None
    if step_in_backward:
        lean.check_step_in_backward_model(model)
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):  # stepped from its buckets' hook
            ddp, model = model, model.module
    if isinstance(lr, torch.Tensor):  # a tensor lr (torchtitan, CUDA graphs): one value
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"a tensor lr must hold one floating value, got {tuple(lr.shape)} "
                             f"{lr.dtype}")  # fmt: skip
        value = 0.0 if lr.device.type == "meta" else float(lr.detach().reshape(()).cpu())
        if not 0 <= value < float("inf"):  # the groups check its device
            raise ValueError(f"lr must be a finite number >= 0, got {value}")
    elif lr is not None and not (
        isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 <= lr < float("inf")
    ):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    role_of = param_roles(model, overrides=roles)
    dims = norm_dim_of(model)
    table = PRESET_RULES[preset]

    # bucket trainable parameters by (role, rule, norm_dim)
    buckets: dict[tuple[str, str, tuple[tuple[str, Any], ...]], list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and not quant.is_quantized(p):  # int8 codes step in backward
            continue
        role = role_of[name]
        rule = table[role]
        layout = get_rule(rule).layout_options
        options = tuple(sorted(layout(role, dims.get(name, 1)).items())) if layout else ()
        buckets.setdefault((role, rule, options), []).append((name, p))
    if not buckets:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")

    scale = 1.0
    if lr is not None and not isinstance(lr, torch.Tensor):
        scale = lr / preset_lrs(preset)[PRIMARY_RULE[preset]]

    groups: list[dict[str, Any]] = []
    order = {r: i for i, r in enumerate(ROLES)}
    for (role, rule, options), named in sorted(buckets.items(), key=lambda kv: order[kv[0][0]]):
        hp = {
            **get_rule(rule).DEFAULTS,
            **PRESET_HPARAMS[preset].get(rule, {}),
            **PRESET_ROLE_HPARAMS.get(preset, {}).get(role, {}),
        }
        if isinstance(lr, torch.Tensor):  # each group its own tensor, as schedulers fill_ them
            ratio = hp["lr"] / preset_lrs(preset)[PRIMARY_RULE[preset]]
            hp["lr"] = (
                lr.detach().clone().reshape(()) * ratio
                if ratio != 1
                else lr.detach().clone().reshape(())
            )
        else:
            hp["lr"] = hp["lr"] * scale
        hp.update(options)
        groups.append(
            {
                "params": [p for _, p in named],
                "param_names": [n for n, _ in named],
                "algorithm": rule,
                "role": role,
                **hp,
            }
        )

    for key, value in overrides.items():
        target, hparam = _parse_override(key)
        hit = False
        for group in groups:
            if target is not None and target not in (group["algorithm"], group["role"]):
                continue
            if hparam in get_rule(group["algorithm"]).DEFAULTS:
                group[hparam] = value
                hit = True
        if not hit:
            where = f"the {target} groups of" if target else "any rule of"
            raise ValueError(
                f"override {key}={value!r}: {hparam!r} is not an option of {where} preset "
                f"{preset!r} (rules: {', '.join(sorted({g['algorithm'] for g in groups}))})"
            )
    opt = SlimOptimizer(
        groups,
        foreach=foreach,
        fused=fused,
        step_in_backward=step_in_backward,
        stochastic_rounding=stochastic_rounding,
    )
    if step_in_backward:
        if ddp is not None:
            lean.attach_ddp(ddp, opt)
        elif opt._backward_stepper is not None:
            units = lean.fsdp_units(model)
            if units:  # FSDP2: step each unit's parameters together after its reduce-scatter
                opt._backward_stepper.set_units(units)
    return opt


__all__ = [
    "PRESETS",
    "PRESET_SPECS",
    "PresetSpec",
    "PRESET_RULES",
    "check_preset",
    "create_optimizer",
    "normalize_preset",
    "preset_lrs",
]
