"""A run's directory and what it reports: files, metrics, progress, TensorBoard, the saved model.

:class:`RunDir` owns ``out`` for the length of a run: it refuses a directory that holds another
run (unless resuming or overwriting), locks it against a second process, and writes the run's
files; rank 0 alone writes, every other rank's calls do nothing, so the loop calls them
unconditionally.

>>> import tempfile
>>> with RunDir(tempfile.mkdtemp(), resume=False, overwrite=False, progress="none") as run:
...     run.record({"step": 1, "loss": 2.5})
...     run.read_rows()
[{'step': 1, 'loss': 2.5}]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimopt.train import checkpoint as ckpt
from slimopt.train import parallel
from slimopt.train.faults import RunLock

RUN_FILES = ("final.json", "metrics.jsonl", "config.json", "tokenizer.json")
# the config and generation-config fields that name the special tokens of an exported model
_SPECIAL_IDS = ("eos_token_id", "bos_token_id", "pad_token_id")
MODEL_DIR = "model"
TENSORBOARD_DIR = "tensorboard"


class RunDirError(ValueError):
    """The run directory holds a run that this one must not touch."""


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON, atomically (a temporary file renamed over ``path``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_ppl(ppl: float) -> str:
    """A perplexity for people: two decimals, or three significant digits when it is huge."""
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.3g}"


class Progress:
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


def _tensorboard_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RunDirError(
            'report_to="tensorboard" needs the tensorboard package: '
            'pip install "slimopt[tensorboard]"'
        ) from exc
    return SummaryWriter(str(path))


class RunDir:
    """The run directory of one training run (see the module docstring).

    Args:
        out: the directory.
        resume: continue the run there; ``overwrite``: replace it; neither: refuse one that holds
            a run.
        progress: ``auto``, ``bar``, ``log`` or ``none`` (rank 0 only; other ranks are silent).
        callback: called with every row :meth:`record` writes.
        report_to: ``"none"`` or ``"tensorboard"`` (rows also go to ``out/tensorboard``).
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        resume: bool,
        overwrite: bool,
        progress: str = "auto",
        callback: Callable[[dict], Any] | None = None,
        report_to: str = "none",
    ):
        self.path = Path(out)
        self.main = parallel.world()[0] == 0
        self.resume, self.overwrite = resume, overwrite
        self.progress = Progress(progress if self.main else "none")
        self.log = self.progress.log
        self.callback = callback
        self.report_to = report_to
        self._lock = RunLock(self.path)
        self._metrics: Any = None
        self._tensorboard: Any = None

    # --- opening and closing: rank 0 checks, locks and clears; the others learn the outcome

    def __enter__(self) -> RunDir:
        error = None
        if self.main:
            try:
                self._open()
            except (RunDirError, OSError, RuntimeError) as exc:
                error = exc
        failure = parallel.broadcast_object(None if error is None else str(error))
        if error is not None:
            self.close()
            raise error
        if failure is not None:
            raise RunDirError(f"rank 0: {failure}")
        return self

    def _open(self) -> None:
        previous = ckpt.checkpoint_dir(self.path).exists() or any(
            (self.path / f).exists() for f in RUN_FILES
        )
        if previous and not (self.resume or self.overwrite):
            raise RunDirError(
                f"{self.path} already holds a run; pass --resume to continue it or --overwrite "
                "to start over"
            )
        self._lock.acquire()  # before anything is changed: a second process stops here
        if self.overwrite:
            shutil.rmtree(ckpt.checkpoint_dir(self.path), ignore_errors=True)
            shutil.rmtree(self.path / MODEL_DIR, ignore_errors=True)
            shutil.rmtree(self.path / TENSORBOARD_DIR, ignore_errors=True)
            for f in RUN_FILES:
                (self.path / f).unlink(missing_ok=True)
        if self.report_to == "tensorboard":
            self._tensorboard = _tensorboard_writer(self.path / TENSORBOARD_DIR)

    def start_metrics(self, keep_until: int | None) -> None:
        """Open ``metrics.jsonl`` for appending, keeping the rows up to step ``keep_until`` (the
        checkpoint a resumed run restarts from; None = none)."""
        if not self.main:
            return
        path = self.path / "metrics.jsonl"
        rows = self.read_rows() if keep_until is not None else []
        kept = [r for r in rows if r.get("step", 0) <= keep_until] if rows else []
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._metrics = open(path, "a")

    def close(self) -> None:
        self.progress.close()
        for handle in (self._metrics, self._tensorboard):
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass
        self._metrics = self._tensorboard = None
        self._lock.release()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading and writing

    def finished(self) -> dict[str, Any] | None:
        """``final.json`` of a run that completed in this directory (rank 0's view), or None."""
        final = read_json(self.path / "final.json") if self.main else None
        final = parallel.broadcast_object(final)
        return final if isinstance(final, dict) and final.get("status") == "completed" else None

    def read_rows(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``; a last line cut by a kill (no newline, not JSON) is
        dropped, as a torn checkpoint is; a damaged line before the last is an error naming it."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                if number == len(lines):
                    self.log(f"warning: {path} ends in a cut line (a killed run); dropped it")
                    continue
                raise RunDirError(
                    f"{path}: line {number} is not a JSON row; fix or remove it, or pass "
                    "--overwrite to start over"
                )
            rows.append(row)
        return rows

    def record(self, row: dict[str, Any]) -> None:
        """Append ``row`` to ``metrics.jsonl`` (and TensorBoard), then call the callback."""
        if not self.main:
            return
        if self._metrics is None:
            self._metrics = open(self.path / "metrics.jsonl", "a")
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._tensorboard is not None:
            kind = "eval" if "val_loss" in row else "train"
            for key, value in row.items():
                if key not in ("step", "tokens") and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"{kind}/{key}", value, row["step"])
            self._tensorboard.flush()
        if self.callback is not None:
            self.callback(row)

    def write_json(self, name: str, obj: Any) -> None:
        if self.main:
            write_json(self.path / name, obj)

    def _hf_tokenizer(self, core: Any) -> Any:
        """The run's ``tokenizer.json`` as a ``PreTrainedTokenizerFast`` whose eos, bos and pad
        are the token that separates the training documents (None without a tokenizer file)."""
        path = self.path / "tokenizer.json"
        if not path.is_file():
            return None
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        from slimopt.train.data import eot_id

        tok = Tokenizer.from_file(str(path))
        end = eot_id(tok)
        special = {}
        if end is not None:
            token = tok.id_to_token(end)
            special = {"eos_token": token, "bos_token": token, "pad_token": token}
        limit = getattr(core.config, "max_position_embeddings", None) or getattr(
            core.config, "n_positions", None
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, model_max_length=limit or int(1e30), **special
        )

    def save_tokenizer(self, tok: Any) -> None:
        if self.main:
            tok.save(str(self.path / "tokenizer.json"))

    def save_model(self, model: Any) -> None:
        """The trained model as ``out/model``, ready for ``transformers``: ``save_pretrained``
        with ``use_cache`` on and the end-of-text token as ``eos``/``bos``/``pad`` in its config
        and generation config, and the tokenizer beside it (``tokenizer.json`` and a
        ``tokenizer_config.json`` naming the same tokens), so that ``AutoTokenizer``,
        ``AutoModelForCausalLM`` and ``pipeline("text-generation")`` load it and ``generate``
        stops at the end of a document. Every rank calls this (FSDP2 gathers the shards); rank 0
        writes."""
        state = parallel.full_state_dict(model)
        if not self.main:
            return
        target = self.path / MODEL_DIR
        tmp = self.path / f".{MODEL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        from transformers.utils import logging as hf_logging

        core = parallel.unwrap(model)
        from slimopt.quant import dequantized_state_dict

        state = dequantized_state_dict(core, state)  # int8 layers: an ordinary bf16 model
        tokenizer = self._hf_tokenizer(core)
        eot = None if tokenizer is None else tokenizer.eos_token_id
        config, generation = core.config, getattr(core, "generation_config", None)
        targets = [(config, "use_cache", True)]  # off while training; generation wants it
        if eot is not None:
            targets += [(c, key, eot) for c in (config, generation) if c is not None
                         for key in _SPECIAL_IDS]  # fmt: skip
        before = [(c, key, getattr(c, key, None)) for c, key, _ in targets]
        for c, key, value in targets:
            setattr(c, key, value)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one small write; the run's own log says enough
        try:
            core.save_pretrained(str(tmp), state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        finally:
            if bar:
                hf_logging.enable_progress_bar()
            for c, key, value in before:  # the training model is left as it was
                setattr(c, key, value)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
