"""The update rules, one module each, registered here.

Each module holds one rule: ``NAME``, ``DEFAULTS``, ``validate(group)``, ``init_state(p, group)``
(allocates the rule's state; works on the meta device), a readable single-tensor
``reference(p, g, state, group)`` that mirrors the spec, the multi-tensor
``foreach(params, grads, states, group)``, and ``RULE``: the :class:`~slimopt.algorithms.base.Rule`
that declares them with its fused tiers and sharded behaviour. Adding a rule is one module and
one line in :data:`RULES` (see ``docs/adding-a-rule.md``).

Example:
    >>> from slimopt.algorithms import ALGORITHMS, get_rule
    >>> ALGORITHMS
    ('sage', 'sinkgd', 'scale', 'sgd_sai', 'lion', 'adamw')
    >>> get_rule("sinkgd").DEFAULTS["iters"]
    5
"""

from __future__ import annotations

from slimopt.algorithms import adamw, lion, sage, scale, sgd_sai, sinkgd
from slimopt.algorithms.base import Rule

RULES: dict[str, Rule] = {
    r.name: r for r in (sage.RULE, sinkgd.RULE, scale.RULE, sgd_sai.RULE, lion.RULE, adamw.RULE)
}
ALGORITHMS: tuple[str, ...] = tuple(RULES)


def get_rule(name: str) -> Rule:
    """The rule called ``name``; a clear error for anything else."""
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown algorithm {name!r}; expected one of {', '.join(ALGORITHMS)}"
        ) from None


__all__ = ["ALGORITHMS", "RULES", "Rule", "get_rule"]
