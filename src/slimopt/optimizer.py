"""The one ``torch.optim.Optimizer`` that owns param groups, state and dispatch.

Every param group names its update rule under ``"algorithm"`` (sage, sinkgd, scale, sgd_sai, lion,
adamw) and, when built by :func:`slimopt.create_optimizer`, its parameter role under ``"role"``.
Groups of different rules live in one optimizer, so LR schedulers, gradient clipping, AMP and
checkpointing see a single ordinary optimizer. The public classes (:class:`SAGE`, :class:`SinkGD`, ...)
are this optimizer with one rule's defaults.

State holds tensors and Python numbers only, so ``state_dict()`` survives
``torch.save``/``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint``.

Under DDP nothing changes (every rank holds whole tensors and averaged gradients). Under FSDP2 the
parameters are DTensors sharded on dim 0: their state is sharded alike (a matrix's O(d) SAGE
statistic and SGD-SaI's gsnr are whole on every rank), and :meth:`SlimOptimizer.step` updates the
local shards with the few global reductions of :mod:`slimopt.distributed`, so the result is the
one-device update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from slimopt import distributed, lean
from slimopt.algorithms import get_rule
from slimopt.algorithms._common import take


@dataclass
class _Work:
    """One group's parameters that have a gradient this step: plain tensors (and DDP's) in
    ``params``/``grads``/``states``, DTensor ones (FSDP2) as local views."""

    group: dict[str, Any]
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    views: list[distributed.LocalView] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.params or self.views)


# Keys a param group may carry besides its rule's hyperparameters.
_COMMON_KEYS = frozenset({"params", "param_names", "algorithm", "role", "foreach", "initial_lr"})

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


class SlimOptimizer(torch.optim.Optimizer):
    """An optimizer whose param groups may each use a different slimopt update rule.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or param-group dicts. A group may set
            ``"algorithm"`` and any hyperparameter of that rule; missing ones take the rule's
            defaults (or this optimizer's ``defaults`` when the rule is the same).
        algorithm: the rule for groups that do not name one.
        foreach: ``True`` (default) uses the fast multi-tensor path, ``False`` the single-tensor
            reference that mirrors the spec line by line.
        step_in_backward: apply each parameter's update in a hook the moment its gradient is
            complete, then free the gradient (see :mod:`slimopt.lean`); ``step()`` closes the step.
        stochastic_rounding: for bf16 parameters, ``True`` or ``None`` (default) writes each new
            value rounded stochastically, ``False`` to nearest; either way the rule computes in
            fp32. No effect on fp32/float64 parameters.
        **defaults: hyperparameters of ``algorithm``.

    Example:
        >>> import torch, slimopt
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = slimopt.SlimOptimizer(
        ...     [{"params": [model.weight], "algorithm": "sinkgd"},
        ...      {"params": [model.bias], "algorithm": "lion", "lr": 3e-4}])
        >>> model(torch.randn(2, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        algorithm: str | None = None,
        *,
        foreach: bool = True,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
        **defaults: Any,
    ) -> None:
        if stochastic_rounding not in (None, True, False):
            raise ValueError(
                f"stochastic_rounding must be None, True or False, not {stochastic_rounding!r}"
            )
        if step_in_backward not in (True, False):
            raise ValueError(f"step_in_backward must be True or False, not {step_in_backward!r}")
        # lean modes (slimopt.lean): rounding of bf16 parameters, updates during backward
        self.stochastic_rounding = stochastic_rounding
        self.step_in_backward = step_in_backward
        self._sr_base_seed = torch.initial_seed()
        self._backward_stepper: lean.BackwardStepper | None = None
        if algorithm is not None:
            rule = get_rule(algorithm)
            unknown = set(defaults) - set(rule.DEFAULTS)
            if unknown:
                raise ValueError(f"{algorithm}: unknown option(s) {sorted(unknown)}")
            defaults = {**rule.DEFAULTS, **defaults}
        super().__init__(params, {"algorithm": algorithm, "foreach": foreach, **defaults})
        if step_in_backward:
            self._backward_stepper = lean.BackwardStepper(self)

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        algorithm = group.get("algorithm") or self.defaults.get("algorithm")
        if algorithm is None:
            raise ValueError("param group names no 'algorithm' and the optimizer has no default")
        rule = get_rule(algorithm)
        own = {}
        if self.defaults.get("algorithm") == algorithm:
            own = {k: v for k, v in self.defaults.items() if k in rule.DEFAULTS}
        unknown = set(group) - set(rule.DEFAULTS) - _COMMON_KEYS
        if unknown:
            raise ValueError(
                f"{algorithm}: unknown option(s) {sorted(unknown)}; "
                f"its options are {sorted(rule.DEFAULTS)}"
            )
        merged = {**rule.DEFAULTS, **own, **group}
        merged["algorithm"] = algorithm
        merged.setdefault("role", None)
        merged.setdefault("foreach", self.defaults.get("foreach", True))
        if isinstance(merged.get("betas"), list):
            merged["betas"] = tuple(merged["betas"])
        rule.validate(merged)
        # torch's add_param_group handles params/param_names and duplicate checks; it fills
        # missing keys from self.defaults, which must not leak one rule's options into another.
        saved, self.defaults = self.defaults, {}
        try:
            super().add_param_group(merged)
        finally:
            self.defaults = saved
        for p in self.param_groups[-1]["params"]:
            if torch.is_complex(p):
                raise ValueError(f"{algorithm}: complex parameters are not supported")

    # ------------------------------------------------------------------ state
    def _param_name(self, group: dict[str, Any], index: int) -> str:
        names = group.get("param_names")
        if names:
            return names[index]
        return f"param {index} of group {self.param_groups.index(group)}"

    def init_state(self) -> None:
        """Allocate every parameter's state now (normally done lazily at its first step).

        Works on meta-device parameters, which is how ``slimopt memory`` sizes a 7B model's
        state without allocating it: the bytes come from the same ``init_state`` the step uses.
        """
        for group in self.param_groups:
            rule = get_rule(group["algorithm"])
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p].update(rule.init_state(p, group))

    @staticmethod
    def _process_value_according_to_param_policy(
        param: Tensor, value: Tensor, param_id: int, param_groups: Any, key: Any = None
    ) -> Tensor:
        # torch casts loaded floating state to the parameter's dtype; slimopt keeps each state
        # tensor's saved dtype (SGD-SaI's float32 gsnr must stay float32 for bf16 parameters).
        return value.to(device=param.device)

    # ------------------------------------------------------------------ step
    def _collect(self, group: dict[str, Any], only: list[Tensor] | None = None) -> _Work:
        rule = get_rule(group["algorithm"])
        work = _Work(group)
        named = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
        if only is not None:
            named = [(i, p) for i, p in named if any(p is q for q in only)]
        for i, p in named:
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{group['algorithm']} does not support sparse gradients "
                    f"({self._param_name(group, i)}); use a dense nn.Embedding (sparse=False)"
                )
            # an unsupported placement raises here, before any state or parameter changes
            distributed.check_param(p, self._param_name(group, i))
        for i, p in named:
            state = self.state[p]
            if not state:
                state.update(rule.init_state(p, group))
                if lean.is_low_precision(p):
                    group_index = next(k for k, g in enumerate(self.param_groups) if g is group)
                    state["sr_seed"] = lean.param_seed(self._sr_base_seed, group_index, i)
            if distributed.is_dtensor(p):
                work.views.append(distributed.local_view(p, state, self._param_name(group, i)))
            else:
                work.params.append(p)
                work.grads.append(p.grad)
                work.states.append(state)
        return work

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (parameters without a gradient are skipped).

        DTensor parameters (FSDP2) are updated on their local shards with the global reductions
        of ``slimopt.distributed``, so the result equals the one-device update.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # step_in_backward: the hooks applied the updates; step what still has a gradient (set
        # by hand, not by backward) and close the step
        self._run([self._collect(group) for group in self.param_groups])
        if self._backward_stepper is not None:
            self._backward_stepper.close_step()
        return loss

    @torch.no_grad()
    def _step_group_params(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Run ``group``'s rule on ``params`` (some of its parameters that have a gradient),
        creating their state when missing; used by the step-in-backward hooks, which free the
        gradients (bf16 ones as soon as their fp32 copy exists)."""
        self._run([self._collect(group, params)], release_grads=True)

    def _run(self, work: list[_Work], release_grads: bool = False) -> None:
        work = [w for w in work if w]
        # SGD-SaI fixes gsnr before any update so that snr_normalize="max" sees every value.
        for w in work:
            rule = get_rule(w.group["algorithm"])
            if hasattr(rule, "prepare"):
                for p, g, s in zip(w.params, w.grads, w.states):
                    rule.prepare(p, g, s, w.group)
                for v in w.views:
                    rule.prepare(v.param, v.grad, v.state, w.group, shard=v.shard)
        gsnr_max = self._gsnr_max()
        for w in work:
            group = w.group
            rule = get_rule(group["algorithm"])
            extra = {"gsnr_max": gsnr_max} if group["algorithm"] == "sgd_sai" else {}
            if w.params:
                # bf16 parameters: the rule runs on fp32 copies, written back rounded (lean.py)
                lowp = [i for i, p in enumerate(w.params) if lean.is_low_precision(p)]
                rest = [i for i, p in enumerate(w.params) if not lean.is_low_precision(p)]
                params, grads, states = take(rest, w.params, w.grads, w.states)
                if lowp:
                    low = take(lowp, w.params, w.grads, w.states)
                    w.grads = []
                    lean.step_low_precision(
                        functools.partial(self._apply_rule, rule, group, extra=extra),
                        *low,
                        stochastic=self.stochastic_rounding is not False,
                        algorithm=group["algorithm"],
                        release_grads=release_grads,
                    )
                self._apply_rule(rule, group, params, grads, states, extra=extra)
            if w.views:
                distributed.step_local_views(rule, group, w.views, **extra)

    @staticmethod
    def _apply_rule(
        rule: Any,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        *,
        extra: dict[str, Any],
    ) -> None:
        if not params:
            return
        if group["foreach"]:
            rule.foreach(params, grads, states, group, **extra)
        else:
            for p, g, s in zip(params, grads, states):
                rule.reference(p, g, s, group, **extra)

    def _gsnr_max(self) -> Tensor | None:
        """The largest gsnr among parameters of ``snr_normalize="max"`` groups that have one."""
        values = []
        for group in self.param_groups:
            if group["algorithm"] != "sgd_sai" or group["snr_normalize"] != "max":
                continue
            for p in group["params"]:
                state = self.state.get(p)
                # a gsnr is fixed once the parameter has stepped, or was just prepared this step
                if state and (state["step"] > 0 or p.grad is not None):
                    values.append(state["gsnr"].to(torch.float64).reshape(()))
        if not values:
            return None
        return torch.stack([v.to(values[0].device) for v in values]).max()


class SAGE(SlimOptimizer):
    """SAGE: Lion's sign direction times an O(d) damping factor (see ``slimopt.algorithms.sage``).

    Example:
        >>> import torch, slimopt
        >>> emb = torch.nn.Embedding(100, 16)
        >>> opt = slimopt.SAGE(emb.parameters(), lr=2e-3)
        >>> emb(torch.tensor([1, 5, 7])).pow(2).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        lion_order: bool = False,
        foreach: bool = True,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "sage",
            foreach=foreach,
            step_in_backward=step_in_backward,
            stochastic_rounding=stochastic_rounding,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            lion_order=lion_order,
        )


class SinkGD(SlimOptimizer):
    """SinkGD: stateless Sinkhorn-normalized gradient descent (``slimopt.algorithms.sinkgd``).

    Example:
        >>> import torch, slimopt
        >>> layer = torch.nn.Linear(8, 4)
        >>> opt = slimopt.SinkGD(layer.parameters(), lr=1e-3, iters=5)
        >>> layer(torch.randn(3, 8)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        iters: int = 5,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        foreach: bool = True,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "sinkgd",
            foreach=foreach,
            step_in_backward=step_in_backward,
            stochastic_rounding=stochastic_rounding,
            lr=lr,
            iters=iters,
            eps=eps,
            weight_decay=weight_decay,
        )


class SCALE(SlimOptimizer):
    """SCALE: column-normalized SGD; momentum only where a group asks for it (the lm_head).

    ``norm_dim`` (per group) is 1 for an nn.Linear weight [out, in], 0 for an embedding [V, d].

    Example:
        >>> import torch, slimopt
        >>> head = torch.nn.Linear(8, 50, bias=False)
        >>> opt = slimopt.SCALE([{"params": head.parameters(), "momentum": 0.9}], lr=1e-3)
        >>> head(torch.randn(3, 8)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        norm_dim: int = 1,
        foreach: bool = True,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "scale",
            foreach=foreach,
            step_in_backward=step_in_backward,
            stochastic_rounding=stochastic_rounding,
            lr=lr,
            momentum=momentum,
            eps=eps,
            weight_decay=weight_decay,
            norm_dim=norm_dim,
        )


class SGDSaI(SlimOptimizer):
    """SGD-SaI: SGD with momentum, per-tensor lr scaled by the gradient SNR of the first step.

    Example:
        >>> import torch, slimopt
        >>> layer = torch.nn.Linear(8, 4)
        >>> opt = slimopt.SGDSaI(layer.parameters(), lr=1e-2)
        >>> layer(torch.randn(3, 8)).sum().backward()
        >>> opt.step()
        >>> float(opt.state[layer.weight]["gsnr"]) > 0
        True
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        momentum: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        snr_normalize: str | None = None,
        *,
        foreach: bool = True,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "sgd_sai",
            foreach=foreach,
            step_in_backward=step_in_backward,
            stochastic_rounding=stochastic_rounding,
            lr=lr,
            momentum=momentum,
            eps=eps,
            weight_decay=weight_decay,
            snr_normalize=snr_normalize,
        )


class Lion(SlimOptimizer):
    """Lion: the sign of an interpolated momentum (Chen et al. 2023).

    Example:
        >>> import torch, slimopt
        >>> layer = torch.nn.Linear(8, 4)
        >>> opt = slimopt.Lion(layer.parameters(), lr=1e-4)
        >>> layer(torch.randn(3, 8)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        foreach: bool = True,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "lion",
            foreach=foreach,
            step_in_backward=step_in_backward,
            stochastic_rounding=stochastic_rounding,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
        )


class AdamW(SlimOptimizer):
    """AdamW with ``torch.optim.AdamW`` semantics, usable as one rule among others.

    Example:
        >>> import torch, slimopt
        >>> layer = torch.nn.Linear(8, 4)
        >>> opt = slimopt.AdamW(layer.parameters(), lr=1e-3)
        >>> layer(torch.randn(3, 8)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        fused: bool | None = None,
        foreach: bool = True,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "adamw",
            foreach=foreach,
            step_in_backward=step_in_backward,
            stochastic_rounding=stochastic_rounding,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            fused=fused,
        )
