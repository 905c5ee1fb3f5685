"""The update rules. Each module holds one rule: ``NAME``, ``DEFAULTS``, ``validate(group)``,
``init_state(p, group)`` (allocates the rule's state; works on the meta device), a readable
single-tensor ``reference(p, g, state, group)`` that mirrors the spec, and the fast multi-tensor
``foreach(params, grads, states, group)``. SGD-SaI also has ``prepare`` (fixes gsnr at the first step).
"""

from __future__ import annotations

from types import ModuleType

from slimopt.algorithms import adamw, lion, sage, scale, sgd_sai, sinkgd

RULES: dict[str, ModuleType] = {m.NAME: m for m in (sage, sinkgd, scale, sgd_sai, lion, adamw)}
ALGORITHMS: tuple[str, ...] = tuple(RULES)


def get_rule(name: str) -> ModuleType:
    """The rule module called ``name``; a clear error for anything else."""
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown algorithm {name!r}; expected one of {', '.join(ALGORITHMS)}"
        ) from None


__all__ = ["ALGORITHMS", "RULES", "get_rule"]
