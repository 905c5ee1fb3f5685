"""``slimopt profile --device cuda``: each preset's step on a GPU with the Triton kernels, as
bandwidth: GB/s, the share of a large copy measured in the same run, the bytes floor and the ratio
to torch's fused AdamW, beside the targets of the kernels (``docs/kernels.md``).

What is timed is ``optimizer.step()`` alone (CUDA events), as in ``slimopt profile`` on the CPU:
the model is built once with random weights and gradients, every optimizer steps on the same
parameters, the rows take turns one step each per round, and the median is reported. A large
device-to-device copy is timed in the same rounds; its GB/s (bytes read + written over the best
time) is the device's bandwidth the shares are taken against. ``bytes_moved`` is
:func:`slimopt.bench.profile.step_bytes` (each parameter, gradient and state tensor read or
written once); ``floor_ms`` is those bytes at the copy's bandwidth.

The slimopt rows use the Triton kernels (:mod:`slimopt.kernels.triton_ops`) after their
first-use self-check (a rule whose check fails keeps its multi-tensor path, and the table says
so); ``--no-fused`` times the multi-tensor path instead. Only the fused AdamW baseline is kept
beside the presets (not torch's multi-tensor AdamW too), so that llama-7b in bfloat16 with the five
presets that have targets fits in about 90 GB.

::

    slimopt profile --device cuda --model llama-1b --dtype bf16 --presets sgd-sai,lion,scale

Library use (needs a CUDA device)::

    >>> from slimopt.bench.profile_cuda import profile_cuda, format_cuda_table  # doctest: +SKIP
    >>> print(format_cuda_table(profile_cuda("llama-1b", ["lion"], dtype="bf16")))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from slimopt.bench.memory_cli import DTYPES
from slimopt.bench.profile import (
    BASELINE,
    _nbytes,
    _quiet_gc,
    _Timer,
    build_profile_model,
    check_device,
    make_optimizer,
    step_bytes,
)

# A preset's step time over fused AdamW's, in the same run (issue targets; smaller is better).
TARGET_X_FUSED: dict[str, float] = {
    "sgd-sai": 0.75,
    "lion": 0.75,
    "scale": 0.6,
    "sage-hybrid": 1.0,
    "sinkgd-pure": 1.5,
}
TARGET_X_FLOOR = 1.25  # every preset within 1.25x its bytes floor (>= 80% of the copy bandwidth)


@dataclass(frozen=True)
class CudaRow:
    """One optimizer's step on the GPU (the keys of ``slimopt profile --device cuda --json``)."""

    preset: str
    step_ms_median: float
    step_ms_min: float
    bytes_moved: int
    gbps: float  # bytes_moved over the median step time
    copy_share: float  # gbps over the copy's GB/s in the same run
    floor_ms: float  # bytes_moved at the copy's bandwidth
    x_floor: float
    x_fused_adamw: float
    target_x_fused: float | None
    kernels: str  # "triton", "multi-tensor", "torch", or why the kernels were not used


@dataclass
class CudaProfile:
    rows: list[CudaRow]
    copy_gbps: float
    conditions: dict[str, Any] = field(default_factory=dict)

    def row(self, preset: str) -> CudaRow:
        return next(r for r in self.rows if r.preset == preset)


# --------------------------------------------------------------------------- Triton tier
def _rules_of(preset: str) -> set[str]:
    from slimopt.presets import PRESET_RULES

    return set(PRESET_RULES[preset].values())


@contextlib.contextmanager
def triton_tier(device: torch.device | str | None = None) -> Iterator[dict[str, str]]:
    """Inside the block, the rules step with their Triton kernels; yields ``{rule: status}``.

    On CUDA the kernels are every rule's registered ``"cuda"`` fused tier, which an optimizer with
    ``fused=None`` picks by itself: the block runs each rule's first-use self-check on ``device``
    and reports it (a rule that fails it steps with its multi-tensor path, with a warning). On CPU
    tensors under ``TRITON_INTERPRET=1`` (how the tests run the kernels) the registry's rules are
    replaced, for the block, by copies whose multi-tensor step is the kernel step, so an optimizer
    built with ``foreach=True`` goes through the kernels.
    """
    try:
        from slimopt.kernels import triton_ops
    except ImportError as exc:
        raise ValueError(
            f"the Triton kernels need triton (pip install 'slimopt[gpu]'): {exc}"
        ) from None
    import dataclasses

    from slimopt.algorithms import RULES
    from slimopt.algorithms.kernel_check import self_check

    on_cuda = torch.device(device if device is not None else "cuda").type == "cuda"
    swapped: dict[str, Any] = {}
    status: dict[str, str] = {}
    try:
        for name, step in triton_ops.STEPS.items():
            if not self_check(name, device):
                status[name] = "multi-tensor (self-check failed)"
                continue
            status[name] = "triton"
            if not on_cuda:
                swapped[name] = RULES[name]
                RULES[name] = dataclasses.replace(RULES[name], foreach=step)
        yield status
    finally:
        RULES.update(swapped)


# --------------------------------------------------------------------------- measurement
def profile_cuda(
    model: str,
    presets: Sequence[str],
    *,
    device: str = "cuda",
    dtype: str = "fp32",
    steps: int = 20,
    warmup: int = 3,
    triton: bool = True,
    vocab_size: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda msg: None,
) -> CudaProfile:
    """Time ``optimizer.step()`` for each preset and torch's fused AdamW on a CUDA device.

    Args:
        model: a named model (``slimopt.train.models``) or a transformers config .json.
        presets: slimopt presets; ``torch-adamw-fused`` is always the first row.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (parameters, gradients and state).
        steps, warmup: timed rounds (each row steps once per round) and untimed steps first
            (the kernels compile here).
        triton: the Triton kernels (True) or the rules' multi-tensor path (False).
    """
    from slimopt.presets import check_preset

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    for preset in presets:
        check_preset(preset)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not str(device).startswith("cuda"):
        raise ValueError(f"profile_cuda times CUDA devices, got {device!r}")
    dev = check_device(device)
    net = build_profile_model(model, dev, DTYPES[dtype], vocab_size=vocab_size, seed=seed)
    param_bytes = sum(_nbytes(p) for p in {id(p): p for p in net.parameters()}.values())
    names = [BASELINE] + [p for p in presets if p != BASELINE]
    timer = _Timer(dev)
    # a copy far larger than the caches: the parameters' size, within 256 MiB .. 2 GiB
    n = min(max(param_bytes, 256 * 2**20), 2 * 2**30) // 4
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    times: dict[str, list[float]] = {name: [] for name in names}
    copy_times: list[float] = []
    tier = triton_tier(dev) if triton else contextlib.nullcontext({})
    with tier as status, _quiet_gc():
        optimizers = {}
        for name in names:
            log(f"warm-up: {name}")
            opt = make_optimizer(name, net, fused=None if triton else False)
            for _ in range(warmup):
                opt.step()
            optimizers[name] = opt
        dst.copy_(src)
        log(f"timing {len(names)} optimizers x {steps} rounds")
        for k in range(steps):
            order = names[k % len(names) :] + names[: k % len(names)]
            for name in order:
                times[name].append(timer(optimizers[name].step))
            copy_times.append(timer(lambda: dst.copy_(src)))
    copy_gbps = 2 * src.numel() * src.element_size() / min(copy_times) / 1e6
    base = statistics.median(times[BASELINE])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        moved = step_bytes(optimizers[name])
        floor = moved / copy_gbps / 1e6
        if name == BASELINE:
            kernels = "torch"
        elif not triton:
            kernels = "multi-tensor"
        else:
            kernels = ", ".join(sorted({status.get(r, "multi-tensor") for r in _rules_of(name)}))
        rows.append(
            CudaRow(
                preset=name,
                step_ms_median=median,
                step_ms_min=min(times[name]),
                bytes_moved=moved,
                gbps=moved / median / 1e6,
                copy_share=moved / median / 1e6 / copy_gbps,
                floor_ms=floor,
                x_floor=median / floor,
                x_fused_adamw=median / base,
                target_x_fused=TARGET_X_FUSED.get(name),
                kernels=kernels,
            )
        )
    conditions = {
        "model": model,
        "device": torch.cuda.get_device_name(dev),
        "dtype": dtype,
        "steps": steps,
        "warmup": warmup,
        "param_bytes": param_bytes,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "kernels": dict(status) if triton else "multi-tensor",
    }
    return CudaProfile(rows=rows, copy_gbps=copy_gbps, conditions=conditions)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def training_rate(
    model: str,
    presets: Sequence[str],
    *,
    device: str = "cuda",
    dtype: str = "bf16",
    batch: int = 4,
    seq_len: int = 512,
    steps: int = 5,
    warmup: int = 2,
    triton: bool = True,
    vocab_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Tokens per second of whole training steps (forward, backward, ``step``, ``zero_grad``)
    on random tokens, per preset and for torch's fused AdamW (``torch-adamw-fused``); each
    optimizer starts from the same weights. Runs on the CPU too (for tests, with a tiny model).
    """
    from slimopt.presets import check_preset
    from slimopt.train.models import build_model

    for preset in presets:
        check_preset(preset)
    dev = check_device(device)
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = build_model(model, vocab_size, device=dev).to(torch_dtype)
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    vocab = net.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(dev)
    timer = _Timer(dev)
    rates = {}
    tier = triton_tier(dev) if triton and dev.type == "cuda" else contextlib.nullcontext({})
    with tier:
        for name in [BASELINE] + [p for p in presets if p != BASELINE]:
            net.load_state_dict(initial)
            opt = (
                make_optimizer(name, net, fused=None if triton else False)
                if name != BASELINE
                else _fused_adamw(net, dev)
            )

            def one_step(opt: torch.optim.Optimizer = opt) -> None:
                loss = net(input_ids=tokens, labels=tokens).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(warmup):
                one_step()
            ms = statistics.median(timer(one_step) for _ in range(steps))
            rates[name] = batch * seq_len / (ms / 1e3)
            del opt
    return rates


def _fused_adamw(net: torch.nn.Module, dev: torch.device) -> torch.optim.Optimizer:
    # torch's fused AdamW where the device has it, its multi-tensor one otherwise
    return torch.optim.AdamW(
        net.parameters(), lr=1e-4, weight_decay=0.0, fused=dev.type == "cuda" or None
    )


# --------------------------------------------------------------------------- output
def format_cuda_table(result: CudaProfile) -> str:
    """The table ``slimopt profile --device cuda`` prints."""
    c = result.conditions
    kernels = c.get("kernels")
    if isinstance(kernels, dict):
        kernels = ", ".join(f"{k} {v}" for k, v in kernels.items()) or "none"
    lines = [
        f"model {c.get('model')} ({c.get('param_bytes', 0) / 1e6:.1f} MB of parameters), "
        f"{c.get('dtype')}, {c.get('device')}, torch {c.get('torch')}, triton {c.get('triton')}",
        f"kernels: {kernels}; {c.get('steps')} rounds after {c.get('warmup')} warm-up steps",
        f"copy bandwidth {result.copy_gbps:.0f} GB/s (read + write, best round); "
        "floor = bytes moved at that bandwidth",
        "",
        f"{'preset':<18} {'median ms':>9} {'moved MB':>9} {'GB/s':>7} {'% copy':>7} "
        f"{'floor ms':>8} {'x floor':>7} {'x fused':>7} {'target':>7}  kernels",
    ]
    lines.append("-" * len(lines[-1]))
    for r in result.rows:
        target = "" if r.target_x_fused is None else f"<={r.target_x_fused:.2f}"
        lines.append(
            f"{r.preset:<18} {r.step_ms_median:>9.3f} {r.bytes_moved / 1e6:>9.1f} "
            f"{r.gbps:>7.0f} {100 * r.copy_share:>6.1f}% {r.floor_ms:>8.3f} {r.x_floor:>7.2f} "
            f"{r.x_fused_adamw:>7.2f} {target:>7}  {r.kernels}"
        )
    lines.append(
        f"x fused: median step time over torch-adamw-fused's in this run; targets: x floor <= "
        f"{TARGET_X_FLOOR} for every preset, x fused as in the target column"
    )
    return "\n".join(lines)


def run_cuda(args: argparse.Namespace) -> int:
    """``slimopt profile --device cuda ...`` (the options of ``slimopt profile``; ``--fused``
    selects the Triton kernels, ``--no-fused`` the multi-tensor path). Errors print and return 2."""
    from slimopt.presets import PRESETS
    from slimopt.train.models import ModelConfigError

    presets = [p.strip() for p in (args.presets or "").split(",") if p.strip()] or list(PRESETS)
    model = args.model or args.model_config or "llama-60m"
    t0 = time.perf_counter()
    try:
        result = profile_cuda(
            model,
            presets,
            device=args.device,
            dtype=args.dtype,
            steps=args.steps,
            warmup=args.warmup,
            triton=args.fused,
            vocab_size=args.vocab_size,
            seed=args.seed,
            log=lambda msg: print(f"[profile] {msg}", file=sys.stderr, flush=True),
        )
    except (ValueError, ModelConfigError) as exc:
        print(f"slimopt profile: error: {exc}", file=sys.stderr)
        return 2
    result.conditions["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps([asdict(r) for r in result.rows], indent=2))
    else:
        print(format_cuda_table(result))
    return 0


__all__ = [
    "TARGET_X_FLOOR",
    "TARGET_X_FUSED",
    "CudaProfile",
    "CudaRow",
    "format_cuda_table",
    "profile_cuda",
    "run_cuda",
    "training_rate",
    "triton_tier",
]
