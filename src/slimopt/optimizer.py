"""The one ``torch.optim.Optimizer`` that owns param groups, state, tier choice and dispatch.

Every param group names its update rule under ``"algorithm"`` (see :mod:`slimopt.algorithms`) and,
when built by :func:`slimopt.create_optimizer`, its parameter role under ``"role"``. Groups of
different rules live in one optimizer, so LR schedulers, gradient clipping, AMP and checkpointing
see a single ordinary optimizer. The public classes (:class:`SAGE`, :class:`SinkGD`, ...) are this
optimizer with one rule's defaults. Nothing here names a rule: each rule's
:class:`~slimopt.algorithms.base.Rule` declares what the optimizer needs.

**Tiers, torch-style.** ``foreach`` and ``fused`` (constructor arguments, or keys of a param group)
choose how a group's rule runs: ``None`` (the default) picks the fastest tier available for the
tensors' device and dtype (a fused kernel where the rule has one, else the multi-tensor path);
``fused=True`` insists on the fused kernel and is an error where there is none; ``foreach=False``
(with ``fused`` not True) runs the single-tensor reference.

**Schedulers.** Every group carries the hyperparameter torch's schedulers cycle as momentum: the
optimizer's ``defaults`` hold ``betas`` when one of its rules has betas, else ``momentum``. A group
whose rule has no such parameter (SinkGD, or SCALE next to betas rules) carries it inert
(``INERT_MOMENTUM``): ``OneCycleLR``/``CyclicLR`` may write it, and the rule ignores it.

**torch.compile.** ``torch.compile(opt.step)`` traces the multi-tensor path. The state is created
and the ``state["step"]`` counters are held as float32 tensors beside their parameters outside the
graph (as torch's optimizers' ``_init_group``), so the first step's graph serves every step: a
tensor lr compiles one graph, a float lr under a scheduler two (its first value, then the lr as a
graph input), as ``torch.optim.AdamW``. On an accelerator only the single-tensor references read
a tensor lr or counter on the host (and SGD-SaI's first step with Python-int counters, which
decides there whether it measured its gradient); on the CPU the native kernels and torch's
multi-tensor AdamW take a tensor lr's value as a number (no synchronisation).

State holds tensors and Python numbers only, so ``state_dict()`` survives
``torch.save``/``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint``.

Under DDP nothing changes (every rank holds whole tensors and averaged gradients). Under FSDP2 the
parameters are DTensors sharded on dim 0: their state is sharded alike (a matrix's O(d) SAGE
statistic and SGD-SaI's gsnr are whole on every rank), and :meth:`SlimOptimizer.step` updates the
local shards with the few global reductions of :mod:`slimopt.sharding`, so the result is the
one-device update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from slimopt import lean, quant, sharding
from slimopt.algorithms import get_rule
from slimopt.algorithms._common import (
    betas_on_device,
    betas_value,
    check_lr_device,
    has_tensor_betas,
    lr_value,
    others,
    take,
)
from slimopt.algorithms.base import INERT_MOMENTUM, SCHEDULER_KEYS, SHARD_OFFSET_KEY, Rule


@dataclass
class _Work:
    """One group's parameters that have a gradient this step: plain tensors (and DDP's) in
    ``params``/``grads``/``states``, DTensor ones (FSDP2) as local views."""

    group: dict[str, Any]
    rule: Rule
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    views: list[sharding.LocalView] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.params or self.views)


# Keys a param group may carry besides its rule's hyperparameters.
_COMMON_KEYS = frozenset(
    {"params", "param_names", "algorithm", "role", "foreach", "fused", "initial_lr"}
)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


def _check_tier_flag(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"'{name}' must be None, True or False, got {value!r}")


class SlimOptimizer(torch.optim.Optimizer):
    """An optimizer whose param groups may each use a different slimopt update rule.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or param-group dicts. A group may set
            ``"algorithm"`` and any hyperparameter of that rule; missing ones take the rule's
            defaults (or this optimizer's ``defaults`` when the rule is the same). Groups may
            carry ``"foreach"``/``"fused"`` too.
        algorithm: the rule for groups that do not name one.
        foreach: None (default) or True: the multi-tensor path where no fused tier runs; False:
            the single-tensor reference that mirrors the spec line by line.
        fused: None (default): the fused kernel where the rule has one for the tensors' device
            and dtype; True: that kernel or an error naming what is missing; False: never.
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
        >>> "betas" in opt.defaults and opt.param_groups[0]["betas"]  # inert for SinkGD
        (0.0, 0.0)
    """

    def __init__(
        self,
        params: ParamsT,
        algorithm: str | None = None,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
        **defaults: Any,
    ) -> None:
        _check_tier_flag("foreach", foreach)
        _check_tier_flag("fused", fused)
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
        if isinstance(params, Tensor):
            raise TypeError(
                "params must be an iterable of Tensors or dicts, got " + torch.typename(params)
            )
        params = list(params)
        if algorithm is not None:
            rule = get_rule(algorithm)
            unknown = set(defaults) - set(rule.defaults)
            if unknown:
                raise ValueError(f"{algorithm}: unknown option(s) {sorted(unknown)}")
            defaults = {**rule.defaults, **defaults}
        key = self._scheduler_key(params, algorithm)
        defaults.setdefault(key, INERT_MOMENTUM[key])
        super().__init__(
            params, {"algorithm": algorithm, "foreach": foreach, "fused": fused, **defaults}
        )
        if step_in_backward:
            self._backward_stepper = lean.BackwardStepper(self)
            quant.attach(self)  # int8 weights step from their own backward (slimopt.quant)
        quant.check_optimizer(self)

    @staticmethod
    def _scheduler_key(params: list[Any], algorithm: str | None) -> str:
        """``betas`` when one of the optimizer's rules has betas, else ``momentum``."""
        names = {algorithm}
        names.update(g.get("algorithm") for g in params if isinstance(g, dict))
        keys = {get_rule(n).momentum_key for n in names if n is not None}
        return "betas" if "betas" in keys else "momentum"

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        algorithm = group.get("algorithm") or self.defaults.get("algorithm")
        if algorithm is None:
            raise ValueError("param group names no 'algorithm' and the optimizer has no default")
        rule = get_rule(algorithm)
        own = {}
        if self.defaults.get("algorithm") == algorithm:
            own = {k: v for k, v in self.defaults.items() if k in rule.defaults}
        unknown = set(group) - set(rule.defaults) - _COMMON_KEYS
        if unknown:
            raise ValueError(
                f"{algorithm}: unknown option(s) {sorted(unknown)}; "
                f"its options are {sorted(rule.defaults)}"
            )
        merged = {**rule.defaults, **own, **group}
        merged["algorithm"] = algorithm
        merged.setdefault("role", None)
        for flag in ("foreach", "fused"):
            merged.setdefault(flag, self.defaults.get(flag))
            _check_tier_flag(flag, merged[flag])
        for key in SCHEDULER_KEYS:  # the key schedulers cycle, inert where the rule lacks it
            if key in self.defaults and key not in merged:
                merged[key] = self.defaults[key] if key in own else INERT_MOMENTUM[key]
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
        added = self.param_groups[-1]
        if len({id(p) for p in added["params"]}) != len(added["params"]):
            self.param_groups.pop()
            names = added.get("param_names") or []
            seen: set[int] = set()
            twice = next(
                i for i, p in enumerate(added["params"]) if id(p) in seen or seen.add(id(p))
            )
            which = repr(names[twice]) if twice < len(names) else f"the parameter at index {twice}"
            raise ValueError(
                f"{algorithm}: {which} is listed twice in a param group; it would be updated "
                "twice per step"
            )
        for i, p in enumerate(added["params"]):
            if torch.is_complex(p):
                self.param_groups.pop()
                raise ValueError(f"{algorithm}: complex parameters are not supported")
            if hasattr(p, "ds_id") or hasattr(p, "ds_tensor"):
                self.param_groups.pop()
                names = added.get("param_names") or []
                which = repr(names[i]) if i < len(names) else f"the parameter at index {i}"
                raise ValueError(
                    f"{algorithm}: {which} is partitioned by DeepSpeed ZeRO (a flat fp32 "
                    "partition has no row layout, so the rules' per-tensor statistics and the "
                    "lean modes cannot hold); shard with FSDP2 (fully_shard) or DDP instead"
                )
        try:
            check_lr_device(added, added["params"])
        except ValueError:
            self.param_groups.pop()
            raise
        if merged["fused"]:
            if merged["foreach"]:
                raise RuntimeError(f"{algorithm}: `fused` and `foreach` cannot both be True")
            rule.check_fused(added["params"], f" (group {len(self.param_groups) - 1})")

    # ------------------------------------------------------------------ state
    def _param_name(self, group: dict[str, Any], index: int) -> str:
        names = group.get("param_names")
        if names:
            return names[index]
        return f"param {index} of group {self._group_index(group)}"

    def _group_index(self, group: dict[str, Any]) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    def init_state(self) -> None:
        """Allocate every parameter's state now (normally done lazily at its first step).

        Works on meta-device parameters, which is how ``slimopt memory`` sizes a 7B model's
        state without allocating it: the bytes come from the same ``init_state`` the step uses.
        """
        for group in self.param_groups:
            rule = get_rule(group["algorithm"])
            for i, p in enumerate(group["params"]):
                if not self.state[p]:
                    self._new_state(rule, group, i, p)

    def _new_state(self, rule: Rule, group: dict[str, Any], index: int, p: Tensor) -> None:
        """``p``'s fresh state: its rule's, and for a bf16 parameter the rounding numbers (seed,
        count of rounded writes, scheme) that make its stochastic rounding resumable."""
        state = self.state[p]
        state.update(rule.init_state(quant.state_proxy(p), group))
        if lean.is_low_precision(p) or quant.is_quantized(p):
            seed = lean.param_seed(self._sr_base_seed, self._group_index(group), index)
            state.update(lean.rounding_state(seed))
        if quant.is_quantized(p):
            state["q_bits"] = quant.BITS

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` after checking that it belongs here: every saved
        group's rule (``algorithm``), ``role`` and parameter count, and every saved state's keys
        and tensor shapes, must match this optimizer's (ValueError naming the first mismatch)."""
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        self._restore_saved_dtypes(state_dict)

    def _restore_saved_dtypes(self, state_dict: dict[str, Any]) -> None:
        """Give every loaded state tensor its saved dtype back. torch's ``load_state_dict`` casts
        floating state to the parameter's dtype (through ``Optimizer``'s own policy function, which
        a subclass cannot override), which would turn SGD-SaI's float32 gsnr of a bf16 parameter
        into bf16 and change a resumed run."""
        saved_state = state_dict["state"]
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                for key, value in saved_state.get(pid, {}).items():
                    current = self.state[p].get(key)
                    if (
                        isinstance(value, Tensor)
                        and isinstance(current, Tensor)
                        and current.dtype != value.dtype
                    ):
                        self.state[p][key] = value.to(device=current.device, copy=True)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or "state" not in state_dict:
            raise ValueError("not an optimizer state dict: it needs 'state' and 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the saved state has {len(saved_groups)} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        saved_state = state_dict["state"]
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            for key in ("algorithm", "role"):
                if saved.get(key) != group.get(key):
                    raise ValueError(
                        f"param group {gi}: the saved state is for {key} {saved.get(key)!r}, "
                        f"this optimizer's group has {group.get(key)!r}"
                    )
            ids = saved.get("params", [])
            if len(ids) != len(group["params"]):
                raise ValueError(
                    f"param group {gi} ({group['algorithm']}): the saved state has {len(ids)} "
                    f"parameters, this optimizer's group {len(group['params'])}"
                )
            rule = get_rule(group["algorithm"])
            # the loaded group takes the saved hyperparameters (which decide the state's layout)
            loaded = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            for index, (pid, p) in enumerate(zip(ids, group["params"])):
                state = saved_state.get(pid)
                if not state:
                    continue
                proxy = quant.state_proxy(p, "meta")
                if proxy is p:
                    proxy = torch.empty(p.shape, dtype=p.dtype, device="meta")
                expected = rule.init_state(proxy, loaded)
                name = self._param_name(group, index)
                lean.check_rounding_scheme(
                    state, f"param group {gi} ({group['algorithm']}), {name}"
                )
                if ("q_bits" in state) != quant.is_quantized(p):
                    kinds = ("an int8 weight", "a floating-point weight")
                    saved_kind, here = kinds if "q_bits" in state else kinds[::-1]
                    raise ValueError(
                        f"param group {gi} ({group['algorithm']}), {name}: the saved state is "
                        f"of {saved_kind}, this parameter is {here} (slimopt.quant: int8 and "
                        "bf16 runs do not resume each other)"
                    )
                keys = set(lean.STATE_KEYS) | set(quant.STATE_KEYS)
                if set(state) - keys != set(expected):
                    raise ValueError(
                        f"param group {gi} ({group['algorithm']}), {name}: the saved state has "
                        f"keys {sorted(state)}, expected {sorted(expected)}"
                    )
                for key, want in expected.items():
                    got = state[key]
                    if isinstance(want, Tensor) and isinstance(got, Tensor):
                        if tuple(got.shape) != tuple(want.shape) and want.ndim > 0:
                            raise ValueError(
                                f"param group {gi} ({group['algorithm']}), {name}: saved "
                                f"{key!r} has shape {tuple(got.shape)}, expected "
                                f"{tuple(want.shape)} for a parameter of shape {tuple(p.shape)}"
                            )

    # ------------------------------------------------------------------ step
    def _collect(self, group: dict[str, Any], params: Iterable[Tensor] | None = None) -> _Work:
        rule = get_rule(group["algorithm"])
        work = _Work(group, rule)
        chosen = None if params is None else {id(p) for p in params}
        named = [
            (i, p)
            for i, p in enumerate(group["params"])
            if p.grad is not None and (chosen is None or id(p) in chosen)
        ]
        for i, p in named:
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{group['algorithm']} does not support sparse gradients "
                    f"({self._param_name(group, i)}); use a dense nn.Embedding (sparse=False)"
                )
            # an unsupported placement raises here, before any state or parameter changes
            sharding.check_param(p, self._param_name(group, i))
        for i, p in named:
            state = self.state[p]
            if not state:
                self._new_state(rule, group, i, p)
            if sharding.is_dtensor(p):
                work.views.append(sharding.local_view(p, state, self._param_name(group, i)))
            else:
                work.params.append(p)
                work.grads.append(p.grad)
                work.states.append(state)
        return work

    def _run(self, work: list[_Work], release_grads: bool = False) -> None:
        """Prepare, then step, every group of ``work`` (the one path of :meth:`step`).

        bf16 parameters step on fp32 copies that are written back rounded (:mod:`slimopt.lean`);
        ``release_grads`` (updates during backward) frees each gradient once its copy exists."""
        work = [w for w in work if w]
        for w in work:  # before any update, so that cross-parameter statistics see every value
            if w.rule.prepare is not None:
                for p, g, s in zip(w.params, w.grads, w.states):
                    w.rule.prepare(p, g, s, w.group)
                if w.views and w.rule.sharded_prepare is not None:
                    w.rule.sharded_prepare(w.views, w.group)
                else:
                    for v in w.views:
                        w.rule.prepare(v.param, v.grad, v.state, w.group, shard=v.shard)
        extras: dict[str, dict[str, Any]] = {}
        for w in work:
            rule, group = w.rule, w.group
            if rule.name not in extras:
                extras[rule.name] = rule.step_kwargs(self) if rule.step_kwargs else {}
            extra = extras[rule.name]
            where = f" (group {self._group_index(group)})"
            if w.params:
                self._apply(rule, group, where, extra, w, release_grads)
            if w.views:
                low = [v for v in w.views if lean.is_low_precision(v.param)]
                taken, low = lean.kernel_views(rule, group, low)
                if taken:
                    self._step_kernel_views(rule, group, where, extra, taken, release_grads)
                if low:
                    lean.step_low_precision_views(
                        functools.partial(self._step_views, rule, group, where=where, extra=extra),
                        low,
                        stochastic=self.stochastic_rounding is not False,
                        rule=rule,
                        release_grads=release_grads,
                    )
                rest = [v for v in w.views if not lean.is_low_precision(v.param)]
                if rest:
                    self._step_views(rule, group, rest, where, extra)

    def _apply(
        self,
        rule: Rule,
        group: dict[str, Any],
        where: str,
        extra: dict[str, Any],
        w: _Work,
        release_grads: bool,
    ) -> None:
        """Step ``w``'s plain tensors: split once by :meth:`Rule.partition`; a fused kernel takes
        its set whole (pure-bf16 parameters included, read as bf16 and rounded in the kernel);
        pure-bf16 parameters of the rest step on fp32 copies (:mod:`slimopt.lean`)."""
        stochastic = self.stochastic_rounding is not False
        for name, step, idx in rule.partition(group, w.params, w.grads, w.states, where):
            params, grads, states = take(idx, w.params, w.grads, w.states)
            low = [i for i, p in enumerate(params) if lean.is_low_precision(p)]
            tier_group = _host_numbers(group, params) if name == "fused" else group
            if name == "fused" and low:
                step(params, grads, states, tier_group, stochastic=stochastic, **extra)
                if release_grads:
                    for p in params:
                        p.grad = None
            elif low:
                lean.step_low_precision(
                    functools.partial(self._apply_tier, rule, group, where, extra),
                    *take(low, params, grads, states),
                    stochastic=stochastic, rule=rule, group=group, release_grads=release_grads,
                )  # fmt: skip
                rest = others(low, len(params))
                if rest:
                    step(*take(rest, params, grads, states), tier_group, **extra)
            else:
                step(params, grads, states, tier_group, **extra)

    def _step_kernel_views(
        self,
        rule: Rule,
        group: dict[str, Any],
        where: str,
        extra: dict[str, Any],
        views: list[sharding.LocalView],
        release_grads: bool,
    ) -> None:
        """Pure-bf16 local shards of an element-wise rule stepped by its fused kernel directly
        (:func:`slimopt.lean.kernel_views`): read as bf16, rounded inside the kernel with the
        bits of each element's global index (the shard's offset), no fp32 copy."""
        for v in views:
            v.state[SHARD_OFFSET_KEY] = v.shard.offset if v.shard is not None else 0
        params, grads = [v.param for v in views], [v.grad for v in views]
        states = [v.state for v in views]
        stochastic = self.stochastic_rounding is not False
        for name, step, idx in rule.partition(group, params, grads, states, where):
            if name != "fused":  # kernel_views keeps what the kernel does not take
                raise RuntimeError(f"{rule.name}{where}: a pure-bf16 shard reached the {name} tier")
            ps, gs, ss = take(idx, params, grads, states)
            step(ps, gs, ss, _host_numbers(group, ps), stochastic=stochastic, **extra)
        for v in views:
            del v.state[SHARD_OFFSET_KEY]
            v.write_back()
            if release_grads:
                v.grad = None  # type: ignore[assignment]

    @staticmethod
    def _apply_tier(
        rule: Rule,
        group: dict[str, Any],
        where: str,
        extra: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        """Each tier of the group's split (:meth:`Rule.partition`) on these tensors."""
        for name, step, idx in rule.partition(group, params, grads, states, where):
            sub = take(idx, params, grads, states)
            step(*sub, _host_numbers(group, sub[0]) if name == "fused" else group, **extra)

    @staticmethod
    def _step_views(
        rule: Rule,
        group: dict[str, Any],
        views: list[sharding.LocalView],
        where: str = "",
        extra: dict[str, Any] | None = None,
    ) -> None:
        """One step on the local shards of a group's DTensor parameters."""
        extra = extra or {}
        group = _host_numbers(group, [v.param for v in views])
        if rule.sharded == "reducing" and rule.sharded_step is not None:
            rule.sharded_step(views, group, **extra)
        elif rule.sharded == "reducing":
            for v in views:
                rule.reference(v.param, v.grad, v.state, group, shard=v.shard, **extra)
        else:  # element-wise: any tier on the local rows
            params, grads = [v.param for v in views], [v.grad for v in views]
            SlimOptimizer._apply_tier(
                rule, group, where, extra, params, grads, [v.state for v in views]
            )
        for v in views:
            v.write_back()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (parameters without a gradient are skipped).

        DTensor parameters (FSDP2) are updated on their local shards with the global reductions
        of ``slimopt.sharding``, so the result equals the one-device update.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._prepare_compiled_step()
        # step_in_backward: the hooks applied the updates; step what still has a gradient (set
        # by hand, not by backward) and close the step
        work = [self._collect(group) for group in self.param_groups]
        self._run(work)
        if self._backward_stepper is not None:
            self._backward_stepper.close_step(stepped_by_step=any(work))
        return loss

    @torch._disable_dynamo  # as torch.optim: imports dynamo only when first called
    def _prepare_compiled_step(self) -> None:
        """What ``torch.compile(opt.step)`` runs outside its graph, before every step (as torch's
        optimizers' ``_init_group``): create the state of every parameter that has a gradient, so
        that the graph traced at the first step is the graph of every later step, and hold each
        ``state["step"]`` counter as a float32 tensor beside its parameter (a Python int would be
        a constant of the graph, one graph per value). Every tier takes either kind of counter."""
        for group in self.param_groups:
            rule = get_rule(group["algorithm"])
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    if p.grad.is_sparse:
                        continue  # _collect raises, naming the parameter
                    self._new_state(rule, group, i, p)
                step = state.get("step")
                if step is None:
                    continue
                if not isinstance(step, Tensor):
                    state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
                elif step.device != p.device:
                    state["step"] = step.to(p.device)

    @torch.no_grad()
    def step_params(self, params: Iterable[Tensor]) -> None:
        """Step now those of ``params`` (members of this optimizer) that have a gradient, each by
        its group's rule, creating state lazily: the same path as :meth:`step` for a subset,
        batched per group (a reducing rule's global reductions are made once per group). The
        step-in-backward hooks call it as soon as gradients are final.

        >>> import torch, slimopt
        >>> a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        >>> opt = slimopt.Lion([a, b], lr=0.5)
        >>> a.grad, b.grad = torch.ones(3), torch.ones(3)
        >>> opt.step_params([a])
        >>> a.tolist(), b.tolist()
        ([0.5, 0.5, 0.5], [1.0, 1.0, 1.0])
        """
        params = list(params)
        if not params:
            return
        group_of = self._group_map()
        chosen: dict[int, list[Tensor]] = {}
        for p in params:
            index = group_of.get(id(p))
            if index is None:
                raise ValueError(
                    f"step_params: a parameter of shape {tuple(p.shape)} is in none of this "
                    "optimizer's param groups"
                )
            chosen.setdefault(index, []).append(p)
        self._run(
            [self._collect(self.param_groups[i], ps) for i, ps in sorted(chosen.items())],
            release_grads=True,
        )

    def _group_map(self) -> dict[int, int]:
        """{id(parameter): index of its param group}, built once per set of groups."""
        key = tuple(id(g) for g in self.param_groups) + tuple(
            len(g["params"]) for g in self.param_groups
        )
        if getattr(self, "_group_map_key", None) != key:
            self._group_map_cache = {
                id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]
            }
            self._group_map_key = key
        return self._group_map_cache


def _host_numbers(group: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """``group``, or for a fused tier a copy holding numbers where its kernels take numbers: for
    CPU parameters a tensor lr as a float, and tensor betas that live on the CPU as floats
    (reading a CPU tensor is no device synchronisation; :meth:`Rule.partition` keeps betas on an
    accelerator off the fused kernels)."""
    out = group
    if has_tensor_betas(group) and not betas_on_device(group):
        out = {**out, "betas": betas_value(group)}
    lr = group["lr"]
    if isinstance(lr, Tensor) and params and all(p.device.type == "cpu" for p in params):
        out = {**out, "lr": lr_value(group)}
    return out


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
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        lion_order: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "sage",
            foreach=foreach,
            fused=fused,
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
        foreach: bool | None = None,
        fused: bool | None = None,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "sinkgd",
            foreach=foreach,
            fused=fused,
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
        foreach: bool | None = None,
        fused: bool | None = None,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "scale",
            foreach=foreach,
            fused=fused,
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
        foreach: bool | None = None,
        fused: bool | None = None,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "sgd_sai",
            foreach=foreach,
            fused=fused,
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
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "lion",
            foreach=foreach,
            fused=fused,
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
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        step_in_backward: bool = False,
        stochastic_rounding: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            "adamw",
            foreach=foreach,
            fused=fused,
            step_in_backward=step_in_backward,
            stochastic_rounding=stochastic_rounding,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
        )
