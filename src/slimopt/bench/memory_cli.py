"""``slimopt memory``: parameter, gradient and optimizer-state bytes of a model, per preset.

The model is built on the ``meta`` device, so nothing is allocated and a 7B model is sized in
milliseconds on a laptop. The optimizer-state bytes are not a formula: each preset's real
optimizer (:func:`slimopt.create_optimizer`) allocates its state on the meta parameters with
:meth:`slimopt.SlimOptimizer.init_state` (the same ``init_state`` its first step calls) and
:func:`slimopt.state_bytes` counts it. Gradients are one tensor per trainable parameter, in the
parameter's dtype. Decimal units throughout: 1 GB = 10**9 bytes (``GiB`` = 2**30 where named).

::

    slimopt memory --model llama-1b --preset adamw,scale --dtype bf16
    slimopt memory --model gpt2-xl --json
    slimopt memory --budget 24GB                     # per preset and mode, the largest LLaMA that fits
    slimopt memory --model llama-7b --budget 24GB    # does it fit, per preset, and in which mode

Library use:

>>> from slimopt.bench.memory_cli import model_memory
>>> rows = model_memory("llama-60m", ["adamw", "scale"], dtype="bf16")
>>> [(r.preset, round((r.param_bytes + r.state_bytes) / 1e9, 2)) for r in rows]
[('adamw', 0.35), ('scale', 0.15)]
>>> parse_bytes("24GB"), parse_bytes("1.5GiB")
(24000000000, 1610612736)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from slimopt.train.models import DTYPES, build_meta_model, check_dtype

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclass(frozen=True)
class MemoryRow:
    """The memory of one model under one preset (the keys of ``slimopt memory --json``)."""

    model: str
    preset: str
    dtype: str
    param_count: int
    param_bytes: int
    grad_bytes: int
    state_bytes: int

    @property
    def total_bytes(self) -> int:
        """Weights + gradients + optimizer state."""
        return self.param_bytes + self.grad_bytes + self.state_bytes

    def as_dict(self) -> dict[str, Any]:
        """The fields and ``total_bytes`` (one record of ``slimopt memory --json``)."""
        return {**asdict(self), "total_bytes": self.total_bytes}


def parse_bytes(text: str, *, require_unit: bool = False) -> int:
    """``"24GB"`` -> 24 * 10**9; ``"1.5GiB"`` -> 1.5 * 2**30; a plain number is bytes, unless
    ``require_unit`` (as for ``slimopt memory --budget``, where ``24`` is more likely a slip than
    24 bytes).

    Decimal units (kB, MB, GB, TB, or k/M/G/T) are powers of 1000, binary ones (KiB ... TiB) of 1024.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if require_unit and match is not None and unit == "":
        raise ValueError(
            f"the budget {text!r} has no unit: write e.g. {text.strip()}GB (decimal) or "
            f"{text.strip()}GiB (binary)"
        )
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot parse the byte count {text!r}: write a number with an optional unit, "
            "e.g. 24GB, 500MB, 1.5GiB or 8e9"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"the byte count {text!r} must be positive")
    return int(round(value))


_check_dtype = check_dtype


def _distinct(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return list({id(p): p for p in params}.values())


def preset_memory(model: nn.Module, preset: str, *, name: str = "", dtype: str = "") -> MemoryRow:
    """The memory of ``model`` (on any device, meta included) under ``preset``.

    ``state_bytes`` is what the preset's optimizer allocates: the optimizer is built, its state
    allocated by :meth:`~slimopt.SlimOptimizer.init_state` and counted by
    :func:`slimopt.state_bytes`.
    """
    from slimopt import create_optimizer, state_bytes

    params = _distinct(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt = create_optimizer(preset, model)
    opt.init_state()
    return MemoryRow(
        model=name,
        preset=preset,
        dtype=dtype,
        param_count=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        grad_bytes=sum(p.numel() * p.element_size() for p in trainable),
        state_bytes=state_bytes(opt),
    )


def _presets(presets: Sequence[str] | None) -> list[str]:
    from slimopt.presets import PRESETS, check_preset

    return [check_preset(preset) for preset in presets] if presets else list(PRESETS)


def model_memory(
    model: str,
    presets: Sequence[str] | None = None,
    *,
    dtype: str = "fp32",
    vocab_size: int | None = None,
) -> list[MemoryRow]:
    """One :class:`MemoryRow` per preset (all presets when ``presets`` is None) for a named model
    or a transformers config .json, built on the meta device."""
    chosen = _presets(presets)
    meta = build_meta_model(model, dtype, vocab_size)
    return [preset_memory(meta, preset, name=model, dtype=dtype) for preset in chosen]


def fit_budget(
    budget_bytes: int,
    presets: Sequence[str] | None = None,
    *,
    dtype: str = "fp32",
    models: Sequence[str] | None = None,
) -> dict[str, MemoryRow | None]:
    """For each preset, the largest named model (by parameter count) whose weights + gradients +
    optimizer state fit in ``budget_bytes``; None where none does.

    >>> fits = fit_budget(parse_bytes("32GB"), ["adamw", "sage-hybrid"], dtype="bf16")
    >>> {preset: row.model for preset, row in fits.items()}
    {'adamw': 'gpt2-xl', 'sage-hybrid': 'llama-7b'}
    """
    from slimopt.train.models import MODEL_NAMES

    chosen = _presets(presets)
    names = list(models) if models is not None else list(MODEL_NAMES)
    best: dict[str, MemoryRow | None] = dict.fromkeys(chosen)
    for name in names:
        meta = build_meta_model(name, dtype)
        for preset in chosen:
            row = preset_memory(meta, preset, name=name, dtype=dtype)
            current = best[preset]
            if row.total_bytes <= budget_bytes and (
                current is None or row.param_count > current.param_count
            ):
                best[preset] = row
    return best


# --------------------------------------------------------------------------- output
def _gb(n: int) -> str:
    return f"{n / 1e9:.3f}"


def format_table(rows: Sequence[MemoryRow]) -> str:
    """The table ``slimopt memory`` prints (bytes, then decimal GB)."""
    head = (
        f"{'preset':<14} {'params':>14} {'param bytes':>15} {'grad bytes':>15} "
        f"{'state bytes':>15} {'total bytes':>15} | {'param GB':>8} {'grad GB':>8} "
        f"{'state GB':>8} {'total GB':>8} {'wt+state GB':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.preset:<14} {r.param_count:>14,} {r.param_bytes:>15,} {r.grad_bytes:>15,} "
            f"{r.state_bytes:>15,} {r.total_bytes:>15,} | {_gb(r.param_bytes):>8} "
            f"{_gb(r.grad_bytes):>8} {_gb(r.state_bytes):>8} {_gb(r.total_bytes):>8} "
            f"{_gb(r.param_bytes + r.state_bytes):>11}"
        )
    return "\n".join(lines)


def format_budget(budget_bytes: int, fits: dict[str, MemoryRow | None], dtype: str) -> str:
    """The answer of ``slimopt memory --budget``."""
    lines = [
        f"largest named model whose weights + gradients + optimizer state fit in "
        f"{budget_bytes / 1e9:.2f} GB ({dtype})",
        f"{'preset':<14} {'model':<12} {'params':>14} {'total GB':>9}",
    ]
    for preset, row in fits.items():
        if row is None:
            lines.append(f"{preset:<14} {'(none fits)':<12}")
        else:
            lines.append(
                f"{preset:<14} {row.model:<12} {row.param_count:>14,} {_gb(row.total_bytes):>9}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def add_model_and_presets(parser: argparse.ArgumentParser, model_help: str) -> None:
    """``--model NAME`` or ``--model-config JSON``, and ``--presets P[,P...]`` (also ``--preset``):
    the options ``slimopt memory`` and ``slimopt profile`` share."""
    from slimopt.train.models import MODEL_NAMES

    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help=f"{model_help}: {', '.join(MODEL_NAMES)}")
    which.add_argument(
        "--model-config", metavar="JSON", help="a transformers config.json (llama or gpt2)"
    )
    parser.add_argument(
        "--presets",
        "--preset",
        dest="presets",
        metavar="P[,P...]",
        help="comma-separated presets (default: all)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``slimopt memory``."""
    from slimopt.planner import PRECISIONS

    add_model_and_presets(parser, "a named model")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary")
    parser.add_argument(
        "--budget",
        metavar="BYTES",
        help="e.g. 24GB. With --model: does that model's training step fit, per preset, and in "
        "which mode. Without: per preset and mode, the largest LLaMA-family model that fits "
        "(the planner's peak: weights, gradients, state, activations)",
    )
    plan_opts = parser.add_argument_group("planner (the peak of a training step)")
    plan_opts.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="plan a training step: fp32, bf16-mixed (fp32 weights, bf16 autocast) or pure bf16",
    )
    plan_opts.add_argument(
        "--step-in-backward", action="store_true", help="updates applied during backward"
    )
    plan_opts.add_argument(
        "--grad-checkpointing", action="store_true", help="activation checkpointing"
    )
    plan_opts.add_argument(
        "--dist",
        choices=("none", "ddp", "fsdp2"),
        default="none",
        help="data parallelism: plan one rank's peak under DDP or FSDP2 (with --world-size)",
    )
    plan_opts.add_argument(
        "--world-size", type=int, default=1, help="ranks (default 1); batch is per rank"
    )
    plan_opts.add_argument(
        "--weights",
        choices=("auto", "int8"),
        default="auto",
        help="int8: the linear layers' weights as int8 codes (slimopt.quant; with --model, "
        "--precision bf16 --step-in-backward)",
    )
    plan_opts.add_argument("--batch-size", type=int, default=None, help="sequences (default 1)")
    plan_opts.add_argument("--seq-len", type=int, default=None, help="tokens each (default 256)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _split(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def _planning(args: argparse.Namespace) -> bool:
    return (
        args.precision is not None
        or args.step_in_backward
        or args.grad_checkpointing
        or args.batch_size is not None
        or args.seq_len is not None
        or args.dist != "none"
    )


def _plan_modes(args: argparse.Namespace) -> list[tuple[str, bool, bool]]:
    """The modes a ``--budget`` search tries: the one the flags name, or all of the planner's
    (with ``--weights int8``, those that allow int8 weights; flags naming another are an error)."""
    from slimopt.planner import INT8_MODE_ERROR, MODES, int8_mode

    if args.precision is None and not args.step_in_backward and not args.grad_checkpointing:
        modes = list(MODES)
    else:
        modes = [(args.precision or "bf16", args.step_in_backward, args.grad_checkpointing)]
    if getattr(args, "weights", "auto") == "int8":
        modes = [m for m in modes if int8_mode(m[0], m[1], args.dist, args.world_size)]
        if not modes:
            raise ValueError(f"--weights int8: {INT8_MODE_ERROR} (--precision bf16 "
                             "--step-in-backward, no --dist)")  # fmt: skip
    return modes


def _int8_note(text: str, args: argparse.Namespace) -> str:
    """``text`` with a line after its title saying the plans hold int8 linear weights."""
    if getattr(args, "weights", "auto") != "int8":
        return text
    title, _, rest = text.partition("\n")
    note = "weights: the linear layers as int8 codes, one fp32 scale per 256 (--weights int8)"
    return f"{title}\n{note}\n{rest}"


def _llama_models() -> list[str]:
    from slimopt.train.models import MODEL_NAMES

    return [m for m in MODEL_NAMES if m.startswith("llama")]


def format_plans(plans: Sequence, title: str) -> str:
    """The table of planned peaks (decimal GB)."""
    from slimopt.planner import gb

    head = (
        f"{'preset':<14} {'mode':<42} {'weights':>8} {'grads':>7} {'state':>7} {'autocast':>8} "
        f"{'activ.':>7} {'opt work':>8} {'peak GB':>8}"
    )
    lines = [title, head, "-" * len(head)]
    for p in plans:
        lines.append(
            f"{p.preset:<14} {p.mode:<42} {gb(p.weight_bytes):>8} {gb(p.grad_bytes):>7} "
            f"{gb(p.state_bytes):>7} {gb(p.autocast_bytes):>8} {gb(p.activation_bytes):>7} "
            f"{gb(p.optimizer_work_bytes):>8} {gb(p.total_bytes):>8}"
        )
    return "\n".join(lines)


def format_budget_plans(budget: int, table: dict, modes: Sequence[tuple[str, bool, bool]]) -> str:
    """The answer of ``slimopt memory --budget``: per preset and mode the largest model, then the
    largest overall and the leanest mode that reaches it."""
    from slimopt.planner import Plan, gb

    def label(mode: tuple[str, bool, bool]) -> str:
        precision, sib, ckpt = mode
        return precision + (" +sib" if sib else "") + (" +ckpt" if ckpt else "")

    width = max(13, *(len(label(m)) for m in modes))
    lines = [
        f"largest LLaMA-family model whose training step fits in {budget / 1e9:.2f} GB "
        "(planner's peak: weights, gradients, state, activations, optimizer work)",
        "modes: +sib = --step-in-backward, +ckpt = --grad-checkpointing",
        f"{'preset':<14} " + " ".join(f"{label(m):<{width}}" for m in modes) + "  largest, with",
    ]
    for preset, per_mode in table.items():
        cells = []
        best: Plan | None = None
        for m in modes:
            p = per_mode[m]
            cells.append(f"{'-' if p is None else p.model:<{width}}")
            if p is not None and (best is None or p.param_count > best.param_count):
                best = p
        tail = (
            "(none fits)"
            if best is None
            else f"{best.model} ({best.mode}, {gb(best.total_bytes)} GB)"
        )
        lines.append(f"{preset:<14} " + " ".join(cells) + "  " + tail)
    return "\n".join(lines)


def fit_query(
    budget: int,
    model: str,
    presets: Sequence[str],
    modes: Sequence[tuple[str, bool, bool]],
    *,
    batch_size: int = 1,
    seq_len: int = 256,
    vocab_size: int | None = None,
    weights: str = "auto",
) -> dict:
    """preset -> mode -> the :class:`~slimopt.planner.Plan` of one training step of ``model``:
    the answer to "does this model fit in ``budget`` bytes, and in which mode?" (``weights="int8"``:
    with int8 linear weights, in the modes that allow them).

    >>> plans = fit_query(24 * 10**9, "llama-7b", ["adamw", "scale"], [("bf16", True, True)])
    >>> {preset: per_mode[("bf16", True, True)].total_bytes <= 24e9
    ...  for preset, per_mode in plans.items()}
    {'adamw': False, 'scale': True}
    """
    from slimopt.planner import _weights_dtype, check_weights, int8_mode, plan_model

    check_weights(weights)
    metas: dict[Any, nn.Module] = {}
    table: dict = {preset: {} for preset in presets}
    for precision, sib, ckpt in modes:
        if weights == "int8" and not int8_mode(precision, sib):
            continue
        dtype = _weights_dtype(precision)
        if dtype not in metas:
            metas[dtype] = build_meta_model(model, dtype, vocab_size)
            if weights == "int8":
                from slimopt.quant import quantize_weights

                quantize_weights(metas[dtype])
        for preset in presets:
            table[preset][(precision, sib, ckpt)] = plan_model(
                metas[dtype],
                preset,
                name=model,
                precision=precision,
                step_in_backward=sib,
                grad_checkpointing=ckpt,
                batch_size=batch_size,
                seq_len=seq_len,
            )
    return table


def _mode_label(mode: tuple[str, bool, bool]) -> str:
    precision, sib, ckpt = mode
    return precision + (" +sib" if sib else "") + (" +ckpt" if ckpt else "")


def format_fit_query(budget: int, model: str, table: dict, modes: Sequence) -> str:
    """The answer of ``slimopt memory --model M --budget B``: per preset, whether one training
    step fits, the leanest mode that gets there (the first of ``modes``), and every mode's peak."""
    from slimopt.planner import gb

    width = max(9, *(len(_mode_label(m)) for m in modes))
    first = next(iter(next(iter(table.values())).values()))
    lines = [
        f"does {model} ({first.param_count:,} parameters) fit in {budget / 1e9:.2f} GB? The "
        f"planner's peak of one training step, batch {first.batch_size} x {first.seq_len} tokens, "
        "in GB = 10^9 bytes",
        "modes: +sib = --step-in-backward, +ckpt = --grad-checkpointing; * = fits",
        f"{'preset':<14} {'fits':<5} {'leanest mode that fits':<28} "
        + " ".join(f"{_mode_label(m):>{width}}" for m in modes),
    ]
    for preset, per_mode in table.items():
        fitting = [m for m in modes if per_mode[m].total_bytes <= budget]
        answer = "yes" if fitting else "no"
        how = _mode_label(fitting[0]) if fitting else "none (see the peaks)"
        cells = " ".join(
            f"{gb(per_mode[m].total_bytes) + ('*' if m in fitting else ' '):>{width}}"
            for m in modes
        )
        lines.append(f"{preset:<14} {answer:<5} {how:<28} {cells}")
    return "\n".join(lines)


def budget_table(
    budget: int,
    presets: Sequence[str],
    models: Sequence[str],
    modes: Sequence[tuple[str, bool, bool]],
    *,
    batch_size: int = 1,
    seq_len: int = 256,
    dist: str = "none",
    world_size: int = 1,
    weights: str = "auto",
) -> dict:
    """preset -> mode -> the :class:`~slimopt.planner.Plan` of the largest model that fits (or
    None); with ``dist`` and ``world_size``, on each rank; ``weights="int8"``: int8 linear
    weights, in the modes that allow them."""
    from slimopt.planner import largest_fit

    table: dict = {preset: {} for preset in presets}
    metas: dict = {}
    for mode in modes:
        fits = largest_fit(
            budget,
            presets,
            models,
            modes=[mode],
            batch_size=batch_size,
            seq_len=seq_len,
            meta_models=metas,
            dist=dist,
            world_size=world_size,
            weights=weights,
        )
        for preset, p in fits.items():
            table[preset][mode] = p
    return table


def _smallest_plan(
    models: Sequence[str], preset: str, mode: tuple, batch: int, seq: int, weights: str = "auto"
):
    """The plan of the smallest of ``models`` in ``mode`` (for a search where none fits)."""
    from slimopt.planner import plan
    from slimopt.train.models import MODEL_NAMES

    # the named models come smallest first; a --model-config file may be smaller still
    names = [models[0], *(m for m in models[1:] if m not in MODEL_NAMES)]
    plans = [
        plan(name, preset, precision=mode[0], step_in_backward=mode[1],
             grad_checkpointing=mode[2], batch_size=batch, seq_len=seq, weights=weights)
        for name in names
    ]  # fmt: skip
    return min(plans, key=lambda p: p.param_count)


def run(args: argparse.Namespace) -> int:
    """Run ``slimopt memory``; a bad model, preset or budget prints an error and returns 2."""
    from slimopt.planner import plan
    from slimopt.train.models import ModelConfigError

    batch = 1 if args.batch_size is None else args.batch_size
    seq = 256 if args.seq_len is None else args.seq_len
    try:
        presets = _presets(_split(args.presets))
        if batch < 1 or seq < 1:
            raise ValueError(f"--batch-size and --seq-len must be >= 1, got {batch} and {seq}")
        if args.world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
        if args.world_size > 1 and args.dist == "none":
            raise ValueError("--world-size needs --dist ddp or --dist fsdp2")
        dist_kw = {"dist": args.dist, "world_size": args.world_size}
        if args.budget is not None and args.model:
            budget = parse_bytes(args.budget, require_unit=True)
            modes = _plan_modes(args)
            table = fit_query(
                budget, args.model, presets, modes, batch_size=batch, seq_len=seq,
                vocab_size=args.vocab_size, weights=args.weights,
            )  # fmt: skip
            if args.json:
                out = []
                for per_mode in table.values():
                    leanest = next((m for m in modes if per_mode[m].total_bytes <= budget), None)
                    out += [
                        {**p.as_dict(), "budget_bytes": budget,
                         "fits": p.total_bytes <= budget, "leanest_fit": m == leanest}
                        for m, p in per_mode.items()
                    ]  # fmt: skip
                print(json.dumps(out, indent=2))
            else:
                print(_int8_note(format_fit_query(budget, args.model, table, modes), args))
            return 0
        if args.budget is not None:
            budget = parse_bytes(args.budget, require_unit=True)
            models = _llama_models() + ([args.model_config] if args.model_config else [])
            modes = _plan_modes(args)
            table = budget_table(
                budget, presets, models, modes, batch_size=batch, seq_len=seq, **dist_kw,
                weights=args.weights,
            )  # fmt: skip
            if args.json:
                out = []
                for preset, per_mode in table.items():
                    for m, p in per_mode.items():
                        if p is not None:
                            out.append({"budget_bytes": budget, "fits": True, **p.as_dict()})
                            continue
                        # nothing fits: the smallest candidate's peak says by how much
                        smallest = _smallest_plan(models, preset, m, batch, seq, args.weights)
                        out.append({
                            "budget_bytes": budget, "fits": False, "preset": preset,
                            "precision": m[0], "step_in_backward": m[1],
                            "grad_checkpointing": m[2], "weights": args.weights, "model": None,
                            "smallest_model": smallest.model,
                            "total_bytes": smallest.total_bytes,
                        })  # fmt: skip
                print(json.dumps(out, indent=2))
            else:
                where = (
                    "" if args.dist == "none" else f" ({args.dist}, per rank of {args.world_size})"
                )
                text = format_budget_plans(budget, table, modes)
                print(_int8_note(text.replace(" fits in ", f"{where} fits in ", 1), args))
            return 0
        model = args.model or args.model_config
        if model is None:
            raise ValueError("name a model with --model (or --model-config, or ask --budget)")
        if _planning(args):
            precision = args.precision or "fp32"
            plans = [
                plan(
                    model,
                    preset,
                    precision=precision,
                    step_in_backward=args.step_in_backward,
                    grad_checkpointing=args.grad_checkpointing,
                    batch_size=batch,
                    seq_len=seq,
                    vocab_size=args.vocab_size,
                    **dist_kw,
                    **({"weights": "int8"} if args.weights == "int8" else {}),
                )
                for preset in presets
            ]
            if args.json:
                print(json.dumps([p.as_dict() for p in plans], indent=2))
            else:
                print(
                    format_plans(
                        plans,
                        f"model {model}: {plans[0].param_count:,} parameters; predicted peak "
                        f"of one training step, batch {batch} x {seq} tokens; GB = 10^9 bytes",
                    )
                )
            return 0
        rows = model_memory(model, presets, dtype=args.dtype, vocab_size=args.vocab_size)
    except (ValueError, ModelConfigError) as exc:
        print(f"slimopt memory: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        first = rows[0]
        print(
            f"model {model}: {first.param_count:,} parameters, {args.dtype}; "
            "state allocated on the meta device by each preset's optimizer; GB = 10^9 bytes"
        )
        print(format_table(rows))
    return 0


__all__ = [
    "DTYPES",
    "MemoryRow",
    "add_arguments",
    "budget_table",
    "build_meta_model",
    "fit_budget",
    "format_budget_plans",
    "format_plans",
    "format_table",
    "model_memory",
    "parse_bytes",
    "preset_memory",
    "run",
]
