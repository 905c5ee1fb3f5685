"""Lion (Chen et al. 2023): the sign of an interpolated momentum.

Spec (docs: algorithms.md, "Lion")::

    decoupled weight decay;  C = sign(b1*m + (1-b1)*g);  p = p - lr*C;  m = b2*m + (1-b2)*g

The arithmetic is ordered exactly as in the reference implementation ``lion-pytorch`` so that the two
agree bit for bit in float32. Non-finite gradients: a NaN propagates into the parameter; an Inf,
whose sign would be finite, is turned into NaN in the update so that it is not hidden.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimopt.algorithms._common import (
    add_scaled_,
    betas_of,
    betas_value,
    check_betas,
    check_nonneg,
    foreach_add_scaled_,
    foreach_sub_scaled_,
    lr_of,
    nan_if_nonfinite,
    sub_scaled_,
)
from slimopt.algorithms.base import (
    NATIVE_DTYPES,
    TRITON_DTYPES,
    Rule,
    kernel_rounding,
    native_cpu,
    native_takes,
    triton_cuda,
)

NAME = "lion"
DEFAULTS: dict[str, Any] = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0}


def validate(group: dict[str, Any]) -> None:
    check_nonneg(group, "lr")
    check_nonneg(group, "weight_decay")
    check_betas(group)


def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    return {"step": 0, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format)}


def reference(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One Lion step on one tensor, line by line as in the spec."""
    lr, wd = lr_of(group), group["weight_decay"]
    beta1, beta2 = betas_of(group)
    m = state["exp_avg"]
    state["step"] += 1
    p.mul_(1.0 - lr * wd)
    c = add_scaled_(m.mul(beta1), g, 1.0 - beta1)
    update = nan_if_nonfinite(c.sign(), c)
    sub_scaled_(p, update, lr)
    add_scaled_(m.mul_(beta2), g, 1.0 - beta2)


def foreach(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> None:
    """The same step for a list of tensors with multi-tensor (``torch._foreach_*``) kernels."""
    lr, wd = lr_of(group), group["weight_decay"]
    beta1, beta2 = betas_of(group)
    for s in states:
        s["step"] += 1
    if not params:
        return
    ms = [s["exp_avg"] for s in states]
    if wd != 0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    c = torch._foreach_mul(ms, beta1)
    foreach_add_scaled_(c, grads, 1.0 - beta1)
    update = torch._foreach_sign(c)
    torch._foreach_mul_(c, 0.0)  # 0 * c: NaN where c is +-inf, so that sign() hides nothing
    torch._foreach_add_(update, c)
    foreach_sub_scaled_(params, update, lr)
    torch._foreach_mul_(ms, beta2)
    foreach_add_scaled_(ms, grads, 1.0 - beta2)


def fused_cpu(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool = True,
) -> None:
    """The fused CPU tier: one native pass per tensor (read p, g, m; write p, m), for the tensors
    :func:`~slimopt.algorithms.base.native_takes` accepts (bf16 rounded in the loop)."""
    from slimopt.kernels import cpu

    lr, wd = lr_of(group), group["weight_decay"]
    beta1, beta2 = betas_value(group)
    items = []
    for p, g, s in zip(params, grads, states):
        s["step"] += 1
        items.append((p, g, s["exp_avg"], kernel_rounding(p, s, stochastic)))
    cpu.lion_step(items, lr, wd, beta1, beta2)


def _triton_takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
    """The Triton kernels take contiguous dense CUDA tensors of one dtype (pure bf16 included)."""
    from slimopt.kernels import triton_ops

    return triton_ops.kernel_ok(p, g, state["exp_avg"])


RULE = Rule(
    name=NAME,
    defaults=DEFAULTS,
    validate=validate,
    init_state=init_state,
    reference=reference,
    foreach=foreach,
    fused={"cpu": native_cpu(fused_cpu), "cuda": triton_cuda(NAME)},
    fused_dtypes={"cpu": NATIVE_DTYPES, "cuda": TRITON_DTYPES},
    sharded="elementwise",
    fused_takes={"cpu": native_takes("exp_avg"), "cuda": _triton_takes},
    rounds_bf16=("cpu", "cuda"),
    momentum_key="betas",
    temporaries=2,
)
