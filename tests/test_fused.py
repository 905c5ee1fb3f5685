"""The fused (``torch.compile``) kernels: equal to the reference in float64, no recompile when a
schedule changes the learning rate, nothing hidden, and a clean fallback when compiling fails.

The kernels compile once per process (a few seconds each on a small CPU; inductor's on-disk cache
makes later runs faster), so every test here reuses the same float64 kernels.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_algorithms import RULE_CONFIGS, rel_err, run_rule, train_preset

import slimopt
from slimopt.algorithms import fused, native

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile missing")

HAVE_NATIVE = native.library() is not None


@pytest.fixture
def no_native(monkeypatch):
    """As on a machine without a C compiler: the compiled (torch.compile) kernels run instead."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", "RuntimeError: cc: not found")


@pytest.fixture
def fused_on():
    if fused._broken is not None:
        pytest.skip(f"torch.compile does not work here: {fused._broken}")
    with fused.enabled(True):
        yield


def _counts() -> dict[str, int]:
    return {**fused.calls, **{f"native:{k}": v for k, v in native.calls.items()}}


def _ran_since(before: dict[str, int]) -> set[str]:
    return {k for k, v in _counts().items() if v > before.get(k, 0)}


@pytest.mark.parametrize("algorithm,options", RULE_CONFIGS, ids=lambda x: str(x))
def test_fused_equals_reference_float64(algorithm, options, fused_on):
    before = _counts()
    fast, _ = run_rule(algorithm, options, foreach=True)
    ran = _ran_since(before)
    with fused.enabled(False):
        ref, _ = run_rule(algorithm, options, foreach=False)
    for f, r in zip(fast, ref):
        assert rel_err(f.detach(), r.detach()) <= 1e-10, f.shape
    assert fused._broken is None
    assert ran == expected_kernels(algorithm, options, HAVE_NATIVE)


def expected_kernels(algorithm: str, options: dict, with_native: bool) -> set[str]:
    """The kernels a rule's fused path runs on CPU, with or without the native loops."""
    if algorithm == "sgd_sai" and options.get("momentum") == 0.0:
        return set()  # plain SGD with a scaled lr: nothing to fuse
    if algorithm == "adamw":
        return set()  # torch's own fused kernel
    if algorithm == "sage":
        if with_native:
            return {"native:sage", "native:column_sums"}
        return {"sage_lion_order" if options.get("lion_order") else "sage"}
    if algorithm == "scale" and options.get("norm_dim") == 0:
        return {"native:scale", "native:column_sums"} if with_native else {"scale_by"}
    if algorithm == "scale":
        return {"native:scale"} if with_native else {"scale_rows"}
    if algorithm == "sinkgd":
        return {"native:sinkgd"} if with_native else set()
    return {f"native:{algorithm}"} if with_native else {algorithm}


# one preset per fused kernel (the other presets combine the same rules)
@pytest.mark.parametrize("preset", ["lion", "sage-hybrid", "scale", "sgd-sai", "adamw"])
def test_fused_preset_equals_reference_float64(preset, fused_on):
    from lm_models import tiny_llama

    base = tiny_llama()
    fast, _ = train_preset(preset, True, model=base)
    with fused.enabled(False):
        ref, _ = train_preset(preset, False, model=base)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert rel_err(a.detach(), b.detach()) <= 1e-10, name


def test_a_learning_rate_schedule_does_not_recompile(no_native, fused_on):
    from torch._dynamo.utils import counters

    def run(foreach: bool) -> torch.Tensor:
        torch.manual_seed(0)
        w = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
        opt = slimopt.SlimOptimizer([{"params": [w], "algorithm": "lion"}], foreach=foreach)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
        for t in range(5):
            w.grad = torch.randn(
                12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(t)
            )
            opt.step()
            sched.step()
            if t == 0:
                graphs.append(counters["stats"]["unique_graphs"])
        graphs.append(counters["stats"]["unique_graphs"])
        return w.detach()

    graphs: list[int] = []
    fast = run(True)
    assert graphs[0] == graphs[1], "a new learning rate compiled a new graph"
    with fused.enabled(False):
        assert rel_err(fast, run(False)) <= 1e-12


@pytest.mark.parametrize("algorithm", ["lion", "sage"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("loops", ["native", "compiled"])
def test_fused_hides_no_nonfinite_gradient(algorithm, bad, loops, monkeypatch, fused_on):
    if loops == "compiled":
        monkeypatch.setattr(native, "_lib", None)
        monkeypatch.setattr(native, "_failed", "RuntimeError: cc: not found")
    elif not HAVE_NATIVE:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    opt = slimopt.SlimOptimizer([{"params": [w], "algorithm": algorithm}])
    w.grad = torch.randn_like(w)
    opt.step()
    w.grad = torch.randn_like(w)
    w.grad[1, 2] = bad
    before = _counts()
    opt.step()
    assert _ran_since(before)
    assert not torch.isfinite(w).all()


def test_compile_failure_falls_back_with_one_warning(monkeypatch, no_native):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_broken", None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with fused.enabled(True):
        with pytest.warns(RuntimeWarning, match="torch.compile failed"):
            fast, _ = run_rule("sgd_sai", {}, foreach=True)
        assert not fused.fused_enabled() and "C++ compiler" in fused._broken
    ref, _ = run_rule("sgd_sai", {}, foreach=False)
    for f, r in zip(fast, ref):
        assert rel_err(f.detach(), r.detach()) <= 1e-10


def test_without_torch_compile_the_multi_tensor_path_runs(monkeypatch):
    monkeypatch.delattr(torch, "compile")
    before = _counts()
    with fused.enabled(True):
        fast, _ = run_rule("lion", {"weight_decay": 0.1}, foreach=True)
    assert _ran_since(before) == set()
    ref, _ = run_rule("lion", {"weight_decay": 0.1}, foreach=False)
    for f, r in zip(fast, ref):
        assert rel_err(f.detach(), r.detach()) <= 1e-10


def test_switch_and_environment_variable():
    import subprocess
    import sys

    saved = fused._enabled
    try:
        fused.set_fused(True)
        assert fused._enabled
        fused.set_fused(False)
        assert not fused.fused_enabled()
    finally:
        fused.set_fused(saved)
    code = "from slimopt.algorithms import fused; print(fused.fused_enabled())"
    env = {**os.environ, "SLIMOPT_FUSED": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler for the native SinkGD loop")
@pytest.mark.parametrize("threads", [1, 2])
def test_native_sinkgd_matches_the_spec_on_a_large_matrix(threads):
    from slimopt.algorithms.sinkgd import sinkhorn

    torch.manual_seed(0)
    g = torch.randn(700, 512, dtype=torch.float64)  # 2.9 MB: rows split over the threads
    g[3] = 0.0  # a zero row and a zero column keep their scales and stay zero
    g[:, 5] = 0.0
    p0 = torch.randn_like(g)
    p = p0.clone()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.sinkgd_step([p], [g], 5, 1e-8, 1e-3)
    finally:
        torch.set_num_threads(saved)
    expected = p0 - 1e-3 * sinkhorn(g, 5, 1e-8)
    assert rel_err(p, expected) <= 1e-10
    assert torch.equal(p[3], p0[3]) and torch.equal(p[:, 5], p0[:, 5])


@pytest.mark.parametrize("algorithm,options", RULE_CONFIGS, ids=lambda x: str(x))
def test_compiled_kernels_equal_reference_float64(algorithm, options, no_native, fused_on):
    before = _counts()
    fast, _ = run_rule(algorithm, options, foreach=True)
    assert _ran_since(before) == expected_kernels(algorithm, options, with_native=False)
    with fused.enabled(False):
        ref, _ = run_rule(algorithm, options, foreach=False)
    for f, r in zip(fast, ref):
        assert rel_err(f.detach(), r.detach()) <= 1e-10
    assert fused._broken is None
