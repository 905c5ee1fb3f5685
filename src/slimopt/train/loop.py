"""The training loop: text in, a trained model and an honest validation perplexity out.

``train(TrainConfig(...))`` is a plain function (no global state, no ``sys.exit``) that writes into
``config.out``:

- ``config.json``   every setting, resolved (vocabulary, steps, warm-up, device, parameter count);
- ``tokenizer.json`` the tokenizer the model was trained with;
- ``metrics.jsonl`` one row per logged step (``step, tokens, loss, lr, lr_scale, grad_norm,
  tokens_per_s``) and one per evaluation (``step, tokens, val_loss, val_ppl, eval_tokens``);
- ``final.json``    validation loss and perplexity, tokens seen, parameters, optimizer state bytes
  (``slimopt.state_bytes``), peak memory, wall time; returned as a dict too;
- ``checkpoints/``  the newest checkpoint (see ``checkpoint.py``), every ``save_every`` steps.

Validation perplexity is ``exp`` of the mean next-token loss over the validation tokens (or over
their first ``eval_tokens``), each token after the first predicted exactly once.

>>> import tempfile
>>> from slimopt.train import TrainConfig, train
>>> result = train(TrainConfig(data="stdlib:json", vocab_size=512, seq_len=32, batch_size=4,
...                            max_steps=3, out=tempfile.mkdtemp(), progress="none",
...                            cache_dir=tempfile.mkdtemp()))
>>> result["steps"], result["val_ppl"] > 1
(3, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slimopt.train import checkpoint as ckpt
from slimopt.train import data as data_mod
from slimopt.train import models

DEFAULT_TOKENS = 1_000_000
PROGRESS_MODES = ("auto", "bar", "log", "none")
NONFINITE_MODES = ("stop", "skip")
PRECISIONS = ("auto", "fp32", "bf16")
DIST_MODES = ("none", "ddp", "fsdp2")
DCP_DIR = "dcp-checkpoints"  # distributed (torch.distributed.checkpoint) checkpoints of a run


class ConfigError(ValueError):
    """A setting that cannot work, found before training starts."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; ``step`` is the step that produced it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class TrainConfig:
    """Everything that defines a run; the CLI flags are these names with dashes."""

    model: str = "llama-tiny"  # a name from models.MODEL_NAMES or a transformers config .json
    preset: str = "sage-hybrid"
    lr: float | None = None  # peak lr of the preset's primary rule; None = the preset's own
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # create_optimizer overrides
    data: str = "stdlib"
    tokenizer: str | None = None  # a tokenizer.json; None = train a BPE on the training split
    vocab_size: int | None = None  # None = the model's default (8192 for llama-tiny)
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    tokens: int | None = None  # training budget; None with max_steps None = DEFAULT_TOKENS
    max_steps: int | None = None  # or the budget in optimizer steps
    warmup: float = 0.1  # < 1: a fraction of the steps; >= 1: a number of steps
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    grad_clip: float | None = None  # max global gradient norm; None or 0 = no clipping
    eval_every: int = 200  # steps between evaluations (0 = only at the end)
    eval_tokens: int | None = None  # evaluate on the first N validation tokens; None = all
    save_every: int = 200  # steps between checkpoints (0 = none); the last step is saved too
    resume: bool = False  # continue from the newest checkpoint in out
    overwrite: bool = False  # replace a previous run in out
    out: str | None = None  # None = runs/<model>-<preset>-<timestamp>
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu
    precision: str = "auto"  # "auto" = bf16 autocast on cuda, fp32 elsewhere
    on_nonfinite: str = "stop"  # "stop" raises NonFiniteLossError, "skip" skips and counts
    log_every: int = 10
    progress: str = "auto"  # "auto" = a bar on a terminal, log lines otherwise
    cache_dir: str | None = None  # None = $SLIMOPT_CACHE or ~/.cache/slimopt
    dist: str = "none"  # "ddp" or "fsdp2" under torchrun; batch_size is then the global batch


# ----------------------------------------------------------------------------- helpers


def lr_schedule(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at the last step (GaLore's schedule).

    >>> f = lr_schedule(10, 100, 0.1)
    >>> round(f(0), 2), f(9), f(10), round(f(99), 3)
    (0.1, 1.0, 1.0, 0.1)
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _grad_norm(params: list[torch.nn.Parameter], clip: float | None) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if clip:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not grads:
        return 0.0
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    *,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[float, int]:
    """(mean next-token loss, number of predicted tokens) over the first ``limit`` tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data_mod.eval_batches(tokens, seq_len, batch_size, limit):
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(input_ids=x).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1), count


def _reset_peak_memory(device: torch.device) -> bool:
    """Start measuring peak memory now; False when only the process's lifetime peak is known."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_memory(device: torch.device, was_reset: bool) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    if was_reset:
        with open("/proc/self/status") as fh:
            hwm = next(line for line in fh if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) * 1024, "process_peak_rss_during_training"
    # ru_maxrss is in KiB on Linux, bytes on macOS; it is the whole process's peak so far.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024, "process_max_rss"


def _format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """A tqdm bar on a terminal, plain log lines otherwise, or silence."""

    def __init__(self, mode: str):
        self.mode = ("bar" if sys.stderr.isatty() else "log") if mode == "auto" else mode
        self.bar = None

    def start(self, total: int, initial: int) -> None:
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif self.mode != "none":
            print(message, file=sys.stderr, flush=True)

    def step(self, row: dict[str, Any], line: str) -> None:
        if self.bar is not None:
            self.bar.update(row["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        elif self.mode == "log":
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------- setup


def _check_config(cfg: TrainConfig, custom_optimizer: bool) -> None:
    import slimopt

    positive = ("seq_len", "batch_size", "grad_accum", "log_every")
    for name in positive:
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    for name in ("tokens", "max_steps", "vocab_size", "eval_tokens"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name in ("eval_every", "save_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
    if cfg.tokens is not None and cfg.max_steps is not None:
        raise ConfigError("give the budget as tokens or as max_steps, not both")
    if not custom_optimizer and cfg.preset not in slimopt.PRESETS:
        raise ConfigError(
            f"unknown preset {cfg.preset!r}; presets are {', '.join(slimopt.PRESETS)}"
        )
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"lr must be > 0, got {cfg.lr!r}")
    if not cfg.warmup >= 0:
        raise ConfigError(f"warmup must be >= 0, got {cfg.warmup!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")
    if cfg.grad_clip is not None and cfg.grad_clip < 0:
        raise ConfigError(f"grad_clip must be >= 0, got {cfg.grad_clip!r}")
    choices = {
        "on_nonfinite": NONFINITE_MODES,
        "progress": PROGRESS_MODES,
        "precision": PRECISIONS,
        "dist": DIST_MODES,
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(
                f"{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}"
            )
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume and overwrite contradict each other; choose one")


def _resolve_device(cfg: TrainConfig) -> tuple[torch.device, str]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError as exc:
            raise ConfigError(f"device {cfg.device!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {cfg.device!r} asked for, but CUDA is not available")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return device, precision


_RUN_FILES = ("final.json", "metrics.jsonl", "config.json", "tokenizer.json", DCP_DIR)


def _out_dir(cfg: TrainConfig) -> Path:
    """The run directory; refuses one that holds a run unless resuming or overwriting."""
    out = Path(
        cfg.out or f"runs/{Path(cfg.model).stem}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    previous = ckpt.checkpoint_dir(out).exists() or any((out / f).exists() for f in _RUN_FILES)
    if previous and not (cfg.resume or cfg.overwrite):
        raise ConfigError(
            f"{out} already holds a run; pass resume to continue it or overwrite to start over"
        )
    return out


def _clear_run(out: Path) -> None:
    shutil.rmtree(ckpt.checkpoint_dir(out), ignore_errors=True)
    shutil.rmtree(out / DCP_DIR, ignore_errors=True)
    for f in _RUN_FILES[:-1]:
        (out / f).unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after the checkpoint a resumed run restarts from."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- distributed


def _dist_launch(cfg: TrainConfig) -> None:
    """Refuse ``dist`` outside ``torchrun`` (before any process group is created)."""
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [v for v in needed if v not in os.environ]
    if missing:
        raise ConfigError(
            f"dist={cfg.dist!r} needs the torchrun environment ({', '.join(missing)} not set); "
            f"launch with `torchrun --nproc-per-node N -m slimopt train ... --dist {cfg.dist}` "
            "(N = 1 works too), or train in one process with dist='none'"
        )
    world = int(os.environ["WORLD_SIZE"])
    if cfg.batch_size % world:
        raise ConfigError(
            f"batch_size {cfg.batch_size} (the global batch) does not split evenly over "
            f"{world} ranks; use a multiple of {world}"
        )


def _sync_error(info: Any, error: str | None) -> None:
    """Raise ``error`` (rank 0's) on every rank, so that no rank waits for one that has failed."""
    import torch.distributed as dist

    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ConfigError(box[0])


def _load_dcp(
    out: Path, root: Path, model: torch.nn.Module, optimizer: Any, fingerprint: dict
) -> dict | None:
    """Load the newest distributed checkpoint under ``root`` into ``model`` and ``optimizer`` (any
    world size) after checking that it belongs to this run; its ``extra`` dict, or None."""
    from slimopt.distributed import CheckpointError as DCPError
    from slimopt.distributed import latest_checkpoint, load_checkpoint_dcp

    try:
        found = latest_checkpoint(root)
    except DCPError as exc:
        raise ckpt.CheckpointError(str(exc)) from exc
    if found is None:
        if ckpt.has_checkpoint(out):
            raise ckpt.CheckpointError(
                f"{out} holds a single-process checkpoint ({ckpt.checkpoint_dir(out)}); resume it "
                "with dist='none', or start the distributed run afresh"
            )
        return None
    try:
        extra = torch.load(found / "extra.pt", weights_only=True)
    except Exception as exc:  # unpickling raises many kinds; all mean the file is unusable
        raise ckpt.CheckpointError(f"cannot load {found / 'extra.pt'}: {exc}") from exc
    current = ckpt._as_json(fingerprint)
    if extra.get("fingerprint") != current:
        raise ckpt.CheckpointError(
            f"checkpoint {found} belongs to a different run: "
            + ckpt._describe_mismatch(extra.get("fingerprint") or {}, current)
        )
    try:
        load_checkpoint_dcp(found, model, optimizer)
    except (DCPError, KeyError, RuntimeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {found} does not fit this run: {exc}") from exc
    return extra


def _dist_grad_norm(params: list[torch.nn.Parameter], clip: float | None) -> float:
    """The global gradient norm (clipped to ``clip`` when given) of DDP or FSDP2 parameters."""
    from slimopt.distributed import is_dtensor

    if clip:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.get_total_norm(grads)
    if is_dtensor(norm):  # FSDP2: a replicated DTensor computed from every rank's shards
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def _evaluate_sharded(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    *,
    limit: int | None,
    device: torch.device,
    autocast: Callable[[], Any],
    rank: int,
    world_size: int,
) -> tuple[float, int]:
    """:func:`evaluate` with the batches dealt round-robin over the ranks, summed token losses and
    counts all-reduced: the same global mean. Every rank runs the same number of forward passes
    (FSDP2 all-gathers weights in each), a rank short of a batch repeating its first one unused."""
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    first, passes, n_batches = None, 0, 0
    for i, (x, y) in enumerate(data_mod.eval_batches(tokens, seq_len, batch_size, limit)):
        n_batches += 1
        if i % world_size != rank:
            continue
        first = (x, y) if first is None else first
        with autocast():
            logits = model(input_ids=x.to(device)).logits
        y = y.to(device)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        sums[0] += loss.item()
        sums[1] += y.numel()
        passes += 1
    spare = first[0] if first is not None else torch.zeros(1, 1, dtype=torch.long)
    for _ in range(passes, -(-n_batches // world_size)):
        with autocast():
            model(input_ids=spare.to(device))
    model.train(was_training)
    sums = sums.to(device)
    dist.all_reduce(sums)
    total, count = float(sums[0]), int(sums[1])
    return total / max(count, 1), count


# ----------------------------------------------------------------------------- the loop


def train(
    config: TrainConfig | None = None,
    *,
    callback: Callable[[dict], Any] | None = None,
    optimizer_factory: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None,
) -> dict:
    """Train ``config.model`` with ``config.preset`` and return the contents of ``final.json``.

    ``callback`` receives every row written to ``metrics.jsonl`` (training and evaluation rows).
    ``optimizer_factory(model)``, when given, builds the optimizer instead of
    ``slimopt.create_optimizer(preset, model, lr, **optimizer_args)`` (a baseline from another
    library, say); ``preset`` is then only the run's label, and the factory must be deterministic
    for ``resume`` to continue exactly.

    With ``dist="ddp"`` or ``"fsdp2"`` (under ``torchrun``, any number of processes, 1 included)
    every rank calls this: each takes its equal slice of the same global batch of ``batch_size``
    sequences, rank 0 alone writes the run's files and ``callback`` runs on rank 0 only, and
    checkpoints are ``torch.distributed.checkpoint`` directories in ``DIR/dcp-checkpoints`` that
    resume on any world size. The process group is destroyed on return and on error.

    Raises ``ConfigError``, ``DataError``, ``ModelConfigError`` or ``CheckpointError`` before
    training starts when the settings cannot work, and ``NonFiniteLossError`` when the loss stops
    being finite (unless ``on_nonfinite="skip"``).
    """
    cfg = dataclasses.replace(config) if config is not None else TrainConfig()
    if cfg.dist == "none":
        return _train(cfg, callback, optimizer_factory, None)
    import torch.distributed as dist

    from slimopt.distributed import cleanup_distributed, setup_distributed

    _check_config(cfg, custom_optimizer=optimizer_factory is not None)
    _dist_launch(cfg)
    info = setup_distributed()
    try:
        result = _train(cfg, callback, optimizer_factory, info)
        # every rank is done with its collectives before any rank tears its connections down: a
        # gloo peer that closes while another still reads from it aborts that process at exit
        dist.barrier()
        return result
    finally:
        cleanup_distributed()


def _train(
    cfg: TrainConfig,
    callback: Callable[[dict], Any] | None,
    optimizer_factory: Callable[[torch.nn.Module], torch.optim.Optimizer] | None,
    info: Any,
) -> dict:
    """The run itself; ``info`` is the :class:`slimopt.distributed.DistInfo` of a distributed run,
    None for one process (whose path this leaves exactly as it was)."""
    import slimopt

    wall_start = time.perf_counter()
    _check_config(cfg, custom_optimizer=optimizer_factory is not None)
    device, precision = _resolve_device(cfg)
    main = info is None or info.is_main
    if info is not None:
        if cfg.device == "auto" or device.type == info.device.type:
            device = info.device  # one device per rank: cuda:LOCAL_RANK, or the CPU
        if cfg.precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
    # Fail on an unknown model (or a bad config file) before spending time on data.
    default_vocab = models.model_config(cfg.model).vocab_size
    out = _out_dir(cfg)
    if info is not None:
        import torch.distributed as dist

        dist.barrier()  # every rank has looked at out before rank 0 writes into it
    progress = _Progress(cfg.progress if main else "none")
    log = progress.log

    # --- data: corpus -> tokenizer -> token shards (cached)
    tok = data_mod.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    if tok is not None and cfg.vocab_size and data_mod.tokenizer_vocab_size(tok) != cfg.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.tokenizer} has {data_mod.tokenizer_vocab_size(tok)} tokens, "
            f"but vocab_size {cfg.vocab_size} was asked for; drop one of the two"
        )

    def prepare():
        return data_mod.prepare_data(
            cfg.data,
            tokenizer=tok,
            vocab_size=cfg.vocab_size or default_vocab,
            cache_dir=cfg.cache_dir,
            log=log,
        )

    if info is None:
        corpus, tok, shards = prepare()
    else:  # rank 0 fills the token cache; the others then read it
        failure: Exception | None = None
        if main:
            try:
                corpus, tok, shards = prepare()
            except Exception as exc:  # told to the other ranks, which would wait for it forever
                failure = exc
        try:
            _sync_error(
                info, None if failure is None else f"rank 0 could not prepare the data: {failure}"
            )
        except ConfigError:
            if failure is not None:
                raise failure from None
            raise
        if not main:
            corpus, tok, shards = prepare()
    vocab_size = shards.vocab_size
    train_tokens, valid_tokens = shards["train"], shards["valid"]
    for split, toks in (("train", train_tokens), ("valid", valid_tokens)):
        if len(toks) < cfg.seq_len + 1:
            raise ConfigError(
                f"seq_len {cfg.seq_len} is longer than the {split} split of {corpus.description} "
                f"({len(toks)} tokens); use a smaller seq_len or a larger corpus"
            )

    # --- model and optimizer
    model_cfg = models.model_config(cfg.model, vocab_size)
    max_pos = model_cfg.max_position_embeddings  # n_positions for GPT-2
    if cfg.seq_len > max_pos:
        if model_cfg.model_type != "llama":
            raise ConfigError(
                f"seq_len {cfg.seq_len} exceeds {cfg.model}'s {max_pos} learned positions"
            )
        model_cfg.max_position_embeddings = cfg.seq_len  # rotary positions extend freely
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    from transformers import AutoModelForCausalLM

    # Peak memory is the training's: tokenizer training and earlier runs in this process excluded.
    peak_was_reset = _reset_peak_memory(device)
    model = AutoModelForCausalLM.from_config(model_cfg).to(device)
    model.train()
    n_params = models.parameter_count(model)
    core = model
    if info is not None:
        from slimopt.distributed import reduce_mean, shard_batch, unwrap, wrap_model

        model = wrap_model(model, cfg.dist)  # identical weights on every rank: same seed
        core = unwrap(model)
    try:
        if optimizer_factory is not None:
            optimizer = optimizer_factory(core)
        else:
            optimizer = slimopt.create_optimizer(cfg.preset, core, lr=cfg.lr, **cfg.optimizer_args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build the {cfg.preset!r} optimizer: {exc}") from exc

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    max_steps = cfg.max_steps or math.ceil((cfg.tokens or DEFAULT_TOKENS) / tokens_per_step)
    warmup_steps = int(cfg.warmup * max_steps) if cfg.warmup < 1 else int(cfg.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(warmup_steps, max_steps, cfg.min_lr_ratio)
    )
    batches = data_mod.PackedBatches(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if precision == "bf16"
        else contextlib.nullcontext
    )

    # Everything that changes the sequence of losses; a checkpoint resumes only an equal run.
    fingerprint = {
        "model": {k: v for k, v in model_cfg.to_diff_dict().items() if k != "transformers_version"},
        "preset": cfg.preset,
        "lr": cfg.lr,
        "optimizer_args": cfg.optimizer_args,
        "corpus": corpus.key,
        "tokenizer": data_mod.tokenizer_hash(tok),
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "max_steps": max_steps,
        "warmup_steps": warmup_steps,
        "min_lr_ratio": cfg.min_lr_ratio,
        "grad_clip": cfg.grad_clip or None,
        "seed": cfg.seed,
        "precision": precision,
        "on_nonfinite": cfg.on_nonfinite,
    }

    # --- resume, or start afresh
    if cfg.overwrite and main:
        _clear_run(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    step, skipped, resumed_from = 0, 0, None
    metrics_path = out / "metrics.jsonl"
    dcp_root = out / DCP_DIR
    if info is not None:
        dist.barrier()  # out is cleared and exists
    if cfg.resume and info is not None:
        extra = _load_dcp(out, dcp_root, model, optimizer, fingerprint)
        if extra is not None:
            try:
                scheduler.load_state_dict(extra["scheduler"])
                batches.load_state_dict(extra["data"])
            except (KeyError, RuntimeError, ValueError) as exc:
                raise ckpt.CheckpointError(
                    f"checkpoint in {dcp_root} does not fit this run: {exc}"
                ) from exc
            torch.set_rng_state(extra["rng"]["torch"])
            if device.type == "cuda" and extra["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(extra["rng"]["cuda"], device)
            random.setstate(extra["rng"]["python"])
            step, skipped, resumed_from = extra["step"], extra["skipped_steps"], extra["step"]
            if main:
                _truncate_metrics(metrics_path, step)
            log(f"resumed {out} at step {step} on {info.world_size} rank(s)")
        else:
            log(f"no checkpoint in {dcp_root}; starting from step 0")
            if main:
                metrics_path.unlink(missing_ok=True)
    elif cfg.resume and (out / DCP_DIR / "latest").is_file() and not ckpt.has_checkpoint(out):
        raise ckpt.CheckpointError(
            f"{out} holds distributed checkpoints ({out / DCP_DIR}); resume them under torchrun "
            "with dist='ddp' or 'fsdp2' (--nproc-per-node 1 works)"
        )
    elif cfg.resume and ckpt.has_checkpoint(out):
        state = ckpt.load_checkpoint(out, fingerprint=fingerprint)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            batches.load_state_dict(state["data"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"checkpoint in {out} does not fit this run: {exc}") from exc
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        random.setstate(state["rng"]["python"])
        step, skipped, resumed_from = state["step"], state["skipped_steps"], state["step"]
        _truncate_metrics(metrics_path, step)
        log(f"resumed {out} at step {step}")
    elif cfg.resume:
        log(f"no checkpoint in {out}; starting from step 0")
        metrics_path.unlink(missing_ok=True)

    if main:
        tok.save(str(out / "tokenizer.json"))
    resolved = {
        "vocab_size": vocab_size,
        "params": n_params,
        "tokens_per_step": tokens_per_step,
        "max_steps": max_steps,
        "warmup_steps": warmup_steps,
        "device": str(device),
        "precision": precision,
        "corpus": corpus.description,
        "corpus_key": corpus.key,
        "train_tokens": len(train_tokens),
        "valid_tokens": len(valid_tokens),
        "token_cache": str(shards.directory),
        "versions": {"torch": torch.__version__, "slimopt": slimopt.__version__},
    }
    if info is not None:
        resolved["world_size"] = info.world_size
    if main:
        _write_json(
            out / "config.json", {**dataclasses.asdict(cfg), "out": str(out), "resolved": resolved}
        )
    log(
        f"{cfg.model} ({n_params / 1e6:.1f}M parameters, vocab {vocab_size}) with {cfg.preset} on "
        f"{corpus.description}: {max_steps} steps of {tokens_per_step} tokens, {device} {precision}"
    )

    def save() -> None:
        state = {
            "step": step,
            "skipped_steps": skipped,
            "scheduler": scheduler.state_dict(),
            "data": batches.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "python": random.getstate(),
            },
        }
        if info is not None:  # model and optimizer go through DCP, sharded; the rest beside them
            from slimopt.distributed import save_checkpoint_dcp

            state["fingerprint"] = ckpt._as_json(fingerprint)
            save_checkpoint_dcp(dcp_root, model, optimizer, state, step=step)
            return
        state["model"] = model.state_dict()
        state["optimizer"] = optimizer.state_dict()
        ckpt.save_checkpoint(out, state, step=step, fingerprint=fingerprint)

    def record(row: dict, metrics) -> None:
        if not main:
            return
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if callback is not None:
            callback(row)

    def run_eval(metrics) -> dict:
        if info is not None:  # DDP evaluates the bare model; FSDP2 must gather its weights
            val_loss, n_eval = _evaluate_sharded(
                core if cfg.dist == "ddp" else model, valid_tokens, cfg.seq_len, cfg.batch_size,
                limit=cfg.eval_tokens, device=device, autocast=autocast,
                rank=info.rank, world_size=info.world_size,
            )  # fmt: skip
        else:
            val_loss, n_eval = evaluate(
                model, valid_tokens, cfg.seq_len, cfg.batch_size,
                limit=cfg.eval_tokens, device=device, autocast=autocast,
            )  # fmt: skip
        row = {
            "step": step,
            "tokens": step * tokens_per_step,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 700.0)),
            "eval_tokens": n_eval,
        }
        record(row, metrics)
        progress.log(
            f"step {step}: validation loss {val_loss:.4f}, perplexity {row['val_ppl']:.2f}"
        )
        return row

    # --- train
    progress.start(total=max_steps, initial=step)
    last_eval: dict | None = None
    train_time, trained_tokens = 0.0, 0
    interval_time, interval_tokens = 0.0, 0
    with open(metrics_path if main else os.devnull, "a") as metrics:
        try:
            while step < max_steps:
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=device)
                for _ in range(cfg.grad_accum):
                    x, y = batches.next_batch()
                    if info is not None:  # the same global batch on every rank; this rank's slice
                        x = shard_batch(x, info.rank, info.world_size)
                        y = shard_batch(y, info.rank, info.world_size)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with autocast():
                        logits = model(input_ids=x).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach()
                if info is None:
                    loss_value = loss_sum.item() / cfg.grad_accum
                    grad_norm = _grad_norm(params, cfg.grad_clip)
                else:
                    loss_value = reduce_mean(loss_sum / cfg.grad_accum)
                    grad_norm = _dist_grad_norm(params, cfg.grad_clip)
                lr = optimizer.param_groups[0]["lr"]
                step += 1
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    if cfg.on_nonfinite == "stop":
                        raise NonFiniteLossError(
                            f"non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at "
                            f"step {step}; the last good checkpoint is kept in "
                            f"{ckpt.checkpoint_dir(out)} (if save_every > 0). Lower the lr, clip "
                            "gradients, or pass on_nonfinite='skip'",
                            step,
                        )
                    skipped += 1
                    scheduler.step()
                    record(
                        {"step": step, "tokens": step * tokens_per_step, "skipped": True}, metrics
                    )
                    progress.log(f"step {step}: non-finite loss, step skipped ({skipped} so far)")
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                train_time += dt
                interval_time += dt
                trained_tokens += tokens_per_step
                interval_tokens += tokens_per_step

                if step % cfg.log_every == 0 or step == max_steps:
                    row = {
                        "step": step,
                        "tokens": step * tokens_per_step,
                        "loss": loss_value,
                        "lr": lr,
                        "lr_scale": scheduler.lr_lambdas[0](step - 1),
                        "grad_norm": grad_norm,
                        "tokens_per_s": interval_tokens / interval_time,
                    }
                    record(row, metrics)
                    eta = (max_steps - step) * train_time / max(step - (resumed_from or 0), 1)
                    progress.step(
                        row,
                        f"step {step}/{max_steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                        f"grad norm {grad_norm:.3f} | {row['tokens_per_s']:.0f} tok/s | "
                        f"eta {_format_seconds(eta)}",
                    )
                    interval_time, interval_tokens = 0.0, 0
                if cfg.eval_every and step % cfg.eval_every == 0:
                    last_eval = run_eval(metrics)
                if cfg.save_every and (step % cfg.save_every == 0 or step == max_steps):
                    save()
        except NonFiniteLossError:
            progress.close()
            if main:
                _write_json(
                    out / "final.json",
                    {"status": "nonfinite", "nonfinite_step": step, "steps": step - 1,
                     "model": cfg.model, "preset": cfg.preset},
                )  # fmt: skip
            raise
        progress.close()
        if last_eval is None or last_eval["step"] != step:
            last_eval = run_eval(metrics)

    peak, peak_kind = _peak_memory(device, peak_was_reset)
    final = {
        "status": "completed",
        "model": cfg.model,
        "preset": cfg.preset,
        "data": cfg.data,
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "val_loss": last_eval["val_loss"],
        "val_ppl": last_eval["val_ppl"],
        "eval_tokens": last_eval["eval_tokens"],
        "params": n_params,
        "optimizer_state_bytes": slimopt.state_bytes(optimizer),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "wall_time_s": time.perf_counter() - wall_start,
        "train_time_s": train_time,
        "train_tokens_per_s": trained_tokens / train_time if train_time else None,
        "skipped_steps": skipped,
        "resumed_from_step": resumed_from,
        "device": str(device),
        "precision": precision,
        "out": str(out),
    }
    if info is not None:
        final.update(dist=cfg.dist, world_size=info.world_size)
    if main:
        _write_json(out / "final.json", final)
    return final
