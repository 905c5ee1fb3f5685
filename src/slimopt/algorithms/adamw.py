"""AdamW with ``torch.optim.AdamW`` semantics: the baseline every table is measured against.

Reference (one tensor, as torch's single-tensor loop)::

    t += 1;  p = p * (1 - lr*wd)
    m = lerp(m, g, 1-b1);  v = b2*v + (1-b2)*g*g
    p = p - lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)

The fast tiers are torch's own multi-tensor (``foreach``) and ``fused`` kernels, so the ``adamw``
preset is exactly ``torch.optim.AdamW`` (fused by default on CPU and CUDA). State: ``step`` (a float32 scalar tensor, as torch keeps it),
``exp_avg``, ``exp_avg_sq``. Non-finite gradients propagate into the parameter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _get_capturable_supported_devices

from slimopt.algorithms._common import (
    betas_of,
    betas_value,
    check_betas,
    check_nonneg,
    lr_of,
    lr_value,
    others,
    take,
)
from slimopt.algorithms.base import Rule, kernel_rounding, native_takes

NAME = "adamw"
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-2,
}


def validate(group: dict[str, Any]) -> None:
    check_nonneg(group, "lr")
    check_nonneg(group, "eps")
    check_nonneg(group, "weight_decay")
    check_betas(group)


def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    # torch's fused kernel wants the step counter beside the parameter; its multi-tensor path on
    # an accelerator wants it on the CPU (no device sync per parameter)
    fused = group.get("fused") is not False and p.device.type in FUSED_DTYPES
    step_device = p.device if fused or p.device.type in ("cpu", "meta") else torch.device("cpu")
    return {
        "step": torch.zeros((), dtype=torch.float32, device=step_device),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def reference(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One AdamW step on one tensor, as torch's single-tensor implementation computes it (which
    reads a tensor lr and the step counter on the host)."""
    lr, eps, wd = lr_value(group), group["eps"], group["weight_decay"]
    beta1, beta2 = betas_value(group)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    state["step"] += 1
    t = float(state["step"].item())
    p.mul_(1.0 - lr * wd)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    step_size = lr / (1.0 - beta1**t)
    denom = (v.sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def _torch_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    fused: bool,
) -> None:
    if not params:
        return
    lr, capturable = (group["lr"], False) if fused else _foreach_lr(params, states, group)
    # torch's kernels take tensor betas only when capturable (multi-tensor); else numbers
    beta1, beta2 = betas_of(group) if capturable else betas_value(group)
    _torch_adam(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        [s["step"] for s in states],
        foreach=not fused,
        fused=fused,
        capturable=capturable,
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )


def _foreach_lr(
    params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> tuple[float | Tensor, bool]:
    """The lr and ``capturable`` flag for torch's multi-tensor AdamW, which takes a tensor lr only
    when capturable (bias corrections as tensor ops, step counters beside the parameters).
    Traced by torch.compile it is capturable, with the lr a tensor (a float lr too: see
    ``lr_of``); in eager mode a tensor lr is capturable where torch allows it (an accelerator,
    counters on the parameters' device) and is read on the host otherwise (the CPU)."""
    if torch.compiler.is_compiling():
        return lr_of(group), True
    lr = group["lr"]
    if not isinstance(lr, Tensor):
        return lr, False
    devices = _get_capturable_supported_devices()
    if all(
        p.device.type in devices and s["step"].device == p.device for p, s in zip(params, states)
    ):
        return lr_of(group), True
    return lr_value(group), False


def foreach(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> None:
    """torch's multi-tensor AdamW kernel."""
    _torch_step(params, grads, states, group, fused=False)


def fused_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    stochastic: bool = True,
) -> None:
    """torch's fused AdamW kernel (one pass over p, g, m and v); pure-bf16 parameters on the CPU
    take the native loop, which reads bf16 and rounds inside (torch's kernel would round the
    parameter to nearest)."""
    low = [i for i, (p, s) in enumerate(zip(params, states)) if _pure_bf16(p, s)]
    if not low:
        _torch_step(params, grads, states, group, fused=True)
        return
    from slimopt.kernels import cpu

    items = []
    for p, g, s in zip(*take(low, params, grads, states)):
        s["step"] += 1
        rounding = kernel_rounding(p, s, stochastic)
        items.append((p, g, s["exp_avg"], s["exp_avg_sq"], float(s["step"]), rounding))
    beta1, beta2 = betas_value(group)
    cpu.adamw_step(items, lr_of(group), group["weight_decay"], beta1, beta2, group["eps"])
    rest = others(low, len(params))
    _torch_step(*take(rest, params, grads, states), group, fused=True)


def _pure_bf16(p: Tensor, state: dict[str, Any]) -> bool:
    return p.dtype == torch.bfloat16 and "sr_seed" in state


def _takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
    """torch's kernel takes plain tensors whose step counter is on their device; a pure-bf16
    CPU tensor goes to the native loop where it is built."""
    if _pure_bf16(p, state):
        from slimopt.kernels import cpu

        keys = ("exp_avg", "exp_avg_sq")
        return (
            p.device.type == "cpu"
            and cpu.library() is not None
            and native_takes(*keys)(p, g, state, group)
        )
    plain = type(p) in (Tensor, torch.nn.Parameter) and p.layout == torch.strided
    return plain and state["step"].device == p.device


# torch's fused AdamW takes these devices and dtypes
FUSED_DTYPES = {
    "cpu": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
}

RULE = Rule(
    name=NAME,
    defaults=DEFAULTS,
    validate=validate,
    init_state=init_state,
    reference=reference,
    foreach=foreach,
    fused={"cpu": lambda: fused_step, "cuda": lambda: fused_step},
    fused_dtypes=FUSED_DTYPES,
    fused_takes={"cpu": _takes, "cuda": _takes},
    rounds_bf16=("cpu",),
    sharded="elementwise",
    momentum_key="betas",
    temporaries=1,  # torch's foreach AdamW: the denominator
)
