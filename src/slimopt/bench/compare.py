"""``slimopt compare``: every optimizer trained on one model, corpus, token budget, schedule and seeds.

Each preset (and each optional baseline, see :mod:`slimopt.bench.baselines`) is trained through the
training harness (:func:`slimopt.train.train`), one run per seed, with everything but the optimizer
held equal. The comparison directory (``--out``) then holds::

    compare.json            the settings; a rerun with other settings is refused, not mixed in
    results.csv             one row per preset: perplexity mean/std/min/max over seeds, state bytes
                            and their ratio to AdamW's, step time, tokens/s, wall time, learning rates
    results.md              the same as a Markdown report, with the plots and the sweep table
    ppl_vs_tokens.png       validation perplexity against training tokens, every preset
    ppl_vs_memory.png       final perplexity against optimizer-state bytes (the Pareto picture)
    sweep.png, sweep/       with --sweep: the short-budget runs that chose each learning rate
    runs/<preset>/seed-<k>/ the harness's run directories (config.json, metrics.jsonl, final.json)

Interrupting is safe: rerunning the same command resumes each unfinished run from its newest
checkpoint and reuses every finished one (its ``final.json``), so nothing finished is retrained.
A run whose loss becomes non-finite is recorded as *diverged* and the comparison goes on.
``--report-only`` writes the results and plots from the runs finished so far and trains nothing,
to look at a comparison that other processes are still running. Seeds can be added to some
presets only (``--seeds 3 --presets a,b``): later reports of the whole comparison, with fewer
``--seeds``, count every finished seed.

``--sweep lr=0.5,1,2`` tunes the learning rates first: for each preset, each of its rules (the
primary first: SAGE before SinkGD in ``sage-hybrid``) is tried at every multiplier of its default
lr, the others held at their best so far, on seed 0 at ``--sweep-tokens`` (a quarter of the budget
by default); when the best multiplier lies on the grid's edge the grid is extended in that direction
(``--sweep-extend`` more points). The lowest validation loss wins, and the full runs use it.

>>> import tempfile
>>> from slimopt.bench.compare import CompareConfig, run_compare
>>> out = tempfile.mkdtemp()
>>> result = run_compare(CompareConfig(presets=("adamw", "sgd-sai"), data="stdlib:json",
...     vocab_size=512, seq_len=32, batch_size=4, tokens=512, evals=2, eval_tokens=256,
...     out=out, cache_dir=tempfile.mkdtemp()), log=lambda *a: None)
>>> sorted(r["preset"] for r in result["rows"]), sorted(p.name for p in result["files"])
(['adamw', 'sgd-sai'], ['ppl_vs_memory.png', 'ppl_vs_tokens.png', 'results.csv', 'results.md'])
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimopt.bench import report

# The built-in comparison: the SAGE paper's table (AdamW, Lion, SAGE-Hybrid and its ablations,
# the SinkGD hybrid) plus SCALE and SGD-SaI.
DEFAULT_PRESETS: tuple[str, ...] = (
    "adamw",
    "lion",
    "sage-hybrid",
    "sage-pure",
    "lion-hybrid",
    "sinkgd-hybrid",
    "sinkgd-pure",
    "scale",
    "sgd-sai",
)
# Tokens per run of the built-in comparison: nine presets of llama-tiny on the stdlib corpus finish
# in well under 20 minutes on 2 CPU cores (6 min 16 s measured with an empty cache, see the README).
DEFAULT_TOKENS = 200_000
DEFAULT_EVALS = 5  # evaluations per run: the points of the perplexity-against-tokens curve
DEFAULT_EVAL_TOKENS = 32_768  # the same first validation tokens for every run and evaluation
DEFAULT_OUT = "runs/compare"
SETTINGS_FILE = "compare.json"
RUN_SPEC_FILE = "compare_run.json"
STATE_BYTES_FILE = "state_bytes.json"
_FORMAT = 1


class CompareError(ValueError):
    """A comparison that cannot run as asked; raised before any training starts."""


@dataclass
class CompareConfig:
    """Everything that defines a comparison; the CLI flags are these names with dashes."""

    presets: tuple[str, ...] = DEFAULT_PRESETS  # slimopt presets and/or baseline names
    model: str = "llama-tiny"
    data: str = "stdlib"
    tokens: int = DEFAULT_TOKENS  # training tokens per run
    seeds: int = 1  # seeds 0 .. seeds-1 (initialisation and data order)
    out: str = DEFAULT_OUT
    sweep: tuple[float, ...] | None = None  # lr multipliers; None = the presets' defaults
    sweep_tokens: int | None = None  # None = tokens // 4
    sweep_extend: int = 2  # extra grid points allowed when the best lies on the grid's edge
    vocab_size: int | None = None  # None = the model's default
    tokenizer: str | None = None
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float | None = None
    evals: int = DEFAULT_EVALS
    eval_tokens: int | None = DEFAULT_EVAL_TOKENS  # None = the whole validation split
    # token ranks cutting the vocabulary by training frequency: each full run's final loss per
    # bucket and the share of embedding rows touched per step (slimopt.bench.frequency)
    frequency_eval: tuple[int, ...] | None = None
    device: str = "auto"
    threads: int | None = None  # torch CPU threads; None = torch's default (one per core)
    cache_dir: str | None = None
    progress: str = "none"  # the harness's per-step output: "none" or "log"
    overwrite: bool = False  # delete a previous comparison in ``out`` first
    keep_checkpoints: bool = False  # keep the finished runs' last checkpoints
    # write the results from the runs finished so far and train nothing (e.g. while other
    # processes still run the comparison)
    report_only: bool = False
    command: str | None = None  # the command line, recorded in the report


@dataclass
class _Plan:
    """What the settings resolve to, computed before any training."""

    tokens_per_step: int
    steps: int
    sweep_tokens: int
    sweep_steps: int
    vocab_size: int
    corpus: str
    corpus_key: str
    train_tokens: int
    valid_tokens: int
    adamw_state_bytes: int = 0


# ----------------------------------------------------------------------------- parsing


_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(text: str | int) -> int:
    """A positive token count: ``250000``, ``250_000``, ``250k``, ``1.5M``.

    >>> parse_count("250k"), parse_count("1.5M"), parse_count("2_048")
    (250000, 1500000, 2048)
    """
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().lower().replace("_", "").replace(",", "")
        mult = _SUFFIX.get(s[-1:], 1)
        if s[-1:] in _SUFFIX:
            s = s[:-1]
        try:
            value_f = float(s) * mult
        except ValueError:
            raise CompareError(f"{text!r} is not a count (examples: 250000, 250k, 1.5M)") from None
        if not math.isfinite(value_f) or value_f != int(value_f):
            raise CompareError(f"{text!r} is not a whole number")
        value = int(value_f)
    if value < 1:
        raise CompareError(f"{text!r}: a count must be at least 1")
    return value


def parse_ranks(text: str) -> tuple[int, ...]:
    """Increasing token ranks for ``--frequency-eval``.

    >>> parse_ranks("1k,8k")
    (1000, 8000)
    """
    try:
        ranks = tuple(parse_count(x) for x in text.split(","))
    except CompareError as exc:
        raise CompareError(f"--frequency-eval: {exc}") from None
    if any(r < 1 for r in ranks) or list(ranks) != sorted(set(ranks)):
        raise CompareError(f"--frequency-eval ranks must increase and be >= 1, got {text!r}")
    return ranks


def parse_sweep(text: str) -> tuple[float, ...]:
    """The multiplier grid of ``--sweep lr=a,b,c`` (sorted, each > 0, no repeats).

    >>> parse_sweep("lr=2, 0.5,1")
    (0.5, 1.0, 2.0)
    >>> parse_sweep("lr=0.5,x")
    Traceback (most recent call last):
    ...
    slimopt.bench.compare.CompareError: --sweep 'lr=0.5,x': 'x' is not a number; expected lr=MULT,MULT,... (e.g. lr=0.5,1,2)
    """
    usage = "expected lr=MULT,MULT,... (e.g. lr=0.5,1,2)"
    key, sep, values = text.partition("=")
    if not sep or key.strip() != "lr":
        raise CompareError(f"--sweep {text!r}: {usage}; only the learning rate can be swept")
    grid = []
    for item in values.split(","):
        item = item.strip()
        try:
            value = float(item)
        except ValueError:
            raise CompareError(f"--sweep {text!r}: {item!r} is not a number; {usage}") from None
        if not (math.isfinite(value) and value > 0):
            raise CompareError(f"--sweep {text!r}: multiplier {item} must be a finite number > 0")
        grid.append(value)
    if len(set(grid)) != len(grid):
        raise CompareError(f"--sweep {text!r}: a multiplier is repeated")
    return tuple(sorted(grid))


def known_names() -> tuple[str, ...]:
    """Every name ``--presets`` accepts: slimopt's presets, then the baselines."""
    import slimopt
    from slimopt.bench.baselines import BASELINES

    return (*slimopt.PRESETS, *BASELINES)


def parse_presets(text: str) -> tuple[str, ...]:
    """``adamw,sage-hybrid`` → a tuple; ``default`` and ``baselines`` expand to their lists.

    >>> parse_presets("adamw, sage-hybrid,adamw")
    ('adamw', 'sage-hybrid')

    With the baselines' packages installed (``pip install 'slimopt[baselines]'``):

    >>> parse_presets("adamw,baselines")[:3]  # doctest: +SKIP
    ('adamw', 'adam-mini', 'apollo')
    """
    from slimopt.bench.baselines import BASELINES

    names: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        expanded = {"default": DEFAULT_PRESETS, "baselines": tuple(BASELINES)}.get(item, (item,))
        names += [n for n in expanded if n not in names]
    check_names(names)
    return tuple(names)


def check_names(names: Sequence[str]) -> None:
    """A clear error for an empty list, an unknown name, or a baseline that is not installed."""
    from slimopt.bench.baselines import BASELINES, BaselineUnavailable, check_available

    if not names:
        raise CompareError("no presets to compare")
    unknown = [n for n in names if n not in known_names()]
    if unknown:
        raise CompareError(
            f"unknown preset {', '.join(map(repr, unknown))}; presets are "
            f"{', '.join(known_names())} (or 'default', 'baselines')"
        )
    for n in names:
        if n in BASELINES:
            try:
                check_available(n)
            except BaselineUnavailable as exc:
                raise CompareError(str(exc)) from None


# ----------------------------------------------------------------------------- optimizers


def _is_baseline(name: str) -> bool:
    from slimopt.bench.baselines import BASELINES

    return name in BASELINES


def rules_of(name: str) -> list[str]:
    """The learning rates a sweep tunes: the preset's rules, primary first (a baseline: itself).

    >>> rules_of("sage-hybrid"), rules_of("adamw"), rules_of("muon")
    (['sage', 'sinkgd'], ['adamw'], ['muon'])
    """
    if _is_baseline(name):
        return [name]
    from slimopt.presets import PRIMARY_RULE, preset_lrs

    primary = PRIMARY_RULE[name]
    return [primary, *(r for r in preset_lrs(name) if r != primary)]


def default_lrs(name: str) -> dict[str, float]:
    """Each rule's default peak lr (a baseline's main lr under its own name)."""
    if _is_baseline(name):
        from slimopt.bench.baselines import BASELINES

        return {name: BASELINES[name].default_lr}
    from slimopt.presets import preset_lrs

    return {r: preset_lrs(name)[r] for r in rules_of(name)}


def _optimizer_settings(
    name: str, mults: dict[str, float]
) -> tuple[float | None, dict[str, float], dict[str, float]]:
    """(harness ``lr``, harness ``optimizer_args``, the resulting lr of each rule)."""
    base = default_lrs(name)
    lrs = {r: base[r] * mults.get(r, 1.0) for r in base}
    if _is_baseline(name):
        m = mults.get(name, 1.0)
        return (None if m == 1.0 else lrs[name]), {}, lrs
    args = {f"{r}_lr": lrs[r] for r in base if mults.get(r, 1.0) != 1.0}
    return None, args, lrs


def optimizer_factory(name: str, lr: float | None) -> Callable[[Any], Any] | None:
    """What ``train(optimizer_factory=...)`` needs to build baseline ``name`` (None for a slimopt
    preset, which the harness builds itself from its config).

    >>> optimizer_factory("adamw", None) is None
    True
    """
    if not _is_baseline(name):
        return None
    from slimopt.bench.baselines import create_baseline

    def build(model: Any) -> Any:
        return create_baseline(name, model, lr)

    return build


def measure_state_bytes(
    name: str,
    model: str,
    vocab_size: int,
    mults: dict[str, float] | None = None,
) -> int:
    """Optimizer-state bytes of preset/baseline ``name`` on ``model``, measured after one step.

    Every rule allocates its whole state on its first step, so one step with random gradients
    gives the bytes the optimizer holds for the rest of training. Counted with
    :func:`slimopt.bench.baselines.deep_state_bytes` (equal to ``slimopt.state_bytes`` for
    slimopt's optimizers; it also sees the projector matrices of GaLore and APOLLO).

    >>> measure_state_bytes("sinkgd-pure", "llama-tiny", 512)
    0
    """
    import torch

    import slimopt
    from slimopt.bench.baselines import create_baseline, deep_state_bytes
    from slimopt.train.models import build_model

    lr, args, _ = _optimizer_settings(name, mults or {})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_model(model, vocab_size)
        if _is_baseline(name):
            opt = create_baseline(name, net, lr)
        else:
            opt = slimopt.create_optimizer(name, net, lr, **args)
        for p in net.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
    return deep_state_bytes(opt)


# ----------------------------------------------------------------------------- the comparison


def _validate(cfg: CompareConfig) -> None:
    check_names(cfg.presets)
    for name in ("seeds", "evals", "seq_len", "batch_size", "grad_accum"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise CompareError(f"{name} must be a positive integer, got {value!r}")
    for name in ("tokens", "sweep_tokens", "eval_tokens", "vocab_size"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise CompareError(f"{name} must be a positive integer, got {value!r}")
    if cfg.eval_tokens is not None and cfg.eval_tokens < 2:
        raise CompareError("eval_tokens must be at least 2 (one prediction)")
    if not isinstance(cfg.sweep_extend, int) or cfg.sweep_extend < 0:
        raise CompareError(f"sweep_extend must be an integer >= 0, got {cfg.sweep_extend!r}")
    if cfg.sweep is not None:
        if not cfg.sweep or not all(isinstance(m, (int, float)) and m > 0 for m in cfg.sweep):
            raise CompareError(f"sweep must be multipliers > 0, got {cfg.sweep!r}")
    elif cfg.sweep_tokens is not None:
        raise CompareError("sweep_tokens is given but no sweep grid (--sweep lr=...)")
    if cfg.threads is not None and (not isinstance(cfg.threads, int) or cfg.threads < 1):
        raise CompareError(f"threads must be a positive integer, got {cfg.threads!r}")
    if cfg.progress not in ("none", "log"):
        raise CompareError(f"progress must be 'none' or 'log', got {cfg.progress!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise CompareError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")
    if not cfg.warmup >= 0:
        raise CompareError(f"warmup must be >= 0, got {cfg.warmup!r}")


def _prepare(cfg: CompareConfig, log: Callable[[str], Any]) -> _Plan:
    """Check model, data and budgets, and tokenize the corpus (cached), before any training."""
    from slimopt.train import data as data_mod
    from slimopt.train import models

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    budgets = [("the budget (--tokens)", cfg.tokens)]
    sweep_tokens = cfg.sweep_tokens or max(cfg.tokens // 4, 1)
    if cfg.sweep is not None:
        budgets.append(("the sweep budget (--sweep-tokens)", sweep_tokens))
    for what, tokens in budgets:
        if tokens < tokens_per_step:
            raise CompareError(
                f"{what} of {tokens:,} tokens is smaller than one optimizer step "
                f"(batch_size {cfg.batch_size} × grad_accum {cfg.grad_accum} × seq_len "
                f"{cfg.seq_len} = {tokens_per_step:,} tokens), so no run could train and evaluate; "
                f"give at least {tokens_per_step:,} tokens"
            )
    try:
        default_vocab = models.model_config(cfg.model).vocab_size
        corpus, tok, shards = data_mod.prepare_data(
            cfg.data,
            tokenizer=cfg.tokenizer,
            vocab_size=cfg.vocab_size or default_vocab,
            cache_dir=cfg.cache_dir,
            log=log,
        )
    except (models.ModelConfigError, data_mod.DataError) as exc:
        raise CompareError(str(exc)) from None
    if cfg.tokenizer and cfg.vocab_size and shards.vocab_size != cfg.vocab_size:
        raise CompareError(
            f"tokenizer {cfg.tokenizer} has {shards.vocab_size} tokens, but vocab_size "
            f"{cfg.vocab_size} was asked for; drop one of the two"
        )
    for split in ("train", "valid"):
        if len(shards[split]) < cfg.seq_len + 1:
            raise CompareError(
                f"the {split} split of {corpus.description} has {len(shards[split]):,} tokens, "
                f"fewer than seq_len + 1 = {cfg.seq_len + 1}; an evaluation needs one full sequence"
            )
    return _Plan(
        tokens_per_step=tokens_per_step,
        steps=math.ceil(cfg.tokens / tokens_per_step),
        sweep_tokens=sweep_tokens,
        sweep_steps=math.ceil(sweep_tokens / tokens_per_step),
        vocab_size=shards.vocab_size,
        corpus=corpus.description,
        corpus_key=corpus.key,
        train_tokens=len(shards["train"]),
        valid_tokens=len(shards["valid"]),
    )


def _settings(cfg: CompareConfig, plan: _Plan) -> dict[str, Any]:
    """What makes two runs comparable; presets and seeds may be added to a comparison later."""
    keep = (
        "model", "data", "tokens", "sweep", "sweep_tokens", "sweep_extend", "vocab_size",
        "tokenizer", "seq_len", "batch_size", "grad_accum", "warmup", "min_lr_ratio",
        "grad_clip", "evals", "eval_tokens",
    )  # fmt: skip
    s = {k: getattr(cfg, k) for k in keep}
    s["sweep"] = list(cfg.sweep) if cfg.sweep is not None else None
    s["sweep_tokens"] = plan.sweep_tokens if cfg.sweep is not None else None
    s["corpus_key"] = plan.corpus_key
    s["resolved_vocab_size"] = plan.vocab_size
    if cfg.frequency_eval:
        s["frequency_eval"] = list(cfg.frequency_eval)
    return s


_OWN_ENTRIES = ("runs", "sweep", SETTINGS_FILE, STATE_BYTES_FILE, "results.csv", "results.md",
                report.PLOT_PPL_VS_TOKENS, report.PLOT_PPL_VS_MEMORY, report.PLOT_SWEEP,
                "loss_by_frequency.png", "embedding_rows_touched.png")  # fmt: skip


def _claim_out_dir(cfg: CompareConfig, plan: _Plan) -> Path:
    out = Path(cfg.out)
    settings = _settings(cfg, plan)
    path = out / SETTINGS_FILE
    if cfg.overwrite:
        for entry in _OWN_ENTRIES:
            target = out / entry
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    elif path.is_file():
        try:
            saved = json.loads(path.read_text())["settings"]
        except (OSError, ValueError, KeyError) as exc:
            raise CompareError(f"{path} is unreadable ({exc}); use --overwrite") from None
        saved = json.loads(json.dumps(saved))
        current = json.loads(json.dumps(settings))
        diffs = [
            f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now"
            for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)
        ]
        if diffs:
            raise CompareError(
                f"{out} holds a comparison with other settings ({'; '.join(diffs)}); "
                "use another --out, or --overwrite to start it over"
            )
    elif (out / "runs").exists() or (out / "sweep").exists():
        raise CompareError(
            f"{out} holds runs but no {SETTINGS_FILE}, so their settings are unknown; "
            "use another --out, or --overwrite to start it over"
        )
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{SETTINGS_FILE}.tmp"
    tmp.write_text(
        json.dumps({"format": _FORMAT, "settings": settings, "command": cfg.command}, indent=2)
        + "\n"
    )
    os.replace(tmp, path)
    return out


def _tag(mults: dict[str, float]) -> str:
    return "_".join(f"{rule}x{m:g}" for rule, m in mults.items())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (none when it cannot be read; unreadable lines skipped)."""
    rows = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def _record(run_dir: Path, name: str, seed: int, mults: dict[str, float]) -> dict[str, Any]:
    """One run as report.summarize reads it (status ``pending`` when it has not finished)."""
    _, _, lrs = _optimizer_settings(name, mults)
    rec: dict[str, Any] = {
        "preset": name,
        "kind": "baseline" if _is_baseline(name) else "preset",
        "seed": seed,
        "status": "pending",
        "lrs": lrs,
        "multipliers": dict(mults),
        "run_dir": str(run_dir),
    }
    spec = _read_json(run_dir / RUN_SPEC_FILE)
    final = _read_json(run_dir / "final.json")
    if final is None or spec is None or spec.get("multipliers") != mults:
        return rec
    metrics = _metric_rows(run_dir)
    rec["curve"] = [[r["tokens"], r["val_ppl"]] for r in metrics if "val_ppl" in r]
    if final.get("status") == "nonfinite":
        rec.update(status="diverged", nonfinite_step=final.get("nonfinite_step"))
        return rec
    if final.get("status") != "completed":
        return rec
    rec.update({k: final.get(k) for k in (
        "val_loss", "val_ppl", "steps", "tokens_seen", "train_time_s", "train_tokens_per_s",
        "wall_time_s", "resumed_from_step", "peak_memory_bytes", "optimizer_state_bytes", "device",
    )})  # fmt: skip
    if final.get("val_loss_by_frequency"):
        rec["val_loss_by_frequency"] = final["val_loss_by_frequency"]
        # (step, share of embedding rows with a gradient) from a frequency_eval run
        rec["rows_curve"] = [
            [r["step"], r["embedding_rows_touched"]]
            for r in metrics
            if r.get("embedding_rows_touched") is not None
        ]
    if not math.isfinite(final.get("val_loss", math.nan)):
        rec.update(status="diverged", nonfinite_step=final.get("steps"))
    else:
        rec["status"] = "completed"
    return rec


def _extra_seeds(preset_dir: Path, seeds: int) -> list[int]:
    """The seeds >= ``seeds`` that have a run directory under ``preset_dir``."""
    found = []
    for d in preset_dir.glob("seed-*"):
        suffix = d.name[len("seed-") :]
        if suffix.isdigit() and int(suffix) >= seeds:
            found.append(int(suffix))
    return sorted(found)


@contextlib.contextmanager
def _run_lock(run_dir: Path, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``run_dir``, so comparisons sharing ``--out`` (several processes
    training side by side) never train the same run at once. Yields False when another process
    holds it and ``wait`` is False; otherwise waits for it and yields True."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): one comparison per directory at a time
        yield True
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Runner:
    """Trains (or reuses) single runs and keeps the comparison's bookkeeping."""

    def __init__(self, cfg: CompareConfig, plan: _Plan, out: Path, log: Callable[[str], Any]):
        self.cfg, self.plan, self.out, self.log = cfg, plan, out, log
        self.trained_s = 0.0
        self.count = 0

    def run(
        self,
        stage: str,
        name: str,
        seed: int,
        mults: dict[str, float],
        label: str,
        wait: bool = True,
    ) -> dict[str, Any] | None:
        """Train one run, or reuse it; None when another process is training it and not ``wait``."""
        cfg, plan = self.cfg, self.plan
        tokens = cfg.tokens if stage == "full" else plan.sweep_tokens
        steps = plan.steps if stage == "full" else plan.sweep_steps
        if stage == "full":
            run_dir = self.out / "runs" / name / f"seed-{seed}"
        else:
            run_dir = self.out / "sweep" / name / _tag(mults)
        spec = {"stage": stage, "preset": name, "seed": seed, "tokens": tokens,
                "multipliers": mults}  # fmt: skip
        self.count += 1
        rec = _record(run_dir, name, seed, mults)
        if rec["status"] != "pending":
            self.log(f"{label}: done before ({_outcome(rec)})")
            return rec
        if cfg.report_only:
            self.log(f"{label}: not finished (--report-only trains nothing)")
            return rec
        with _run_lock(run_dir, wait) as locked:
            if not locked:
                self.log(f"{label}: another process is training it; coming back to it later")
                return None
            rec = _record(run_dir, name, seed, mults)  # it may have finished while we waited
            if rec["status"] != "pending":
                self.log(f"{label}: done by another process ({_outcome(rec)})")
                return rec
            return self._train(stage, name, seed, mults, label, run_dir, spec, tokens, steps)

    def _train(
        self,
        stage: str,
        name: str,
        seed: int,
        mults: dict[str, float],
        label: str,
        run_dir: Path,
        spec: dict[str, Any],
        tokens: int,
        steps: int,
    ) -> dict[str, Any]:
        from slimopt.bench.baselines import BASELINES
        from slimopt.train import TrainConfig, train
        from slimopt.train.checkpoint import CheckpointError, has_checkpoint
        from slimopt.train.loop import NonFiniteLossError

        cfg = self.cfg
        lr, args, _ = _optimizer_settings(name, mults)
        resumable = not _is_baseline(name) or BASELINES[name].resumable
        eval_every = max(1, math.ceil(steps / cfg.evals))
        resume = (
            resumable
            and _read_json(run_dir / RUN_SPEC_FILE) == json.loads(json.dumps(spec))
            and has_checkpoint(run_dir)
        )
        tc = TrainConfig(
            model=cfg.model, preset=name, lr=lr, optimizer_args=args, data=cfg.data,
            tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
            batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, tokens=tokens,
            warmup=cfg.warmup, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip,
            # a sweep run is judged by its final evaluation only
            eval_every=eval_every if stage == "full" else 0, eval_tokens=cfg.eval_tokens,
            save_every=eval_every if resumable else 0, resume=resume, overwrite=not resume,
            out=str(run_dir), seed=seed, device=cfg.device, progress=cfg.progress,
            cache_dir=cfg.cache_dir, on_nonfinite="stop", save_model=False,
            frequency_eval=cfg.frequency_eval if stage == "full" else None,
        )  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
        self.log(f"{label}: {'resuming' if resume else 'training'} ({steps} steps)")

        def on_row(row: dict[str, Any]) -> None:
            if "val_loss" in row and cfg.progress == "none":
                self.log(f"    step {row['step']}/{steps}: val ppl {row['val_ppl']:.2f}")

        t0 = time.perf_counter()
        factory = optimizer_factory(name, lr)
        try:
            train(tc, callback=on_row, optimizer_factory=factory)
        except NonFiniteLossError as exc:
            self.log(f"    diverged: {exc}")
        except CheckpointError as exc:
            if not resume:
                raise
            self.log(f"    cannot resume ({exc}); starting over")
            tc = dataclasses.replace(tc, resume=False, overwrite=True)
            try:
                train(tc, callback=on_row, optimizer_factory=factory)
            except NonFiniteLossError as exc2:
                self.log(f"    diverged: {exc2}")
        self.trained_s += time.perf_counter() - t0
        if not cfg.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        rec = _record(run_dir, name, seed, mults)
        self.log(f"{label}: {_outcome(rec)}")
        return rec


def _outcome(rec: dict[str, Any]) -> str:
    if rec["status"] == "diverged":
        return f"diverged at step {rec.get('nonfinite_step')}"
    if rec["status"] == "completed":
        return (
            f"val loss {rec['val_loss']:.4f}, ppl {rec['val_ppl']:.2f}, "
            f"{report.format_seconds(rec.get('wall_time_s'))}"
        )
    return "not finished"


def _sweep(runner: _Runner, name: str, grid: Sequence[float], extend: int, idx: str):
    """Coordinate-wise search of each rule's multiplier; returns the sweep summary for ``name``."""
    rules = rules_of(name)
    chosen = dict.fromkeys(rules, 1.0)
    by_rule: dict[str, list[tuple[float, float, str]]] = {}
    for rule in rules:
        tried: dict[float, tuple[float, str]] = {}

        def trial(m: float, rule: str = rule, tried: dict = tried) -> None:
            mults = {**chosen, rule: m}
            label = f"[sweep {idx}] {name} {report.format_multipliers(mults)}"
            rec = runner.run("sweep", name, 0, mults, label)
            loss = rec.get("val_loss") if rec["status"] == "completed" else None
            tried[m] = (loss if loss is not None else math.inf, rec["status"])

        for m in grid:
            trial(m)
        for _ in range(extend if len(grid) > 1 else 0):
            ms = sorted(tried)
            best = min(ms, key=lambda m: (tried[m][0], abs(math.log(m))))
            if not math.isfinite(tried[best][0]):
                break
            if best == ms[0]:
                nxt = ms[0] * ms[0] / ms[1]
            elif best == ms[-1]:
                nxt = ms[-1] * ms[-1] / ms[-2]
            else:
                break
            trial(float(f"{nxt:.3g}"))
        ms = sorted(tried)
        best = min(ms, key=lambda m: (tried[m][0], abs(math.log(m))))
        if math.isfinite(tried[best][0]):
            chosen[rule] = best
        by_rule[rule] = [(m, tried[m][0], tried[m][1]) for m in ms]
    _, _, lrs = _optimizer_settings(name, chosen)
    summary = {"chosen": chosen, "lrs": lrs, "defaults": default_lrs(name), "by_rule": by_rule}
    unfinished = any(status == "pending" for trials in by_rule.values() for *_, status in trials)
    if not (runner.cfg.report_only and unfinished):  # a partial sweep's choice is not recorded
        path = runner.out / "sweep" / name / "chosen.json"
        path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _state_bytes(cfg: CompareConfig, plan: _Plan, out: Path, names: Sequence[str]) -> dict:
    path = out / STATE_BYTES_FILE
    cache = _read_json(path) or {}
    key = f"{cfg.model}|{plan.vocab_size}"
    known = cache.get(key, {})
    for name in [*names, "adamw"]:
        if name not in known:
            known[name] = measure_state_bytes(name, cfg.model, plan.vocab_size)
    cache[key] = known
    path.write_text(json.dumps(cache, indent=1) + "\n")
    return known


def write_results(
    out: Path,
    cfg: CompareConfig,
    plan: _Plan,
    records: list[dict[str, Any]],
    sweeps: dict[str, dict[str, Any]],
    state: dict[str, int],
    total_s: float | None = None,
    *,
    plots: bool = True,
) -> list[dict[str, Any]]:
    """Write results.csv, results.md and (``plots``) the PNG figures from the records so far."""
    for rec in records:
        rec["state_bytes"] = state.get(rec["preset"])
    rows = report.summarize(
        records, seeds=cfg.seeds, adamw_state_bytes=state.get("adamw"), order=cfg.presets
    )
    report.write_csv(rows, out / "results.csv")
    trained = math.ceil(cfg.tokens / tokens_per_step(cfg)) * tokens_per_step(cfg)
    title = f"{cfg.model} on {Path(cfg.data).name or cfg.data}, {trained:,} tokens per run"
    if plots:
        report.plot_ppl_vs_tokens(rows, out / report.PLOT_PPL_VS_TOKENS, title=title)
        report.plot_ppl_vs_memory(rows, out / report.PLOT_PPL_VS_MEMORY, title=title)
        if sweeps:
            report.plot_sweep(sweeps, out / report.PLOT_SWEEP)
    devices = sorted({str(rec["device"]) for rec in records if rec.get("device")})
    text = _markdown(cfg, plan, rows, sweeps, total_s, devices)
    if cfg.frequency_eval:
        from slimopt.bench import frequency

        freq_rows = frequency.summarize(records, [r["preset"] for r in rows])
        if freq_rows:
            text += (
                "\n## Rare tokens\n\nValidation loss by the target token's frequency in the "
                "training split (buckets cut at ranks "
                f"{', '.join(f'{e:,}' for e in cfg.frequency_eval)}; mean over seeds), and the "
                "mean share of the input embedding's rows that receive a gradient per step.\n\n"
                + frequency.markdown_table(freq_rows)
            )
            if plots:
                frequency.plot(freq_rows, out, title=title)
    (out / "results.md").write_text(text)
    return rows


def tokens_per_step(cfg: CompareConfig) -> int:
    """The tokens of one optimizer step: a run trains whole steps, so ``tokens`` rounds up."""
    return cfg.batch_size * cfg.grad_accum * cfg.seq_len


def _asked(asked: int, trained: int) -> str:
    """What the report adds where the budget asked for is not a whole number of steps: the
    tokens trained are stated, and the ones asked for beside them."""
    return "" if asked == trained else f"; {asked:,} asked, rounded up to whole steps"


def _markdown(
    cfg: CompareConfig,
    plan: _Plan,
    rows: list[dict[str, Any]],
    sweeps: dict[str, dict[str, Any]],
    total_s: float | None,
    devices: Sequence[str] = (),
) -> str:
    import torch

    import slimopt
    from slimopt.train.models import model_config

    n_params = None
    with contextlib.suppress(Exception):
        from slimopt.train.models import build_model

        with torch.device("meta"):
            n_params = sum(p.numel() for p in build_model(cfg.model, plan.vocab_size).parameters())
    mc = model_config(cfg.model, plan.vocab_size)
    dims = (
        f"hidden {getattr(mc, 'hidden_size', '?')}, {getattr(mc, 'num_hidden_layers', '?')} layers"
    )
    schedule = (
        f"warm-up {cfg.warmup:g}{' of the steps' if cfg.warmup < 1 else ' steps'}, cosine to "
        f"{cfg.min_lr_ratio:g} of the peak, "
        + (f"gradient clipping {cfg.grad_clip:g}" if cfg.grad_clip else "no gradient clipping")
    )
    eval_what = (
        f"the first {min(cfg.eval_tokens, plan.valid_tokens):,} validation tokens"
        if cfg.eval_tokens
        else f"all {plan.valid_tokens:,} validation tokens"
    )
    done = sum(min(r["seeds_done"], cfg.seeds) for r in rows)
    wanted = len(rows) * cfg.seeds
    # seeds past --seeds, added to some presets by an earlier call with a larger --seeds
    more = {r["preset"]: r["seeds_done"] for r in rows if r["seeds_done"] > cfg.seeds}
    added = sum(more.values()) - cfg.seeds * len(more)
    seeds_text = f"seeds: {cfg.seeds}" + (
        " (" + ", ".join(f"{n} for {p}" for p, n in more.items()) + ")" if more else ""
    )
    lines = [
        f"# slimopt compare: {cfg.model} on {cfg.data}",
        "",
        f"Command: `{cfg.command or command_line(cfg)}`  ",
        f"slimopt {slimopt.__version__}, torch {torch.__version__}, "
        f"device {', '.join(devices) or cfg.device}, {os.cpu_count()} CPU cores visible, "
        f"{torch.get_num_threads()} torch threads.",
        "",
        f"- Model: {cfg.model} ({dims}, vocabulary {plan.vocab_size:,}"
        + (f", {n_params / 1e6:.2f}M parameters" if n_params else "")
        + ").",
        f"- Data: {plan.corpus}; {plan.train_tokens:,} training tokens, {plan.valid_tokens:,} "
        f"validation tokens; perplexity is measured on {eval_what}.",
        f"- Budget: {plan.steps * plan.tokens_per_step:,} tokens per run ({plan.steps} steps of "
        f"{cfg.batch_size} × {cfg.grad_accum} × {cfg.seq_len} tokens"
        + _asked(cfg.tokens, plan.steps * plan.tokens_per_step)
        + f"), {schedule}; {seeds_text}.",
        "- Learning rates: "
        + (
            f"swept per rule over ×{', ×'.join(f'{m:g}' for m in cfg.sweep)} of each default "
            f"(seed 0, {plan.sweep_steps * plan.tokens_per_step:,} tokens per trial"
            + _asked(plan.sweep_tokens, plan.sweep_steps * plan.tokens_per_step)
            + "), see below."
            if cfg.sweep
            else "each preset's defaults (`slimopt.presets`)."
        ),
        f"- Progress: {done}/{wanted} runs finished"
        + (f", and {added} added seed{'s' if added > 1 else ''}" if more else "")
        + (
            f"; {report.format_seconds(total_s)} of training in this invocation."
            if total_s
            else "."
        ),
        "",
        "## Results",
        "",
        report.markdown_table(rows),
        "",
        "Perplexity: final validation perplexity, mean ± sample standard deviation over seeds "
        "(a diverged run, whose loss became non-finite, is reported as such, not averaged). "
        "Optimizer state: exact bytes of every state tensor after the first step (constant "
        "afterwards), and their ratio to AdamW's on this model. Step: mean wall time of one "
        "training step (forward, backward, update); tokens/s: training throughput without "
        "evaluations; wall/run: one whole run including data loading and evaluations (the last leg "
        "only, for a run that was resumed). Timings are only comparable between presets on an "
        "otherwise idle machine; `slimopt profile` measures the optimizer step alone.",
        "",
        f"![validation perplexity against tokens]({report.PLOT_PPL_VS_TOKENS})",
        "",
        f"![perplexity against optimizer-state memory]({report.PLOT_PPL_VS_MEMORY})",
        "",
    ]
    if sweeps:
        lines += [
            "## Learning-rate sweep",
            "",
            "Each rule's multiplier of its default lr, tried in turn (the preset's primary rule "
            "first, the others held at their best so far); the lowest validation loss (bold) is "
            "used for the full runs.",
            "",
            report.sweep_table(sweeps),
            "",
            f"![sweep]({report.PLOT_SWEEP})",
            "",
        ]
    return "\n".join(lines)


def run_compare(
    config: CompareConfig | None = None, *, log: Callable[[str], Any] | None = None
) -> dict[str, Any]:
    """Run (or resume) a comparison and write its results; returns ``{"rows", "out", "files"}``.

    Raises :class:`CompareError` before any training when the settings cannot work.
    """
    cfg = dataclasses.replace(config) if config is not None else CompareConfig()
    if log is None:

        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

    cfg.presets = tuple(cfg.presets)
    _validate(cfg)
    if cfg.report_only and cfg.overwrite:
        raise CompareError(
            "--report-only and --overwrite cannot be combined: one would delete the runs the "
            "other reports"
        )
    if cfg.report_only and not (Path(cfg.out) / SETTINGS_FILE).is_file():
        raise CompareError(f"--report-only: {cfg.out} holds no comparison to report")
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    plan = _prepare(cfg, log)
    out = _claim_out_dir(cfg, plan)
    state = _state_bytes(cfg, plan, out, cfg.presets)
    n = len(cfg.presets)
    total_tokens = n * cfg.seeds * plan.steps * plan.tokens_per_step
    log(
        f"comparing {n} optimizers on {cfg.model} / {cfg.data}: {cfg.seeds} seed(s) × "
        f"{plan.steps} steps × {plan.tokens_per_step:,} tokens = {total_tokens:,} training tokens"
        + (
            f", after a sweep of ×{','.join(f'{m:g}' for m in cfg.sweep)} per rule at "
            f"{plan.sweep_steps * plan.tokens_per_step:,} tokens"
            if cfg.sweep
            else ""
        )
        + f"; results in {out}"
    )
    runner = _Runner(cfg, plan, out, log)
    t_start = time.perf_counter()
    sweeps: dict[str, dict[str, Any]] = {}
    chosen: dict[str, dict[str, float]] = {}
    for i, name in enumerate(cfg.presets, 1):
        if cfg.sweep is not None:
            sweeps[name] = _sweep(runner, name, cfg.sweep, cfg.sweep_extend, f"{i}/{n}")
            chosen[name] = sweeps[name]["chosen"]
        else:
            chosen[name] = dict.fromkeys(rules_of(name), 1.0)

    def gather() -> list[dict[str, Any]]:
        records = [
            _record(out / "runs" / name / f"seed-{seed}", name, seed, chosen[name])
            for seed in range(cfg.seeds)
            for name in cfg.presets
        ]
        # seeds past --seeds that an earlier call with more seeds finished count too (a third
        # seed added for the presets whose comparison was within noise)
        for name in cfg.presets:
            for seed in _extra_seeds(out / "runs" / name, cfg.seeds):
                rec = _record(out / "runs" / name / f"seed-{seed}", name, seed, chosen[name])
                if rec["status"] != "pending":
                    records.append(rec)
        return records

    rows: list[dict[str, Any]] = []
    later = []  # runs another process was training: waited for at the end
    for seed in range(cfg.seeds):
        for i, name in enumerate(cfg.presets, 1):
            label = f"[{i + seed * n}/{n * cfg.seeds}] {name} seed {seed}"
            if runner.run("full", name, seed, chosen[name], label, wait=False) is None:
                later.append((name, seed, label))
            rows = write_results(out, cfg, plan, gather(), sweeps, state, plots=False)
    for name, seed, label in later:
        runner.run("full", name, seed, chosen[name], label)
    total = time.perf_counter() - t_start
    # the time spent training in this call (none when every run was finished before)
    rows = write_results(out, cfg, plan, gather(), sweeps, state, total_s=runner.trained_s or None)
    files = [out / "results.csv", out / "results.md"]
    files += [
        out / f
        for f in (
            report.PLOT_PPL_VS_TOKENS,
            report.PLOT_PPL_VS_MEMORY,
            report.PLOT_SWEEP,
            "loss_by_frequency.png",
            "embedding_rows_touched.png",
        )
        if (out / f).exists()
    ]
    return {"rows": rows, "out": out, "files": files, "sweeps": sweeps, "seconds": total}


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``slimopt compare``."""
    d = CompareConfig()
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON on stdout instead of a table"
    )
    parser.add_argument(
        "--presets",
        default=",".join(DEFAULT_PRESETS),
        help="comma-separated presets and/or baselines ('default' = the nine presets below, "
        "'baselines' = adam-mini,apollo,galore,muon,prodigy); default: %(default)s",
    )
    parser.add_argument("--model", default=d.model, help="model name or config .json (%(default)s)")
    parser.add_argument(
        "--data", default=d.data, help="stdlib[:PREFIX,...], a directory, a .txt file, hf:NAME"
    )
    parser.add_argument(
        "--tokens",
        default=d.tokens,
        type=str,
        help="training tokens per run, e.g. 1M (%(default)s)",
    )
    parser.add_argument("--seeds", default=d.seeds, type=int, help="seeds per preset (%(default)s)")
    parser.add_argument("--out", default=d.out, help="comparison directory (%(default)s)")
    parser.add_argument(
        "--sweep",
        default=None,
        help="lr=a,b,c: tune each rule's lr over these multipliers of its default first",
    )
    parser.add_argument(
        "--sweep-tokens", default=None, type=str, help="tokens per sweep run (default: tokens/4)"
    )
    parser.add_argument(
        "--sweep-extend",
        default=d.sweep_extend,
        type=int,
        help="extra multipliers tried when the best is on the grid's edge (%(default)s)",
    )
    parser.add_argument("--vocab-size", default=None, type=int, help="BPE vocabulary size")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead")
    parser.add_argument("--seq-len", default=d.seq_len, type=int)
    parser.add_argument("--batch-size", default=d.batch_size, type=int)
    parser.add_argument("--grad-accum", default=d.grad_accum, type=int)
    parser.add_argument("--warmup", default=d.warmup, type=float)
    parser.add_argument("--min-lr-ratio", default=d.min_lr_ratio, type=float)
    parser.add_argument("--grad-clip", default=None, type=float)
    parser.add_argument(
        "--evals", default=d.evals, type=int, help="evaluations per run (%(default)s)"
    )
    parser.add_argument(
        "--eval-tokens",
        default=str(d.eval_tokens),
        type=str,
        help="validation tokens per evaluation, 'all' for the whole split (%(default)s)",
    )
    parser.add_argument(
        "--frequency-eval",
        default=None,
        metavar="R1,R2",
        help="also report each preset's validation loss per bucket of training frequency cut at "
        "these token ranks (e.g. 1k,8k) and the share of embedding rows touched per step",
    )
    parser.add_argument("--device", default=d.device)
    parser.add_argument(
        "--threads",
        default=None,
        type=int,
        help="torch CPU threads (default: one per core); on a busy machine 1 is often faster",
    )
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument(
        "--progress", default=d.progress, choices=("none", "log"), help="per-step output"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete a previous comparison in --out first"
    )
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write results.csv, results.md and the plots from the runs finished so far and "
        "train nothing (to look at a comparison that other processes are still running)",
    )


def command_line(cfg: CompareConfig) -> str:
    """The ``slimopt compare`` command that reproduces ``cfg`` (only non-default flags).

    >>> command_line(CompareConfig(presets=("adamw", "scale"), tokens=1_000_000, sweep=(0.5, 1.0)))
    'slimopt compare --presets adamw,scale --tokens 1000000 --sweep lr=0.5,1'
    """
    d = CompareConfig()
    parts = ["slimopt", "compare"]
    for f in dataclasses.fields(CompareConfig):
        value = getattr(cfg, f.name)
        if f.name in ("command", "progress", "keep_checkpoints", "threads", "overwrite",
                      "report_only"):  # fmt: skip
            continue
        if value == getattr(d, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag)
        elif f.name == "presets":
            parts += [flag, ",".join(value)]
        elif f.name == "sweep":
            parts += [flag, "lr=" + ",".join(f"{m:g}" for m in value)]
        elif f.name == "frequency_eval":
            parts += [flag, ",".join(str(r) for r in value)]
        else:
            parts += [flag, "all" if value is None else str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """The :class:`CompareConfig` the parsed flags describe (a :class:`CompareError` if invalid)."""
    eval_tokens = None if str(args.eval_tokens).lower() in ("all", "none") else args.eval_tokens
    cfg = CompareConfig(
        presets=parse_presets(args.presets),
        model=args.model,
        data=args.data,
        tokens=parse_count(args.tokens),
        seeds=args.seeds,
        out=args.out,
        sweep=parse_sweep(args.sweep) if args.sweep else None,
        sweep_tokens=parse_count(args.sweep_tokens) if args.sweep_tokens else None,
        sweep_extend=args.sweep_extend,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip,
        evals=args.evals,
        eval_tokens=parse_count(eval_tokens) if eval_tokens is not None else None,
        frequency_eval=parse_ranks(args.frequency_eval) if args.frequency_eval else None,
        device=args.device,
        threads=args.threads,
        cache_dir=args.cache_dir,
        progress=args.progress,
        overwrite=args.overwrite,
        keep_checkpoints=args.keep_checkpoints,
        report_only=args.report_only,
    )
    cfg.command = command_line(cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    """Entry point of ``slimopt compare``: prints the table; exit status 2 on bad input."""
    from slimopt.train.checkpoint import CheckpointWriteError
    from slimopt.train.faults import Interrupted, OutputError
    from slimopt.train.loop import ConfigError

    try:
        cfg = config_from_args(args)
        result = run_compare(cfg)
    except (CompareError, ConfigError) as exc:
        print(f"slimopt compare: error: {exc}", file=sys.stderr)
        return 2
    except (OutputError, CheckpointWriteError) as exc:
        print(f"slimopt compare: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # the run in progress saved a checkpoint; finished runs are kept
        name = str(exc).split(" received", 1)[0]
        print(f"slimopt compare: stopped by {name}; the same command continues where it stopped",
              file=sys.stderr)  # fmt: skip
        return 128 + exc.signum
    if getattr(args, "json", False):
        summary = {**result, "out": str(result["out"]), "files": [str(p) for p in result["files"]]}
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
        return 0
    print(report.text_table(result["rows"]))
    print(f"\n{len(result['files'])} files in {result['out']}: "
          + ", ".join(p.name for p in result["files"]))  # fmt: skip
    return 0


__all__ = [
    "DEFAULT_PRESETS",
    "DEFAULT_TOKENS",
    "CompareConfig",
    "CompareError",
    "add_arguments",
    "check_names",
    "command_line",
    "config_from_args",
    "measure_state_bytes",
    "parse_count",
    "parse_presets",
    "parse_sweep",
    "rules_of",
    "run",
    "run_compare",
    "write_results",
]
