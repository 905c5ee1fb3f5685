"""The memory planner: the peak memory of one training step, by precision and mode.

A step's peak is the sum of

* **weights**: 4 bytes per parameter in ``fp32`` and ``bf16-mixed`` (fp32 weights, bf16 autocast),
  2 in pure ``bf16``;
* **gradients**: one per trainable parameter in the weights' dtype; with ``step_in_backward`` only
  the largest single gradient (each is applied and freed as soon as it is complete);
* **optimizer state**: not a formula: the preset's real optimizer allocates its state on the meta
  device (:meth:`slimopt.SlimOptimizer.init_state`) and :func:`slimopt.state_bytes` counts it;
* **autocast weight copies** (``bf16-mixed`` only): autocast keeps a bf16 copy of every weight
  that a matmul used until backward has consumed it, 2 bytes per parameter of the matmuls;
* **activations**: what autograd saves for backward plus the gradients in flight during backward
  (:func:`activation_bytes`, a LLaMA-family formula counted from the tensors that
  ``transformers``' ``LlamaDecoderLayer`` saves, see below);
* **the optimizer's working set**: the temporaries of the update (in pure bf16, the fp32 copies
  of the parameter, gradient and state that the rule runs on, one parameter or a few small ones
  at a time; in fp32, the rule's own temporaries over a param group, e.g. SAGE's and Lion's sign
  direction).

Activation formula (bytes per token; ``h`` hidden, ``i`` intermediate, ``V`` vocabulary, ``L``
layers). The per-layer coefficients were counted with ``torch.autograd.graph.saved_tensors_hooks``
on ``transformers``' LLaMA with SDPA attention; the scale on them and the logits' coefficient were
fitted to measured peak RSS of llama-20m and llama-60m (``docs/memory.md``)::

    per layer:   fp32 1.27 (16 i + 40 h),  bf16 1.41 (8 i + 24 h),  bf16-mixed 1.3 (11 i + 38 h)
                 for L + 1 layers (one layer's gradients in flight)
    outside:     fp32 13 h, bf16 8 h, bf16-mixed 42 h;  logits: 5 V, 7 V, 5 V
    checkpointing keeps each layer's input (h x 4 or 2 bytes per layer) and recomputes one layer
    at a time during backward (2 layers' worth in flight).

On CPU the runtime adds 170 MB (allocator, thread pools, measured on llama-tiny) and one fp32
buffer of the embedding's size that the C allocator may keep once freed.

Decimal units: 1 GB = 10**9 bytes.

>>> p = plan("llama-7b", "sage-hybrid", precision="bf16", step_in_backward=True,
...          grad_checkpointing=True, batch_size=1, seq_len=256)
>>> round(p.weight_bytes / 1e9, 2), round(p.grad_bytes / 1e9, 2), round(p.total_bytes / 1e9, 1)
(13.48, 0.26, 14.7)
>>> round(plan("llama-7b", "adamw", precision="fp32").total_bytes / 1e9)
134
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

PRECISIONS: tuple[str, ...] = ("fp32", "bf16-mixed", "bf16")

# What a CPU training process holds beyond tensors once it has run a step: allocator arenas,
# thread pools, kernels' workspaces (measured as the peak RSS of a step of llama-tiny, whose
# tensors are 30 MB, above the RSS before the model was built). Where the process keeps what the
# C allocator frees (fp32 runs, --keep-freed-memory) the planner adds one fp32 buffer of the
# embedding's size; the lean modes hand freed buffers back (slimopt.lean.return_freed_memory),
# which lowers llama-1b's peak by 0.4 GB, and plan without it. llama-20m's lean step measures
# about 50 MB more in a freshly installed environment than in an older one with the same
# packages, for a reason not found; the 170 MB stay in every mode.
RUNTIME_BYTES = 170_000_000

# bytes per token per unit of (intermediate, hidden) saved by one decoder layer
_LAYER: dict[str, tuple[float, float]] = {
    "fp32": (16.0, 40.0),
    "bf16": (8.0, 24.0),
    "bf16-mixed": (11.0, 38.0),
}
# bytes per token per unit of hidden outside the layers (embedding output, final norm)
_OUTSIDE: dict[str, float] = {"fp32": 13.0, "bf16": 8.0, "bf16-mixed": 42.0}
# The saved-tensor counts above, scaled to what a CPU step measures (the gradients of
# activations in flight, the allocator), and the logits' bytes per token per vocabulary entry: both
# fitted to the measured peaks of llama-20m and llama-60m at batch 1 and 4 x 256 tokens
# (benchmarks/lean_step.py, docs/memory.md).
_MEASURED_OVER_SAVED: dict[str, float] = {"fp32": 1.27, "bf16": 1.41, "bf16-mixed": 1.3}
_LOGITS: dict[str, float] = {"fp32": 5.0, "bf16": 7.0, "bf16-mixed": 5.0}
# the residual stream's bytes per element (what checkpointing keeps per layer)
_RESIDUAL: dict[str, int] = {"fp32": 4, "bf16": 2, "bf16-mixed": 4}


def check_precision(precision: str) -> str:
    """Raise a clear error for anything that is not a precision name."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class Plan:
    """The predicted peak memory of one training step (bytes; keys of ``slimopt memory --json``)."""

    model: str
    preset: str
    precision: str
    step_in_backward: bool
    grad_checkpointing: bool
    batch_size: int
    seq_len: int
    param_count: int
    weight_bytes: int
    grad_bytes: int
    state_bytes: int
    autocast_bytes: int
    activation_bytes: int
    logits_bytes: int
    optimizer_work_bytes: int
    largest_grad_bytes: int
    runtime_bytes: int
    dist: str = "none"
    world_size: int = 1
    gather_bytes: int = 0
    reduce_bytes: int = 0
    weights: str = "auto"
    quant_work_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """The predicted peak: weights, state and the runtime's own memory always; then the
        largest of the phases of a step. Start of backward: activations, the logits' tensors (and
        autocast's weight copies) with the first gradient. With ``step_in_backward`` the updates
        run while activations are alive (the logits' tensors are gone by the first update).
        The ordinary step: every gradient and the update's working set."""
        resident = self.weight_bytes + self.state_bytes + self.runtime_bytes
        alive = self.activation_bytes + self.autocast_bytes + self.largest_grad_bytes
        alive += self.gather_bytes  # FSDP2: the unsharded units in use
        backward = alive + self.logits_bytes + self.reduce_bytes
        if self.step_in_backward:
            # DDP and FSDP2 update during backward, next to their reduction buffers; an int8
            # weight's update holds its own gradient in its working set (quant_work_bytes)
            update = alive + self.reduce_bytes + self.optimizer_work_bytes
            quant = alive - self.largest_grad_bytes + self.quant_work_bytes
            return resident + max(backward, update, quant if self.quant_work_bytes else 0)
        return resident + max(backward, self.grad_bytes + self.optimizer_work_bytes)

    @property
    def mode(self) -> str:
        """The mode in words, e.g. ``bf16 +step-in-backward +grad-checkpointing``."""
        parts = [self.precision]
        if self.weights == "int8":
            parts.append("int8-weights")
        if self.dist != "none":
            parts.insert(0, f"{self.dist} x{self.world_size}")
        if self.step_in_backward:
            parts.append("+step-in-backward")
        if self.grad_checkpointing:
            parts.append("+grad-checkpointing")
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes, "mode": self.mode}


def _cfg(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"the model config has none of {names}")


def activation_bytes(
    config: Any,
    precision: str,
    *,
    batch_size: int,
    seq_len: int,
    grad_checkpointing: bool = False,
) -> int:
    """Activation memory of one forward and backward of a LLaMA-family (or GPT-2) model.

    >>> from slimopt.train.models import model_config
    >>> cfg = model_config("llama-7b")
    >>> full = activation_bytes(cfg, "bf16", batch_size=1, seq_len=256)
    >>> ckpt = activation_bytes(cfg, "bf16", batch_size=1, seq_len=256, grad_checkpointing=True)
    >>> round(full / 1e9, 2), round(ckpt / 1e9, 2)
    (2.23, 0.21)
    """
    check_precision(precision)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    h = _cfg(config, "hidden_size", "n_embd")
    i = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    layers = _cfg(config, "num_hidden_layers", "n_layer")
    tokens = batch_size * seq_len
    c_i, c_h = _LAYER[precision]
    layer = _MEASURED_OVER_SAVED[precision] * tokens * (c_i * i + c_h * h)
    outside = tokens * _OUTSIDE[precision] * h
    if grad_checkpointing:
        # each layer's input, plus one layer recomputed (and its gradients) during backward
        return int(layers * tokens * h * _RESIDUAL[precision] + 2 * layer + outside)
    # all layers' saved tensors, plus one layer's gradients in flight
    return int((layers + 1) * layer + outside)


def logits_bytes(config: Any, precision: str, *, batch_size: int, seq_len: int) -> int:
    """The logits' tensors at the start of backward (the loss's saved log-softmax, the logits'
    gradient): bytes per token per vocabulary entry, fitted to measured peaks (docs/memory.md).

    >>> from slimopt.train.models import model_config
    >>> logits_bytes(model_config("llama-7b"), "bf16", batch_size=1, seq_len=256) / 1e6
    57.344
    """
    check_precision(precision)
    return int(batch_size * seq_len * _LOGITS[precision] * _cfg(config, "vocab_size"))


def _weights_dtype(precision: str) -> str:
    return "bf16" if precision == "bf16" else "fp32"


@dataclass(frozen=True)
class _Facts:
    """What the planner needs from a preset's optimizer on one model (built once, cached)."""

    param_count: int
    param_bytes: int
    grad_bytes: int
    state_bytes: int
    largest_grad_bytes: int
    # per param group: (rule, element counts, parameter-shaped state tensors of its largest)
    groups: tuple[tuple[str, tuple[int, ...], int], ...]
    # per trainable parameter: (rows, elements, element size, bytes of its parameter-shaped
    # state, bytes of its other state), for the sharded plans
    tensors: tuple[tuple[int, int, int, int, int], ...] = ()


_FACTS: dict[tuple[int, str], tuple[nn.Module, _Facts]] = {}


def _facts(model: nn.Module, preset: str) -> _Facts:
    from slimopt import create_optimizer, state_bytes

    key = (id(model), preset)
    hit = _FACTS.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    opt = create_optimizer(preset, model)
    opt.init_state()
    groups = []
    for group in opt.param_groups:
        sizes = tuple(p.numel() for p in group["params"])
        if not sizes:
            continue
        big = max(group["params"], key=lambda q: q.numel())
        shaped = sum(
            1
            for v in opt.state[big].values()
            if isinstance(v, torch.Tensor) and v.numel() == big.numel() and v.numel() > 1
        )
        groups.append((group["algorithm"], sizes, shaped))
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    tensors = []
    for p in params:
        shaped = other = 0
        for v in opt.state[p].values() if p.requires_grad else ():
            if isinstance(v, torch.Tensor):
                nbytes = v.numel() * v.element_size()
                if v.shape == p.shape and v.ndim > 0:
                    shaped += nbytes
                else:
                    other += nbytes
        rows = p.shape[0] if p.ndim else 1
        tensors.append((rows, p.numel(), p.element_size(), shaped, other))
    facts = _Facts(
        param_count=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        grad_bytes=sum(p.numel() * p.element_size() for p in trainable),
        state_bytes=state_bytes(opt),
        largest_grad_bytes=max((p.numel() * p.element_size() for p in trainable), default=0),
        groups=tuple(groups),
        tensors=tuple(tensors),
    )
    if len(_FACTS) > 64:
        _FACTS.clear()
    _FACTS[key] = (model, facts)
    return facts


def _optimizer_work(
    facts: _Facts, precision: str, step_in_backward: bool, device: str = "cpu"
) -> int:
    """The largest working set of the update among the preset's param groups."""
    from slimopt.algorithms import get_rule
    from slimopt.lean import FP32_CHUNK_ELEMENTS, steps_in_row_blocks

    worst = 0
    for algorithm, sizes, shaped in facts.groups:
        temps = get_rule(algorithm).temporaries
        if precision == "bf16":
            # where the rule's kernel reads bf16 on this device (Rule.rounds_bf16) nothing is
            # copied: its temporaries only; elsewhere fp32 copies of p, g and the state shaped
            # like p for the largest chunk, and the rule's temporaries; a large table steps a
            # block of rows at a time where its rule allows (slimopt.lean.row_blocked)
            rule = get_rule(algorithm)
            largest = FP32_CHUNK_ELEMENTS if steps_in_row_blocks(rule) else max(sizes)
            n = max(largest, min(sum(sizes), FP32_CHUNK_ELEMENTS))
            copies = 0 if device in rule.rounds_bf16 else 2 + shaped
            worst = max(worst, 4 * n * (copies + temps))
        else:
            n = max(sizes) if step_in_backward else sum(sizes)
            worst = max(worst, 4 * n * temps)
    return worst


def _int8_work(model: nn.Module, facts: _Facts) -> int:
    """The update of the largest int8 weight (:mod:`slimopt.quant`), during its backward: its
    bf16 gradient, the fp32 dequantized weight and gradient the rule runs on, the rule's
    temporaries on them, and the rounding of a block of rows (grid positions, fractions, bits)."""
    from slimopt.algorithms import get_rule
    from slimopt.quant import ROW_CHUNK_ELEMENTS, Int8Linear

    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if not layers:
        return 0
    n = max(m.weight.numel() for m in layers)
    temps = max((get_rule(a).temporaries for a, _, _ in facts.groups), default=1)
    rows = min(n, ROW_CHUNK_ELEMENTS)
    return n * (2 + 4 + 4 + 4 * temps) + 20 * rows


DIST_MODES: tuple[str, ...] = ("none", "ddp", "fsdp2")
WEIGHTS: tuple[str, ...] = ("auto", "int8")
INT8_MODE_ERROR = "int8 weights need precision bf16 and step_in_backward, in one process"


def check_weights(weights: str) -> None:
    """A ValueError naming ``weights`` unless it is one of :data:`WEIGHTS`."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")


def int8_mode(precision: str, step_in_backward: bool, dist: str = "none", world: int = 1) -> bool:
    """Whether int8 weights (:mod:`slimopt.quant`) can be trained in this mode."""
    return precision == "bf16" and step_in_backward and (dist == "none" or world == 1)


def _shard(rows: int, numel: int, world: int) -> int:
    """Elements of rank 0's shard of a tensor split on dim 0 (FSDP2: ceil(rows / world) rows)."""
    if rows == 0:
        return 0
    return min(rows, -(-rows // world)) * (numel // rows)


def _units(model: nn.Module) -> tuple[list[int], int]:
    """(elements of each FSDP2 unit: every block of the innermost ``nn.ModuleList``s, the input
    embedding and the untied head, as ``slimopt.train.parallel.default_fsdp_units`` shards them;
    elements of the root: the rest)."""
    units: list[int] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and not any(
            isinstance(m, nn.ModuleList) for child in module for m in child.modules()
        ):
            for block in module:
                ps = [p for p in block.parameters() if id(p) not in seen]
                seen.update(id(p) for p in ps)
                units.append(sum(p.numel() for p in ps))
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if isinstance(module, nn.Module) and module is not model:
            ps = list(module.parameters())
            if ps and not any(id(p) in seen for p in ps):
                seen.update(id(p) for p in ps)
                units.append(sum(p.numel() for p in ps))
    root = sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in seen
    )
    return units, root


def _dist_terms(
    model: nn.Module, facts: _Facts, precision: str, dist: str, world: int, step_in_backward: bool
) -> dict[str, int]:
    """The per-rank weights, gradients, state and communication buffers of DDP or FSDP2.

    FSDP2 (``fully_shard`` on each block, then the root): weights, gradients and parameter-shaped
    state are sharded on dim 0 (rank 0 holds ``ceil(rows / world)`` rows, the largest share);
    other state (SAGE's O(d) statistic, step counters) is whole on every rank. While a step runs,
    the root unit (embedding, head, final norm) stays gathered, and two blocks are gathered at a
    time (the one in use and the one prefetched). During backward the current block's unsharded
    gradients and the reduce-scatter's input buffer (each a block's size) are alive, and the
    root's unsharded gradients from the head's on. With updates during backward a unit's sharded
    gradients are applied and freed after its reduce-scatter; otherwise all of them wait for the
    step. DDP: every rank holds everything, plus its gradient buckets (the size of all gradients).
    """
    grad_elem = 2 if precision == "bf16" else 4
    if dist == "ddp":
        full_grads = sum(n * grad_elem for _, n, _, _, _ in facts.tensors)
        return {
            "weight": facts.param_bytes,
            "grad": facts.grad_bytes,
            "state": facts.state_bytes,
            "gather": 0,
            "reduce": full_grads,  # the buckets
            "largest_grad": facts.largest_grad_bytes,
        }
    weight = sum(_shard(r, n, world) * e for r, n, e, _, _ in facts.tensors)
    state = sum(
        (shaped * _shard(r, n, world) // n if n else 0) + other
        for r, n, _, shaped, other in facts.tensors
    )
    grads = sum(_shard(r, n, world) * grad_elem for r, n, _, _, _ in facts.tensors)
    units, root = _units(model)
    block = max(units, default=0)
    elem = 4 if precision == "fp32" else 2  # bf16-mixed gathers in bf16 (MixedPrecisionPolicy)
    gather = elem * (root + 2 * block)
    reduce = grad_elem * (root + 2 * block)
    if step_in_backward:
        grads = grad_elem * max([-(-u // world) for u in units] + [-(-root // world)])
    return {"weight": weight, "grad": grads, "state": state, "gather": gather,
            "reduce": reduce, "largest_grad": 0}  # fmt: skip


# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: a larger allocation is always its own mapping
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def _runtime_bytes(
    device: str, embedding: int, dist: str, world: int, returns_freed: bool = False
) -> int:
    """The CPU runtime's own memory and one fp32 buffer of the embedding's size that the C
    allocator may keep once freed (a shard's size under FSDP2, where no rank holds the whole
    table but while it is gathered, as the ranks' measured peaks were fitted; in one process none
    where freed buffers are handed back to the system, :func:`slimopt.lean.return_freed_memory`,
    and the buffer is above glibc's largest mmap threshold, so that it is always a mapping of its
    own that a free unmaps: a smaller one lives in the heap and may stay);
    nothing on CUDA (max_memory_allocated counts tensors)."""
    if device != "cpu":
        return 0
    held = 4 * embedding
    if dist == "fsdp2" and world > 1:
        held = -(-held // world)
    elif returns_freed and (dist == "none" or world == 1) and held > MMAP_THRESHOLD_MAX:
        # one process: llama-350m to llama-7b measured without it (benchmarks/lean_step.md),
        # llama-20m (a 32.8 MB table, in the heap) with it
        held = 0
    return RUNTIME_BYTES + held


def _optimizer_work_sharded(facts: _Facts, precision: str, world: int) -> int:
    """The update's working set on FSDP2 shards: the rule on a group's local shards, in pure
    bf16 through fp32 copies of at most :data:`slimopt.lean.VIEW_CHUNK_ELEMENTS` elements."""
    from slimopt.algorithms import get_rule
    from slimopt.lean import VIEW_CHUNK_ELEMENTS

    worst = 0
    for algorithm, sizes, shaped in facts.groups:
        local = sum(-(-n // world) for n in sizes)
        temps = get_rule(algorithm).temporaries
        if precision == "bf16":
            n = min(local, VIEW_CHUNK_ELEMENTS)
            worst = max(worst, 4 * n * (2 + shaped + temps))
        else:
            worst = max(worst, 4 * local * temps)
    return worst


def plan_model(
    model: nn.Module,
    preset: str,
    *,
    name: str = "",
    precision: str = "fp32",
    step_in_backward: bool = False,
    grad_checkpointing: bool = False,
    batch_size: int = 1,
    seq_len: int = 256,
    device: str = "cpu",
    dist: str = "none",
    world_size: int = 1,
    returns_freed_memory: bool | None = None,
) -> Plan:
    """The :class:`Plan` of a model already built (on the meta device, in its weights' dtype:
    float32 for ``fp32``/``bf16-mixed``, bfloat16 for ``bf16``). With ``dist`` ``"ddp"`` or
    ``"fsdp2"`` and ``world_size`` ranks it is one rank's peak (:func:`_dist_terms`), with
    ``batch_size`` sequences on each rank. ``returns_freed_memory``: whether the process hands
    freed buffers back to the system (:func:`slimopt.lean.return_freed_memory`); None: as
    ``slimopt train`` does, on CPU in the lean modes (pure bf16 or updates during backward)."""
    check_precision(precision)
    if dist not in DIST_MODES:
        raise ValueError(f"unknown dist {dist!r}; choose one of {', '.join(DIST_MODES)}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    from slimopt.quant import Int8Linear, scale_bytes

    facts = _facts(model, preset)
    grads = facts.largest_grad_bytes if step_in_backward else facts.grad_bytes
    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    autocast = 0
    if precision == "bf16-mixed":
        # autocast's bf16 copies of the matmul weights (not of the embedding table)
        autocast = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    kw = dict(batch_size=batch_size, seq_len=seq_len, grad_checkpointing=grad_checkpointing)
    acts = activation_bytes(model.config, precision, **kw)
    logits = logits_bytes(model.config, precision, batch_size=batch_size, seq_len=seq_len)
    work = _optimizer_work(facts, precision, step_in_backward, device)
    quant_work = _int8_work(model, facts) if int8 else 0
    if returns_freed_memory is None:
        returns_freed_memory = device == "cpu" and (precision == "bf16" or step_in_backward)
    vocab, hidden = _cfg(model.config, "vocab_size"), _cfg(model.config, "hidden_size", "n_embd")
    weights, state, largest = facts.param_bytes, facts.state_bytes, facts.largest_grad_bytes
    weights += scale_bytes(model)  # int8 weights' scales (buffers)
    gather = reduce = 0
    if dist != "none" and world_size > 1:
        terms = _dist_terms(model, facts, precision, dist, world_size, step_in_backward)
        weights, grads, state = terms["weight"], terms["grad"], terms["state"]
        gather, reduce, largest = terms["gather"], terms["reduce"], terms["largest_grad"]
        if dist == "fsdp2":
            work = min(work, _optimizer_work_sharded(facts, precision, world_size))
            # bf16-mixed under FSDP2 as it is run: MixedPrecisionPolicy gathers each unit in
            # bf16 (no autocast copy of every weight) and reduces gradients in fp32
            autocast = 0
    return Plan(
        model=name,
        preset=preset,
        precision=precision,
        step_in_backward=step_in_backward,
        grad_checkpointing=grad_checkpointing,
        batch_size=batch_size,
        seq_len=seq_len,
        param_count=facts.param_count,
        weight_bytes=weights,
        grad_bytes=grads,
        state_bytes=state,
        autocast_bytes=autocast,
        activation_bytes=acts,
        logits_bytes=logits,
        optimizer_work_bytes=work,
        largest_grad_bytes=largest,
        runtime_bytes=_runtime_bytes(
            device, vocab * hidden, dist, world_size, returns_freed_memory
        ),
        dist=dist,
        world_size=world_size,
        gather_bytes=gather,
        reduce_bytes=reduce,
        weights="int8" if int8 else "auto",
        quant_work_bytes=quant_work,
    )


def plan(
    model: str,
    preset: str,
    *,
    precision: str = "fp32",
    step_in_backward: bool = False,
    grad_checkpointing: bool = False,
    batch_size: int = 1,
    seq_len: int = 256,
    vocab_size: int | None = None,
    device: str = "cpu",
    dist: str = "none",
    world_size: int = 1,
    weights: str = "auto",
    block: int = 256,
    returns_freed_memory: bool | None = None,
) -> Plan:
    """The predicted peak memory of one training step of a named model (or a transformers
    config .json), built on the meta device: nothing is allocated. With ``dist`` and
    ``world_size``, one rank's peak (``batch_size`` sequences per rank). ``weights="int8"``:
    the linear layers as int8 codes with one fp32 scale per ``block`` elements of a row
    (:mod:`slimopt.quant`; pure bf16 with ``step_in_backward`` only). ``returns_freed_memory``:
    as in :func:`plan_model`.

    >>> p = plan("llama-7b", "sage-hybrid", precision="bf16", step_in_backward=True,
    ...          grad_checkpointing=True, weights="int8")
    >>> p.mode, round(p.weight_bytes / 1e9, 2)
    ('bf16 int8-weights +step-in-backward +grad-checkpointing', 7.1)

    >>> p = plan("llama-1b", "sage-hybrid", precision="bf16", step_in_backward=True,
    ...          grad_checkpointing=True, dist="fsdp2", world_size=4)
    >>> p.mode, p.weight_bytes < plan("llama-1b", "sage-hybrid", precision="bf16").weight_bytes / 3
    ('fsdp2 x4 bf16 +step-in-backward +grad-checkpointing', True)

    >>> p = plan("llama-60m", "scale", precision="bf16", batch_size=4)
    >>> p.mode, p.weight_bytes == 2 * p.param_count
    ('bf16', True)
    """
    from slimopt.train.models import build_meta_model

    check_precision(precision)
    meta = build_meta_model(model, _weights_dtype(precision), vocab_size)
    check_weights(weights)
    if weights == "int8":
        if not int8_mode(precision, step_in_backward, dist, world_size):
            raise ValueError(INT8_MODE_ERROR)
        from slimopt.quant import quantize_weights

        quantize_weights(meta, block=block)
    return plan_model(
        meta,
        preset,
        name=model,
        precision=precision,
        step_in_backward=step_in_backward,
        grad_checkpointing=grad_checkpointing,
        batch_size=batch_size,
        seq_len=seq_len,
        device=device,
        dist=dist,
        world_size=world_size,
        returns_freed_memory=returns_freed_memory,
    )


MODES: tuple[tuple[str, bool, bool], ...] = (
    ("fp32", False, False),
    ("bf16-mixed", False, False),
    ("bf16", False, False),
    ("bf16", True, False),
    ("bf16", False, True),
    ("bf16", True, True),
)


def largest_fit(
    budget_bytes: int,
    presets: Sequence[str],
    models: Sequence[str],
    *,
    modes: Sequence[tuple[str, bool, bool]] = MODES,
    batch_size: int = 1,
    seq_len: int = 256,
    meta_models: dict[tuple[str, str], nn.Module] | None = None,
    dist: str = "none",
    world_size: int = 1,
    device: str = "cpu",
    weights: str = "auto",
    block: int = 256,
) -> dict[str, Plan | None]:
    """Per preset, the plan of the largest model (by parameter count) that fits in
    ``budget_bytes`` in any of ``modes`` (``(precision, step_in_backward, grad_checkpointing)``),
    with the leanest mode that gets there (the first of ``modes`` that fits); None if none fits.
    ``meta_models`` caches the meta-device models across calls. ``weights="int8"``: the linear
    layers as int8 codes (:mod:`slimopt.quant`), in the modes that allow them only (pure bf16
    with ``step_in_backward``, one process).

    >>> fits = largest_fit(24 * 10**9, ["scale"], ["llama-60m", "llama-1b", "llama-7b"])
    >>> fits["scale"].model, fits["scale"].mode
    ('llama-7b', 'bf16 +step-in-backward')
    """
    from slimopt.train.models import build_meta_model

    best: dict[str, Plan | None] = dict.fromkeys(presets)
    metas: dict[tuple[str, str], nn.Module] = {} if meta_models is None else meta_models
    check_weights(weights)
    for name in models:
        for precision, sib, ckpt in modes:
            if weights == "int8" and not int8_mode(precision, sib, dist, world_size):
                continue
            key = (name, _weights_dtype(precision)) + (
                (weights, block) if weights != "auto" else ()
            )
            if key not in metas:
                metas[key] = build_meta_model(name, key[1])
                if weights == "int8":
                    from slimopt.quant import quantize_weights

                    quantize_weights(metas[key], block=block)
            for preset in presets:
                current = best[preset]
                p = plan_model(
                    metas[key],
                    preset,
                    name=name,
                    precision=precision,
                    step_in_backward=sib,
                    grad_checkpointing=ckpt,
                    batch_size=batch_size,
                    seq_len=seq_len,
                    dist=dist,
                    world_size=world_size,
                    device=device,
                )
                if p.total_bytes > budget_bytes:
                    continue
                if current is None or p.param_count > current.param_count:
                    best[preset] = p
    return best


def gb(n: int | float) -> str:
    """Decimal GB with two decimals."""
    return f"{n / 1e9:.2f}"


__all__ = [
    "DIST_MODES",
    "MODES",
    "PRECISIONS",
    "Plan",
    "activation_bytes",
    "check_precision",
    "logits_bytes",
    "gb",
    "largest_fit",
    "plan",
    "plan_model",
]
