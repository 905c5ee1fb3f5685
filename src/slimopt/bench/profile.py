"""``slimopt profile``: the time of ``optimizer.step()`` per preset, against torch's AdamW and
against the memory-bandwidth floor, measured side by side in one run.

What is timed is the step alone: the model is built once (weights drawn like an initialisation),
its gradients are filled once with random values of a realistic scale, and every optimizer steps
on the same parameters. The presets run as a user gets them (``create_optimizer(preset, model)``:
each rule's fastest tier); ``--no-fused`` times their multi-tensor path instead. After a warm-up
(which also builds the native kernels on first use), the rows take
turns, one step each per round, in a rotating order, so that a noisy machine slows them alike; the
median, min and max over the rounds are reported. On a GPU the step is timed with CUDA events.

Two rows come from ``torch.optim.AdamW`` itself: ``torch-adamw-fused`` (one vectorized pass; the
baseline, since it is the fastest AdamW a user can pick) and ``torch-adamw-foreach``.

**The floor.** ``bytes_moved`` is the fewest bytes a step must move if each tensor is read or
written once: every parameter read and written, its gradient read, every state tensor read and
written (:func:`step_bytes`, computed from the optimizer's real state). ``floor_ms`` is that at the
best streaming bandwidth measured in the same run: the best of a large copy, a large add, and
fused AdamW's own bytes over its fastest step (a single copy underestimates what a CPU
sustains). A row's ``step_ms_median / floor_ms`` says how far it is from memory-bound.

::

    slimopt profile --model llama-60m --presets sgd-sai,lion,scale,sage-hybrid --steps 20
    slimopt profile --model llama-20m --presets adamw --device cuda --dtype bf16 --json

Library use:

>>> from slimopt.bench.profile import profile_model
>>> result = profile_model("llama-tiny", ["sgd-sai"], steps=3, warmup=1, fused=None,
...                        vocab_size=512)
>>> [row.preset for row in result.rows]
['torch-adamw-fused', 'torch-adamw-foreach', 'sgd-sai']
>>> round(result.row("sgd-sai").bytes_moved / result.conditions["param_bytes"], 2)  # p 2x, g, m 2x
5.0
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from slimopt.bench.memory_cli import DTYPES, add_model_and_presets

TORCH_ROWS: tuple[str, ...] = ("torch-adamw-fused", "torch-adamw-foreach")
BASELINE = "torch-adamw-fused"


@dataclass(frozen=True)
class ProfileRow:
    """One optimizer's step time and floor (the keys of ``slimopt profile --json``)."""

    preset: str
    step_ms_median: float
    step_ms_min: float
    step_ms_max: float
    state_bytes: int
    bytes_moved: int
    floor_ms: float


@dataclass
class ProfileResult:
    """The rows of one run and the conditions they were measured under."""

    rows: list[ProfileRow]
    bandwidth_gbps: dict[str, float]
    conditions: dict[str, Any] = field(default_factory=dict)

    def row(self, preset: str) -> ProfileRow:
        return next(r for r in self.rows if r.preset == preset)

    def ratio(self, preset: str, baseline: str = BASELINE) -> float:
        """Median step time of ``preset`` over that of ``baseline``, from this run."""
        return self.row(preset).step_ms_median / self.row(baseline).step_ms_median


# --------------------------------------------------------------------------- bytes
def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def step_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The fewest bytes one step of ``optimizer`` must move: each parameter that has a gradient
    read and written, its gradient read, each of its state tensors read and written.

    Example:
        >>> import torch
        >>> w = torch.zeros(1000, requires_grad=True); w.grad = torch.ones(1000)
        >>> opt = torch.optim.AdamW([w], fused=True); opt.step()
        >>> step_bytes(opt)  # p (2x), g, exp_avg (2x), exp_avg_sq (2x), and the step count (2x)
        28008
    """
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            total += 2 * _nbytes(p) + _nbytes(p.grad)
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor):
                    total += 2 * _nbytes(value)
    return total


# --------------------------------------------------------------------------- set-up
def check_device(device: str) -> torch.device:
    """``cpu`` or ``cuda[:k]``; a clear error when CUDA is asked for and absent."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available here")
    return dev


def build_profile_model(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """The named model on ``device`` with weights and gradients drawn once.

    Built on the meta device and materialised with ``to_empty`` (a full initialisation of a large
    model costs more than the whole benchmark); matrices ~ N(0, 0.02), vectors 1, gradients
    ~ N(0, 1e-3): the scales of a model early in training. Dense gradients for the embedding too,
    the costliest case for every rule.
    """
    from slimopt.train.models import build_model

    meta = build_model(model, vocab_size, device="meta")
    real = meta.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in {id(p): p for p in real.parameters()}.values():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
            p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
    return real


def make_optimizer(name: str, model: nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    """A preset's optimizer (``fused`` as :func:`slimopt.create_optimizer` takes it), or
    ``torch-adamw-fused`` / ``torch-adamw-foreach``."""
    if name == "torch-adamw-fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    if name == "torch-adamw-foreach":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, foreach=True)
    from slimopt import create_optimizer

    return create_optimizer(name, model, fused=fused)


# --------------------------------------------------------------------------- timing
class _Timer:
    """Wall time of a callable; CUDA events (and a synchronize) on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _streams(nbytes: int, device: torch.device, dtype: torch.dtype) -> dict[str, tuple]:
    """Streaming operations for the bandwidth calibration: name -> (callable, bytes it moves)."""
    n = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
    x = torch.rand(n, dtype=dtype, device=device)
    y = torch.rand(n, dtype=dtype, device=device)
    z = torch.empty(n, dtype=dtype, device=device)
    size = n * x.element_size()
    return {
        "copy": (lambda: z.copy_(x), 2 * size),
        "add": (lambda: torch.add(x, y, out=z), 3 * size),
    }


def profile_model(
    model: str,
    presets: Sequence[str],
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    steps: int = 20,
    warmup: int = 3,
    fused: bool | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda msg: None,
) -> ProfileResult:
    """Time ``optimizer.step()`` for each preset and torch's two AdamWs, side by side.

    Args:
        model: a named model (``slimopt.train.models``) or a transformers config .json.
        presets: slimopt presets (the two torch AdamW rows are always added).
        device, dtype: where and in which dtype the model lives (``fp32``, ``bf16``, ``fp16``).
        steps: timed rounds; every row steps once per round.
        warmup: untimed steps per row first (the native kernels are built here on first use).
        fused: as :func:`slimopt.create_optimizer` takes it: None (default) the fastest tier of
            each rule, False the multi-tensor path.
    """
    from slimopt.presets import check_preset

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    for preset in presets:
        check_preset(preset)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    dev = check_device(device)
    torch_dtype = DTYPES[dtype]
    net = build_profile_model(model, dev, torch_dtype, vocab_size=vocab_size, seed=seed)
    param_bytes = sum(_nbytes(p) for p in {id(p): p for p in net.parameters()}.values())

    names = list(TORCH_ROWS) + [p for p in presets if p not in TORCH_ROWS]
    timer = _Timer(dev)
    times: dict[str, list[float]] = {name: [] for name in names}
    streams = _streams(min(max(param_bytes, 64 * 2**20), 2**30), dev, torch_dtype)
    stream_times: dict[str, list[float]] = {name: [] for name in streams}
    loads = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    with _quiet_gc():
        optimizers = {}
        for name in names:
            log(f"warm-up: {name}")
            opt = make_optimizer(name, net, fused=fused)
            for _ in range(warmup):
                opt.step()
            optimizers[name] = opt
        for fn, _ in streams.values():
            fn()
        log(f"timing {len(names)} optimizers x {steps} rounds")
        for k in range(steps):
            order = names[k % len(names) :] + names[: k % len(names)]
            for name in order:
                times[name].append(timer(optimizers[name].step))
            for sname, (fn, _) in streams.items():
                stream_times[sname].append(timer(fn))
    if hasattr(os, "getloadavg"):
        loads.append(os.getloadavg()[0])

    moved = {name: step_bytes(opt) for name, opt in optimizers.items()}
    bandwidth = {s: streams[s][1] / min(t) / 1e6 for s, t in stream_times.items()}  # GB/s
    bandwidth["fused-adamw"] = moved[BASELINE] / min(times[BASELINE]) / 1e6
    best = max(bandwidth.values())
    from slimopt import state_bytes

    rows = [
        ProfileRow(
            preset=name,
            step_ms_median=statistics.median(times[name]),
            step_ms_min=min(times[name]),
            step_ms_max=max(times[name]),
            state_bytes=state_bytes(optimizers[name]),
            bytes_moved=moved[name],
            floor_ms=moved[name] / best / 1e6,
        )
        for name in names
    ]
    conditions = {
        "model": model,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "dtype": dtype,
        "steps": steps,
        "warmup": warmup,
        "fused": fused is not False,
        "native": _native_state(fused, dev),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average": loads,
        "param_bytes": param_bytes,
    }
    return ProfileResult(rows=rows, bandwidth_gbps=bandwidth, conditions=conditions)


def _native_state(fused: bool | None, dev: torch.device) -> str:
    """Whether the native CPU kernels (the rules' fused CPU tier) ran, or why not."""
    if fused is False or dev.type != "cpu":
        return "off"
    from slimopt.kernels import cpu

    if cpu.library() is None:
        return f"unavailable ({cpu.unavailable_reason()})"
    return "on"


# --------------------------------------------------------------------------- output
def format_table(result: ProfileResult) -> str:
    """The table ``slimopt profile`` prints; ratios are to ``torch-adamw-fused`` in this run."""
    c = result.conditions
    bw = ", ".join(f"{k} {v:.1f}" for k, v in result.bandwidth_gbps.items())
    fused_note = "default (fastest tier)" if c.get("fused") else "off (multi-tensor path)"
    if c.get("fused"):
        fused_note += f" (native CPU loops: {c.get('native', 'off')})"
    lines = [
        f"model {c['model']} ({c['param_bytes'] / 1e6:.1f} MB of parameters), {c['dtype']}, "
        f"{c['device']}, {c['threads']} threads, torch {c['torch']}",
        f"slimopt fused kernels: {fused_note}; {c['steps']} rounds after {c['warmup']} warm-up "
        f"steps; load average {' -> '.join(f'{x:.2f}' for x in c['load_average'])}",
        f"streaming bandwidth (GB/s): {bw}; floor = bytes moved / the best of these",
        "",
        f"{'preset':<20} {'median ms':>9} {'min ms':>8} {'max ms':>8} {'x fused':>8} "
        f"{'state MB':>9} {'moved MB':>9} {'floor ms':>8} {'x floor':>7}",
    ]
    lines.append("-" * len(lines[-1]))
    base = result.row(BASELINE).step_ms_median
    for r in result.rows:
        lines.append(
            f"{r.preset:<20} {r.step_ms_median:>9.2f} {r.step_ms_min:>8.2f} "
            f"{r.step_ms_max:>8.2f} {r.step_ms_median / base:>8.2f} {r.state_bytes / 1e6:>9.1f} "
            f"{r.bytes_moved / 1e6:>9.1f} {r.floor_ms:>8.2f} {r.step_ms_median / r.floor_ms:>7.2f}"
        )
    lines.append(
        "x fused: median step time over torch-adamw-fused's; x floor: median over floor_ms"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``slimopt profile``."""
    add_model_and_presets(parser, "a named model (default llama-60m)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: each rule's fastest tier, as create_optimizer gives it; --no-fused times "
        "the multi-tensor path; --fused insists on the fused kernels",
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Run ``slimopt profile``; bad input prints an error and returns 2."""
    from slimopt.presets import PRESETS
    from slimopt.train.models import ModelConfigError

    # --- CUDA: the Triton kernels, GB/s and the share of the copy bandwidth (profile_cuda.py)
    if str(args.device).startswith("cuda"):
        from slimopt.bench.profile_cuda import run_cuda

        return run_cuda(args)
    # --- end CUDA
    presets = [p.strip() for p in (args.presets or "").split(",") if p.strip()] or list(PRESETS)
    model = args.model or args.model_config or "llama-60m"
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        result = profile_model(
            model,
            presets,
            device=args.device,
            dtype=args.dtype,
            steps=args.steps,
            warmup=args.warmup,
            fused=args.fused,
            vocab_size=args.vocab_size,
            seed=args.seed,
            log=lambda msg: print(f"[profile] {msg}", file=sys.stderr, flush=True),
        )
    except (ValueError, ModelConfigError) as exc:
        print(f"slimopt profile: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in result.rows], indent=2))
    else:
        print(format_table(result))
    return 0


__all__ = [
    "BASELINE",
    "TORCH_ROWS",
    "ProfileResult",
    "ProfileRow",
    "add_arguments",
    "build_profile_model",
    "check_device",
    "format_table",
    "make_optimizer",
    "profile_model",
    "run",
    "step_bytes",
]
