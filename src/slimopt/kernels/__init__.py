"""The fused tiers of the update rules, as real source files with loaders.

- :mod:`slimopt.kernels.cpu`: native C loops (``native/slimopt_cpu.c``) for float32/float64 CPU
  tensors, built once with the system C compiler and cached on disk.
- ``slimopt.kernels.triton_ops``: Triton kernels for CUDA tensors (one ``<rule>_step`` per rule),
  used only where ``triton`` imports.

Nothing here is imported until a rule asks for its fused tier, so the library needs only torch.
A missing backend is reported once, by name, and the rules fall back to their multi-tensor path.

Example:
    >>> from slimopt.kernels import triton_step
    >>> triton_step("no_such_rule") is None
    True
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

_triton_failed: str | None = None
# frames in these directories are never "the user's line" of a warning
_INTERNAL_DIRS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by this function's caller point at the
    first frame outside slimopt and torch: the user's line (``optimizer.step()``, the
    ``create_optimizer`` call) whatever path inside the library led there."""
    frame = sys._getframe(1)  # the caller of warnings.warn: stacklevel 1
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _INTERNAL_DIRS
    ):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 1


def triton_step(rule: str) -> Callable[..., Any] | None:
    """``slimopt.kernels.triton_ops.<rule>_step`` when ``triton`` and that module import and
    define it; None otherwise (one warning when triton is installed but the module fails). The
    rule's loader (:func:`slimopt.algorithms.base.triton_cuda`) puts the step behind its
    first-use self-check against the rule's reference (:mod:`slimopt.algorithms.kernel_check`)."""
    global _triton_failed
    if _triton_failed is not None:
        return None
    try:
        importlib.import_module("triton")
    except ImportError:
        _triton_failed = "triton is not installed"
        return None
    try:
        ops = importlib.import_module("slimopt.kernels.triton_ops")
    except ModuleNotFoundError as exc:
        if exc.name != "slimopt.kernels.triton_ops":
            raise
        _triton_failed = "slimopt.kernels.triton_ops is absent"
        return None
    except Exception as exc:  # noqa: BLE001 - a broken backend falls back with a warning
        _triton_failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        warnings.warn(
            f"slimopt: the Triton kernels are unavailable ({_triton_failed}); "
            "the rules use their multi-tensor path on CUDA",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return None
    return getattr(ops, f"{rule}_step", None)


__all__ = ["triton_step", "user_stacklevel"]
