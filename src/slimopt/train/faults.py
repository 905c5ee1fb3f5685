"""What a run does when the world misbehaves: signals, a second process, a full or read-only disk.

- :class:`StopSignals` turns SIGTERM (``timeout``, job schedulers, ``docker stop``) and SIGINT
  (Ctrl-C) into a request the loop honours at the next step boundary: it saves a checkpoint and
  raises :class:`Interrupted`, whose message names the command that resumes the run. A second
  Ctrl-C stops at once (``KeyboardInterrupt``).
- :class:`RunLock` makes a run directory one process's: a second ``train`` on the same ``out``
  gets a :class:`RunLockedError` naming the process that holds it.
- :func:`output_error` turns an ``OSError`` on the run directory into one line naming the path and
  the reason (disk full, read-only, permission denied).

>>> import tempfile
>>> run = tempfile.mkdtemp()
>>> with RunLock(run):
...     RunLock(run).acquire()
Traceback (most recent call last):
...
slimopt.train.faults.RunLockedError: ... is in use by pid ...
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

LOCK_FILE = ".train.lock"


class Interrupted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class RunLockedError(RuntimeError):
    """Another process is training in the same run directory."""


class OutputError(RuntimeError):
    """The run directory cannot be written (full, read-only, no permission)."""


def output_error(exc: OSError, out: Path) -> OSError | OutputError:
    """A one-line :class:`OutputError` for an ``OSError`` on the run directory ``out``, naming the
    path, the reason and the newest checkpoint (which a failed write leaves intact); ``exc``
    itself when it concerns a path outside ``out``."""
    from slimopt.train.checkpoint import newest_checkpoint

    path = exc.filename or out
    try:
        inside = Path(os.path.abspath(path)).is_relative_to(os.path.abspath(out))
    except (TypeError, ValueError):
        inside = False
    if not inside:
        return exc
    reason = exc.strerror or str(exc)
    kept = newest_checkpoint(out)
    saved = f"; the newest checkpoint, {kept}, is intact" if kept else ""
    return OutputError(f"cannot write {path}: {reason}{saved}")


class StopSignals:
    """While active, SIGTERM and SIGINT set ``received`` instead of killing the process.

    Only the main thread can install signal handlers; elsewhere this does nothing (the signals keep
    their old behaviour), as it does for a signal the process was started ignoring. The previous
    handlers are restored on exit.

    >>> with StopSignals() as stop:
    ...     os.kill(os.getpid(), signal.SIGTERM)
    ...     stop.received == signal.SIGTERM
    True
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is signal.SIG_IGN:  # ignored by whoever started us (nohup)
                    continue
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class RaiseOnSignal(StopSignals):
    """While active, SIGTERM and SIGINT raise :class:`Interrupted` with ``message`` (for the phases
    that have no step boundary to stop at: preparing the data, the final evaluation), so that
    ``finally`` clauses clean up and the command says what happened instead of dying silently.
    Main thread only, as :class:`StopSignals`.

    >>> with RaiseOnSignal("while testing") :  # doctest: +SKIP
    ...     os.kill(os.getpid(), signal.SIGTERM)
    Traceback (most recent call last):
    Interrupted: SIGTERM received while testing
    """

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        raise Interrupted(f"{signal.Signals(signum).name} received {self.message}", signum)


class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``DIR/.train.lock``, released when the
    process ends, however it ends). The file names the holder: pid, host and start time."""

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.path = Path(run_dir) / LOCK_FILE
        self._fh: Any = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): nothing to hold
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunLockedError(
                f"{self.path.parent} is in use by {holder}; wait for that run to finish, stop it, "
                "or choose another out directory"
            ) from None
        fh.seek(0)
        fh.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file releases the flock
            self._fh = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
