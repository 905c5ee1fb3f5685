"""Optional dependencies: which ``pip install "slimopt[...]"`` extra provides which module.

The core library (optimizers, roles, presets, memory) needs only torch. The harness, the plots,
the Hugging Face datasets, the baselines and the GPU kernels come with extras; code that needs one
calls :func:`require` where it imports the module, so a missing extra is one clear line instead of
a traceback:

    this needs transformers: pip install "slimopt[train]"

Example:
    >>> from slimopt._extras import extra_of, require
    >>> extra_of("matplotlib")
    'bench'
    >>> require("json").__name__  # any importable module is returned as imported
    'json'
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

# top-level module -> the extra that installs it (the keys of [project.optional-dependencies])
EXTRA_OF: dict[str, str] = {
    "transformers": "train",
    "tokenizers": "train",
    "numpy": "train",
    "tqdm": "train",
    "matplotlib": "bench",
    "datasets": "hf",
    "adam_mini": "baselines",
    "apollo_torch": "baselines",
    "galore_torch": "baselines",
    "prodigyopt": "baselines",
    "triton": "gpu",
    "tensorboard": "tensorboard",
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def extra_of(module: str) -> str | None:
    """The extra that installs ``module`` (its top-level package), or None if none does."""
    return EXTRA_OF.get(module.partition(".")[0])


def install_hint(modules: Iterable[str], extra: str | None = None) -> str:
    """``this needs transformers, numpy: pip install "slimopt[train]"`` for the given modules."""
    names = list(dict.fromkeys(modules))
    extras = [extra] if extra else list(dict.fromkeys(e for m in names if (e := extra_of(m))))
    if not extras:
        return f"this needs {', '.join(names)}: pip install {' '.join(names)}"
    return f'this needs {", ".join(names)}: pip install "slimopt[{",".join(extras)}]"'


def missing_extra_error(exc: ModuleNotFoundError) -> MissingExtraError | None:
    """The one-line error for a raw ``ModuleNotFoundError`` of a module an extra installs."""
    name = getattr(exc, "name", None) or ""
    if isinstance(exc, MissingExtraError):
        return exc
    if extra_of(name) is None:
        return None
    top = name.partition(".")[0]
    return MissingExtraError(install_hint([top]), name=top)


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra to install.

    Args:
        module: a dotted module name, e.g. ``"transformers"`` or ``"matplotlib.pyplot"``.
        extra: the extra to name in the error; by default looked up in :data:`EXTRA_OF`.

    Only the absence of ``module`` itself (or its top-level package) becomes the one-line
    error; an import that fails further down (a broken install) propagates unchanged.

    Example:
        >>> from slimopt._extras import MissingExtraError, require
        >>> try:
        ...     require("no_such_module_xyz", "train")
        ... except MissingExtraError as exc:
        ...     print(exc)
        this needs no_such_module_xyz: pip install "slimopt[train]"
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        if exc.name not in (module, top):
            raise
        raise MissingExtraError(install_hint([top], extra), name=top) from None


def check_installed(modules: Iterable[str]) -> None:
    """Raise one :class:`MissingExtraError` naming every missing module of ``modules`` and the
    extras that install them, without importing the ones that are present."""
    missing = [m for m in modules if not _findable(m)]
    if missing:
        raise MissingExtraError(install_hint(missing), name=missing[0])


def _findable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


__all__ = [
    "EXTRA_OF",
    "MissingExtraError",
    "check_installed",
    "extra_of",
    "install_hint",
    "missing_extra_error",
    "require",
]
