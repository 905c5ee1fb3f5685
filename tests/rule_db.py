"""The one rule table that drives the battery (in the style of torch's OptimizerInfo).

Every rule configuration below goes through the same checks in ``test_algorithms.py`` (each tier
against the reference in float64, resume, bad input, state bytes), ``test_fused.py`` (the fused
tiers and their fallbacks) and ``test_distributed.py`` (sharded against one process). A new rule
adds its rows here and nowhere else in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

import slimopt
from slimopt.algorithms import ALGORITHMS, RULES, get_rule
from slimopt.presets import PRESET_RULES, PRESETS


@dataclass(frozen=True)
class RuleCase:
    """One rule configuration: the group options beyond the rule's defaults, and hyperparameter
    values the rule must reject (key -> bad value)."""

    algorithm: str
    options: dict[str, Any] = field(default_factory=dict)
    bad: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.algorithm}[{extra}]" if extra else self.algorithm


RULE_CASES: list[RuleCase] = [
    RuleCase("sage", {"weight_decay": 0.1}, {"betas": (0.9, 1.0), "eps": -1.0}),
    RuleCase("sage", {"lion_order": True}, {"lion_order": "yes"}),
    RuleCase("sinkgd", {"weight_decay": 0.1}, {"iters": 0, "lr": -1.0}),
    RuleCase("sinkgd", {"iters": 1}, {"iters": 1.5}),
    RuleCase("scale", {}, {"norm_dim": 2, "momentum": 1.0}),
    RuleCase("scale", {"momentum": 0.9, "norm_dim": 0}, {"eps": float("nan")}),
    RuleCase("sgd_sai", {}, {"momentum": -0.1, "snr_normalize": "min"}),
    RuleCase("sgd_sai", {"momentum": 0.0}, {"weight_decay": -1.0}),
    RuleCase("sgd_sai", {"snr_normalize": "max"}, {"lr": "big"}),
    RuleCase("lion", {"weight_decay": 0.1}, {"betas": (0.9,)}),
    RuleCase("adamw", {}, {"betas": (1.5, 0.9), "weight_decay": -0.1}),
]

# zero-size, 0-dim, one-element, vectors, a [V, d] table, a matrix, ndim > 2
SHAPES: list[tuple[int, ...]] = [(0, 5), (), (1,), (7,), (50, 8), (6, 9), (4, 3, 5)]

# tier -> the optimizer arguments that select it
TIERS: dict[str, dict[str, Any]] = {
    "reference": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"fused": True},
    "default": {},
}


def has_fused(algorithm: str, device: str = "cpu", dtype: torch.dtype = torch.float64) -> bool:
    """Whether ``algorithm`` has a working fused tier for this device and dtype here."""
    rule = get_rule(algorithm)
    return dtype in rule.fused_dtypes.get(device, ()) and rule.fused_step(device) is not None


def make_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def fill_grads(params: list[torch.Tensor], step: int, skip_every: int = 3) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        # every third parameter misses a gradient on some steps (and one misses the first)
        if (i + step) % skip_every == 0:
            p.grad = None
        else:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * (1 + i)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    scale = b.abs().max().clamp(min=1e-30)
    return float((a - b).abs().max() / scale)


def make_optimizer(
    case: RuleCase, params: list[torch.Tensor], tier: str = "default"
) -> slimopt.SlimOptimizer:
    return slimopt.SlimOptimizer(
        [{"params": params, "algorithm": case.algorithm, **case.options}], **TIERS[tier]
    )


def run_case(
    case: RuleCase,
    tier: str = "default",
    steps: int = 6,
    dtype: torch.dtype = torch.float64,
    start: int = 0,
    params: list[torch.Tensor] | None = None,
    opt: slimopt.SlimOptimizer | None = None,
) -> tuple[list[torch.Tensor], slimopt.SlimOptimizer]:
    params = make_params(dtype) if params is None else params
    opt = make_optimizer(case, params, tier) if opt is None else opt
    for t in range(start, start + steps):
        fill_grads(params, t)
        opt.step()
    return params, opt


def check_covered() -> set[str]:
    """The rules without a row in :data:`RULE_CASES`."""
    return set(ALGORITHMS) - {c.algorithm for c in RULE_CASES}


# ------------------------------------------------------------------ lists derived from the registry
# Tests that run "every rule with X" or "a preset of each rule" take their lists from these, so
# that a new rule or preset is tested without editing them.
def triton_rules() -> list[str]:
    """The registered rules whose CUDA fused tier is a Triton kernel
    (:func:`slimopt.algorithms.base.triton_cuda`), in registry order."""
    return [
        name
        for name, rule in RULES.items()
        if getattr(rule.fused.get("cuda"), "__qualname__", "").startswith("triton_cuda.")
    ]


def reducing_rules() -> list[str]:
    """The registered rules that reduce over a matrix (rows or columns), in registry order."""
    return [name for name, rule in RULES.items() if rule.sharded == "reducing"]


def rules_of(preset: str) -> set[str]:
    """The rules a preset uses."""
    return set(PRESET_RULES[preset].values())


def presets_covering(rules: list[str] | None = None) -> list[str]:
    """A few presets that together use every rule of ``rules`` (default: every registered rule):
    greedily the preset that adds the most rules not yet used, the first in ``PRESETS`` on a tie.

    >>> presets_covering(["sage", "sinkgd", "lion"])
    ['sage-hybrid', 'lion']
    """
    wanted = set(ALGORITHMS if rules is None else rules)
    chosen: list[str] = []
    while wanted:
        best = max(PRESETS, key=lambda p: len(rules_of(p) & wanted))
        if not rules_of(best) & wanted:
            raise AssertionError(f"no preset uses {sorted(wanted)}")
        chosen.append(best)
        wanted -= rules_of(best)
    return chosen


def expected_state_bytes(case: RuleCase, p: torch.Tensor) -> int:
    """The bytes the spec's state of ``case`` takes for parameter ``p`` (written from the spec,
    independently of the rules' code)."""
    n, size = p.numel(), p.element_size()
    momentum = case.options.get("momentum", get_rule(case.algorithm).defaults.get("momentum", 0))
    if case.algorithm == "adamw":
        return 2 * n * size + 4  # exp_avg, exp_avg_sq, a float32 step
    if case.algorithm == "lion":
        return n * size
    if case.algorithm == "sage":
        columns = math.prod(p.shape[1:]) if p.ndim >= 2 else n
        return (n + columns) * size  # momentum + the O(d) statistic
    if case.algorithm == "sinkgd":
        return 0
    if case.algorithm == "scale":
        return n * size if momentum > 0 else 0
    if case.algorithm == "sgd_sai":
        gsnr = 8 if p.dtype == torch.float64 else 4
        return (n * size if momentum > 0 else 0) + gsnr
    raise AssertionError(f"no state formula for {case.algorithm}; add one")
