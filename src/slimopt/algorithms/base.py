"""The rule contract: what an update rule declares, in one typed place.

A rule is one module of :mod:`slimopt.algorithms` holding the functions of its math and one
:class:`Rule` that names them. The optimizer, the presets and the sharding code read only the
:class:`Rule`; none of them mentions a rule by name. See ``docs/adding-a-rule.md``.

Tiers (each group split once per step by :meth:`Rule.partition`, torch-style):

- ``reference(p, g, state, group, **kw)``: one tensor, the spec's lines nearly verbatim;
- ``foreach(params, grads, states, group, **kw)``: the same math for a list of tensors with
  multi-tensor kernels;
- ``fused[device_type]``: a zero-argument loader returning a callable with ``foreach``'s signature
  (or None where the backend is missing), for the device types and dtypes in ``fused_dtypes``.

Every tier updates ``params`` and ``states`` exactly as ``reference`` does (state keys and the
``state["step"]`` counter included); results differ only by rounding.

Example:
    >>> from slimopt.algorithms import get_rule
    >>> rule = get_rule("lion")
    >>> rule.name, rule.momentum_key, rule.sharded
    ('lion', 'betas', 'elementwise')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from slimopt.algorithms._common import betas_on_device
from slimopt.rounding import SHARD_OFFSET_KEY, kernel_rounding

StepFn = Callable[..., None]

# The hyperparameter keys torch's schedulers (OneCycleLR, CyclicLR) cycle as "momentum".
SCHEDULER_KEYS = ("betas", "momentum")
# What a group whose rule has no momentum carries under that key (read by schedulers, unused).
INERT_MOMENTUM: dict[str, Any] = {"betas": (0.0, 0.0), "momentum": 0.0}


@dataclass(frozen=True)
class RowBlocks:
    """A reducing rule's step on a matrix (ndim >= 2, rows on dim 0) in blocks of rows, so that a
    bf16 table is never copied to fp32 whole (:func:`slimopt.lean.step_rows`).

    The step is passes over the blocks with the rule's reductions over all rows between them; each
    function sees blocks of rows (fp32 copies of bf16 rows; views otherwise) and the rows of the
    state tensors shaped like the parameter (views, updated in place):

    - ``gather(g_rows, state_rows, group) -> Tensor | None``: this block's part of the column
      statistic (summed over blocks), or None for a row-local step; it may update state rows
      that the statistic reads (SCALE's momentum). Optional.
    - ``finish(total, n_rows, state, group, grad_blocks) -> factor``: from the summed statistic
      (None when there is none) and the whole parameter's state, the per-step factor of the update
      (SAGE's damping H, SCALE's column RMS); it counts the step and updates O(d) state once.
      ``grad_blocks()`` yields ``(rows, g_rows)`` once more over the gradient, for a rule whose
      statistic takes several passes (SinkGD's iterations).
    - ``update(p_rows, g_rows, state_rows, group, factor, rows)``: the update of the block's rows
      (``rows``, a slice of dim 0).
    """

    finish: Callable[..., Any]
    update: Callable[..., None]
    gather: Callable[[Tensor, dict[str, Any], dict[str, Any]], Tensor | None] | None = None


@dataclass(frozen=True)
class Rule:
    """One update rule's declaration.

    Attributes:
        name: the rule's name in param groups (``group["algorithm"]``).
        defaults: every hyperparameter and its default.
        validate: ``validate(group)`` raises ValueError naming a bad hyperparameter.
        init_state: ``init_state(p, group) -> dict`` of tensors and numbers (works on meta tensors).
        reference: the single-tensor step.
        foreach: the multi-tensor step.
        fused: device type -> loader of a fused step (``foreach``'s signature), or None.
        fused_dtypes: device type -> the parameter dtypes that fused step takes.
        sharded: how the rule runs on a parameter sharded on dim 0 (FSDP2): ``"elementwise"``
            (any tier on the local rows, unchanged) or ``"reducing"`` (its ``reference`` takes
            ``shard=`` and makes its global reductions through :mod:`slimopt.sharding`).
        sharded_step: for a reducing rule, ``sharded_step(views, group, **kw)`` on the local views
            of all of a group's sharded parameters at once (``slimopt.sharding.LocalView``): the
            same result as ``reference`` with ``shard=`` per parameter, with the global reductions
            batched (a constant number of all-reduces per step) and the fast tier on the rows.
        momentum_key: the hyperparameter torch's schedulers cycle as momentum (``"betas"``,
            ``"momentum"``), or None for a rule without momentum.
        prepare: ``prepare(p, g, state, group, shard=None)`` run for every parameter of every
            group of this rule before any update of the step (SGD-SaI fixes its gsnr here).
        sharded_prepare: ``sharded_prepare(views, group)``, ``prepare`` for all of a group's
            sharded parameters at once with its reductions batched (optional).
        step_kwargs: ``step_kwargs(optimizer) -> dict`` of extra keyword arguments every tier
            of this rule receives in this step (computed after ``prepare``).
        layout_options: ``layout_options(role, norm_dim) -> dict`` of hyperparameters a preset
            sets from a parameter's role and layout (SCALE's ``norm_dim``).
        fused_takes: device type -> ``takes(p, g, state, group) -> bool``, which tensors of an
            accepted device and dtype that fused kernel takes (layout, contiguity, the rule's
            own conditions); absent: every one. :meth:`partition` reads it once per step, so a
            kernel is handed only what it takes and never falls back on its own.
        rounds_bf16: the device types whose fused kernel takes pure-bf16 parameters (bf16 with
            the rounding state of :mod:`slimopt.lean`): it reads the bf16 tensors, computes in
            fp32 and writes the parameter rounded stochastically inside the kernel
            (:func:`slimopt.rounding.next_rounding`; keyword ``stochastic``). Elsewhere a
            pure-bf16 parameter steps on fp32 copies (:func:`slimopt.lean.step_low_precision`).
        temporaries: the transient tensors of one update, in units of the parameter's size in its
            compute dtype, that :mod:`slimopt.planner` counts (SAGE's interpolated momentum and
            its sign: 2; SinkGD's block workspace: 1; SCALE's reduction pass: 0).
        row_blocks: how a reducing rule steps a large matrix a block of rows at a time in pure
            bf16 (:class:`RowBlocks`); element-wise rules need none (any block of rows steps
            alone), and a reducing rule without it steps the whole matrix on fp32 copies.
    """

    name: str
    defaults: Mapping[str, Any]
    validate: Callable[[dict[str, Any]], None]
    init_state: Callable[[Tensor, dict[str, Any]], dict[str, Any]]
    reference: StepFn
    foreach: StepFn
    fused: Mapping[str, Callable[[], StepFn | None]] = field(default_factory=dict)
    fused_dtypes: Mapping[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    sharded: Literal["elementwise", "reducing"] = "elementwise"
    sharded_step: Callable[..., None] | None = None
    momentum_key: Literal["betas", "momentum"] | None = None
    prepare: Callable[..., None] | None = None
    sharded_prepare: Callable[..., None] | None = None
    step_kwargs: Callable[[Any], dict[str, Any]] | None = None
    layout_options: Callable[[str, int], dict[str, Any]] | None = None
    fused_takes: Mapping[str, Callable[..., bool]] = field(default_factory=dict)
    rounds_bf16: tuple[str, ...] = ()
    temporaries: int = 2
    row_blocks: RowBlocks | None = None

    @property
    def NAME(self) -> str:  # noqa: N802 - the rule modules' spelling, kept for callers
        return self.name

    @property
    def DEFAULTS(self) -> Mapping[str, Any]:  # noqa: N802
        return self.defaults

    # ------------------------------------------------------------------ tiers
    def fused_step(self, device_type: str) -> StepFn | None:
        """The fused step for ``device_type``, loading it on first use; None where absent."""
        loader = self.fused.get(device_type)
        return loader() if loader is not None else None

    def partition(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        where: str = "",
    ) -> list[tuple[str, StepFn, list[int]]]:
        """Split ``params`` once into what each tier runs: ``[(tier name, step, indices)]``, a
        fused set per device type first (the tensors its kernel takes: device, dtype,
        :attr:`fused_takes`, and pure bf16 only where :attr:`rounds_bf16`), then the rest on the
        multi-tensor path (or the reference for ``foreach=False``), as torch groups tensors
        before calling a kernel. The group's ``fused``/``foreach`` keys are read as torch reads
        them: both None takes the fused kernels where they load (not inside torch.compile, which
        traces the multi-tensor path); ``foreach=True`` or ``False`` with ``fused`` None the
        multi-tensor path or the reference; ``fused=True`` with no kernel loadable for a device
        raises RuntimeError naming it."""
        fused, foreach = group.get("fused"), group.get("foreach")
        if fused and foreach:
            raise RuntimeError(f"{self.name}{where}: `fused` and `foreach` cannot both be True")
        out: list[tuple[str, StepFn, list[int]]] = []
        taken: set[int] = set()
        if (fused or (fused is None and foreach is None)) and not torch.compiler.is_compiling():
            by_device: dict[str, list[int]] = {}
            for i, p in enumerate(params):
                by_device.setdefault(p.device.type, []).append(i)
            for device, members in by_device.items():
                dtypes = self.fused_dtypes.get(device, ())
                if device not in self.fused or not any(params[i].dtype in dtypes for i in members):
                    continue
                if not self.fused_takes_group(device, group):
                    if fused:
                        raise RuntimeError(
                            f"{self.name}{where}: fused=True, but the betas are tensors on an "
                            f"accelerator and the fused {device} kernels take numbers (pass "
                            "floats or CPU tensors, or leave fused=None for the multi-tensor path)"
                        )
                    continue
                step = self.fused_step(device)
                if step is None:
                    if fused:
                        raise RuntimeError(
                            f"{self.name}{where}: fused=True but the fused {device} kernel is "
                            f"unavailable ({self.missing(device)})"
                        )
                    continue
                takes = self.fused_tensor_filter(device)
                chosen = [
                    i
                    for i in members
                    if params[i].dtype in dtypes and takes(params[i], grads[i], states[i], group)
                ]
                if chosen:
                    out.append(("fused", step, chosen))
                    taken.update(chosen)
        rest = [i for i in range(len(params)) if i not in taken]
        if rest:
            if foreach is False:
                out.append(("reference", self._reference_loop, rest))
            else:
                out.append(("foreach", self.foreach, rest))
        return out

    def fused_takes_group(self, device: str, group: dict[str, Any]) -> bool:
        """Whether ``device``'s fused kernels can take the group's hyperparameters: they take
        betas as numbers, so tensor betas on an accelerator (reading them would synchronise)
        keep a group off them."""
        return device == "cpu" or not betas_on_device(group)

    def fused_tensor_filter(self, device: str) -> Callable[..., bool]:
        """``takes(p, g, state, group)`` for ``device``'s fused kernel: :attr:`fused_takes`, and a
        pure-bf16 parameter only where the kernel rounds it (:attr:`rounds_bf16`)."""
        own = self.fused_takes.get(device)
        rounds = device in self.rounds_bf16

        def takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
            # a kernel that rounds takes bf16 only with the rounding state, one that does not
            # only without it
            if p.dtype == torch.bfloat16 and rounds != ("sr_seed" in state):
                return False
            return own is None or own(p, g, state, group)

        return takes

    def check_fused(self, params: list[Tensor], where: str = "") -> None:
        """Raise RuntimeError unless a fused tier is declared for every parameter's device and
        dtype (what ``fused=True`` requires; the backend itself is loaded at the first step)."""
        for p in params:
            device = p.device.type
            if device not in self.fused:
                have = ", ".join(sorted(self.fused)) or "none"
                raise RuntimeError(
                    f"{self.name}{where}: fused=True but the rule has no fused kernel for "
                    f"{device} tensors (fused devices: {have})"
                )
            dtypes = self.fused_dtypes.get(device, ())
            if p.dtype not in dtypes:
                raise RuntimeError(
                    f"{self.name}{where}: fused=True but its fused {device} kernel takes "
                    f"{', '.join(str(d) for d in dtypes)}, not {p.dtype}"
                )

    def missing(self, device_type: str) -> str:
        """Why the fused tier for ``device_type`` is absent, in words."""
        if device_type not in self.fused:
            return f"{self.name} declares no fused {device_type} kernel"
        if device_type == "cpu":
            from slimopt.kernels import cpu

            return cpu.unavailable_reason() or "the native CPU kernels did not load"
        if device_type == "cuda":
            from slimopt import kernels

            return kernels._triton_failed or f"triton_ops defines no {self.name}_step"
        return "its backend did not load"

    def _reference_loop(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        group: dict[str, Any],
        **kw: Any,
    ) -> None:
        for p, g, s in zip(params, grads, states):
            self.reference(p, g, s, group, **kw)


def native_takes(*state_keys: str, matrix: bool = False) -> Callable[..., bool]:
    """A :attr:`Rule.fused_takes` predicate for the native CPU loops: ``p``, ``g`` and the state
    tensors under ``state_keys`` contiguous, of one dtype and shape (and ``p.ndim >= 2`` with
    ``matrix``)."""

    def takes(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
        from slimopt.kernels import cpu

        if matrix and p.ndim < 2:
            return False
        return cpu.supports_all(p, g, *(state[k] for k in state_keys))

    return takes


def native_cpu(step: StepFn) -> Callable[[], StepFn | None]:
    """A loader for a CPU fused step built on the native loops: ``step`` where they load."""

    def load() -> StepFn | None:
        from slimopt.kernels import cpu

        return step if cpu.library() is not None else None

    return load


def triton_cuda(name: str) -> Callable[[], StepFn | None]:
    """A loader for ``slimopt.kernels.triton_ops.<name>_step``: None without triton, and None
    when the kernels fail their first-use self-check against the rule's reference on this
    device (:func:`slimopt.algorithms.kernel_check.self_check`: once per rule and device, with a
    warning), so that the group runs its multi-tensor path (pure-bf16 parameters through fp32
    copies, :meth:`Rule.partition`)."""

    def load() -> StepFn | None:
        from slimopt.kernels import triton_step

        step = triton_step(name)
        if step is None:
            return None
        from slimopt.algorithms.kernel_check import self_check

        return step if self_check(name) else None

    return load


# the native CPU loops: float32 and float64, and bf16 read and rounded inside (pure bf16)
NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "INERT_MOMENTUM",
    "NATIVE_DTYPES",
    "Rule",
    "SCHEDULER_KEYS",
    "SHARD_OFFSET_KEY",
    "TRITON_DTYPES",
    "kernel_rounding",
    "native_cpu",
    "native_takes",
    "triton_cuda",
]
