"""The native CPU tier: loops in ``native/slimopt_cpu.c`` that read each tensor once and write it once.

``torch``'s multi-tensor kernels run a rule as several passes over memory, and SinkGD's iterations
alternate a reduction over rows with one over columns, which eager torch (through G*G and batched
mat-vecs) turns into two or more passes per iteration. The C loops:

- SinkGD: one pass per Sinkhorn iteration (for each row: ``q_i = sum_j G_ij**2 c_j**2``, the row
  scale, and at once ``r_i**2 G_ij**2`` added to the column sums; row in L1), then one pass
  ``p -= lr * G * r * c``. The matrix is read ``iters + 1`` times and never copied.
- SCALE: a row's momentum, RMS and update in one pass; the column-normalized embedding's update
  given its column denominators; column sums of ``G**2`` or ``|G|`` (SAGE's statistic too).
- SGD-SaI (after its first step), Lion and SAGE's update: one pass each.

float32/float64 contiguous CPU tensors only. The source is compiled with the system C compiler
(``cc``, or ``$CC``) with ``-march=native`` and ``-fopenmp`` into ``<cache>/kernels/native-<key>.so`` once, where
``<cache>`` is ``$SLIMOPT_CACHE``, else ``$XDG_CACHE_HOME/slimopt`` or ``~/.cache/slimopt``, and
``<key>`` hashes the source, the compiler's identity (``cc --version``), the flags and the CPU's
features (``/proc/cpuinfo`` flags), so a cache shared by two machines never hands one a library
built for the other's instruction set. Later processes load the cached library; an empty or
unloadable cached file is rebuilt. ``SLIMOPT_NO_NATIVE=1`` turns the native tier off (the rules
then run their multi-tensor path; ``fused=True`` names the variable in its error). Without a
working compiler :func:`library` returns None after one warning naming what is missing (raised at
the caller's line, not inside slimopt), and the rules run their multi-tensor path.

Threads: each loop splits a large tensor over ``torch.get_num_threads()`` threads with OpenMP,
in the OpenMP runtime torch itself loaded (``libgomp.so.1``), so the loops and torch's own
kernels share one pool of threads instead of competing for the cores; the blocks are fixed and
their partial sums combined in order, so the result does not depend on the thread count. A
compiler without OpenMP builds single-threaded loops (:func:`threaded` says which); a torch built
with another OpenMP runtime (Intel's ``libiomp5``) leaves the loops a pool of their own.

Example:
    >>> import torch
    >>> from slimopt.kernels import cpu
    >>> G = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    >>> cpu.column_sums(G, square=True) if cpu.library() else (G * G).sum(0)
    tensor([10., 20.])
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimopt.rounding import Rounding

SOURCE = Path(__file__).with_name("native") / "slimopt_cpu.c"

# Entry points and their argument types: p = pointer, i = int64, T = the float type of the
# variant (f32: float, f64: double), b = int flag; the last letter is the return type
# (v = void, b = int status).
SIGNATURES: dict[str, str] = {
    "sinkgd_full": "ppiiiTT>b",
    "scale_rows": "pppiiTTTT>v",
    "scale_cols": "ppiipT>v",
    "sgd_sai": "pppiTTTT>v",
    "lion": "pppiTTTTTT>v",
    "sage": "ppppiiTTTTTTb>v",
    "column_sums": "piipb>b",
}

# The bf16 loops (pure bf16): p = bf16 pointer, f = float, i = int64, u = uint64, b = int; every
# loop that writes a parameter ends in the rounding arguments "uuib" (seed, step, the first
# element's index in the whole tensor, stochastic or nearest).
BF16_SIGNATURES: dict[str, str] = {
    "lion_bf16": "pppiffffffuuib>v",
    "sgd_sai_bf16": "pppiffffuuib>v",
    "adamw_bf16": "ppppiffffffffuuib>v",
    "sage_bf16": "ppppiiffffffbuuib>v",
    "column_sums_bf16": "piipb>b",
    "scale_rows_bf16": "pppiifffffuuib>b",
    "scale_cols_bf16": "ppiipfuuib>v",
    "sinkgd_apply_bf16": "ppiippffuuib>v",
    "sinkgd_full_bf16": "ppiiifffuuib>b",
}
_BF16_CODES = {
    "p": ctypes.c_void_p,
    "f": ctypes.c_float,
    "i": ctypes.c_int64,
    "u": ctypes.c_uint64,
    "b": ctypes.c_int,
}


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_TYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}
# what the loops take: float32 and float64 computed in their own precision, bfloat16 (pure bf16)
# read and computed in float32 and written rounded inside the loop
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# entry point -> how many times it ran (for tests and ``slimopt profile``)
calls: dict[str, int] = {}


def _enter(name: str) -> ctypes.CDLL:
    """The library, its thread count set to ``torch.get_num_threads()``, with ``name`` counted."""
    lib = library()
    assert lib is not None
    lib.slimopt_set_threads(torch.get_num_threads())
    calls[name] = calls.get(name, 0) + 1
    return lib


def threaded() -> bool:
    """Whether the built loops split large tensors over threads (built with OpenMP)."""
    lib = library()
    return bool(lib is not None and lib.slimopt_openmp())


def _cache_dir() -> Path:
    """``$SLIMOPT_CACHE/kernels``, else ``$XDG_CACHE_HOME/slimopt/kernels`` (``~/.cache``)."""
    if os.environ.get("SLIMOPT_CACHE"):
        return Path(os.environ["SLIMOPT_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slimopt" / "kernels"


# the flags of every build; the first attempt adds -march=native (and, on x86, 512-bit vectors
# where the CPU has them: one load per cache line, measured 15% faster on an AVX-512 CPU's
# memory-bound loops) and OpenMP; a compiler without one of them builds without it
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared")
NATIVE_FLAGS: tuple[str, ...] = ("-march=native",) + (
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
)
OPENMP_FLAGS = ("-fopenmp",)
_ATTEMPTS = (NATIVE_FLAGS + OPENMP_FLAGS, OPENMP_FLAGS, NATIVE_FLAGS, ())
_OFF_VALUES = ("", "0", "false", "no", "off")


def native_disabled() -> bool:
    """Whether ``$SLIMOPT_NO_NATIVE`` turns the native tier off (any value but 0/false/no/off)."""
    return os.environ.get("SLIMOPT_NO_NATIVE", "").strip().lower() not in _OFF_VALUES


def _compiler() -> str:
    return os.environ.get("CC", "cc")


_identity_cache: dict[str, str] = {}


def _compiler_identity(cc: str) -> str:
    """``cc --version`` (once per process and compiler); a missing compiler is a clear error."""
    if cc not in _identity_cache:
        try:
            proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
        except (FileNotFoundError, PermissionError):
            raise RuntimeError(f"no C compiler found ({cc!r} is not on PATH; set $CC)") from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cc} --version did not answer within 60 s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} --version failed: {proc.stderr.strip()[-300:]}")
        _identity_cache[cc] = proc.stdout.strip()
    return _identity_cache[cc]


_cpu_features_cache: list[str] = []


def _cpu_features() -> str:
    """What ``-march=native`` resolves from: the CPU's architecture, model and feature flags
    (``/proc/cpuinfo`` on Linux; the machine and processor names elsewhere). Read once."""
    if not _cpu_features_cache:
        parts = [platform.machine()]
        try:
            with open("/proc/cpuinfo") as f:
                wanted = ("flags", "features", "model name", "cpu family", "model", "cpu part")
                seen: set[str] = set()
                for line in f:
                    key, sep, value = line.partition(":")
                    key = key.strip().lower()
                    if sep and key in wanted and key not in seen:  # the first processor's
                        seen.add(key)
                        parts.append(f"{key}={value.strip()}")
                    if not line.strip() and seen:
                        break
        except OSError:
            pass
        _cpu_features_cache.append("\n".join(parts))
    return _cpu_features_cache[0]


def cache_key(source: bytes, cc: str | None = None) -> str:
    """The hash a built library is cached under: the source, the compiler's identity, the flags
    and the CPU features, so that a change in any of them builds a new library."""
    cc = _compiler() if cc is None else cc
    h = hashlib.sha256(source)
    flags = " ".join(NATIVE_FLAGS + OPENMP_FLAGS + FLAGS)
    for part in (_compiler_identity(cc), flags, _cpu_features()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def _compile(source: Path, path: Path) -> None:
    cc = _compiler()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        errors = []
        for extra in _ATTEMPTS:
            cmd = [cc, *FLAGS[:1], *extra, *FLAGS[1:], str(source), "-o", str(out), "-lm"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except FileNotFoundError:
                raise RuntimeError(
                    f"no C compiler found ({cc!r} is not on PATH; set $CC)"
                ) from None
            if proc.returncode == 0 and out.is_file() and out.stat().st_size > 0:
                os.replace(out, path)  # atomic: concurrent processes never see half a file
                return
            errors.append(proc.stderr.strip()[-500:] or "it wrote no library")
        raise RuntimeError(f"{cc} failed: {errors[-1]}")


def _bind(lib: ctypes.CDLL) -> None:
    """Set every entry point's ctypes signature from :data:`SIGNATURES`."""
    codes = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "b": ctypes.c_int}
    for suffix, ctype in _TYPES.values():
        for name, sig in SIGNATURES.items():
            args, ret = sig.split(">")
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [ctype if c == "T" else codes[c] for c in args]
            fn.restype = None if ret == "v" else codes[ret]
    for name, sig in BF16_SIGNATURES.items():
        args, ret = sig.split(">")
        fn = getattr(lib, name)
        fn.argtypes = [_BF16_CODES[c] for c in args]
        fn.restype = None if ret == "v" else _BF16_CODES[ret]
    # the dtype-free entry points: counter-based stochastic rounding (slimopt.rounding)
    lib.sr_round_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64]  # fmt: skip
    lib.sr_round_bf16.restype = None
    lib.philox4x32_10.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.philox4x32_10.restype = None
    lib.slimopt_set_threads.argtypes = [ctypes.c_int]
    lib.slimopt_set_threads.restype = None
    lib.slimopt_openmp.argtypes = []
    lib.slimopt_openmp.restype = ctypes.c_int


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    _bind(lib)
    return lib


def _load_or_build(path: Path) -> ctypes.CDLL:
    """The cached library at ``path``, built first when absent; a cached file that is empty,
    truncated or lacks an entry point (a crash mid-copy, a disk that filled) is rebuilt once."""
    if path.is_file() and path.stat().st_size > 0:
        try:
            return _load(path)
        except (OSError, AttributeError):
            pass  # unloadable: rebuilt below
    _compile(SOURCE, path)
    return _load(path)


def library() -> ctypes.CDLL | None:
    """The compiled loops, built on first use (once per source, compiler, flags and CPU, then
    cached on disk); None where ``$SLIMOPT_NO_NATIVE`` turns them off, or, after one warning
    naming what is missing, where they cannot be built."""
    global _lib, _failed
    if native_disabled():
        return None
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        try:
            if sys.platform == "win32":
                raise RuntimeError("the native CPU kernels are built on Linux and macOS only")
            source = SOURCE.read_bytes()
            _lib = _load_or_build(_cache_dir() / f"native-{cache_key(source)}.so")
        except (OSError, RuntimeError, AttributeError) as exc:
            _failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            from slimopt.kernels import user_stacklevel

            warnings.warn(
                f"slimopt: the native CPU kernels are unavailable ({_failed}); "
                "the rules use their multi-tensor path on CPU",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
    return _lib


def unavailable_reason() -> str | None:
    """Why :func:`library` returned None (after it was called), else None."""
    if native_disabled():
        return f"turned off by SLIMOPT_NO_NATIVE={os.environ['SLIMOPT_NO_NATIVE']}"
    return _failed


_PLAIN = (Tensor, torch.nn.Parameter)


def supports_all(*tensors: Tensor) -> bool:
    """Whether the native loops can take these same-shaped tensors (any ndim) and are built."""
    first = tensors[0]
    dtype, shape = first.dtype, first.shape
    if dtype not in DTYPES or first.numel() <= 1:
        return False
    for t in tensors:  # a plain loop: this runs for every tensor of every step
        if (
            type(t) not in _PLAIN
            or t.dtype != dtype
            or t.device.type != "cpu"
            or not t.is_contiguous()
            or t.shape != shape
        ):
            return False
    return True


def supports(p: Tensor, g: Tensor) -> bool:
    """Whether the native kernel can take this parameter and gradient."""
    return (
        p.device.type == "cpu"
        and p.dtype in DTYPES
        and g.dtype == p.dtype
        and type(p) in (Tensor, torch.nn.Parameter)
        and type(g) in (Tensor, torch.nn.Parameter)
        and p.is_contiguous()
        and g.is_contiguous()
        and p.ndim >= 2
        and p.numel() > 0
    )


def sinkgd_step(
    params: list[Tensor],
    grads: list[Tensor],
    iters: int,
    eps: float,
    lr: float,
    weight_decay: float = 0.0,
    roundings: list[Rounding | None] | None = None,
) -> None:
    """``p = p*(1 - lr*wd) - lr * X`` for each matrix, X the Sinkhorn-normalized gradient (see
    the module docstring). Every tensor must pass :func:`supports`; a bf16 one is read and
    written in place with its entry of ``roundings`` (the decay and the update then round once)."""
    lib = _enter("sinkgd")
    decay = 1.0 - lr * weight_decay
    roundings = roundings or [None] * len(params)
    for p, g, rounding in zip(params, grads, roundings):
        m = p.shape[0]
        n = p.numel() // m
        if rounding is None:
            if decay != 1.0:
                p.mul_(decay)
            suffix, ctype = _TYPES[p.dtype]
            fn = getattr(lib, f"sinkgd_full_{suffix}")
            status = fn(g.data_ptr(), p.data_ptr(), m, n, iters, ctype(eps), ctype(lr))
        else:
            status = lib.sinkgd_full_bf16(
                g.data_ptr(), p.data_ptr(), m, n, iters, eps, lr, decay, *rounding.args(0)
            )
        if status != 0:
            raise MemoryError("sinkgd: out of memory for the scaling vectors")


def _column_sums(lib: ctypes.CDLL, G: Tensor, square: bool) -> Tensor:
    """One native pass of :func:`column_sums` over ``G`` with the library already entered."""
    m, n = G.shape
    if G.dtype == torch.bfloat16:  # summed in float32, and returned so
        col, fn = torch.zeros(n, dtype=torch.float32), lib.column_sums_bf16
    else:
        col = torch.zeros(n, dtype=G.dtype)
        fn = getattr(lib, f"column_sums_{_TYPES[G.dtype][0]}")
    if fn(G.data_ptr(), m, n, col.data_ptr(), int(square)) != 0:
        raise MemoryError("column_sums: out of memory for the blocks' partial sums")
    return col


def column_sums(G: Tensor, *, square: bool) -> Tensor:
    """``sum(G**2, dim=0)`` or ``sum(|G|, dim=0)`` of a CPU float32/float64 matrix in one pass:
    blocks of 256 rows summed apart (split over the threads, in the matrix's dtype, as torch's
    float32 reductions do), then added in block order; a bf16 matrix's sums are float32."""
    assert G.is_contiguous() and G.dtype in DTYPES
    return _column_sums(_enter("column_sums"), G, square)


def column_means(mats: list[Tensor], *, square: bool) -> list[Tensor]:
    """``sum(G**2, dim=0) / rows`` or ``sum(|G|, dim=0) / rows`` for each contiguous matrix, as
    :func:`column_sums` then one division each (one multi-tensor division for all): the
    per-matrix statistic of a step's many matrices with one library lookup."""
    lib = _enter("column_sums")
    out = [_column_sums(lib, G, square) for G in mats]
    if out:
        torch._foreach_div_(out, [float(G.shape[0]) for G in mats])
    return out


def scale_step(
    items: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None, Rounding | None]],
    lr: float,
    weight_decay: float,
    eps: float,
    beta: float,
) -> None:
    """SCALE's update for CPU matrices, one pass each, over the threads.

    ``items``: ``(p, u, m, step, rounding)``. Row-normalized (``step`` None): ``u`` is the
    gradient, with ``m`` the momentum buffer updated here (or None), and each row's RMS is taken
    in the same pass as its update. Column-normalized: ``step`` [n] = lr / the column
    denominators (float32 for a bf16 matrix), and ``u`` is what they were taken of (the gradient,
    or the already-updated momentum). bf16 tensors are rounded as ``rounding`` says.
    """
    lib = _enter("scale")
    decay = 1.0 - lr * weight_decay
    for p, u, m, step, rounding in items:
        rows = p.shape[0]
        n = p.numel() // rows
        m_ptr = None if m is None else m.data_ptr()
        if step is not None:
            step = step.to(torch.float32 if rounding is not None else p.dtype).contiguous()
            if step.numel() != n:
                raise ValueError(f"scale: {step.numel()} column steps for rows of {n}")
        if rounding is not None:
            if step is None:
                args = (p.data_ptr(), u.data_ptr(), m_ptr, rows, n, lr, decay, eps, beta)
                if lib.scale_rows_bf16(*args, 1.0 - beta, *rounding.args(0)) != 0:
                    raise MemoryError("scale: out of memory for a row of the update")
            else:
                args = (p.data_ptr(), u.data_ptr(), rows, n, step.data_ptr(), decay)
                lib.scale_cols_bf16(*args, *rounding.args(0))
            continue
        suffix, ctype = _TYPES[p.dtype]
        if step is None:
            fn = getattr(lib, f"scale_rows_{suffix}")
            fn(p.data_ptr(), u.data_ptr(), m_ptr, rows, n, *map(ctype, (lr, decay, eps, beta)))
        else:
            fn = getattr(lib, f"scale_cols_{suffix}")
            fn(p.data_ptr(), u.data_ptr(), rows, n, step.data_ptr(), ctype(decay))


def _run(jobs: list[tuple[Any, tuple]]) -> None:
    """Run ``(fn, args)`` jobs in order on this thread (each loop splits its own work over the
    threads)."""
    for fn, args in jobs:
        fn(*args)


def _blocks(t: Tensor) -> tuple[int, int]:
    """[rows, n] for a contiguous tensor: its matrix view, or a vector cut in rows of 4096."""
    if t.ndim >= 2:
        return t.shape[0], t.numel() // t.shape[0]
    n = t.numel()
    return (n // 4096, 4096) if n % 4096 == 0 and n >= 4096 else (1, n)


def _elementwise_job(
    lib: ctypes.CDLL,
    name: str,
    tensors: tuple[Tensor, ...],
    scalars: tuple,
    rounding: Rounding | None = None,
) -> tuple[Any, tuple]:
    """The call ``fn(*pointers, count, *scalars)`` of an element-wise loop over same-shaped
    contiguous tensors (the loop splits itself over the threads); a bf16 loop (``rounding``
    given) also takes the rounding arguments."""
    if rounding is None:
        suffix, ctype = _TYPES[tensors[0].dtype]
        fn = getattr(lib, f"{name}_{suffix}")
        values = tuple(ctype(x) for x in scalars)
    else:
        fn, values = getattr(lib, f"{name}_bf16"), tuple(float(x) for x in scalars)
    tail = () if rounding is None else rounding.args(0)
    return fn, (*(t.data_ptr() for t in tensors), tensors[0].numel(), *values, *tail)


def sr_round_bf16(dst: Tensor, src: Tensor, seed: int, step: int, offset: int = 0) -> bool:
    """Round contiguous float32 ``src`` into contiguous bf16 ``dst`` stochastically with the
    counter-based bits of ``(seed, step)`` for global element indices ``offset + k``
    (``slimopt.rounding``); False (nothing written) where the native library is not built.

    >>> import torch
    >>> x, y = torch.full((5,), 1.0 + 2**-9), torch.empty(5, dtype=torch.bfloat16)
    >>> sr_round_bf16(y, x, seed=1, step=1) in (True, False)
    True
    """
    if library() is None:
        return False
    lib = _enter("sr_round_bf16")
    n = src.numel()
    lib.sr_round_bf16(src.data_ptr(), dst.data_ptr(), n, seed & 2**64 - 1, step & 2**64 - 1, offset)
    return True


def philox(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...] | None:
    """The four words of one Philox4x32-10 call in the native library (known-answer tests);
    None where the library is not built."""
    lib = library()
    if lib is None:
        return None
    ctr = (ctypes.c_uint32 * 4)(*counter)
    k = (ctypes.c_uint32 * 2)(*key)
    out = (ctypes.c_uint32 * 4)()
    lib.philox4x32_10(ctr, k, out)
    return tuple(out)


def sgd_sai_step(
    items: list[tuple[Tensor, Tensor, Tensor, float, Rounding | None]],
    lr: float,
    weight_decay: float,
    mu: float,
) -> None:
    """SGD-SaI after its first step for ``(p, g, m, step, rounding)``, ``step`` = lr * gsnr:
    ``m = mu*m + (1-mu)*g; p = p*(1 - lr*wd) - m*step`` in one pass (bf16 tensors: rounded as
    ``rounding`` says)."""
    lib = _enter("sgd_sai")
    jobs = []
    decay = 1.0 - weight_decay * lr
    for p, g, m, step, rounding in items:
        scalars = (decay, mu, 1.0 - mu, step)
        jobs.append(_elementwise_job(lib, "sgd_sai", (p, g, m), scalars, rounding))
    _run(jobs)


def lion_step(
    items: list[tuple[Tensor, Tensor, Tensor, Rounding | None]],
    lr: float,
    weight_decay: float,
    b1: float,
    b2: float,
) -> None:
    """Lion for ``(p, g, m, rounding)``, one pass each (NaN where the interpolation is not
    finite; bf16 tensors rounded as ``rounding`` says)."""
    lib = _enter("lion")
    jobs = []
    decay = 1.0 - lr * weight_decay
    for p, g, m, rounding in items:
        scalars = (lr, decay, b1, b2, 1.0 - b1, 1.0 - b2)
        jobs.append(_elementwise_job(lib, "lion", (p, g, m), scalars, rounding))
    _run(jobs)


def adamw_step(
    items: list[tuple[Tensor, Tensor, Tensor, Tensor, float, Rounding]],
    lr: float,
    weight_decay: float,
    b1: float,
    b2: float,
    eps: float,
) -> None:
    """AdamW (torch's single-tensor arithmetic) for bf16 ``(p, g, m, v, t, rounding)``, ``t`` the
    step count after this step: one pass each, reading and writing bf16."""
    lib = _enter("adamw")
    jobs = []
    w = 1.0 - b1
    for p, g, m, v, t, rounding in items:
        scalars = (1.0 - lr * weight_decay, w, 1.0 - w, b2, 1.0 - b2)
        scalars += (-(lr / (1.0 - b1**t)), (1.0 - b2**t) ** 0.5, eps)
        jobs.append(_elementwise_job(lib, "adamw", (p, g, m, v), scalars, rounding))
    _run(jobs)


def sage_step(
    items: list[tuple[Tensor, Tensor, Tensor, Tensor, Rounding | None]],
    lr: float,
    weight_decay: float,
    b1: float,
    b2: float,
    lion_order: bool,
) -> None:
    """SAGE's update for ``(p, g, m, H, rounding)`` matrices (H [n] over the rows; float32 for
    a bf16 matrix, which is rounded as ``rounding`` says), one pass each."""
    lib = _enter("sage")
    jobs = []
    decay = 1.0 - lr * weight_decay
    keep = []  # converted H, alive until the jobs have run
    for p, g, m, H, rounding in items:
        rows, n = _blocks(p)
        if rounding is None:
            suffix, ctype = _TYPES[p.dtype]
            fn = getattr(lib, f"sage_{suffix}")
            scalars: tuple = tuple(ctype(x) for x in (lr, decay, b1, b2, 1.0 - b1, 1.0 - b2))
        else:
            fn, scalars = lib.sage_bf16, (lr, decay, b1, b2, 1.0 - b1, 1.0 - b2)
            H = H.to(torch.float32).contiguous()
        if H.numel() != n:
            raise ValueError(f"sage: H has {H.numel()} entries for rows of {n}")
        keep.append(H)
        ptrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), H.data_ptr())
        tail = () if rounding is None else rounding.args(0)
        jobs.append((fn, (*ptrs, rows, n, *scalars, int(lion_order), *tail)))
    _run(jobs)


__all__ = [
    "BF16_SIGNATURES",
    "DTYPES",
    "SIGNATURES",
    "adamw_step",
    "SOURCE",
    "threaded",
    "cache_key",
    "calls",
    "column_means",
    "column_sums",
    "library",
    "lion_step",
    "native_disabled",
    "sage_step",
    "scale_step",
    "sgd_sai_step",
    "sinkgd_step",
    "supports",
    "supports_all",
    "unavailable_reason",
]
