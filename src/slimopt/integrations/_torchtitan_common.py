"""Version-independent parts of the torchtitan integration: config-string parsing, roles from
torchtitan's parameter names, and state allocation without torch's zero-gradient step."""

from __future__ import annotations

import ast
from typing import Any

from torch import nn

from slimopt.optimizer import SlimOptimizer
from slimopt.roles import ROLES

#: ``optimizer.name`` (0.2) / ``ParamGroupConfig.optimizer_name`` (0.3) that selects slimopt.
NAME = "slimopt"

#: wrapper segments left out of parameter names (activation checkpointing, torch.compile), so
#: roles do not depend on how the model was wrapped.
_WRAPPERS = frozenset({"_checkpoint_wrapped_module", "_orig_mod"})

_EMBEDDINGS = frozenset({"tok_embeddings", "embed_tokens", "embeddings", "wte"})
_HEADS = frozenset({"output", "lm_head"})


def clean_name(name: str) -> str:
    """``layers.0._checkpoint_wrapped_module.attention.wo.weight`` -> ``layers.0.attention.wo.weight``."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def torchtitan_roles(model: nn.Module, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Every trainable parameter's role, from torchtitan's parameter names: ``tok_embeddings``
    -> embedding, ``output``/``lm_head`` -> lm_head, any ``*norm*`` module or other 1-D parameter
    -> vector, the rest (>= 2-D) -> matrix. Keyed by the model's own names; ``overrides`` (by
    either the model's or the wrapper-free name) win.

    Example:
        >>> import torch
        >>> m = torch.nn.ModuleDict({"tok_embeddings": torch.nn.Embedding(8, 4),
        ...     "norm": torch.nn.LayerNorm(4), "w": torch.nn.Linear(4, 4),
        ...     "output": torch.nn.Linear(4, 8, bias=False)})
        >>> torchtitan_roles(m)
        {'tok_embeddings.weight': 'embedding', 'norm.weight': 'vector', 'norm.bias': 'vector', 'w.weight': 'matrix', 'w.bias': 'vector', 'output.weight': 'lm_head'}
    """
    overrides = dict(overrides or {})
    for name, role in overrides.items():
        if role not in ROLES:
            raise ValueError(f"role for {name!r}: unknown role {role!r}; roles are {ROLES}")
    roles: dict[str, str] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = clean_name(name)
        parts = clean.split(".")
        if name in overrides or clean in overrides:
            roles[name] = overrides.pop(name, None) or overrides.pop(clean)
        elif parts[0] in _EMBEDDINGS and p.ndim == 2:
            roles[name] = "embedding"
        elif parts[0] in _HEADS and p.ndim == 2:
            roles[name] = "lm_head"
        elif p.ndim < 2 or any("norm" in part for part in parts[:-1]):
            roles[name] = "vector"
        else:
            roles[name] = "matrix"
    if overrides:
        raise ValueError(f"roles name parameters the model does not have: {sorted(overrides)}")
    return roles


def init_states(optimizers: list[Any]) -> None:
    """Allocate the state of every slimopt optimizer that has none yet, with
    ``SlimOptimizer.init_state()``: torch's zero-gradient, zero-lr step would count a step (and
    fix SGD-SaI's gsnr from a zero gradient), so asking for the state would change the run."""
    for opt in optimizers:
        if isinstance(opt, SlimOptimizer) and not opt.state:
            opt.init_state()


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
