"""Lean training modes: pure bf16 with stochastic rounding, and updates applied during backward.

The spec is ``docs/algorithms.md``, "Lean modes". Both modes keep each rule's math; they change
only where its inputs live and when it runs.

**Pure bf16.** A bf16 parameter has no fp32 master copy. The reductions over the gradient and
the new parameter and state values are computed in fp32 from the bf16 values; the state stays
bf16 (each new value rounded to nearest once), as in the papers' bf16 runs, and the parameter is
written back rounded stochastically. Where the rule's fused kernel takes the tensor (the native
CPU loops and every rule's Triton kernels: :attr:`~slimopt.algorithms.base.Rule.rounds_bf16`), the
kernel does all of it: it reads bf16, computes in fp32 registers and rounds as it writes, with no
copy. Elsewhere (a tensor the kernel does not take, a reducing rule's FSDP2 shards, SGD-SaI's
unmeasured first step) the rule runs on transient fp32 copies of one parameter
(or of a few small ones at a time: never all parameters at once), of its gradient and of its
state, written back rounded, the same arithmetic (:func:`step_low_precision`). A tensor above
:data:`FP32_CHUNK_ELEMENTS` (an embedding, a head, a large matrix) is never copied whole: it steps a
block of rows at a time (:func:`step_rows`), an element-wise rule block by block, a reducing rule
by its :class:`~slimopt.algorithms.base.RowBlocks` (a pass gathering its column statistics over all
rows, then a pass of updates). The new parameter value is written
back rounded *stochastically* (:func:`stochastic_round_`). ``stochastic_rounding=False`` rounds the
parameter to nearest instead (for comparison). fp32 and float64 parameters are untouched.

The random bits are counter-based (:mod:`slimopt.rounding`): element ``i`` of a parameter at its
``t``-th rounded write takes bits that are a pure function of ``(state["sr_seed"], t, i)``
(Philox4x32-10), ``t`` kept as ``state["sr_step"]`` (stateless rules keep no step counter) and ``i``
the element's index in the whole tensor. So a resumed run continues bit for bit (the numbers are in
``state_dict()`` and survive torch.distributed.checkpoint), and the bits depend neither on the order
in which parameters are stepped (updates during backward round exactly like the ordinary step) nor
on row blocks, shards, device or tier. ``sr_seed`` is derived from ``torch.initial_seed()`` when the
optimizer is built and the parameter's position in its param groups, so ``torch.manual_seed`` fixes
it. ``state["sr_scheme"]`` records the version of the bits; a state saved without it (by an earlier
slimopt) is refused on load unless converted with :func:`upgrade_rounding_state`.

**Updates during backward** (``step_in_backward=True``). A post-accumulate-grad hook on each
parameter runs the parameter's rule the moment its gradient is complete and frees the gradient, so
at most a few gradients exist at any time. ``optimizer.step()`` closes the step (and steps any
parameter whose gradient was set by hand rather than by backward); ``zero_grad()`` has nothing
left to clear. Under FSDP2 a unit's parameters are stepped together after its reduce-scatter,
under DDP a bucket's after its all-reduce (:class:`BackwardStepper`, :func:`attach_ddp`). Modes
that would change the result raise before any update: a second backward before ``step()``
(gradient accumulation), SGD-SaI's ``snr_normalize="max"``, plain parameters in a multi-process
run without the DDP hook, a column-sharded parameter. A global gradient-norm clip cannot see gradients that were
already applied: ``clip_grad_norm_`` after such a backward finds no gradients, and
:func:`check_no_global_clip` is the check a training loop calls.

>>> import torch, slimopt
>>> model = torch.nn.Linear(4, 3).to(torch.bfloat16)
>>> opt = slimopt.create_optimizer("scale", model, step_in_backward=True)
>>> model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()  # updates happen here
>>> model.weight.grad is None
True
>>> opt.step()  # closes the step
>>> opt.state[model.weight]["sr_step"]  # one rounded write
1
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from slimopt.algorithms.base import Rule
from slimopt.rounding import SCHEME, round_to_bf16, stochastic_round_
from slimopt.sharding import LocalView, check_param, is_dtensor

# Parameters stepped together through fp32 copies in the ordinary step: at most this many
# elements per batch, so the transient fp32 working set stays small next to the model.
FP32_CHUNK_ELEMENTS = 1 << 22
# Local shards (FSDP2) stepped together through fp32 copies: a reducing rule batches its global
# reductions over one such batch, so this bounds both the fp32 working set and the collectives.
VIEW_CHUNK_ELEMENTS = 1 << 24
_LOW_PRECISION = (torch.bfloat16,)
# the numbers this module keeps in a bf16 parameter's optimizer state, beside its rule's own
STATE_KEYS = ("sr_seed", "sr_step", "sr_scheme")

__all__ = [
    "LeanModeError",
    "check_no_global_clip",
    "check_step_in_backward_model",
    "return_freed_memory",
    "round_to_bf16",
    "stochastic_round_",
    "upgrade_rounding_state",
]


class LeanModeError(RuntimeError):
    """A lean mode was asked for where it cannot give the ordinary step's result."""


# --------------------------------------------------------------------------- host memory
# glibc's mallopt parameter that fixes the size from which allocations are mmap'd
_M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make the C allocator give freed buffers of ``threshold`` bytes and more back to the OS at
    once (glibc on Linux; elsewhere nothing changes and this returns False).

    CPU tensors come from ``malloc``. glibc raises its mmap threshold each time a large buffer is
    freed (up to 32 MB), so later buffers of that size are carved from the heap and, once freed,
    stay in the process: a pure-bf16 step that frees a gradient and its update's blocks layer
    after layer holds on to hundreds of MB that nothing uses (140 MB of a 650 MB step on a
    one-layer llama with a 32k x 2048 table, measured). A fixed threshold returns each large
    buffer when it is freed, for a page fault per large allocation. ``slimopt train`` calls this
    for the lean modes on CPU; call it before building the model.

    >>> return_freed_memory() in (True, False)
    True
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


# --------------------------------------------------------------------------- rounding
def _mix(seed: int, step: int) -> int:
    """A 63-bit seed from (seed, step): splitmix64 of their combination."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


def rounding_state(seed: int) -> dict[str, int]:
    """The numbers this module keeps in a bf16 parameter's state: its rounding seed, its count of
    rounded writes and the version of the rounding bits (:data:`slimopt.rounding.SCHEME`)."""
    return {"sr_seed": int(seed), "sr_step": 0, "sr_scheme": SCHEME}


def upgrade_rounding_state(state_dict: dict[str, Any]) -> int:
    """Convert, in place, an optimizer ``state_dict()`` saved before the counter-based rounding
    bits (its bf16 parameters' states have ``sr_seed`` and ``sr_step`` but no ``sr_scheme``) so
    that it loads; returns how many parameter states were converted.

    The seeds and write counts are kept, so the run continues with counter-based bits from the
    same ``(sr_seed, sr_step)``: statistically the same rounding, not the same bits the earlier
    generator would have drawn (a resumed run is then not bit-identical to an uninterrupted run
    of the earlier version). Without this call, loading such a state raises ``ValueError``.

    >>> sd = {"state": {0: {"sr_seed": 5, "sr_step": 3}}, "param_groups": []}
    >>> upgrade_rounding_state(sd), sd["state"][0]["sr_scheme"]
    (1, 1)
    """
    converted = 0
    for state in state_dict.get("state", {}).values():
        if "sr_seed" in state and "sr_scheme" not in state:
            state["sr_scheme"] = SCHEME
            converted += 1
    return converted


def check_rounding_scheme(state: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` for a saved bf16 state whose rounding bits came from another scheme."""
    if "sr_seed" not in state:
        return
    scheme = state.get("sr_scheme")
    if isinstance(scheme, Tensor):
        scheme = int(scheme.item())
    if scheme is None:
        raise ValueError(
            f"{where}: the saved state was written before slimopt's counter-based stochastic "
            "rounding (it has sr_seed but no sr_scheme), so the rounding bits would silently "
            "change; convert it with slimopt.lean.upgrade_rounding_state(state_dict) (the run "
            "continues with equally distributed but different bits) or resume with the slimopt "
            "version that wrote it"
        )
    if scheme != SCHEME:
        raise ValueError(
            f"{where}: the saved state's rounding scheme is {scheme}, this slimopt writes "
            f"scheme {SCHEME}"
        )


# --------------------------------------------------------------------------- the bf16 step
def is_low_precision(p: Tensor) -> bool:
    """Parameters stepped through fp32 copies (bf16)."""
    return p.dtype in _LOW_PRECISION


def param_seed(base: int, group_index: int, param_index: int) -> int:
    """The stochastic-rounding seed of the parameter at ``param_index`` of param group
    ``group_index`` (stored in its state as ``sr_seed`` at its first step)."""
    return _mix(base, (group_index << 32) + param_index)


def _chunks(params: Sequence[Tensor], limit: int) -> list[list[int]]:
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, p in enumerate(params):
        if current and size + p.numel() > limit:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += p.numel()
    if current:
        out.append(current)
    return out


def row_blocked(rule: Rule, p: Tensor) -> bool:
    """Whether pure bf16 steps ``p`` in blocks of rows (:func:`step_rows`) rather than on an fp32
    copy of the whole tensor: a tensor above :data:`FP32_CHUNK_ELEMENTS` with more than one row,
    under an element-wise rule or a reducing rule that declares :class:`~slimopt.algorithms.base.
    RowBlocks` (for a matrix)."""
    if p.ndim == 0 or p.shape[0] < 2 or p.numel() <= FP32_CHUNK_ELEMENTS:
        return False
    return steps_in_row_blocks(rule) and (rule.sharded == "elementwise" or p.ndim >= 2)


def steps_in_row_blocks(rule: Rule) -> bool:
    """Whether ``rule`` can step a large table in blocks of rows: an element-wise rule, or a
    reducing rule that declares :class:`~slimopt.algorithms.base.RowBlocks` (for matrices)."""
    return rule.sharded == "elementwise" or rule.row_blocks is not None


def step_low_precision(
    apply: Callable[[list[Tensor], list[Tensor], list[dict[str, Any]]], None],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    stochastic: bool,
    rule: Rule,
    group: dict[str, Any],
    release_grads: bool = False,
) -> None:
    """Run ``apply(params, grads, states)`` (a rule's step) on fp32 copies of bf16 parameters and
    gradients, a few parameters at a time, and write the new parameters back: rounded
    stochastically when ``stochastic`` (bits seeded by each state's ``sr_seed`` and ``sr_step``,
    its count of rounded writes), else to nearest. Reductions over the gradient (norms, column
    statistics, Sinkhorn sums) run on the fp32 copy. The state stays bf16: the rule steps an fp32
    copy of it that is rounded back to nearest once (what a kernel that reads bf16 computes in its
    registers). Large tables (:func:`row_blocked`) step a
    block of rows at a time (:func:`step_rows`), so no fp32 copy of a whole table exists.
    ``release_grads`` (step-in-backward) frees each bf16 gradient (``p.grad`` and the entry of
    ``grads``) as soon as it is no longer read."""
    blocked = [i for i, p in enumerate(params) if row_blocked(rule, p)]
    for i in blocked:
        step_rows(apply, rule, group, params[i], grads[i], states[i], stochastic=stochastic)
        if release_grads:
            grads[i] = None  # type: ignore[call-overload]
            params[i].grad = None
    skip = set(blocked)
    rest = [i for i in range(len(params)) if i not in skip]
    for part in _chunks([params[i] for i in rest], FP32_CHUNK_ELEMENTS):
        chunk = [rest[j] for j in part]
        p32 = [params[i].detach().float() for i in chunk]
        g32 = []
        for i in chunk:
            g32.append(grads[i].float())
            if release_grads:
                grads[i] = None  # type: ignore[call-overload]
                params[i].grad = None
        s32 = [{k: _fp32(v) for k, v in states[i].items()} for i in chunk]
        apply(p32, g32, s32)
        del g32
        for j, i in enumerate(chunk):
            p, state = params[i], states[i]
            _write_state(state, s32[j])
            _write_param(p.data, p32[j], state, stochastic)
            p32[j] = None  # type: ignore[call-overload]


def kernel_views(
    rule: Rule, group: dict[str, Any], views: list[Any]
) -> tuple[list[Any], list[Any]]:
    """Split pure-bf16 local shards (FSDP2) into those an element-wise rule's fused kernel takes
    directly (the kernel reads bf16 and rounds inside, :attr:`~slimopt.algorithms.base.Rule.
    rounds_bf16`, with each element's global index from the shard's offset) and the rest, which
    step on fp32 copies (:func:`step_low_precision_views`). A reducing rule's sharded step makes
    its global reductions first, so its shards take the copy path."""
    if rule.sharded != "elementwise":
        return [], views
    taken, rest = [], []
    for v in views:
        device = v.param.device.type
        ok = (
            device in rule.rounds_bf16
            and v.param.dtype in rule.fused_dtypes.get(device, ())
            and group.get("foreach") is None
            and group.get("fused") is not False
            and rule.fused_takes_group(device, group)
            and rule.fused_tensor_filter(device)(v.param, v.grad, v.state, group)
            and rule.fused_step(device) is not None
        )
        (taken if ok else rest).append(v)
    return taken, rest


def step_low_precision_views(
    step_views: Callable[[list[Any]], None],
    views: list[Any],
    *,
    stochastic: bool,
    rule: Rule,
    release_grads: bool = False,
) -> None:
    """Pure bf16 on the local shards of DTensor parameters (FSDP2): ``step_views(views)`` (the
    rule's sharded step, global reductions included, then each view's ``write_back``) runs on
    fp32 copies of a few shards at a time, and each new shard is written back rounded
    (stochastically with the bits of its elements' global indices, ``view.shard.offset`` on,
    so the result does not depend on how the tensor is sharded). The state stays bf16, as in
    :func:`step_low_precision`. ``release_grads`` frees each gradient once its copy exists."""
    for part in _chunks([v.param for v in views], VIEW_CHUNK_ELEMENTS):
        work = []
        for i in part:
            v = views[i]
            state = {k: _fp32(x) for k, x in v.state.items()}
            work.append(LocalView(v.param.float(), v.grad.float(), state, v.shard, v.owner))
            if release_grads:
                v.grad = None  # type: ignore[assignment]
        step_views(work)  # writes the state back (bf16 state rounded to nearest)
        for i, w in zip(part, work):
            v, owner = views[i], views[i].owner
            owner["sr_step"] = int(owner["sr_step"]) + 1
            if stochastic and v.param.numel():
                offset = v.shard.offset if v.shard is not None else 0
                stochastic_round_(
                    v.param, w.param.contiguous(), int(owner["sr_seed"]), owner["sr_step"], offset
                )
            else:
                v.param.copy_(w.param)


def _fp32(v: Any) -> Any:
    return v.float() if isinstance(v, Tensor) and is_low_precision(v) else v


def _write_state(state: dict[str, Any], new: dict[str, Any]) -> None:
    """Copy a stepped working copy of a state back (bf16 tensors rounded to nearest in place)."""
    for k, v in new.items():
        old = state.get(k)
        if isinstance(old, Tensor) and old is not v and old.shape == getattr(v, "shape", None):
            old.copy_(v)
        else:
            state[k] = v


def _write_param(dst: Tensor, src: Tensor, state: dict[str, Any], stochastic: bool) -> None:
    """Count one rounded write in ``state`` and write ``src`` (fp32) into the bf16 ``dst``."""
    state["sr_step"] = int(state["sr_step"]) + 1
    if stochastic:
        stochastic_round_(dst, src, int(state["sr_seed"]), state["sr_step"])
    else:
        dst.copy_(src)


def step_rows(
    apply: Callable[[list[Tensor], list[Tensor], list[dict[str, Any]]], None],
    rule: Rule,
    group: dict[str, Any],
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    stochastic: bool = True,
    rows: int | None = None,
) -> None:
    """One step of ``p`` by ``rule`` in blocks of ``rows`` rows (default: as many as make
    :data:`FP32_CHUNK_ELEMENTS` elements), never copying the whole of ``p`` or ``g``.

    bf16 rows are copied to fp32, stepped and written back rounded (stochastically with the bits
    of the whole-tensor write: one generator for the parameter's step, drawn block after block);
    rows of any other dtype are stepped in place, so a float64 run of this path can be checked
    against the rule's reference. An element-wise rule runs ``apply`` (its tier) on each block,
    with the state tensors shaped like ``p`` sliced to the block and its other state (step
    counters) from the step's start, kept once after the last block. A reducing rule runs its
    :class:`~slimopt.algorithms.base.RowBlocks`: a pass gathering its column statistic, then a
    pass of updates.

    >>> import torch
    >>> from slimopt.algorithms import get_rule
    >>> rule, p = get_rule("sage"), torch.ones(6, 3, dtype=torch.float64)
    >>> group = dict(rule.defaults, lr=0.1)
    >>> state = rule.init_state(p, group)
    >>> step_rows(None, rule, group, p, torch.full_like(p, 0.5), state, rows=4)
    >>> state["step"], round(p[0, 0].item(), 6)  # 1 - lr*wd, then minus lr * sign * H (H ~ 1)
    (1, 0.899)
    """
    low = is_low_precision(p)
    n = p.shape[0]
    if rows is None:
        rows = max(1, FP32_CHUNK_ELEMENTS // max(1, p[0].numel()))
    blocks = [slice(r, min(r + rows, n)) for r in range(0, n, rows)]
    shaped = [k for k, v in state.items() if isinstance(v, Tensor) and v.shape == p.shape]
    in_place = not low
    row_numel = p[0].numel() if p.ndim else 1
    if low:
        state["sr_step"] = int(state["sr_step"]) + 1

    def load(x: Tensor) -> Tensor:
        return x.float() if low else x

    def store(dst: Tensor, src: Tensor, sl: slice) -> None:
        if src is dst:
            return
        if low and stochastic:  # the block's bits are its elements' in the whole tensor
            seed, step = int(state["sr_seed"]), state["sr_step"]
            stochastic_round_(dst, src, seed, step, offset=sl.start * row_numel)
        else:
            dst.copy_(src)

    data = p.detach()
    if rule.sharded == "elementwise":
        last: dict[str, Any] = {}
        for sl in blocks:
            # the step's starting counters for every block (cloned: a rule may bump a tensor
            # counter in place), and the block's rows of the state shaped like p (never cloned)
            part = {
                k: (v.clone() if isinstance(v, Tensor) else v)
                for k, v in state.items()
                if k not in shaped
            }
            for k in shaped:
                part[k] = state[k][sl] if in_place else state[k][sl].float()
            work = load(data[sl])
            apply([work], [load(g[sl])], [part])
            store(data[sl], work, sl)
            if not in_place:  # fp32 working rows of bf16 state, rounded back to nearest
                for k in shaped:
                    state[k][sl].copy_(part[k])
            last = part
        _write_state(state, {k: v for k, v in last.items() if k not in shaped})
        return
    spec = rule.row_blocks
    if spec is None:
        raise ValueError(f"{rule.name} declares no row blocks for pure bf16")

    # a reducing rule's bf16 state is stepped on fp32 working copies (rows of the state shaped
    # like p, block by block; its small state whole) and rounded back to nearest once, as in
    # step_low_precision
    def state_rows(sl: slice) -> dict[str, Tensor]:
        return {k: load(state[k][sl]) for k in shaped}

    def put_back(sl: slice, rows: dict[str, Tensor]) -> None:
        for k in shaped:
            if rows[k] is not state[k][sl] and low:
                state[k][sl].copy_(rows[k])

    total = None
    if spec.gather is not None:
        for sl in blocks:
            rows_ = state_rows(sl)
            part = spec.gather(load(g[sl]), rows_, group)
            put_back(sl, rows_)
            if part is not None:
                total = part if total is None else total.add_(part)

    def grad_blocks() -> Iterator[tuple[slice, Tensor]]:
        return ((sl, load(g[sl])) for sl in blocks)

    small = {k: (_fp32(v) if low else v) for k, v in state.items() if k not in shaped}
    factor = spec.finish(total, n, small, group, grad_blocks)
    _write_state(state, small)
    for sl in blocks:
        work = load(data[sl])
        rows_ = state_rows(sl)
        spec.update(work, load(g[sl]), rows_, group, factor, sl)
        put_back(sl, rows_)
        store(data[sl], work, sl)


# --------------------------------------------------------------------------- step in backward
class BackwardStepper:
    """The hooks of one optimizer in step-in-backward mode.

    Built by :class:`slimopt.SlimOptimizer` when ``step_in_backward=True``: a post-accumulate-grad
    hook on each parameter steps it the moment its gradient is final, through the optimizer's
    public seam :meth:`slimopt.SlimOptimizer.step_params`, and frees the gradient. Where a gradient
    is final depends on the parallelism (spec, "Lean modes"):

    - one process: when autograd has accumulated it;
    - FSDP2: after the reduce-scatter of its unit (FSDP2 runs these hooks on the sharded
      parameter with the sharded gradient). With the units known (:meth:`set_units`, done by
      :func:`slimopt.create_optimizer` for an FSDP2 model), a unit's parameters are stepped
      together once the last of them has its gradient, so a reducing rule makes its global
      reductions once per unit and group, never once per tensor;
    - DDP: after the all-reduce of its bucket, in a communication hook (:func:`attach_ddp`); the
      per-parameter hooks are then removed.

    ``remove()`` detaches the hooks (the optimizer then steps as usual).
    """

    def __init__(self, optimizer: Any) -> None:
        self._opt = weakref.ref(optimizer)
        self.stepped: set[int] = set()
        self.handles: list[Any] = []
        self.ddp: Any = None  # the DistributedDataParallel module after attach_ddp
        self._unit_of: dict[int, int] = {}
        self._unit_size: list[int] = []
        self._pending: dict[int, list[Tensor]] = {}
        check_step_in_backward_groups(optimizer.param_groups)
        for gi, group in enumerate(optimizer.param_groups):
            names = group.get("param_names") or []
            for i, p in enumerate(group["params"]):
                # a placement no rule can update exactly (tensor parallelism's column shards)
                # is refused now, not in a hook after other parameters were updated
                check_param(p, names[i] if i < len(names) else f"param {i} of group {gi}")
        seen: set[int] = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def set_units(self, units: Sequence[Sequence[Tensor]]) -> None:
        """Step each of ``units`` (lists of the optimizer's parameters, e.g. one FSDP2 unit's
        sharded parameters) together, once every one of its parameters has its gradient."""
        self._unit_of = {id(p): i for i, ps in enumerate(units) for p in ps if p.requires_grad}
        self._unit_size = [sum(1 for p in ps if p.requires_grad) for ps in units]
        self._pending = {}

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        opt = self._opt()
        if opt is None or p.grad is None:
            return
        self._check_not_twice(p)
        if self.ddp is None and not is_dtensor(p):
            _check_single_process()
        unit = self._unit_of.get(id(p))
        if unit is None:
            self.step_now([p])
            return
        pending = self._pending.setdefault(unit, [])
        pending.append(p)
        if len(pending) == self._unit_size[unit]:
            self.step_now(self._pending.pop(unit))

    def _check_not_twice(self, p: Tensor) -> None:
        if id(p) in self.stepped:
            raise LeanModeError(
                "step_in_backward: a second backward pass before optimizer.step() (gradient "
                "accumulation) cannot be exact, because each update was applied during the first "
                "pass; call optimizer.step() after every backward, or turn step_in_backward off"
            )

    @torch.no_grad()
    def step_now(self, params: Sequence[Tensor]) -> None:
        """Step ``params`` (their gradients are final) and free their gradients."""
        opt = self._opt()
        if opt is None:
            return
        opt.step_params(params)
        for p in params:
            self.stepped.add(id(p))
            p.grad = None

    def close_step(self, stepped_by_step: bool = False) -> None:
        """End the step: the next backward may update every parameter again. (A unit some of
        whose parameters got no gradient was stepped by ``optimizer.step()``.)

        A step in which no parameter was updated, neither during backward nor by ``step()``, is
        refused: the hooks sit on parameters that no longer receive gradients, which is what
        wrapping the model (FSDP2's ``fully_shard`` replaces every parameter) after building the
        optimizer does."""
        if not self.stepped and not stepped_by_step and self.handles:
            raise LeanModeError(
                "step_in_backward: no parameter of this optimizer received a gradient since the "
                "last step. If the model was wrapped (fully_shard, DDP) after the optimizer was "
                "built, build the optimizer after wrapping; otherwise call backward() before "
                "step()"
            )
        self.stepped.clear()
        self._pending.clear()


def fsdp_units(model: torch.nn.Module) -> list[list[Tensor]]:
    """The sharded parameters of each FSDP2 unit of ``model`` (empty for a model without FSDP2).

    >>> fsdp_units(torch.nn.Linear(2, 2))
    []
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    units = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
        if group is not None:
            units.append([fp.sharded_param for fp in group.fsdp_params])
    return units


def attach_ddp(ddp_model: torch.nn.Module, optimizer: Any) -> None:
    """Apply ``optimizer``'s updates during backward under DDP: after each bucket's all-reduce
    (a communication hook, as torch's optimizer-overlap hooks do), the bucket's parameters are
    stepped with their averaged gradients, batched per bucket, and the gradients freed.

    ``optimizer`` must have been built with ``step_in_backward=True`` from ``ddp_model.module``
    (:func:`slimopt.create_optimizer` calls this itself when given the DDP model). Call before
    the first backward.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise LeanModeError(
            f"attach_ddp takes a DistributedDataParallel model, not {type(ddp_model).__name__}"
        )
    stepper = getattr(optimizer, "_backward_stepper", None)
    if stepper is None:
        raise LeanModeError("attach_ddp: the optimizer was not built with step_in_backward=True")
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    foreign = [
        n for n, p in ddp_model.module.named_parameters() if p.requires_grad and id(p) not in owned
    ]
    if foreign:
        raise LeanModeError(
            f"attach_ddp: parameter {foreign[0]!r} of the DDP model is in none of the optimizer's "
            "param groups (build the optimizer from ddp_model.module)"
        )
    stepper.remove()  # a per-parameter hook would step before the all-reduce
    stepper.ddp = ddp_model
    process_group = ddp_model.process_group

    def clear_grads() -> None:  # DDP's finalize may have written the bucket views back
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in stepper.stepped:
                    p.grad = None
        stepper._clear_queued = False

    def hook(state: Any, bucket: Any) -> Any:
        # wait here, on the backward's thread (as torch's optimizer-in-backward hook does): the
        # step and the end-of-backward callback must run inside the backward pass
        allreduce_hook(process_group, bucket).wait()
        params = list(bucket.parameters())
        for p, g in zip(params, bucket.gradients()):
            stepper._check_not_twice(p)
            p.grad = g.view_as(p)
        stepper.step_now(params)
        if not getattr(stepper, "_clear_queued", False):
            torch.autograd.Variable._execution_engine.queue_callback(clear_grads)
            stepper._clear_queued = True
        done: torch.futures.Future[Tensor] = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    # DDP checks the hook's annotations (real types, not this module's postponed strings)
    hook.__annotations__ = {
        "state": object,
        "bucket": torch.distributed.GradBucket,
        "return": torch.futures.Future[torch.Tensor],
    }
    ddp_model.register_comm_hook(None, hook)
    set_flag = getattr(ddp_model.reducer, "_set_optimizer_in_backward", None)
    if set_flag is not None:  # DDP then does not copy the bucket back into freed gradients
        set_flag()


def _check_single_process() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise LeanModeError(
            "step_in_backward with several processes: a plain (not DTensor) parameter's "
            "gradient is complete on one rank before it is averaged across ranks; under DDP "
            "build the optimizer with slimopt.create_optimizer(preset, ddp_model, "
            "step_in_backward=True) or call slimopt.lean.attach_ddp(ddp_model, optimizer) "
            "before the first backward"
        )


def check_step_in_backward_groups(param_groups: Iterable[dict[str, Any]]) -> None:
    """Raise :class:`LeanModeError` for param groups whose step cannot run during backward."""
    for group in param_groups:
        if group.get("algorithm") == "sgd_sai" and group.get("snr_normalize") == "max":
            raise LeanModeError(
                "step_in_backward: SGD-SaI's snr_normalize='max' divides by the largest gsnr of "
                "all parameters, which is not known while parameters are updated one by one"
            )


def check_step_in_backward_model(model: torch.nn.Module) -> None:
    """Raise :class:`LeanModeError` for a model wrapped in ``DataParallel``, whose gradient
    reduction happens after the hooks would apply the updates. (A DDP model is stepped from its
    buckets' communication hook: :func:`attach_ddp`.)

    >>> check_step_in_backward_model(torch.nn.Linear(2, 2))  # a plain model: nothing to object to
    >>> check_step_in_backward_model(torch.nn.DataParallel(torch.nn.Linear(2, 2)))
    Traceback (most recent call last):
    ...
    slimopt.lean.LeanModeError: step_in_backward is not supported with DataParallel: ...
    """
    from torch.nn.parallel import DataParallel

    if isinstance(model, DataParallel):
        raise LeanModeError(
            f"step_in_backward is not supported with {type(model).__name__}: its gradients are "
            "averaged across replicas after each parameter's update would already be applied; "
            "use DistributedDataParallel"
        )


def check_no_global_clip(optimizer: Any, max_grad_norm: float | None) -> None:
    """Raise :class:`LeanModeError` when a training loop asks for a global gradient-norm clip on an
    optimizer that applies updates during backward (the clip would see no gradients).

    >>> import slimopt
    >>> opt = slimopt.Lion(torch.nn.Linear(2, 2).parameters(), step_in_backward=True)
    >>> check_no_global_clip(opt, None)  # no clip asked for: fine
    """
    if max_grad_norm and getattr(optimizer, "step_in_backward", False):
        raise LeanModeError(
            "step_in_backward cannot be combined with a global gradient-norm clip "
            f"(max_grad_norm={max_grad_norm}): each gradient is applied and freed before the "
            "norm over all of them exists"
        )
