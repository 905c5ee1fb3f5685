"""The first-use self-check of the Triton kernels against each rule's reference.

The kernels (:mod:`slimopt.kernels.triton_ops`) know no rule's reference: this module, on the
rules' side, runs each rule's kernel step beside its ``reference`` on tiny tensors the first time
the rule's ``"cuda"`` loader is asked for it (:func:`slimopt.algorithms.base.triton_cuda`). A rule
whose kernels disagree, or fail to compile, gets no fused step (one warning), and
``Rule.partition`` puts its tensors on the multi-tensor path.

Example (``TRITON_INTERPRET=1`` set before triton is imported, or on a CUDA machine)::

    >>> from slimopt.algorithms import kernel_check     # doctest: +SKIP
    >>> kernel_check.self_check("lion")                  # doctest: +SKIP
    True
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from slimopt.algorithms import get_rule
from slimopt.kernels import triton_ops

_checked: dict[tuple[str, str], bool] = {}


def _prepare(
    mod: Any,
    group: dict[str, Any],
    grads: list[Tensor],
    *sides: tuple[list[Tensor], list[dict[str, Any]]],
) -> dict[str, Any]:
    """Run the rule's ``prepare`` (SGD-SaI's first-step measurement) on every side's tensors and
    return the step's extra arguments (``gsnr_max`` for ``snr_normalize="max"``, from the first
    side's states)."""
    if mod.prepare is None:
        return {}
    for params, states in sides:
        for p, g, s in zip(params, grads, states):
            mod.prepare(p, g, s, group)
    if group.get("snr_normalize") != "max":
        return {}
    return {"gsnr_max": torch.stack([s["gsnr"] for s in sides[0][1]]).max()}


def _compare_once(rule: str, options: dict[str, Any], device: torch.device) -> str | None:
    """Two steps of the kernel and of the reference on tiny float32 tensors; what differs, or None."""
    mod = get_rule(rule)
    group = dict(mod.DEFAULTS, lr=0.01, weight_decay=0.1, **options)
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 33), (3, 2, 4), (7,), (1,), (0,)]
    ref = [torch.randn(s, generator=gen).to(device) for s in shapes]
    fast = [p.clone() for p in ref]
    ref_states = [mod.init_state(p, group) for p in ref]
    fast_states = [mod.init_state(p, group) for p in fast]
    for _ in range(2):
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
        extra = _prepare(mod, group, grads, (ref, ref_states), (fast, fast_states))
        for p, g, s in zip(ref, grads, ref_states):
            mod.reference(p, g, s, group, **extra)
        triton_ops.STEPS[rule](fast, grads, fast_states, group, **extra)
    for i, (a, b) in enumerate(zip(ref, fast)):
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True):
            return f"parameter {i} of shape {tuple(a.shape)} differs by {(a - b).abs().max():.3g}"
    for i, (sa, sb) in enumerate(zip(ref_states, fast_states)):
        if set(sa) != set(sb):
            return f"state keys {sorted(sa)} != {sorted(sb)}"
        for key, va in sa.items():
            vb = sb[key]
            same = (
                torch.allclose(va, vb, rtol=1e-5, atol=1e-6, equal_nan=True)
                if isinstance(va, Tensor)
                else va == vb
            )
            if not same:
                return f"state {key!r} of parameter {i} differs"
    return None


def _bf16_spacing(x: Tensor) -> Tensor:
    """The distance from |x| (bf16) to the next larger bf16 value, in float32."""
    bits = x.float().abs().view(torch.int32) & -65536
    return (bits + 65536).view(torch.float32) - bits.view(torch.float32)


def _compare_pure(rule: str, device: torch.device) -> str | None:
    """Two pure-bf16 steps of the kernels (stochastic rounding in the kernel) and of the
    reference on fp32 copies rounded with the same counter-based bits (:mod:`slimopt.lean`): every
    element within one bf16 spacing, at most 5% (or 2) of them off at all (bits from another
    counter would move about a third), NaN where the reference has NaN; what differs, or None."""
    from slimopt import lean

    mod = get_rule(rule)
    group = dict(mod.DEFAULTS, lr=0.01, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    shapes = [(5, 33), (7,), (0,)]
    ref = [torch.randn(s, generator=gen).to(torch.bfloat16).to(device) for s in shapes]
    fast = [p.clone() for p in ref]
    ref_states = [
        dict(mod.init_state(p, group), sr_seed=7 + i, sr_step=0) for i, p in enumerate(ref)
    ]
    fast_states = [
        dict(mod.init_state(p, group), sr_seed=7 + i, sr_step=0) for i, p in enumerate(fast)
    ]
    for _ in range(2):
        grads = [torch.randn(s, generator=gen).to(torch.bfloat16).to(device) for s in shapes]
        extra = _prepare(mod, group, grads, (ref, ref_states), (fast, fast_states))

        def apply(
            ps: list[Tensor], gs: list[Tensor], ss: list[dict[str, Any]], kw: dict[str, Any] = extra
        ) -> None:
            for p, g, s in zip(ps, gs, ss):
                mod.reference(p, g, s, group, **kw)

        lean.step_low_precision(
            apply, ref, grads, ref_states, stochastic=True, rule=mod, group=group
        )
        triton_ops.STEPS[rule](fast, grads, fast_states, group, stochastic=True, **extra)
    pairs = [(f"parameter {i}", a, b) for i, (a, b) in enumerate(zip(ref, fast))]
    for i, (sa, sb) in enumerate(zip(ref_states, fast_states)):
        if sa.get("sr_step") != sb.get("sr_step"):
            return f"sr_step of parameter {i}: {sb.get('sr_step')} != {sa.get('sr_step')}"
        pairs += [
            (f"state {k!r} of parameter {i}", v, sb[k])
            for k, v in sa.items()
            if isinstance(v, Tensor) and v.dtype == torch.bfloat16
        ]
    for what, a, b in pairs:
        a, b = a.float().cpu(), b.float().cpu()
        if not torch.equal(a.isnan(), b.isnan()):
            return f"{what}: NaN in other places"
        keep = ~a.isnan()
        diff = (a[keep] - b[keep]).abs()
        spacing = torch.maximum(_bf16_spacing(a[keep]), _bf16_spacing(b[keep]))
        off = int((diff > 0).sum())
        if (diff > spacing).any() or off > max(2, a.numel() // 20):
            return f"{what} in pure bf16: {off} of {a.numel()} differ, by up to {diff.max():.3g}"
    return None


def self_check(rule: str, device: str | torch.device | None = None) -> bool:
    """Whether ``rule``'s kernels compile and agree with its reference on ``device`` (default: the
    current CUDA device, or the CPU under the interpreter): two steps on tiny float32 tensors for
    every kernel path of the rule, within rtol 1e-5, atol 1e-6, and two pure-bf16 steps against
    the reference on fp32 copies rounded with the same bits (:func:`_compare_pure`: within one
    bf16 spacing, at most 5% of the elements off). Cached per rule and device. On
    failure it warns (the caller then keeps the multi-tensor path) and returns False.

    Example (``TRITON_INTERPRET=1`` set before the import, or on a CUDA machine)::

        >>> from slimopt.algorithms.kernel_check import self_check    # doctest: +SKIP
        >>> self_check("lion")                                       # doctest: +SKIP
        True
    """
    if rule not in triton_ops.STEPS:
        raise ValueError(
            f"no Triton kernels for {rule!r}; expected one of {', '.join(triton_ops.STEPS)}"
        )
    if device is None:
        device = "cpu" if triton_ops.interpreted() else "cuda"
    dev = torch.device(device)
    key = (rule, str(dev))
    if key in _checked:
        return _checked[key]
    problem = None
    if dev.type == "cpu" and not triton_ops.interpreted():
        problem = "CPU tensors need TRITON_INTERPRET=1 before triton is imported"
    else:
        try:
            for options in triton_ops.CHECK_OPTIONS[rule]:
                problem = _compare_once(rule, options, dev)
                if problem is not None:
                    problem = f"{problem} (options {options})"
                    break
            if problem is None:
                problem = _compare_pure(rule, dev)
        except Exception as exc:  # a compile or launch failure: fall back, say why
            problem = f"{type(exc).__name__}: {exc}"
    ok = problem is None
    if not ok:
        warnings.warn(
            f"slimopt: the Triton kernels of {rule!r} failed their self-check on {dev} "
            f"({problem}); the multi-tensor path is used instead",
            RuntimeWarning,
            stacklevel=2,
        )
    _checked[key] = ok
    return ok


__all__ = ["self_check"]
