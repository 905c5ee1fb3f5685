"""``slimopt train``: the command-line face of :func:`slimopt.train.loop.train`.

Every flag is a :class:`~slimopt.train.loop.TrainConfig` field with dashes; ``--opt KEY=VALUE``
passes a hyperparameter override to ``slimopt.create_optimizer`` (``--opt weight_decay=0.1``,
``--opt sinkgd_lr=5e-4``).

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_arguments(parser)
>>> config_from_args(parser.parse_args(["--preset", "adamw", "--opt", "weight_decay=0.1"])).optimizer_args
{'weight_decay': 0.1}
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
from typing import Any

from slimopt.train.models import MODEL_NAMES

_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def _positive_int(text: str) -> int:
    """Non-negative integers, also written 1e6, 1_000_000, 250k or 1.5M."""
    s = text.strip().lower().replace("_", "").replace(",", "")
    mult = _SUFFIXES.get(s[-1:], 1)
    if s[-1:] in _SUFFIXES:
        s = s[:-1]
    try:
        value = float(s) * mult if ("e" in s or "." in s or mult != 1) else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer (e.g. 250000, 250k, 1.5M, 2e6), got {text!r}"
        ) from None
    if value != value or value in (float("inf"), float("-inf")) or value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative whole number, got {text!r}")
    return int(value)


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare word stays a string
    return key.strip(), parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``slimopt train`` flags to ``parser``."""
    import slimopt
    from slimopt.train.loop import (
        DEFAULT_TOKENS,
        DIST_MODES,
        NONFINITE_MODES,
        PRECISIONS,
        PROGRESS_MODES,
        REPORT_TO,
    )
    from slimopt.train.loop import TrainConfig as C

    d = C()
    parser.add_argument(
        "--config",
        metavar="DIR/config.json",
        help="rerun a recorded run: its config.json sets every flag, flags given here override",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the final summary as JSON on stdout"
    )
    m = parser.add_argument_group("model and optimizer")
    m.add_argument(
        "--model", default=d.model, help=f"one of {', '.join(MODEL_NAMES)} (default: %(default)s)"
    )
    m.add_argument(
        "--model-config", metavar="FILE.json", help="a transformers config.json instead of --model"
    )
    m.add_argument(
        "--preset",
        default=d.preset,
        help=f"one of {', '.join(slimopt.PRESETS)} (default: %(default)s)",
    )
    m.add_argument(
        "--lr", type=float, help="peak lr of the preset's primary rule (default: the preset's)"
    )
    m.add_argument(
        "--opt",
        action="append",
        type=_override,
        default=[],
        metavar="KEY=VALUE",
        help="create_optimizer override, e.g. weight_decay=0.1 or sinkgd_lr=5e-4 (repeatable)",
    )

    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        default=d.data,
        help="stdlib (default), stdlib:PREFIX[,PREFIX], a directory with train/valid "
        ".txt[.xz], a text file, or hf:NAME[:CONFIG]",
    )
    g.add_argument(
        "--tokenizer", metavar="tokenizer.json", help="use this tokenizer instead of training one"
    )
    g.add_argument(
        "--vocab-size",
        type=_positive_int,
        help="BPE vocabulary to train (default: the model's; 8192 for llama-tiny)",
    )
    g.add_argument(
        "--seq-len", type=_positive_int, default=d.seq_len, help="(default: %(default)s)"
    )
    g.add_argument(
        "--frequency-eval",
        type=_ranks,
        metavar="R1,R2",
        help="report the final validation loss per bucket of training frequency cut at these "
        "token ranks (e.g. 1000,8000), and the share of embedding rows with a gradient per step",
    )
    g.add_argument("--cache-dir", help="token cache (default: $SLIMOPT_CACHE or ~/.cache/slimopt)")

    t = parser.add_argument_group("schedule")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument(
        "--tokens", type=_positive_int, help=f"training tokens (default: {DEFAULT_TOKENS:,})"
    )
    budget.add_argument("--max-steps", type=_positive_int, help="or optimizer steps")
    t.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help="sequences per micro-batch (default: %(default)s)",
    )
    t.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=d.grad_accum,
        help="micro-batches per step (default: %(default)s)",
    )
    t.add_argument(
        "--warmup",
        type=float,
        default=d.warmup,
        help="warm-up: a fraction of the steps if < 1, else steps (default: %(default)s)",
    )
    t.add_argument(
        "--min-lr-ratio",
        type=float,
        default=d.min_lr_ratio,
        help="cosine floor as a fraction of the peak (default: %(default)s)",
    )
    t.add_argument("--grad-clip", type=float, help="clip the global gradient norm (default: off)")
    t.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    t.add_argument("--device", default=d.device, help="auto (default), cpu, cuda, cuda:1 ...")
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="auto = bf16-mixed on CUDA, fp32 on CPU; bf16-mixed = fp32 weights with bf16 "
        "autocast; bf16 = pure bf16 weights and state, updates rounded stochastically",
    )
    t.add_argument(
        "--step-in-backward",
        action="store_true",
        help="apply each parameter's update during backward and free its gradient at once "
        "(not with --grad-accum > 1, --grad-clip, --dist)",
    )
    t.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="activation checkpointing through the model's own gradient_checkpointing_enable",
    )
    t.add_argument(
        "--weights",
        choices=("auto", "int8"),
        default=d.weights,
        help="auto: weights in the precision's dtype; int8: the linear layers' weights as int8 "
        "codes with per-block scales, rounded stochastically (needs --precision bf16 "
        "--step-in-backward; the embedding, head and norms stay bf16)",
    )
    t.add_argument(
        "--weights-block",
        type=_positive_int,
        default=d.weights_block,
        help="int8 weights: elements of a row that share a scale (default: %(default)s)",
    )
    t.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="in the lean modes on CPU, leave the C allocator as it is: steps about twice as "
        "fast, a peak RSS several hundred MB higher at llama-1b (by default freed buffers of "
        "1 MB and more go back to the OS)",
    )
    t.add_argument(
        "--dist",
        choices=DIST_MODES,
        default=d.dist,
        help="none (default): one process; ddp or fsdp2: data-parallel under torchrun, "
        "--batch-size is then the global batch",
    )
    t.add_argument(
        "--on-nonfinite",
        choices=NONFINITE_MODES,
        default=d.on_nonfinite,
        help="stop (default): stop at a NaN/inf loss; skip: skip such steps and count them",
    )

    o = parser.add_argument_group("evaluation, checkpoints and output")
    o.add_argument(
        "--eval-every",
        type=_positive_int,
        default=d.eval_every,
        help="steps between evaluations, 0 = only at the end (default: %(default)s)",
    )
    o.add_argument(
        "--eval-tokens",
        type=_positive_int,
        help="evaluate on the first N validation tokens (default: all)",
    )
    o.add_argument(
        "--save-every",
        type=_positive_int,
        default=d.save_every,
        help="steps between checkpoints, 0 = none (default: %(default)s)",
    )
    o.add_argument(
        "--keep-checkpoints",
        type=_positive_int,
        default=d.keep_checkpoints,
        help="how many of the newest checkpoints to keep (default: %(default)s)",
    )
    o.add_argument(
        "--no-save-model",
        dest="save_model",
        action="store_false",
        help="do not save the trained model to DIR/model (save_pretrained)",
    )
    o.add_argument(
        "--report-to",
        choices=REPORT_TO,
        default=d.report_to,
        help="also log metrics to DIR/tensorboard (needs tensorboard installed)",
    )
    o.add_argument("--out", help="run directory (default: runs/MODEL-PRESET-TIMESTAMP)")
    runmode = o.add_mutually_exclusive_group()
    runmode.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    runmode.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    o.add_argument(
        "--log-every", type=_positive_int, default=d.log_every, help="(default: %(default)s)"
    )
    o.add_argument("--progress", choices=PROGRESS_MODES, default=d.progress, help="auto: a bar on a terminal, log lines otherwise")  # fmt: skip
    _mark_given(parser)


class _Given(argparse.Action):
    """Wraps a flag's action to record, in ``namespace._given``, that the flag was typed: with
    ``--config`` a typed flag overrides the recorded setting even when its value equals the
    default (which a comparison with the default cannot tell)."""

    def __init__(self, inner: argparse.Action) -> None:
        self.inner = inner
        super().__init__(inner.option_strings, inner.dest, nargs=inner.nargs, const=inner.const,
                         default=inner.default, type=inner.type, choices=inner.choices,
                         required=inner.required, help=inner.help, metavar=inner.metavar)  # fmt: skip

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        self.inner(parser, namespace, values, option_string)
        given = set(getattr(namespace, "_given", set()))
        given.add(self.dest)
        namespace._given = given


def _mark_given(parser: argparse.ArgumentParser) -> None:
    for i, action in enumerate(parser._actions):
        if action.option_strings and not isinstance(action, (argparse._HelpAction, _Given)):
            wrapped = _Given(action)
            parser._actions[i] = wrapped
            for opt in action.option_strings:
                parser._option_string_actions[opt] = wrapped
            for group in [*parser._action_groups, *parser._mutually_exclusive_groups]:
                group._group_actions[:] = [
                    wrapped if a is action else a for a in group._group_actions
                ]


def _ranks(text: str) -> tuple[int, ...]:
    """``1000,8000`` or ``1k,8k`` as increasing positive token ranks."""
    ranks = tuple(_positive_int(x) for x in text.split(","))
    if any(r < 1 for r in ranks) or list(ranks) != sorted(set(ranks)):
        raise argparse.ArgumentTypeError(f"ranks must increase and be >= 1, got {text!r}")
    return ranks


def _recorded(path: str) -> dict[str, Any]:
    """The settings a ``config.json`` written by ``slimopt train`` records."""
    import json

    from slimopt.train.loop import ConfigError, TrainConfig

    try:
        saved = json.loads(open(path).read())
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"--config {path} is not valid JSON: {exc}") from exc
    if not isinstance(saved, dict):
        raise ConfigError(f"--config {path} does not hold a JSON object of settings")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - names - {"resolved"})
    if unknown:
        raise ConfigError(f"--config {path} has unknown settings: {', '.join(unknown)}")
    return {k: v for k, v in saved.items() if k in names}


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None):
    """The :class:`TrainConfig` that the parsed flags describe. With ``--config`` the recorded
    settings come first and every flag typed on the command line overrides them (also one whose
    value equals the default)."""
    from slimopt.train.loop import TrainConfig

    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    values["optimizer_args"] = dict(args.opt)
    if args.model_config:
        values["model"] = args.model_config
    if getattr(args, "config", None):
        typed = set(getattr(args, "_given", set()))
        if "opt" in typed:
            typed.add("optimizer_args")
        if "model_config" in typed:
            typed.add("model")
        given = {k: v for k, v in values.items() if k in typed}
        recorded = _recorded(args.config)
        recorded.pop("resume", None), recorded.pop("overwrite", None)  # this command's choice
        if "tokens" in given or "max_steps" in given:  # a new budget replaces the recorded one
            recorded.pop("tokens", None), recorded.pop("max_steps", None)
        values = {**recorded, **given}
    return TrainConfig(**values)


def _main_rank() -> bool:
    """Whether this process speaks for the run: rank 0 under ``torchrun``, or the only one."""
    return os.environ.get("RANK", "0") == "0"


def run(args: argparse.Namespace) -> int:
    """Train, print the validation perplexity (or ``--json`` the summary); a clear one-line error
    (exit status 2) for bad input, 1 for a run that diverged or cannot write its directory, 130
    or 143 after saving on SIGINT or SIGTERM."""
    import json

    from slimopt.train.checkpoint import CheckpointError, CheckpointWriteError
    from slimopt.train.data import DataError
    from slimopt.train.faults import Interrupted, OutputError, RunLockedError
    from slimopt.train.loop import ConfigError, NonFiniteLossError, train
    from slimopt.train.models import ModelConfigError
    from slimopt.train.outputs import RunDirError, format_ppl

    bad_input = (ConfigError, DataError, ModelConfigError, CheckpointError, RunDirError,
                 RunLockedError)  # fmt: skip
    try:
        result = train(config_from_args(args))
    except (OutputError, CheckpointWriteError) as exc:
        print(f"slimopt train: error: {exc}", file=sys.stderr)
        return 1
    except bad_input as exc:
        print(f"slimopt train: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"slimopt train: stopped: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        if _main_rank():  # every rank stops; one says how to continue
            print(f"slimopt train: stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        if _main_rank():
            cfg_out = getattr(args, "out", None) or "the run's directory (printed at its start)"
            print(
                f"slimopt train: interrupted (a second Ctrl-C) without saving this step; "
                f"continue from the last checkpoint with: slimopt train --resume --out {cfg_out}",
                file=sys.stderr,
            )
        return 130
    if not _main_rank():  # under torchrun, rank 0 speaks for the run
        return 0
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(
        f"validation loss {result['val_loss']:.4f}, perplexity {format_ppl(result['val_ppl'])} "
        f"({result['eval_tokens']:,} tokens) after {result['tokens_seen']:,} training tokens "
        f"in {result['wall_time_s']:.0f}s; results in {result['out']}"
    )
    return 0
