"""AdamW with ``torch.optim.AdamW`` semantics: the baseline every table is measured against.

Reference (one tensor, as torch's single-tensor loop)::

    t += 1;  p = p * (1 - lr*wd)
    m = lerp(m, g, 1-b1);  v = b2*v + (1-b2)*g*g
    p = p - lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)

The fast path is torch's own multi-tensor (``foreach``) or ``fused`` kernel, so the ``adamw`` preset
is exactly ``torch.optim.AdamW``. State: ``step`` (a float32 scalar tensor, as torch keeps it),
``exp_avg``, ``exp_avg_sq``. Non-finite gradients propagate into the parameter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam

from slimopt.algorithms import fused
from slimopt.algorithms._common import check_betas, check_choice, check_nonneg, lr_of

NAME = "adamw"
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "fused": None,
}


def validate(group: dict[str, Any]) -> None:
    check_nonneg(group, "lr")
    check_nonneg(group, "eps")
    check_nonneg(group, "weight_decay")
    check_betas(group)
    check_choice(group, "fused", (None, False, True))


def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    step_device = p.device if group.get("fused") else torch.device("cpu")
    if p.device.type == "meta":
        step_device = p.device
    return {
        "step": torch.zeros((), dtype=torch.float32, device=step_device),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def reference(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One AdamW step on one tensor, as torch's single-tensor implementation computes it."""
    lr, eps, wd = lr_of(group), group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    state["step"] += 1
    t = float(state["step"].item())
    p.mul_(1.0 - lr * wd)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    step_size = lr / (1.0 - beta1**t)
    denom = (v.sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def _fused_supported(params: list[Tensor], states: list[dict[str, Any]]) -> bool:
    """Whether torch's fused kernel can take these tensors (its step counters must share the
    parameters' device, which ``init_state`` arranges on CPU and with ``fused=True``)."""
    return all(
        p.device.type in ("cpu", "cuda")
        and s["step"].device == p.device
        and p.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
        and fused.usable((p,))
        for p, s in zip(params, states)
    )


def foreach(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> None:
    """torch's multi-tensor (or fused, with ``fused=True``) AdamW kernel. With ``fused=None`` and
    slimopt's fused kernels on (:func:`slimopt.algorithms.fused.set_fused`), torch's fused kernel
    where it applies: one pass over p, g, m and v instead of several."""
    beta1, beta2 = group["betas"]
    fused_kernel = group.get("fused")
    if fused_kernel is None:
        fused_kernel = fused.fused_enabled() and _fused_supported(params, states)
    fused_kernel = bool(fused_kernel)
    _torch_adam(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        [s["step"] for s in states],
        foreach=not fused_kernel,
        fused=fused_kernel,
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )
