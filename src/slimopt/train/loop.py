"""The training loop: text in, a trained model and an honest validation perplexity out.

``train(TrainConfig(...))`` is a plain function (no global state, no ``sys.exit``) that writes into
``config.out``:

- ``config.json``   every setting, resolved (vocabulary, steps, warm-up, device, parameter count);
  ``slimopt train --config DIR/config.json`` reruns it;
- ``tokenizer.json`` the tokenizer the model was trained with;
- ``metrics.jsonl`` one row per logged step (``step, tokens, loss, lr, lr_scale, grad_norm,
  tokens_per_s``) and one per evaluation (``step, tokens, val_loss, val_ppl, eval_tokens``);
- ``final.json``    status, validation loss and perplexity, tokens seen, parameters, optimizer
  state bytes (``slimopt.state_bytes``), peak memory, wall time; returned as a dict too;
- ``checkpoints/``  the ``keep_checkpoints`` newest checkpoints (see ``checkpoint.py``), every
  ``save_every`` steps, at the last step and when SIGTERM or SIGINT stops the run;
- ``model/``        the trained model (``save_pretrained``) with its tokenizer.

One process is a world of one: the same code runs under ``torchrun`` with ``dist="ddp"`` or
``"fsdp2"``, each rank taking its slice of the global batch (see ``parallel.py``).

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
import math
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slimopt import lean
from slimopt.presets import check_preset
from slimopt.train import checkpoint as ckpt
from slimopt.train import data as data_mod
from slimopt.train import models, parallel
from slimopt.train.faults import Interrupted, RaiseOnSignal, StopSignals, output_error
from slimopt.train.outputs import (
    RUN_FILES,
    RunDir,
    RunDirError,
    format_ppl,
    format_seconds,
    read_json,
)

DEFAULT_TOKENS = 1_000_000
MAX_STEPS = 10**9  # a bound no schedule reaches: 1e9 steps of one token each
MAX_SKIPPED_FRACTION = 0.1  # on_nonfinite="skip" tolerates this share of the steps (at least 1)
PROGRESS_MODES = ("auto", "bar", "log", "none")
NONFINITE_MODES = ("stop", "skip")
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
WEIGHTS = ("auto", "int8")
DIST_MODES = ("none", "ddp", "fsdp2")
REPORT_TO = ("none", "tensorboard")


class ConfigError(ValueError):
    """A setting that cannot work, found before training starts."""


class OutOfMemoryError(ConfigError):
    """A step that cannot fit in the memory there is (planned before, or met during, training)."""


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
    # ranks that cut the vocabulary by training frequency (e.g. (1000, 8000)): the final
    # validation loss per bucket of the target token, and the share of embedding rows with a
    # gradient per step in the metrics; None = off
    frequency_eval: tuple[int, ...] | None = None
    save_every: int = 200  # steps between checkpoints (0 = none); the last step is saved too
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep
    resume: bool = False  # continue from the newest checkpoint in out
    overwrite: bool = False  # replace a previous run in out
    out: str | None = None  # None = runs/<model>-<preset>-<timestamp>
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu
    # "auto" = bf16-mixed on cuda, fp32 elsewhere; "bf16-mixed" = fp32 weights, bf16 autocast;
    # "bf16" = pure bf16 weights and state, updates rounded stochastically (slimopt.lean)
    precision: str = "auto"
    step_in_backward: bool = False  # apply each update during backward, free its gradient
    grad_checkpointing: bool = False  # the model's own activation checkpointing
    # "auto" = weights in the precision's dtype; "int8" = the linear layers' weights as int8
    # codes with per-block scales, updated during backward (slimopt.quant)
    weights: str = "auto"
    weights_block: int = 256  # int8 weights: elements of a row per scale
    # lean modes on CPU: keep glibc's allocator as it is (faster steps, a higher peak RSS)
    keep_freed_memory: bool = False
    on_nonfinite: str = "stop"  # "stop" raises NonFiniteLossError, "skip" skips and counts
    log_every: int = 10
    progress: str = "auto"  # "auto" = a bar on a terminal, log lines otherwise
    report_to: str = "none"  # "tensorboard": also write the metrics to out/tensorboard
    save_model: bool = True  # save the trained model to out/model (save_pretrained)
    cache_dir: str | None = None  # None = $SLIMOPT_CACHE or ~/.cache/slimopt
    dist: str = "none"  # "ddp" or "fsdp2" under torchrun; batch_size is then the global batch


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
    sequences, rank 0 alone writes the run's files and ``callback`` runs on rank 0 only. The
    process group is destroyed on return and on error. Checkpoints resume on any world size.

    Raises ``ConfigError``, ``DataError``, ``ModelConfigError``, ``CheckpointError``,
    ``RunDirError`` or ``RunLockedError`` before training starts when the settings cannot work;
    ``NonFiniteLossError`` when the loss stops being finite (``on_nonfinite="stop"``) or too many
    steps were skipped (``"skip"``); ``Interrupted`` after saving a checkpoint on SIGTERM or SIGINT;
    ``OutputError`` (naming the path and the reason) when the run directory cannot be written.
    """
    cfg = dataclasses.replace(config) if config is not None else TrainConfig()
    _check_config(cfg, custom_optimizer=optimizer_factory is not None)
    if cfg.dist != "none":
        _check_launch(cfg)
        parallel.setup_distributed()
    try:
        result = _train(cfg, callback, optimizer_factory)
        # every rank is done with its collectives before any rank tears its connections down: a
        # gloo peer that closes while another still reads from it aborts that process at exit
        parallel.barrier()
        return result
    except OSError as exc:
        error = output_error(exc, _out_path(cfg))
        if error is exc:  # not about the run directory
            raise
        raise error from exc
    finally:
        if cfg.dist != "none":
            parallel.cleanup_distributed()


def _train(cfg: TrainConfig, callback: Any, optimizer_factory: Any) -> dict:
    import slimopt

    wall_start = time.perf_counter()
    device, precision = _resolve_device(cfg)
    default_vocab = models.model_config(cfg.model).vocab_size  # an unknown model fails first
    tokens_per_step, max_steps, warmup_steps = _schedule(cfg)
    if cfg.resume:
        _check_resumable(_out_path(cfg))
    run = RunDir(_out_path(cfg), resume=cfg.resume, overwrite=cfg.overwrite,
                 progress=cfg.progress, callback=callback, report_to=cfg.report_to)  # fmt: skip
    with run:
        if cfg.resume and (done := _finished(cfg, run)) is not None:
            return done
        with RaiseOnSignal(
            "while preparing the data (training the tokenizer or tokenizing); nothing was "
            "trained and the cache holds nothing half-written: run the same command again"
        ):
            corpus, tok, shards = _prepare_data(cfg, default_vocab, run.log)
        model_cfg = _model_config(cfg, shards, corpus)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        lean_mode = precision == "bf16" or cfg.step_in_backward
        if device.type == "cpu" and lean_mode and not cfg.keep_freed_memory:
            lean.return_freed_memory()  # freed buffers leave the process: a lower peak RSS
        baseline_rss = _rss_bytes()
        peak_was_reset = _reset_peak_memory(device)
        model, core, n_params = _build_model(
            model_cfg, device, cfg.dist, precision, cfg.grad_checkpointing,
            weights=cfg.weights, block=cfg.weights_block,
        )  # fmt: skip
        optimizer = _build_optimizer(cfg, model, core, optimizer_factory)
        # the planner's peak for this run, computed once: the fit check, an out-of-memory
        # message and final.json all report it
        planned = _planned_peak(cfg, model_cfg, precision, device, optimizer_factory)
        _check_fits(cfg, planned, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_schedule(warmup_steps, max_steps, cfg.min_lr_ratio)
        )
        batches = data_mod.PackedBatches(shards["train"], cfg.seq_len, cfg.batch_size, cfg.seed)
        autocast = _autocast(device, precision)
        fingerprint = _fingerprint(cfg, model_cfg, corpus, tok, max_steps, warmup_steps, precision)
        state = _TrainState()
        probe = (
            _FrequencyProbe(cfg.frequency_eval, shards["train"], core)
            if cfg.frequency_eval
            else None
        )

        def save() -> Path:
            return _save(run, model, optimizer, scheduler, batches, state, fingerprint, cfg, device)

        def evaluate() -> dict:
            return _evaluate(run, model, shards["valid"], cfg, state, tokens_per_step, device,
                             autocast)  # fmt: skip

        if cfg.resume:
            _resume(run, model, optimizer, scheduler, batches, state, fingerprint, device)
        run.start_metrics(keep_until=state.step if cfg.resume else None)
        run.save_tokenizer(tok)
        resolved = {
            "vocab_size": model_cfg.vocab_size, "params": n_params,
            "tokens_per_step": tokens_per_step, "max_steps": max_steps,
            "warmup_steps": warmup_steps, "device": str(device), "precision": precision,
            "corpus": corpus.description, "corpus_key": corpus.key,
            "train_tokens": len(shards["train"]), "valid_tokens": len(shards["valid"]),
            "token_cache": str(shards.directory), "world_size": parallel.world()[1],
            "versions": {"torch": torch.__version__, "slimopt": slimopt.__version__},
        }  # fmt: skip
        run.write_json("config.json", {**dataclasses.asdict(cfg), "out": str(run.path),
                                       "resolved": resolved})  # fmt: skip
        run.log(
            f"{cfg.model} ({n_params / 1e6:.1f}M parameters, vocab {model_cfg.vocab_size}) with "
            f"{cfg.preset} on {corpus.description}: {max_steps} steps of {tokens_per_step} tokens, "
            f"{device} {precision}, {parallel.world()[1]} process(es)"
        )

        params = [p for p in model.parameters() if p.requires_grad]
        run.progress.start(total=max_steps, initial=state.step)
        last_eval: dict | None = None
        with StopSignals() as signals:  # SIGTERM and SIGINT stop at a step boundary, saved
            while state.step < max_steps:
                if parallel.any_rank(signals.received is not None):
                    _stop_on_signal(run, state, save, signals.received or signal.SIGTERM, cfg)
                t0 = time.perf_counter()
                try:
                    loss_value = _forward_backward(model, batches, cfg, device, autocast)
                except (RuntimeError, MemoryError) as exc:
                    _raise_if_out_of_memory(exc, cfg, planned, device)
                    raise
                # step_in_backward: the gradients were applied and freed during backward
                grad_norm = (
                    None if cfg.step_in_backward else parallel.grad_norm(params, cfg.grad_clip)
                )
                lr = optimizer.param_groups[0]["lr"]
                state.step += 1
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm or 0.0)):
                    optimizer.zero_grad(set_to_none=True)
                    _nonfinite(run, state, cfg, max_steps, loss_value, grad_norm, tokens_per_step)
                    scheduler.step()
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.timed(time.perf_counter() - t0, tokens_per_step)
                if state.step % cfg.log_every == 0 or state.step == max_steps:
                    row = {"step": state.step, "tokens": state.step * tokens_per_step,
                           "loss": loss_value, "lr": lr,
                           "lr_scale": scheduler.lr_lambdas[0](state.step - 1),
                           "grad_norm": grad_norm}  # fmt: skip
                    if probe is not None:
                        row["embedding_rows_touched"] = probe.rows_touched()
                    _log_step(run, state, row, max_steps)
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    last_eval = evaluate()
                if cfg.save_every and (state.step % cfg.save_every == 0 or state.step == max_steps):
                    save()
        run.progress.close()
        # the training's peak, before the final evaluation and the export (which gathers an
        # FSDP2 model whole on rank 0)
        peak, peak_kind = _peak_memory(device, peak_was_reset)
        peaks = parallel.all_gather_object(peak)
        if last_eval is None or last_eval["step"] != state.step:
            saved_last = (ckpt.checkpoint_dir(run.path) / f"step-{state.step:08d}").is_dir()
            then = (
                f"every step is saved; finish with: {resume_command(run.path / 'config.json', cfg.dist)}"
                if saved_last
                else "the steps were not checkpointed (--save-every 0); run it again"
            )
            with RaiseOnSignal(f"during the final evaluation; {then}"):
                last_eval = evaluate()
        if not math.isfinite(last_eval["val_loss"]):
            _fail_nonfinite(run, state, cfg, f"the validation loss is {last_eval['val_loss']}")
        if cfg.save_model:
            run.save_model(model)

        final = {
            "status": "completed", "model": cfg.model, "preset": cfg.preset, "data": cfg.data,
            "steps": state.step, "tokens_seen": state.step * tokens_per_step,
            "val_loss": last_eval["val_loss"], "val_ppl": last_eval["val_ppl"],
            "eval_tokens": last_eval["eval_tokens"], "params": n_params,
            "optimizer_state_bytes": slimopt.state_bytes(optimizer),
            "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
            "peak_memory_bytes_per_rank": peaks,
            "peak_memory_above_baseline_bytes": (
                peak if device.type == "cuda" or baseline_rss is None else peak - baseline_rss
            ),
            "planned_peak_bytes": planned, "planned_peak_is_per_rank": cfg.dist != "none",
            "step_in_backward": cfg.step_in_backward,
            "grad_checkpointing": cfg.grad_checkpointing, "weights": cfg.weights,
            "wall_time_s": time.perf_counter() - wall_start, "train_time_s": state.train_time,
            "train_tokens_per_s": (
                state.trained_tokens / state.train_time if state.train_time else None
            ),
            "skipped_steps": state.skipped, "resumed_from_step": state.resumed_from,
            "device": str(device), "precision": precision, "out": str(run.path),
            "dist": cfg.dist, "world_size": parallel.world()[1],
        }  # fmt: skip
        final.update(_plan_against_peak(planned, final["peak_memory_above_baseline_bytes"]))
        if probe is not None:
            with autocast():
                final["val_loss_by_frequency"] = probe.evaluate(model, shards["valid"], cfg, device)
            probe.close()
        run.write_json("final.json", final)
        return final


# ----------------------------------------------------------------------------- the loop's parts


@dataclass
class _TrainState:
    """What the loop advances; a checkpoint saves and restores the first three."""

    step: int = 0
    skipped: int = 0
    resumed_from: int | None = None
    train_time: float = 0.0
    trained_tokens: int = 0
    interval_time: float = 0.0  # since the last logged step
    interval_tokens: int = 0

    def timed(self, seconds: float, tokens: int) -> None:
        self.train_time += seconds
        self.trained_tokens += tokens
        self.interval_time += seconds
        self.interval_tokens += tokens


def _forward_backward(model, batches, cfg: TrainConfig, device, autocast) -> float:
    """Accumulate one step's gradients over ``grad_accum`` micro-batches, each rank on its slice of
    the global batch; returns the loss averaged over the micro-batches and the ranks."""
    loss_sum = torch.zeros((), device=device)
    for _ in range(cfg.grad_accum):
        x, y = (parallel.shard_batch(t).to(device) for t in batches.next_batch())
        with autocast():
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach()
    return parallel.reduce_mean(loss_sum) / cfg.grad_accum


def _log_step(run: RunDir, state: _TrainState, row: dict, max_steps: int) -> None:
    """Record a training row (with the throughput since the last one) and show progress."""
    row["tokens_per_s"] = state.interval_tokens / state.interval_time
    run.record(row)
    eta = (
        (max_steps - state.step) * state.train_time / max(state.step - (state.resumed_from or 0), 1)
    )
    # no gradient norm when the updates were applied during backward
    norm = "" if row["grad_norm"] is None else f"grad norm {row['grad_norm']:.3f} | "
    run.progress.step(
        row,
        f"step {state.step}/{max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
        f"{norm}{row['tokens_per_s']:.0f} tok/s | eta {format_seconds(eta)}",
    )
    state.interval_time, state.interval_tokens = 0.0, 0


def _save(run, model, optimizer, scheduler, batches, state, fingerprint, cfg, device) -> Path:
    """Checkpoint the run at ``state.step`` (every rank)."""
    extra = {
        "step": state.step,
        "skipped_steps": state.skipped,
        "scheduler": scheduler.state_dict(),
        "data": batches.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate(),
        },
    }
    return ckpt.save_checkpoint(
        run.path, model, optimizer, extra, step=state.step, fingerprint=fingerprint,
        keep=cfg.keep_checkpoints,
    )  # fmt: skip


def _check_resumable(out: Path) -> None:
    """``resume`` needs a checkpoint (or a finished run) in ``out``: a clear error naming what
    was looked for, before anything is created, rather than a fresh run under a resume flag."""
    final = read_json(out / "final.json")
    if ckpt.has_checkpoint(out) or (isinstance(final, dict) and final.get("status") == "completed"):
        return
    looked = f"no checkpoint ({ckpt.checkpoint_dir(out)}/step-*) and no finished run (final.json)"
    if not out.exists():
        why = f"{out} does not exist; drop resume to start a new run there"
    elif any((out / f).exists() for f in RUN_FILES):
        why = (f"{out} holds a run that stopped before its first checkpoint (save_every sets "
               "how often one is saved); pass overwrite to start it over")  # fmt: skip
    else:
        why = f"drop resume to start a new run in {out}"
    raise RunDirError(f"nothing to resume in {out}: {looked}; {why}")


def _resume(run, model, optimizer, scheduler, batches, state, fingerprint, device) -> None:
    """Restore the newest intact checkpoint (every rank); a run directory without one is an
    error (:func:`_check_resumable` says so before the run starts)."""
    extra = ckpt.load_checkpoint(run.path, model, optimizer, fingerprint=fingerprint, warn=run.log)
    if extra is None:
        raise ckpt.CheckpointError(f"no intact checkpoint to resume in {run.path}")
    try:
        scheduler.load_state_dict(extra["scheduler"])
        batches.load_state_dict(extra["data"])
        torch.set_rng_state(extra["rng"]["torch"])
        if device.type == "cuda" and extra["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(extra["rng"]["cuda"], device)
        random.setstate(extra["rng"]["python"])
        state.step = state.resumed_from = extra["step"]
        state.skipped = extra["skipped_steps"]
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(
            f"checkpoint {extra.get('checkpoint')} does not fit this run: {exc}"
        ) from exc
    run.log(f"resumed {run.path} at step {state.step} from {extra['checkpoint']}")


def _evaluate(run, model, tokens, cfg, state, tokens_per_step, device, autocast) -> dict:
    """Evaluate on the validation tokens and record the row (every rank; rank 0 records)."""
    val_loss, n_eval = parallel.evaluate(
        model, lambda: data_mod.eval_batches(tokens, cfg.seq_len, cfg.batch_size, cfg.eval_tokens),
        device=device, autocast=autocast,
    )  # fmt: skip
    val_ppl = math.exp(min(val_loss, 700.0)) if math.isfinite(val_loss) else val_loss
    row = {"step": state.step, "tokens": state.step * tokens_per_step, "val_loss": val_loss,
           "val_ppl": val_ppl, "eval_tokens": n_eval}  # fmt: skip
    run.record(row)
    run.log(f"step {state.step}: validation loss {val_loss:.4f}, perplexity {format_ppl(val_ppl)}")
    return row


class _FrequencyProbe:
    """Rare-token measurements (``frequency_eval``): the validation loss per bucket of training
    frequency, and the share of the input embedding's rows that receive a gradient per step."""

    def __init__(self, edges: tuple[int, ...], train_tokens: Any, core: torch.nn.Module) -> None:
        from slimopt.bench import frequency

        self._frequency = frequency
        weight = core.get_input_embeddings().weight
        vocab = weight.shape[0]
        self.names = frequency.bucket_names(edges, vocab)
        self.buckets = frequency.frequency_buckets(train_tokens, vocab, edges)
        self.activity = frequency.EmbeddingRowActivity(weight)

    def rows_touched(self) -> float | None:
        """Mean share of rows with a gradient over the steps since the last call."""
        shares, self.activity.shares = self.activity.shares, []
        return sum(shares) / len(shares) if shares else None

    def evaluate(self, model, tokens, cfg: TrainConfig, device) -> dict:
        batches = data_mod.eval_batches(tokens, cfg.seq_len, cfg.batch_size, cfg.eval_tokens)
        return self._frequency.evaluate_by_frequency(
            model, batches, self.buckets, self.names, device=device
        )

    def close(self) -> None:
        self.activity.close()


def _nonfinite(run, state, cfg, max_steps, loss_value, grad_norm, tokens_per_step) -> None:
    """A step whose loss or gradient norm is not finite: stop, or skip it within the bound."""
    what = f"non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at step {state.step}"
    if cfg.on_nonfinite == "stop":
        _fail_nonfinite(run, state, cfg, f"{what}; lower the lr, clip gradients, or pass "
                        "on_nonfinite='skip'")  # fmt: skip
    state.skipped += 1
    run.record({"step": state.step, "tokens": state.step * tokens_per_step, "skipped": True})
    run.log(f"step {state.step}: non-finite loss, step skipped ({state.skipped} so far)")
    allowed = max(1, int(MAX_SKIPPED_FRACTION * max_steps))
    if state.skipped > allowed:
        _fail_nonfinite(
            run, state, cfg,
            f"{state.skipped} of {state.step} steps were skipped for a non-finite loss or "
            f"gradient norm, more than the {allowed} ({MAX_SKIPPED_FRACTION:.0%} of {max_steps}) "
            "that on_nonfinite='skip' tolerates; lower the lr or clip gradients",
        )  # fmt: skip


def _fail_nonfinite(run, state, cfg, what: str) -> None:
    run.progress.close()
    kept = ckpt.newest_checkpoint(run.path)
    where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was saved"
    run.write_json("final.json", {"status": "nonfinite", "nonfinite_step": state.step,
                                  "steps": state.step - 1, "skipped_steps": state.skipped,
                                  "model": cfg.model, "preset": cfg.preset})  # fmt: skip
    raise NonFiniteLossError(f"{what}; {where}", state.step)


def _stop_on_signal(run, state, save, signum: int, cfg) -> None:
    """SIGTERM or SIGINT arrived: checkpoint this step boundary, then raise :class:`Interrupted`."""
    run.progress.close()
    saved = ckpt.checkpoint_dir(run.path) / f"step-{state.step:08d}"
    if not saved.is_dir():
        saved = save()
    run.write_json("final.json", {"status": "interrupted", "steps": state.step,
                                  "checkpoint": str(saved), "model": cfg.model,
                                  "preset": cfg.preset})  # fmt: skip
    name = signal.Signals(signum).name
    raise Interrupted(
        f"{name} received; saved step {state.step} to {saved}. Continue with: "
        f"{resume_command(run.path / 'config.json', cfg.dist)}",
        signum,
    )


def resume_command(config_path: str | os.PathLike[str], dist: str = "none") -> str:
    """The command that continues a run from its ``config.json``: under ``torchrun`` (``dist``
    ``ddp`` or ``fsdp2``) the same launch, this process group's size per node.

    >>> resume_command("runs/a/config.json")
    'slimopt train --config runs/a/config.json --resume'
    """
    command = f"slimopt train --config {config_path} --resume"
    if dist == "none":
        return command
    world = parallel.world()[1]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    nodes = max(1, world // max(per_node, 1))
    if nodes == 1:
        return f"torchrun --nproc-per-node {per_node} -m {command}"
    return (
        f"torchrun --nnodes {nodes} --nproc-per-node {per_node} -m {command} (on every node, with "
        "the rendezvous options of the first launch)"
    )


def _finished(cfg: TrainConfig, run: RunDir) -> dict | None:
    """``final.json`` of a completed run in ``out`` that ``cfg`` asks to resume; None otherwise."""
    final = run.finished()
    if final is None:
        return None
    saved = read_json(run.path / "config.json")
    ignore = {"resume", "overwrite", "progress", "out", "cache_dir", "report_to", "save_model",
              "eval_every", "save_every", "keep_checkpoints", "log_every"}  # fmt: skip
    if isinstance(saved, dict):
        diffs = [f"{k}: run {saved.get(k)!r}, now {v!r}" for k, v in dataclasses.asdict(cfg).items()
                 if k not in ignore and k in saved and saved[k] != v]  # fmt: skip
        if diffs:
            raise RunDirError(
                f"{run.path} holds a finished run with other settings ({'; '.join(diffs)}); "
                "pass --overwrite to start over, or choose another --out directory"
            )
    run.log(f"{run.path} already finished at step {final.get('steps')}; nothing to do")
    return final


# ----------------------------------------------------------------------------- setup


# the JSON/Python types each annotated TrainConfig field takes (bool is no int here)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,),
    "tuple": (tuple, list),
}  # fmt: skip
MAX_SEED = 2**63 - 1


def _check_types(cfg: TrainConfig) -> None:
    """One line naming the field for a value of the wrong type (``"batch_size": true`` or
    ``"lr": "abc"`` in a config.json), before anything is written."""
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        annotation = str(f.type)
        optional = "None" in annotation
        if value is None:
            if optional:
                continue
            raise ConfigError(f"{f.name} must not be null (None); expected {annotation}")
        base = annotation.split("|")[0].split("[")[0].strip()
        allowed = _FIELD_TYPES.get(base)
        if allowed is None:
            continue
        ok = isinstance(value, allowed) and (base == "bool" or not isinstance(value, bool))
        if ok and base == "float" and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        if not ok:
            kind = {"int": "an integer", "float": "a number", "str": "a string",
                    "bool": "true or false", "dict": "a mapping", "tuple": "a list"}[base]  # fmt: skip
            raise ConfigError(f"{f.name} must be {kind}, got {value!r} ({type(value).__name__})")


def _check_config(cfg: TrainConfig, custom_optimizer: bool) -> None:

    _check_types(cfg)
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, 2**63 - 1], got {cfg.seed}")
    if cfg.out is not None and not cfg.out.strip():
        raise ConfigError("out is empty; name the run's directory (or leave it out for runs/...)")
    if "lr" in cfg.optimizer_args:
        raise ConfigError(
            "the learning rate is --lr (lr=...), not an optimizer override (--opt lr=...): "
            "--lr sets the preset's primary rule and scales its others"
        )
    for name in ("seq_len", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    for name in ("tokens", "max_steps", "vocab_size", "eval_tokens"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name in ("eval_every", "save_every"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {getattr(cfg, name)!r}")
    if cfg.tokens is not None and cfg.max_steps is not None:
        raise ConfigError("give the budget as tokens or as max_steps, not both")
    if not custom_optimizer:
        try:
            cfg.preset = check_preset(cfg.preset)  # "SAGE_hybrid" is sage-hybrid
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"lr must be a finite number > 0, got {cfg.lr!r}")
    if not (cfg.warmup >= 0 and math.isfinite(cfg.warmup)):
        raise ConfigError(f"warmup must be a finite number >= 0, got {cfg.warmup!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")
    if cfg.grad_clip is not None and not cfg.grad_clip >= 0:
        raise ConfigError(f"grad_clip must be >= 0, got {cfg.grad_clip!r}")
    choices = {"on_nonfinite": NONFINITE_MODES, "progress": PROGRESS_MODES,
               "precision": PRECISIONS, "dist": DIST_MODES, "report_to": REPORT_TO,
               "weights": WEIGHTS}  # fmt: skip
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(
                f"{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}"
            )
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume and overwrite contradict each other; choose one")
    if cfg.frequency_eval is not None:
        edges = cfg.frequency_eval
        if (
            isinstance(edges, (str, bytes))
            or not edges
            or not all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in edges)
            or list(edges) != sorted(set(edges))
        ):
            raise ConfigError(
                f"frequency_eval must be increasing positive token ranks such as (1000, 8000), "
                f"got {edges!r}"
            )
        if cfg.dist != "none":
            raise ConfigError("frequency_eval runs in one process; drop it or --dist")
        cfg.frequency_eval = tuple(edges)  # a list when read back from config.json
    if cfg.weights == "int8":  # slimopt.quant: updates during backward of pure-bf16 layers
        needs = {
            "precision bf16": cfg.precision == "bf16",
            "step_in_backward": cfg.step_in_backward,
            "dist none (FSDP2 and DDP do not shard or reduce int8 weights yet)": cfg.dist == "none",
        }
        missing = [what for what, ok in needs.items() if not ok]
        if missing:
            raise ConfigError(f"weights int8 needs {'; '.join(missing)}")
        if cfg.weights_block < 1:
            raise ConfigError(f"weights_block must be a positive integer, got {cfg.weights_block}")
    if cfg.step_in_backward:  # what cannot hold when each update is applied during backward
        clashes = {
            "grad_accum > 1 (gradient accumulation)": cfg.grad_accum > 1,
            f"grad_clip {cfg.grad_clip} (a global gradient-norm clip)": bool(cfg.grad_clip),
            "on_nonfinite 'skip' (the updates are applied before the loss is known to be finite)": (
                cfg.on_nonfinite == "skip"
            ),
            "a custom optimizer": custom_optimizer,
        }
        bad = [what for what, clash in clashes.items() if clash]
        if bad:
            raise ConfigError(f"step_in_backward cannot be combined with {'; '.join(bad)}")


def _schedule(cfg: TrainConfig) -> tuple[int, int, int]:
    """(tokens per step, steps, warm-up steps); a budget beyond :data:`MAX_STEPS` is refused."""
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    max_steps = cfg.max_steps or math.ceil((cfg.tokens or DEFAULT_TOKENS) / tokens_per_step)
    if max_steps > MAX_STEPS:

        def count(n: int) -> str:
            return f"{n:,}" if n < 10**15 else f"{n:.3g}"

        budget = f"max_steps {count(max_steps)}" if cfg.max_steps else (
            f"tokens {count(cfg.tokens or 0)} ({count(max_steps)} steps of "
            f"{tokens_per_step:,} tokens)"
        )  # fmt: skip
        raise ConfigError(f"{budget} is beyond the {MAX_STEPS:,} steps a run can take")
    warmup_steps = int(cfg.warmup * max_steps) if cfg.warmup < 1 else int(cfg.warmup)
    if warmup_steps > max_steps:
        raise ConfigError(
            f"warmup of {warmup_steps:,} steps is longer than the run's {max_steps:,} steps"
        )
    return tokens_per_step, max_steps, warmup_steps


def _out_path(cfg: TrainConfig) -> Path:
    if cfg.out is None:  # fixed once, so that every later use names the same directory
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.out = f"runs/{Path(cfg.model).stem}-{cfg.preset}-{stamp}"
    return Path(cfg.out)


def _check_launch(cfg: TrainConfig) -> None:
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


def _resolve_device(cfg: TrainConfig) -> tuple[torch.device, str]:
    if cfg.device == "auto" and cfg.dist != "none":
        device = parallel.setup_distributed().device  # one device per rank
    elif cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError as exc:
            raise ConfigError(f"device {cfg.device!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {cfg.device!r} asked for, but CUDA is not available")
        if cfg.dist != "none" and device.type == "cuda":
            device = parallel.setup_distributed().device
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    if precision in ("bf16", "bf16-mixed") and device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision {precision!r}: device {device} does not support bf16")
    return device, precision


def _autocast(device: torch.device, precision: str) -> Callable[[], Any]:
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _prepare_data(cfg: TrainConfig, default_vocab: int, log: Callable[[str], Any]):
    """Corpus, tokenizer and token shards; rank 0 fills the token cache before the others read it."""
    tok = data_mod.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    if tok is not None and cfg.vocab_size and data_mod.tokenizer_vocab_size(tok) != cfg.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.tokenizer} has {data_mod.tokenizer_vocab_size(tok)} tokens, "
            f"but vocab_size {cfg.vocab_size} was asked for; drop one of the two"
        )

    def prepare():
        vocab = cfg.vocab_size or default_vocab
        return data_mod.prepare_data(cfg.data, tokenizer=tok, vocab_size=vocab,
                                     cache_dir=cfg.cache_dir, log=log)  # fmt: skip

    main = parallel.world()[0] == 0
    failure: Exception | None = None
    if main:
        try:
            prepared = prepare()
        except Exception as exc:  # told to the other ranks, which would wait for it forever
            failure = exc
    told = parallel.broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if told is not None:
        raise ConfigError(f"rank 0 could not prepare the data: {told}")
    return prepared if main else prepare()


def _model_config(cfg: TrainConfig, shards: Any, corpus: Any) -> Any:
    for split in ("train", "valid"):
        if len(shards[split]) < cfg.seq_len + 1:
            raise ConfigError(
                f"seq_len {cfg.seq_len} is longer than the {split} split of {corpus.description} "
                f"({len(shards[split])} tokens); use a smaller seq_len or a larger corpus"
            )
    model_cfg = models.model_config(cfg.model, shards.vocab_size)
    max_pos = model_cfg.max_position_embeddings  # n_positions for GPT-2
    if cfg.seq_len > max_pos:
        if model_cfg.model_type != "llama":
            raise ConfigError(
                f"seq_len {cfg.seq_len} exceeds {cfg.model}'s {max_pos} learned positions"
            )
        model_cfg.max_position_embeddings = cfg.seq_len  # rotary positions extend freely
    if cfg.eval_tokens is not None and cfg.eval_tokens < cfg.seq_len + 1:
        raise ConfigError(
            f"eval_tokens {cfg.eval_tokens} is less than one evaluation sequence (seq_len + 1 = "
            f"{cfg.seq_len + 1} tokens): nothing would be evaluated"
        )
    return model_cfg


def _build_model(
    model_cfg: Any,
    device: torch.device,
    mode: str,
    precision: str = "fp32",
    ckpt: bool = False,
    *,
    weights: str = "auto",
    block: int = 256,
):
    """(the model as trained: wrapped for data parallelism; the bare model inside it; its number
    of parameters). Pure ``bf16`` builds the weights in bf16 directly (no fp32 copy); int8
    weights are built on the meta device, quantized, then allocated and initialized a block of
    rows at a time (no bf16 copy of the model)."""
    from transformers import AutoModelForCausalLM

    from slimopt import quant

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if weights == "int8":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_cfg, dtype=dtype)
        try:
            quant.quantize_weights(model, block=block)
        except quant.QuantError as exc:
            raise ConfigError(str(exc)) from None
        quant.materialize_(model, device)
    else:
        model = AutoModelForCausalLM.from_config(model_cfg, dtype=dtype).to(device)
    if ckpt:  # transformers 5 calls it activation_checkpointing_enable, older ones do not
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    model.train()
    n_params = models.parameter_count(model)
    model = parallel.wrap_model(model, mode)  # identical weights on every rank: same seed
    return model, parallel.unwrap(model), n_params


def _build_optimizer(cfg: TrainConfig, model: torch.nn.Module, core: torch.nn.Module, factory: Any):
    import slimopt

    try:
        if factory is not None:
            return factory(core)
        # updates during backward under DDP are applied from its buckets' communication hook,
        # which create_optimizer registers when given the DDP model (FSDP2 wraps in place)
        target = model if cfg.step_in_backward and cfg.dist == "ddp" else core
        return slimopt.create_optimizer(
            cfg.preset, target, lr=cfg.lr, step_in_backward=cfg.step_in_backward,
            **cfg.optimizer_args,
        )  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build the {cfg.preset!r} optimizer: {exc}") from exc


def _fingerprint(cfg, model_cfg, corpus, tok, max_steps, warmup_steps, precision) -> dict:
    """Everything that changes the sequence of losses; a checkpoint resumes only an equal run."""
    return {
        "model": {k: v for k, v in model_cfg.to_diff_dict().items() if k != "transformers_version"},
        "preset": cfg.preset, "lr": cfg.lr, "optimizer_args": cfg.optimizer_args,
        "corpus": corpus.key, "tokenizer": data_mod.tokenizer_hash(tok), "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "max_steps": max_steps,
        "warmup_steps": warmup_steps, "min_lr_ratio": cfg.min_lr_ratio,
        "grad_clip": cfg.grad_clip or None, "seed": cfg.seed, "precision": precision,
        "on_nonfinite": cfg.on_nonfinite, "step_in_backward": cfg.step_in_backward,
        # only int8 runs carry the key, so the fingerprints of earlier runs stay as they were
        **({"weights": f"int8/{cfg.weights_block}"} if cfg.weights == "int8" else {}),
    }  # fmt: skip


def _available_bytes(device: torch.device) -> int | None:
    """Memory this process can still take: free CUDA memory, or Linux's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            line = next(x for x in fh if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def _check_fits(cfg, planned: int | None, device: torch.device) -> None:
    """Refuse, before the first step, a run whose planned peak is far beyond the memory left
    (``--batch-size 1000000``): an allocation failure or the kernel's OOM killer later would
    say much less."""
    available = _available_bytes(device)
    if planned is None or available is None:
        return
    current = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    # the planner is within some 15-30% of measured peaks: refuse only a clear overflow
    if planned > 2 * (available + current):
        raise OutOfMemoryError(
            f"the planned peak of one step is {planned / 1e9:.1f} GB (slimopt memory), with "
            f"{available / 1e9:.1f} GB available on {device}; reduce --batch-size "
            f"({cfg.batch_size}) or --seq-len ({cfg.seq_len}), or use a lean mode "
            "(--precision bf16 --step-in-backward --grad-checkpointing)"
        )


def _raise_if_out_of_memory(exc, cfg, planned: int | None, device: torch.device) -> None:
    text = str(exc)
    if not (
        isinstance(exc, MemoryError)
        or "out of memory" in text.lower()
        or "not enough memory" in text.lower()
    ):
        return
    estimate = f" (the planner's peak: {planned / 1e9:.1f} GB)" if planned else ""
    raise OutOfMemoryError(
        f"out of memory on {device} in a training step{estimate}; reduce --batch-size "
        f"({cfg.batch_size}) or --seq-len ({cfg.seq_len}), or use a lean mode (--precision bf16 "
        "--step-in-backward --grad-checkpointing)"
    ) from exc


def _rss_bytes() -> int | None:
    """This process's resident set now (Linux), the baseline of the measured peak."""
    try:
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith("VmRSS:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def _plan_against_peak(planned: int | None, measured: int | None) -> dict:
    """``planned_over_measured`` (the planner's one-step peak over the measured one above the
    process's baseline: this rank's, rank 0's in ``final.json``, under a distributed run) and,
    where it is outside 0.85-1.15, a note saying so: the plan covers one training step, while the
    measured peak also holds what this process keeps around the steps (batches, evaluation, its
    runtime), which at small sizes is a large share of the whole, so the plan there is a band,
    not a figure."""
    if not planned or not measured:
        return {}
    ratio = planned / measured
    out: dict = {"planned_over_measured": round(ratio, 3)}
    if not 0.85 <= ratio <= 1.15:
        side = "under" if ratio < 1 else "over"
        note = (
            f"the plan is {abs(1 - ratio):.0%} {side} the measured peak "
            f"({planned / 1e6:.0f} MB planned, {measured / 1e6:.0f} MB measured)"
        )
        if side == "under":
            note += (
                ": it covers one training step, not what the process holds around the steps "
                "(batches, evaluation, runtime), which dominates at this size; read the plan as "
                "a lower band here"
            )
        out["planned_peak_note"] = note
    return out


def _planned_peak(cfg, model_cfg, precision, device, factory) -> int | None:
    """The planner's peak for this run's model, preset, precision and mode (slimopt.planner),
    for the comparison in final.json; None for a custom optimizer or a model it cannot plan."""
    if factory is not None:
        return None
    from slimopt.planner import plan_model

    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        meta = AutoModelForCausalLM.from_config(model_cfg, dtype=dtype)
        if cfg.weights == "int8":
            from slimopt import quant

            quant.quantize_weights(meta, block=cfg.weights_block)
    world_size = parallel.world()[1]
    try:
        return plan_model(
            meta, cfg.preset, name=cfg.model, precision=precision,
            step_in_backward=cfg.step_in_backward, grad_checkpointing=cfg.grad_checkpointing,
            batch_size=max(1, cfg.batch_size // world_size), seq_len=cfg.seq_len,
            device=device.type, dist=cfg.dist, world_size=world_size,
            returns_freed_memory=False if cfg.keep_freed_memory else None,
        ).total_bytes  # fmt: skip
    except ValueError:
        return None


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
