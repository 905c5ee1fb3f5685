"""SGD-SaI: SGD with momentum whose per-tensor learning rate is fixed at the first step.

Spec (algorithms.md, "SGD-SaI")::

    at the parameter's first measurable step (a non-zero gradient and a non-zero lr):
        gsnr = ||g||_2 / (std(g) + eps)      std unbiased (N-1), per tensor, computed once and stored
        m = g
    later steps:  m = mu*m + (1-mu)*g
    decoupled weight decay (not scaled by gsnr);  p = p - lr * gsnr * m

``snr_normalize="max"`` divides every gsnr by the largest gsnr of the optimizer's parameters that use
this option (the paper's Algorithm 1). Deliberate differences from the official package, each tested:
a one-element tensor gets gsnr = 1 (its std is undefined); ``momentum=0`` works (m = g); a parameter
whose first gradient arrives late gets its gsnr then; a step at lr 0 or with an all-zero gradient
(what torch.distributed.checkpoint's state initialisation runs) measures nothing, so gsnr stays unset
(``GSNR_UNSET``), m and the step count untouched, and only the weight decay applies (a one-element
tensor's gsnr is 1 whatever its gradient, so only lr 0 leaves it unset); gsnr lives in the state, so a resumed run
continues exactly. The arithmetic otherwise follows ``sgd-sai`` 1.0.3. Non-finite gradients: a NaN or
Inf at the first step makes gsnr NaN, later ones make m non-finite; either way the parameter shows it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimopt.algorithms._common import (
    check_choice,
    check_nonneg,
    check_unit_interval,
    lr_of,
    lr_value,
    others,
    take,
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
from slimopt.sharding import Reduction, RowShard, global_numel, norm_and_std

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


# gsnr before the parameter's first measurable step: no ratio is ever negative (NaN, from a
# non-finite first gradient, is a measured value and shows in the parameter).
GSNR_UNSET = -1.0


def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "step": 0,
        "gsnr": torch.full((), GSNR_UNSET, dtype=gsnr_dtype(p), device=p.device),
    }
    if group["momentum"] > 0:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def gsnr_unset(state: dict[str, Any]) -> bool:
    """Whether the parameter has not had its first measurable step (gsnr and m are unset)."""
    return state["step"] == 0 and bool(state["gsnr"] < 0)


def gradient_snr(g: Tensor, eps: float, shard: RowShard | None = None) -> Tensor:
    """||g|| / (std(g) + eps) with the unbiased std; 1 where the std is undefined (numel <= 1).

    ``shard``: ``g`` holds some rows of a tensor sharded on dim 0; norm and std are global."""
    return _snr_and_norm(g, eps, shard)[0]


def _snr_and_norm(g: Tensor, eps: float, shard: RowShard | None) -> tuple[Tensor, Tensor | None]:
    """gsnr and ||g||; the norm is None for a one-element tensor, whose gsnr is 1 whatever its
    gradient (so a zero one cannot freeze it, and no collective is needed on a shard)."""
    if global_numel(g, shard) <= 1:
        return torch.ones((), dtype=gsnr_dtype(g), device=g.device), None
    dtype = gsnr_dtype(g)
    if shard is None and g.dtype != dtype and g.numel() > _CHUNK:
        norm, std = _norm_and_std_in_chunks(g, dtype)  # a bf16 table: no fp32 copy of it whole
    else:
        norm, std = norm_and_std(g.to(dtype), shard)
    return norm / (std + eps), norm


_CHUNK = 1 << 22


def _norm_and_std_in_chunks(g: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(||g||_2, std(g))`` (unbiased) from float64 sums over chunks of ``g``, in ``dtype``."""
    flat, n = g.reshape(-1), g.numel()
    parts = range(0, n, _CHUNK)
    total = sum(flat[i : i + _CHUNK].to(torch.float64).sum() for i in parts)
    mean = total / n
    sq = dev = torch.zeros((), dtype=torch.float64, device=g.device)
    for i in parts:
        x = flat[i : i + _CHUNK].to(torch.float64)
        sq = sq + x.pow(2).sum()
        dev = dev + (x - mean).pow(2).sum()
    return sq.sqrt().to(dtype), (dev / (n - 1)).sqrt().to(dtype)


def prepare(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    shard: RowShard | None = None,
) -> None:
    """Fix gsnr at the parameter's first measurable step (before any update of this step, so
    that ``snr_normalize="max"`` sees every new gsnr). A step at lr 0 or with an all-zero
    gradient measures nothing (it is what torch.distributed.checkpoint's state initialisation
    runs): gsnr stays unset. The update itself is element-wise.

    ``shard``: ``g`` is the local rows of a gradient sharded on dim 0.

    A tensor step counter (``torch.compile``) is never read on the host: the measurement is
    made at every step and kept where the counter is 0 and the step measures something."""
    if isinstance(state["step"], Tensor):
        _prepare_on_device(g, state, group, shard)
        return
    if state["step"] != 0 or lr_value(group) == 0:
        return
    snr, norm = _snr_and_norm(g, group["eps"], shard)
    if norm is None or bool(norm != 0):  # NaN counts as measured: a non-finite gradient shows
        state["gsnr"].copy_(snr)


def _prepare_on_device(
    g: Tensor, state: dict[str, Any], group: dict[str, Any], shard: RowShard | None
) -> None:
    """:func:`prepare` without a host read: gsnr takes the measurement where it is still unset
    (the counter is 0), the lr is not 0 and the gradient is not all zeros."""
    snr, norm = _snr_and_norm(g, group["eps"], shard)
    gsnr = state["gsnr"]
    keep = (state["step"] == 0) & (lr_of(group) != 0)
    if norm is not None:
        keep = keep & (norm != 0)  # NaN counts as measured: a non-finite gradient shows
    gsnr.copy_(torch.where(keep, snr.to(gsnr.dtype), gsnr))


def sharded_prepare(views: list[Any], group: dict[str, Any]) -> None:
    """:func:`prepare` for the local rows of all of a group's Shard(0) DTensor parameters
    (``slimopt.sharding.LocalView``) at once: one all-reduce of every first-step parameter's sum
    and sum of squares (in float64), instead of one per parameter."""
    if lr_value(group) == 0:
        return
    red, pending = Reduction(), []
    for v in views:
        if v.state["step"] != 0:
            continue
        g, numel = v.grad, global_numel(v.grad, v.shard)
        if numel <= 1:  # gsnr 1 whatever the gradient
            v.state["gsnr"].copy_(torch.ones((), dtype=gsnr_dtype(g), device=g.device))
        elif v.shard is None:
            prepare(v.param, g, v.state, group)
        else:
            x64 = g.to(gsnr_dtype(g)).to(torch.float64)
            pending.append((v, red.add(torch.stack([x64.sum(), x64.pow(2).sum()]), v.shard)))
    sums = red.run()
    for v, k in pending:
        dtype, n = gsnr_dtype(v.grad), v.shard.numel
        total, sq = sums[k][0], sums[k][1]
        var = ((sq - total * total / n) / (n - 1)).clamp(min=0.0)
        norm, std = sq.sqrt().to(dtype), var.sqrt().to(dtype)
        if bool(norm != 0):  # NaN counts as measured: a non-finite gradient shows
            v.state["gsnr"].copy_(norm / (std + group["eps"]))


def _skip_unset(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
    """Apply only the decoupled weight decay to parameters whose gsnr is still unset (a step
    that measured nothing leaves m and the step count as they were); return the others. Only
    Python step counters are read (on the host, at first steps): tensor counters (CUDA graphs)
    start from a measured step."""
    unset = [
        i
        for i, s in enumerate(states)
        if not isinstance(s["step"], Tensor) and s["step"] == 0 and gsnr_unset(s)
    ]
    if not unset:
        return params, grads, states
    decay = 1.0 - group["weight_decay"] * lr_value(group)
    for i in unset:
        if decay != 1.0:
            params[i].mul_(decay)
    return take(others(unset, len(params)), params, grads, states)


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
    if gsnr_unset(state):  # nothing measured yet: no first step
        p.mul_(1.0 - wd * lr)
        return
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


def fused_cpu(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    gsnr_max: Tensor | None = None,
    stochastic: bool = True,
) -> None:
    """The fused CPU tier: once its gsnr is measured SGD-SaI is SGD with momentum and a fixed
    per-tensor lr, one native pass per tensor (read p, g, m; write p, m; bf16 rounded in the
    loop); a first step is the same pass with momentum 0 (m = g). :func:`_native_takes` keeps
    unmeasured tensors and momentum 0 on the multi-tensor path."""
    from slimopt.kernels import cpu

    lr, wd = lr_of(group), group["weight_decay"]
    first, later = [], []
    for p, g, s in zip(params, grads, states):
        # the step size in the precision the update computes in (float32 for bf16)
        dtype = torch.float32 if p.dtype == torch.bfloat16 else p.dtype
        step = float((lr * _scale(s, group, gsnr_max)).to(dtype))
        (first if s["step"] == 0 else later).append(
            (p, g, s["momentum_buffer"], step, kernel_rounding(p, s, stochastic))
        )
        s["step"] += 1
    for items, mu in ((first, 0.0), (later, group["momentum"])):
        if items:
            cpu.sgd_sai_step(items, lr, wd, mu)


def _native_takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
    """The native loop takes a tensor whose gsnr is measured, with momentum (its buffer starts
    at zero, so a first step with momentum 0 sets it to the gradient)."""
    if group["momentum"] <= 0 or isinstance(state["step"], Tensor) or gsnr_unset(state):
        return False
    return native_takes("momentum_buffer")(p, g, state, group)


def foreach(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    gsnr_max: Tensor | None = None,
) -> None:
    """The same step for a list of tensors with multi-tensor kernels."""
    params, grads, states = _skip_unset(params, grads, states, group)
    if not params:
        return
    on_device = [i for i, s in enumerate(states) if isinstance(s["step"], Tensor)]
    if on_device:
        _step_on_device(*take(on_device, params, grads, states), group, gsnr_max)
        if len(on_device) == len(params):
            return
        params, grads, states = take(others(on_device, len(params)), params, grads, states)
    lr, wd, mu = lr_of(group), group["weight_decay"], group["momentum"]
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


def _step_on_device(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    gsnr_max: Tensor | None,
) -> None:
    """The step for tensor step counters (``torch.compile``), with no host read: the reference's
    branches (gsnr unset: only the weight decay; the first step: m = g) as ``torch.where``."""
    lr, wd, mu = lr_of(group), group["weight_decay"], group["momentum"]
    for p, g, s in zip(params, grads, states):
        step = s["step"]
        unset = s["gsnr"] < 0
        m = g
        if mu > 0:
            m = s["momentum_buffer"]
            later = m.mul(mu).add_(g, alpha=1.0 - mu)
            m.copy_(torch.where(unset, m, torch.where(step == 0, g, later)))
        step.add_(torch.where(unset, 0, 1).to(step.dtype))
        if wd != 0:
            p.mul_(1.0 - wd * lr)
        size = (lr * _scale(s, group, gsnr_max)).to(p.dtype)
        p.sub_(torch.where(unset, 0, m * size))


def step_kwargs(optimizer: Any) -> dict[str, Any]:
    """``gsnr_max``: the largest gsnr among the optimizer's parameters of ``snr_normalize="max"``
    groups that have one (fixed at an earlier step, or by :func:`prepare` in this one)."""
    values = []
    for group in optimizer.param_groups:
        if group["algorithm"] != NAME or group["snr_normalize"] != "max":
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            # an unset gsnr never wins, so a tensor counter (never read here) may be included
            if state and (
                p.grad is not None or isinstance(state["step"], Tensor) or state["step"] > 0
            ):
                values.append(state["gsnr"].to(torch.float64).reshape(()))
    if not values:
        return {"gsnr_max": None}
    stacked = torch.stack([v.to(values[0].device) for v in values])
    # unset values (negative) never win; NaN propagates, so a non-finite gradient shows
    return {"gsnr_max": torch.where(stacked < 0, -torch.inf, stacked).max()}


def _triton_takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
    """The Triton kernels: any tensor they can address with its gsnr one float32 value beside
    it, but not one whose gsnr is still unset at a first step with a Python counter (it only
    decays: :func:`foreach`); a pure-bf16 one (rounded in the kernel) only with a measured gsnr,
    momentum, Python-int counters and a float lr (the other cases step on fp32 copies)."""
    from slimopt.kernels import triton_ops

    tensors = (p, g) + ((state["momentum_buffer"],) if "momentum_buffer" in state else ())
    if not triton_ops.kernel_ok(*tensors):
        return False
    if not triton_ops.gsnr_ok(p, state["gsnr"]):
        return False
    if not isinstance(state["step"], Tensor) and state["step"] == 0 and gsnr_unset(state):
        return False
    if p.dtype == torch.bfloat16 and "sr_seed" in state:
        return (
            group["momentum"] > 0
            and not isinstance(state["step"], Tensor)
            and not isinstance(group["lr"], Tensor)
            and not gsnr_unset(state)
        )
    return True


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
    fused_takes={"cpu": _native_takes, "cuda": _triton_takes},
    rounds_bf16=("cpu", "cuda"),
    momentum_key="momentum",
    prepare=prepare,
    sharded_prepare=sharded_prepare,
    step_kwargs=step_kwargs,
    temporaries=0,
)
