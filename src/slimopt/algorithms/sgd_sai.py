"""SGD-SaI: SGD with momentum whose per-tensor learning rate is fixed at the first step.

Spec (algorithms.md, "SGD-SaI")::

    at the parameter's first step with a gradient:
        gsnr = ||g||_2 / (std(g) + eps)      std unbiased (N-1), per tensor, computed once and stored
        m = g
    later steps:  m = mu*m + (1-mu)*g
    decoupled weight decay (not scaled by gsnr);  p = p - lr * gsnr * m

``snr_normalize="max"`` divides every gsnr by the largest gsnr of the optimizer's parameters that use
this option (the paper's Algorithm 1). Deliberate differences from the official package, each tested:
a one-element tensor gets gsnr = 1 (its std is undefined); ``momentum=0`` works (m = g); a parameter
whose first gradient arrives late gets its gsnr then; gsnr lives in the state, so a resumed run
continues exactly. The arithmetic otherwise follows ``sgd-sai`` 1.0.3. Non-finite gradients: a NaN or
Inf at the first step makes gsnr NaN, later ones make m non-finite; either way the parameter shows it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimopt.algorithms import fused, native
from slimopt.algorithms._common import (
    check_choice,
    check_nonneg,
    check_unit_interval,
    lr_of,
    others,
    take,
)
from slimopt.distributed import RowShard, global_numel, norm_and_std

NAME = "sgd_sai"
DEFAULTS: dict[str, Any] = {
    "lr": 1e-2,
    "momentum": 0.9,
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "snr_normalize": None,
}


def validate(group: dict[str, Any]) -> None:
    check_nonneg(group, "lr")
    check_nonneg(group, "eps")
    check_nonneg(group, "weight_decay")
    check_unit_interval(group, "momentum", group["momentum"])
    check_choice(group, "snr_normalize", (None, "max"))


def gsnr_dtype(p: Tensor) -> torch.dtype:
    """float32 for fp32/bf16/fp16 parameters, float64 for float64 ones."""
    return torch.promote_types(p.dtype, torch.float32)


def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "step": 0,
        "gsnr": torch.ones((), dtype=gsnr_dtype(p), device=p.device),
    }
    if group["momentum"] > 0:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def gradient_snr(g: Tensor, eps: float, shard: RowShard | None = None) -> Tensor:
    """||g|| / (std(g) + eps) with the unbiased std; 1 where the std is undefined (numel <= 1).

    ``shard``: ``g`` holds some rows of a tensor sharded on dim 0; norm and std are global."""
    if global_numel(g, shard) <= 1:
        return torch.ones((), dtype=gsnr_dtype(g), device=g.device)
    x = g.to(gsnr_dtype(g))
    norm, std = norm_and_std(x, shard)
    return norm / (std + eps)


def prepare(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    shard: RowShard | None = None,
) -> None:
    """Fix gsnr at the parameter's first step with a gradient (before any update of this step,
    so that ``snr_normalize="max"`` sees every new gsnr). The update itself is element-wise.

    ``shard``: ``g`` is the local rows of a gradient sharded on dim 0."""
    if state["step"] == 0:
        state["gsnr"].copy_(gradient_snr(g, group["eps"], shard))


def _scale(state: dict[str, Any], group: dict[str, Any], gsnr_max: Tensor | None) -> Tensor:
    if group["snr_normalize"] == "max":
        assert gsnr_max is not None
        return state["gsnr"] / gsnr_max
    return state["gsnr"]


def reference(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    gsnr_max: Tensor | None = None,
) -> None:
    """One SGD-SaI step on one tensor (gsnr already fixed by :func:`prepare`)."""
    lr, wd, mu = lr_of(group), group["weight_decay"], group["momentum"]
    first = state["step"] == 0
    state["step"] += 1
    if mu > 0:
        m = state["momentum_buffer"]
        if first:
            m.copy_(g)
        else:
            m.mul_(mu).add_(g, alpha=1.0 - mu)
    else:
        m = g
    step_size = lr * _scale(state, group, gsnr_max)
    p.mul_(1.0 - wd * lr)
    p.sub_(m * step_size.to(p.dtype))


def _fused_later_steps(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    gsnr_max: Tensor | None,
) -> set[int]:
    """After its first step SGD-SaI is SGD with momentum and a fixed per-tensor lr: one fused
    pass per tensor (read p, g, m; write p, m), a native loop on CPU, a compiled one elsewhere.
    Returns the indices it stepped."""
    mu = group["momentum"]
    done = {
        i
        for i, (p, s) in enumerate(zip(params, states))
        if s["step"] > 0 and p.numel() > 1 and fused.usable((p, grads[i], s["momentum_buffer"]))
    }
    lr, wd = lr_of(group), group["weight_decay"]
    on_cpu = [i for i in sorted(done) if native.supports_all(params[i], grads[i])]
    if on_cpu:
        items = []
        for i in on_cpu:
            p, s = params[i], states[i]
            step = float((lr * _scale(s, group, gsnr_max)).to(p.dtype))
            items.append((p, grads[i], s["momentum_buffer"], step))
            s["step"] += 1
        native.sgd_sai_step(items, lr, wd, mu)
    hp = fused.Hyper((lr, wd, mu))
    for i in sorted(done.difference(on_cpu)):
        p, s = params[i], states[i]
        fused.call(
            "sgd_sai",
            fused.sgd_sai_kernel,
            p.view(-1),
            grads[i].view(-1),
            s["momentum_buffer"].view(-1),
            hp.on(p.device),
            _scale(s, group, gsnr_max),
        )
        s["step"] += 1
    return done


def foreach(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    gsnr_max: Tensor | None = None,
) -> None:
    """The same step for a list of tensors with multi-tensor kernels (fused kernels, when on,
    for every tensor past its first step)."""
    lr, wd, mu = lr_of(group), group["weight_decay"], group["momentum"]
    if mu > 0 and fused.fused_enabled():
        done = _fused_later_steps(params, grads, states, group, gsnr_max)
        if done:
            params, grads, states = take(others(done, len(params)), params, grads, states)
            if not params:
                return
    if mu > 0:
        first = [i for i, s in enumerate(states) if s["step"] == 0]
        later = [i for i, s in enumerate(states) if s["step"] > 0]
        for i in first:
            states[i]["momentum_buffer"].copy_(grads[i])
        if later:
            ms_later = [states[i]["momentum_buffer"] for i in later]
            torch._foreach_mul_(ms_later, mu)
            torch._foreach_add_(ms_later, [grads[i] for i in later], alpha=1.0 - mu)
        ms = [s["momentum_buffer"] for s in states]
    else:
        ms = list(grads)
    for s in states:
        s["step"] += 1
    if wd != 0:
        torch._foreach_mul_(params, 1.0 - wd * lr)
    for p, m, s in zip(params, ms, states):
        # p - m * step without a temporary the size of p
        p.addcmul_(m, (lr * _scale(s, group, gsnr_max)).to(p.dtype), value=-1.0)
