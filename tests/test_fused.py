"""The fused tiers and their choice: torch-style ``foreach``/``fused`` arguments, fast by default,
clear errors where ``fused=True`` cannot be honoured, and one warning plus the multi-tensor path
where the native CPU kernels cannot be built."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
from rule_db import RULE_CASES, has_fused, rel_err, run_case

import slimopt
from slimopt.algorithms import ALGORITHMS, get_rule
from slimopt.kernels import cpu

NATIVE = cpu.library()  # as built in the user's cache, before any test changes the loader
HAVE_NATIVE = NATIVE is not None


def _tier_of(opt: slimopt.SlimOptimizer, index: int = 0) -> str:
    """The tier that takes the group's first parameter at a later step (SGD-SaI's first step
    measures the gradient on the multi-tensor path)."""
    group = opt.param_groups[index]
    rule = get_rule(group["algorithm"])
    params = group["params"]
    grads = [torch.zeros_like(p) for p in params]
    states = [rule.init_state(p, group) for p in params]
    for s in states:
        if isinstance(s.get("step"), int):
            s["step"] = 1
    return rule.partition(group, params, grads, states)[0][0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_default_is_the_fastest_tier_available(algorithm):
    w = torch.randn(6, 4, requires_grad=True)
    opt = slimopt.SlimOptimizer([w], algorithm)
    expected = "fused" if has_fused(algorithm, "cpu", torch.float32) else "foreach"
    assert _tier_of(opt) == expected
    assert _tier_of(slimopt.SlimOptimizer([w], algorithm, foreach=True)) == "foreach"
    assert _tier_of(slimopt.SlimOptimizer([w], algorithm, foreach=False)) == "reference"


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
def test_a_preset_with_no_options_runs_the_native_kernels(monkeypatch):
    monkeypatch.delenv("SLIMOPT_FUSED", raising=False)
    model = torch.nn.Linear(4, 8)
    opt = slimopt.create_optimizer("sinkgd-pure", model)
    model(torch.randn(2, 4)).sum().backward()
    before = cpu.calls.get("sinkgd", 0)
    opt.step()
    assert cpu.calls.get("sinkgd", 0) == before + 1


# (rule, dtype) where the rule's fused CPU tier does not take the dtype, from the registry
NOT_FUSED_ON_CPU = [
    (a, d)
    for d in (torch.bfloat16, torch.float16)
    for a in ALGORITHMS
    if "cpu" in get_rule(a).fused and d not in get_rule(a).fused_dtypes["cpu"]
]


def test_some_dtype_is_not_taken_by_a_fused_cpu_tier():
    assert {a for a, _ in NOT_FUSED_ON_CPU} >= {"sage", "sinkgd", "scale", "sgd_sai", "lion"}


@pytest.mark.parametrize("algorithm,dtype", NOT_FUSED_ON_CPU)
def test_fused_true_where_no_kernel_takes_the_dtype_is_a_clear_error(algorithm, dtype):
    w = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    with pytest.raises(RuntimeError, match=rf"{algorithm}.*fused=True.*cpu.*not {dtype}"):
        slimopt.SlimOptimizer([w], algorithm, fused=True)
    # with fused=None the same parameters take the multi-tensor path
    opt = slimopt.SlimOptimizer([w], algorithm)
    assert _tier_of(opt) == "foreach"
    w.grad = torch.randn_like(w)
    opt.step()


def test_fused_true_on_a_device_without_a_kernel_and_with_foreach_true():
    w = torch.empty(4, 3, device="meta", requires_grad=True)
    with pytest.raises(RuntimeError, match="no fused kernel for meta tensors"):
        slimopt.SlimOptimizer([w], "lion", fused=True)
    v = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot both be True"):
        slimopt.SlimOptimizer([v], "lion", fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="cannot both be True"):
        slimopt.create_optimizer("adamw", torch.nn.Linear(3, 2), fused=True, foreach=True)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
@pytest.mark.parametrize("case", RULE_CASES, ids=[c.id for c in RULE_CASES])
def test_fused_float32_stays_within_rounding_of_the_reference(case):
    fast, _ = run_case(case, "fused", steps=3, dtype=torch.float32)
    ref, _ = run_case(case, "reference", steps=3, dtype=torch.float32)
    for f, r in zip(fast, ref):
        assert rel_err(f.detach(), r.detach()) <= 1e-5, f.shape


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """As on a machine without a C compiler and with an empty kernel cache."""
    monkeypatch.setenv("CC", "slimopt-no-such-compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_failed", None)


def test_without_a_compiler_one_warning_names_it_and_the_multi_tensor_path_runs(no_compiler):
    case = next(c for c in RULE_CASES if c.algorithm == "sinkgd")
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable.*no C compiler"):
        fast, _ = run_case(case, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per process
        run_case(case, steps=1)
    ref, _ = run_case(case, "reference", steps=2)
    for f, r in zip(fast, ref):
        assert rel_err(f.detach(), r.detach()) <= 1e-10
    w = torch.randn(4, 3, requires_grad=True)
    w.grad = torch.randn_like(w)
    opt = slimopt.SlimOptimizer([w], "lion", fused=True)
    with pytest.raises(RuntimeError, match="fused=True but the fused cpu kernel is unavailable"):
        opt.step()


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader as in a new process, with an empty cache under ``tmp_path`` and the
    ``SLIMOPT_*`` variables unset."""
    for name in ("SLIMOPT_CACHE", "SLIMOPT_NO_NATIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_failed", None)
    return tmp_path / "slimopt" / "kernels"


@pytest.fixture
def copying_compiler(monkeypatch):
    """``_compile`` replaced by a copy of this process's library (the build itself is tested
    once, in test_the_build_is_cached_under_source_compiler_flags_and_cpu); counts the builds."""
    import shutil

    built = NATIVE._name if HAVE_NATIVE else None
    builds: list[str] = []

    def fake_compile(source, path):
        builds.append(path.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, path)

    monkeypatch.setattr(cpu, "_compile", fake_compile)
    return builds


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
def test_the_build_is_cached_under_source_compiler_flags_and_cpu(fresh_loader, monkeypatch):
    import hashlib

    assert cpu.library() is not None
    key = cpu.cache_key(cpu.SOURCE.read_bytes())
    built = list(fresh_loader.iterdir())
    assert [p.name for p in built] == [f"native-{key}.so"]
    assert key != hashlib.sha256(cpu.SOURCE.read_bytes()).hexdigest()[:16]  # not the source alone
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu, "_lib", None)
    assert cpu.library() is not None and built[0].stat().st_mtime_ns == stamp
    # each ingredient of the key changes it
    source = cpu.SOURCE.read_bytes()
    monkeypatch.setattr(cpu, "_cpu_features", lambda: "x86_64\nflags=sse sse2")
    other_cpu = cpu.cache_key(source)
    monkeypatch.setattr(cpu, "_cpu_features", lambda: "x86_64\nflags=sse sse2 avx512f")
    assert cpu.cache_key(source) != other_cpu
    monkeypatch.setattr(cpu, "_compiler_identity", lambda cc: "clang version 18.1.3")
    assert cpu.cache_key(source) != other_cpu != key
    before = cpu.cache_key(source)
    monkeypatch.setattr(cpu, "NATIVE_FLAGS", ())
    assert cpu.cache_key(source) != before
    assert cpu.cache_key(source + b" ") != cpu.cache_key(source)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
def test_a_compiler_without_openmp_builds_single_threaded_loops_with_the_same_bits(
    fresh_loader, monkeypatch
):
    """Where ``-fopenmp`` fails (Apple's clang), the build falls back to plain loops on the
    calling thread: ``threaded()`` says so and a step gives the same bits as the threaded build."""

    def steps() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = _Wide()
        opt = slimopt.create_optimizer("sage-hybrid", model, fused=True)
        for t in range(2):
            gen = torch.Generator().manual_seed(t)
            for q in model.parameters():
                q.grad = torch.randn(q.shape, generator=gen).mul_(1e-2)
            opt.step()
        return [q.detach().clone() for q in model.parameters()]

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(cpu, "_lib", NATIVE)
        threaded = steps()
        monkeypatch.setattr(cpu, "_lib", None)
        bogus = ("-fno-such-openmp-flag",)
        monkeypatch.setattr(cpu, "OPENMP_FLAGS", bogus)
        monkeypatch.setattr(
            cpu, "_ATTEMPTS", (cpu.NATIVE_FLAGS + bogus, bogus, cpu.NATIVE_FLAGS, ())
        )
        assert cpu.library() is not None and not cpu.threaded()
        plain = steps()
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(threaded, plain):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
def test_a_cache_shared_by_two_cpus_never_loads_the_other_ones_library(
    fresh_loader, copying_compiler, monkeypatch
):
    """One home directory, two CPU generations: each builds and loads its own library (one built
    with -march=native for the other would die with SIGILL)."""
    monkeypatch.setattr(cpu, "_cpu_features", lambda: "x86_64\nflags=sse2 avx2 avx512f")
    assert cpu.library() is not None
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_cpu_features", lambda: "x86_64\nflags=sse2 avx2")
    assert cpu.library() is not None
    assert len(copying_compiler) == 2 and len(set(copying_compiler)) == 2
    assert sorted(p.name for p in fresh_loader.iterdir()) == sorted(copying_compiler)
    assert cpu.library()._name.endswith(copying_compiler[1])


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
@pytest.mark.parametrize("content", [b"", b"\x7fELF truncated", b"not a library at all"])
def test_an_empty_or_corrupt_cached_library_is_rebuilt(fresh_loader, copying_compiler, content):
    path = fresh_loader / f"native-{cpu.cache_key(cpu.SOURCE.read_bytes())}.so"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt quietly, not a warning and the slow path
        assert cpu.library() is not None
    assert copying_compiler == [path.name] and path.stat().st_size > 1000


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
def test_the_native_cache_lives_under_slimopt_cache(
    fresh_loader, copying_compiler, monkeypatch, tmp_path
):
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path / "mine"))
    assert cpu.library() is not None
    assert [p.parent for p in (tmp_path / "mine" / "kernels").glob("native-*.so")] == [
        tmp_path / "mine" / "kernels"
    ]
    assert not fresh_loader.exists()  # nothing under $XDG_CACHE_HOME


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_slimopt_no_native_turns_the_native_tier_off(monkeypatch, value):
    monkeypatch.setenv("SLIMOPT_NO_NATIVE", value)
    model = torch.nn.Linear(4, 8)
    opt = slimopt.create_optimizer("sinkgd-pure", model)
    assert _tier_of(opt) == "foreach"
    model(torch.randn(2, 4)).sum().backward()
    before = dict(cpu.calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deliberate choice: no warning
        opt.step()
    assert cpu.calls == before and cpu.library() is None
    w = torch.randn(4, 3, requires_grad=True)
    w.grad = torch.randn_like(w)
    with pytest.raises(
        RuntimeError, match=f"unavailable \\(turned off by SLIMOPT_NO_NATIVE={value}"
    ):
        slimopt.SlimOptimizer([w], "lion", fused=True).step()
    monkeypatch.setenv("SLIMOPT_NO_NATIVE", "0")
    assert cpu.native_disabled() is False


def test_the_loader_warning_points_at_the_users_line(no_compiler):
    w = torch.randn(4, 3, requires_grad=True)
    w.grad = torch.randn_like(w)
    opt = slimopt.SlimOptimizer([w], "lion")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        opt.step()
    (warning,) = [c for c in caught if "native CPU kernels" in str(c.message)]
    assert (warning.filename, warning.lineno) == (__file__, line)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if has_fused(a)])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fused_hides_no_nonfinite_gradient(algorithm, bad):
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    opt = slimopt.SlimOptimizer([w], algorithm, fused=True)
    w.grad = torch.randn_like(w)
    opt.step()
    w.grad = torch.randn_like(w)
    w.grad[1, 2] = bad
    opt.step()
    assert not torch.isfinite(w).all()


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 2])
def test_native_sinkgd_matches_the_spec_on_a_large_matrix(threads):
    """A matrix large enough to be swept by all threads, in blocks of rows whose partial column
    sums are added in order."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        rows = 2 * 4096 // 64 + 3  # many row blocks, above the size a loop splits at
        w = torch.randn(rows, 64, generator=g, dtype=torch.float64)
        grad = torch.randn(rows, 64, generator=g, dtype=torch.float64)
        grad[5] = 0.0  # a zero row stays zero
        fast = w.clone().requires_grad_()
        ref = w.clone().requires_grad_()
        fast.grad, ref.grad = grad.clone(), grad.clone()
        slimopt.SinkGD([fast], lr=0.1, fused=True).step()
        slimopt.SinkGD([ref], lr=0.1, foreach=False).step()
        assert rel_err(fast.detach(), ref.detach()) <= 1e-10
    finally:
        torch.set_num_threads(saved)


class _Wide(torch.nn.Module):
    """A model whose every matrix is large enough for the native loops to split it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(600, 96)
        self.proj = torch.nn.Linear(96, 400, bias=False)
        self.norm = torch.nn.LayerNorm(400)
        self.lm_head = torch.nn.Linear(400, 600, bias=False)

    def forward(self, x):
        return self.lm_head(self.norm(self.proj(self.embed(x))))


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
@pytest.mark.skipif(HAVE_NATIVE and not cpu.threaded(), reason="built without OpenMP")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", list(slimopt.PRESETS))
def test_the_native_loops_give_the_same_bits_at_any_thread_count(preset, dtype):
    """Every preset's fused CPU step (three steps, float32 and pure bf16) is bit for bit the same
    at 1, 2 and 3 threads: the loops split over fixed blocks and add partial sums in order."""
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = _Wide().to(dtype)
            opt = slimopt.create_optimizer(preset, model, fused=True)
            for t in range(3):
                gen = torch.Generator().manual_seed(t)
                for q in model.parameters():
                    q.grad = torch.randn(q.shape, generator=gen).mul_(1e-2).to(dtype)
                opt.step()
            results.append([q.detach().clone() for q in model.parameters()])
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _compile_case():
    torch.manual_seed(0)
    params = [torch.randn(6, 4, requires_grad=True) for _ in range(2)]
    lr = torch.tensor(1e-2)  # a tensor lr: a schedule changes its value, not the graph
    groups = [
        {"params": [params[0]], "algorithm": "sage", "lr": lr.clone()},
        {"params": [params[1]], "algorithm": "adamw", "lr": lr.clone()},
    ]
    return params, slimopt.SlimOptimizer(groups)


def test_a_compiled_step_equals_the_eager_step():
    """torch.compile of opt.step (the aot_eager backend: tracing without code generation) runs
    the traceable multi-tensor path and equals the eager step within float32 rounding; with a
    tensor lr, six steps under LambdaLR compile one graph (the state and the step counters are
    made outside it), not one per learning rate (tests/test_compile.py has every preset)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    results = []
    for compiled in (False, True):
        params, opt = _compile_case()
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
        for t in range(6):
            g = torch.Generator().manual_seed(t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            step()
            sched.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-6
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 2])
def test_native_column_sums_match_torch(threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        G = torch.randn(300, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        assert rel_err(cpu.column_sums(G, square=True), (G * G).sum(0)) <= 1e-12
        assert rel_err(cpu.column_sums(G, square=False), G.abs().sum(0)) <= 1e-12
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
def test_a_sage_hybrid_step_reaches_each_native_loop_in_few_calls():
    """From ``step()`` to the frame that calls a C loop: at most 11 Python calls (12 with the
    loop itself) in at most 4 files, for every loop a sage-hybrid CPU step runs."""
    import sys

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16))
        opt = slimopt.create_optimizer("sage-hybrid", model)
        stack: list[tuple[str, str]] = []
        paths: list[list[tuple[str, str]]] = []
        leaves = {"_run", "whole", "column_sums", "_large"}

        def profile(frame, event, arg):
            if event == "call":
                code = frame.f_code
                stack.append((code.co_filename, code.co_name))
                if code.co_filename.endswith("kernels/cpu.py") and code.co_name in leaves:
                    paths.append(list(stack))
            elif event == "return" and stack:
                stack.pop()

        for step in range(2):  # the second step is traced (state exists)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            if step == 0:
                opt.step()
                continue
            sys.setprofile(profile)
            try:
                opt.step()
            finally:
                sys.setprofile(None)
    finally:
        torch.set_num_threads(saved)
    assert paths
    for path in paths:
        start = max(i for i, (f, n) in enumerate(path) if n == "step" and "optimizer" in f)
        calls = path[start:]
        assert len(calls) + 1 <= 12, calls
        assert len({f for f, _ in calls}) <= 4, calls


@pytest.mark.parametrize("case", ["non-contiguous", "native off"])
def test_sages_sharded_update_steps_what_the_native_loop_does_not_take(case, monkeypatch):
    """SAGE's sharded step sends float32 matrices to the native loop; one the loop cannot take (a
    local shard on an accelerator, a non-contiguous one, or the native tier turned off) runs the
    multi-tensor update instead of being skipped."""
    from slimopt.algorithms import sage

    if case == "native off":
        monkeypatch.setenv("SLIMOPT_NO_NATIVE", "1")
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    p = base.t() if case == "non-contiguous" else base.clone()
    g, m, H = torch.randn(p.shape), torch.randn(p.shape), torch.rand(p.shape[1])
    group = {"lr": 0.1, "weight_decay": 0.0, "betas": (0.9, 0.99), "lion_order": False}
    before, want_p, want_m = p.clone(), p.clone(), m.clone()
    sage._update_foreach([want_p], [g], [want_m], [H], group)
    sage._update_native([p], [g], [{"exp_avg": m}], [H], group)
    assert not torch.equal(p, before)
    torch.testing.assert_close(p, want_p)
    torch.testing.assert_close(m, want_m)
