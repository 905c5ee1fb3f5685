"""The Triton kernels (``slimopt.kernels.triton_ops``) against each rule's reference.

Without a GPU the kernels run under Triton's interpreter on CPU tensors. The interpreter has to be
chosen before ``triton`` is first imported (triton's own helpers are defined at import), which the
rest of a test session may already have done; so, unless this process was started with
``TRITON_INTERPRET=1``, the interpreter tests run here in one child pytest process that is
(``test_interpreter_battery``), and the tests that need compiled kernels (or no interpreter) run
in this process.

Tolerances (measured maxima in brackets, on the shapes below over three steps):
    float32: rtol 1e-5, atol 1e-6 on parameters and state [<= 4.8e-7 absolute on values of O(1);
             SGD-SaI without momentum is bit-exact]. The kernels compute every element in float32
             like the references; what differs is the summation order of the norms and where the
             reference's eager ops fuse a multiply-add.
    bfloat16: all but 1% (or 2) of the elements within rtol 2**-7, atol 2**-6 (one bf16 ulp at the tensors'
             magnitude, |x| < 4), every element within 0.1 (= 2 lr: a sign that flips where the
             interpolated momentum is within an ulp of zero) [one or two elements in a few hundred
             at 3-6 ulps, the rest within one ulp]. The kernels round to bfloat16 (nearest even)
             wherever the reference stores a bfloat16 intermediate and accumulate reductions in
             float32; the reference's eager CPU ops round some coefficients to bfloat16 first
             (``add_(g, alpha=1-b)`` uses bf16(1-b)), the kernels keep them in float32, as torch's
             CUDA ops do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install 'slimopt[gpu]')"
)

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import slimopt  # noqa: E402
from slimopt.algorithms import get_rule  # noqa: E402

# whether triton was imported under its interpreter in this process
INTERPRETED = isinstance(tl.zeros, InterpretedFunction)
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in test_interpreter_battery's child process"
)
needs_compiler = pytest.mark.skipif(INTERPRETED, reason="triton is interpreted in this process")

# non-power-of-two sizes, a [V, d] table, ndim 3, a vector, one element, zero-size tensors
SHAPES = [(7, 13), (40, 9), (3, 4, 5), (5,), (1,), (0,), (0, 4)]
CASES = [
    ("lion", {}),
    ("sgd_sai", {}),
    ("sgd_sai", {"momentum": 0.0}),
    ("sgd_sai", {"snr_normalize": "max"}),
    ("sage", {}),
    ("sage", {"lion_order": True}),
    ("scale", {}),
    ("scale", {"momentum": 0.9}),
    ("scale", {"norm_dim": 0}),
    ("scale", {"norm_dim": 0, "momentum": 0.9}),
    ("sinkgd", {}),
    ("sinkgd", {"iters": 2, "weight_decay": 0.1}),
]
BF16_MAX_DIFF = 0.1
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 2**-7, "atol": 2**-6}}


@needs_compiler
def test_interpreter_battery():
    """Every interpreter test below, in a child pytest process started with TRITON_INTERPRET=1."""
    src = str(Path(slimopt.__file__).resolve().parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(
        cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600
    )
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, f"interpreter tests failed:\n{tail}"
    assert " passed" in tail and "failed" not in tail, tail


@pytest.fixture(scope="module")
def K():
    if not INTERPRETED:
        pytest.skip("runs in test_interpreter_battery's child process")
    from slimopt.kernels import triton_ops

    assert triton_ops.interpreted()
    return triton_ops


def _group(rule, options):
    mod = get_rule(rule)
    group = dict(mod.DEFAULTS, lr=0.05, **options)
    if rule in ("lion", "sage"):
        group["weight_decay"] = 0.1
    return mod, group


def _run(step, rule, options, dtype, steps=3, shapes=SHAPES, grad_fn=None, fast_setup=None):
    """``steps`` steps of the reference and of ``step`` on the same inputs; returns both sides."""
    mod, group = _group(rule, options)
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    fast = [p.clone() for p in ref]
    ref_states = [mod.init_state(p, group) for p in ref]
    fast_states = [mod.init_state(p, group) for p in fast]
    fast_group = dict(group)
    if fast_setup is not None:
        fast_setup(fast_states, fast_group)
    for k in range(steps):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        if grad_fn is not None:
            grad_fn(k, grads)
        extra = {}
        if rule == "sgd_sai":
            for side, states in ((ref, ref_states), (fast, fast_states)):
                for _p, g, s in zip(side, grads, states):
                    if int(s["step"]) == 0:
                        s["gsnr"].copy_(mod.gradient_snr(g, group["eps"]))
            if group["snr_normalize"] == "max":
                extra["gsnr_max"] = torch.stack([s["gsnr"] for s in ref_states]).max()
        for p, g, s in zip(ref, grads, ref_states):
            mod.reference(p, g, s, group, **extra)
        step(fast, grads, fast_states, fast_group, **extra)
    return ref, fast, ref_states, fast_states


def _close(b, a, tol, what):
    if a.dtype != torch.bfloat16:
        torch.testing.assert_close(b, a, **tol, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    ok = torch.isclose(b.float(), a.float(), **tol, equal_nan=True)
    worst = (b.float() - a.float()).abs().nan_to_num(0.0).max() if a.numel() else 0.0
    bad = int((~ok).sum())
    assert bad <= max(2, a.numel() // 100), f"{what}: {bad} of {a.numel()} differ"
    assert worst <= BF16_MAX_DIFF, f"{what}: differs by {worst}"


def _assert_same(ref, fast, ref_states, fast_states, tol):
    for i, (a, b) in enumerate(zip(ref, fast)):
        _close(b, a, tol, f"param {i}")
    for sa, sb in zip(ref_states, fast_states):
        assert set(sa) == set(sb)
        for key, va in sa.items():
            vb = sb[key]
            if isinstance(va, torch.Tensor):
                _close(vb, va, tol, key)
            else:
                assert int(vb) == va, key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}-{o}" for r, o in CASES])
def test_kernel_matches_reference(K, rule, options, dtype):
    step = K.STEPS[rule]
    _assert_same(*_run(step, rule, options, dtype), TOL[dtype])


def test_sgd_sai_without_momentum_is_bit_exact(K):
    ref, fast, *_ = _run(K.sgd_sai_step, "sgd_sai", {"momentum": 0.0}, torch.float32)
    for a, b in zip(ref, fast):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", ["lion", "sgd_sai", "sage"])
def test_tensor_lr_and_tensor_step_counters(K, rule):
    """lr and the step counters as tensors on the parameters' device (the CUDA-graph set-up):
    read by the kernels, counters advanced in place, same result as float lr and int steps."""

    def setup(states, group):
        group["lr"] = torch.tensor(group["lr"])
        for s in states:
            s["step"] = torch.tensor(s["step"], dtype=torch.int64)

    ref, fast, ref_states, fast_states = _run(
        K.STEPS[rule], rule, {}, torch.float32, fast_setup=setup
    )
    _assert_same(ref, fast, ref_states, fast_states, TOL[torch.float32])
    assert all(isinstance(s["step"], torch.Tensor) and int(s["step"]) == 3 for s in fast_states)


@pytest.mark.parametrize("rule", ["lion", "sgd_sai", "sage", "scale", "sinkgd"])
def test_non_finite_gradients_show_where_the_reference_shows_them(K, rule):
    def poison(k, grads):
        if k == 1:
            grads[0][2, 3] = float("nan")
            grads[1][4, 1] = float("inf")

    ref, fast, *_ = _run(K.STEPS[rule], rule, {}, torch.float32, grad_fn=poison)
    for a, b in zip(ref, fast):
        assert torch.equal(a.isnan(), b.isnan())
    assert ref[0].isnan().any()


def test_one_launch_covers_many_parameters(K, monkeypatch):
    launches = []
    kernel = K._lion_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(K, "_lion_kernel", Counting())
    _run(K.lion_step, "lion", {}, torch.float32, steps=1)
    _run(K.lion_step, "lion", {}, torch.bfloat16, steps=1)
    assert len(launches) == 2  # one per dtype for the seven tensors
    blocks = sum(-(-torch.Size(s).numel() // K.BLOCK) for s in SHAPES)
    assert launches[0] == (blocks,)


def test_tensors_the_kernels_cannot_take_use_the_multi_tensor_path(K):
    """float64 and a non-contiguous parameter go through the rule's foreach in the same call."""
    mod, group = _group("lion", {})
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(6, 5, generator=gen), torch.randn(9, generator=gen, dtype=torch.float64)]
    ref = [base[0].t().contiguous().t(), base[1].clone()]
    fast = [base[0].t().contiguous().t(), base[1].clone()]
    assert not fast[0].is_contiguous()
    rs, fs = [mod.init_state(p, group) for p in ref], [mod.init_state(p, group) for p in fast]
    grads = [torch.randn(6, 5, generator=gen), torch.randn(9, generator=gen, dtype=torch.float64)]
    for p, g, s in zip(ref, grads, rs):
        mod.reference(p, g, s, group)
    K.lion_step(fast, grads, fs, group)
    _assert_same(ref, fast, rs, fs, TOL[torch.float32])


def test_self_check_passes_and_reports_a_wrong_kernel(K, monkeypatch):
    for rule in K.STEPS:
        assert K.self_check(rule, "cpu")
    monkeypatch.setattr(K, "_checked", {})
    monkeypatch.setitem(K.STEPS, "lion", lambda params, grads, states, group: None)
    with pytest.warns(RuntimeWarning, match="multi-tensor path is used instead"):
        assert not K.self_check("lion", "cpu")
    with pytest.raises(ValueError, match="no Triton kernels for 'adamw'"):
        K.self_check("adamw")


@needs_compiler
def test_without_the_interpreter_cpu_tensors_take_the_multi_tensor_path():
    from slimopt.kernels import triton_ops as J

    assert not J.interpreted()
    ref, fast, rs, fs = _run(J.sage_step, "sage", {}, torch.float32, steps=2)
    _assert_same(ref, fast, rs, fs, TOL[torch.float32])
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET"):
        assert not J.self_check("lion", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("rule", ["lion", "sgd_sai", "sage", "scale", "sinkgd"])
@needs_compiler
def test_step_is_captured_in_a_cuda_graph(rule):
    """With lr and the step counters as device tensors, one step captured in a CUDA graph and
    replayed gives the eager reference's result (no host synchronisation inside the step)."""
    from slimopt.kernels import triton_ops as J

    mod, group = _group(rule, {})
    shapes = [(64, 48), (33,), (1000, 7)]
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(s, generator=gen).cuda() for s in shapes]
    fast = [p.clone() for p in ref]
    grads = [torch.randn(s, generator=gen).cuda() for s in shapes]
    rs = [mod.init_state(p, group) for p in ref]
    fs = [mod.init_state(p, group) for p in fast]
    for s in fs:
        if "step" in s:
            s["step"] = torch.tensor(s["step"], dtype=torch.int64, device="cuda")
    fast_group = dict(group, lr=torch.tensor(group["lr"], device="cuda"))
    if rule == "sgd_sai":
        for states in (rs, fs):
            for g, s in zip(grads, states):
                s["gsnr"].copy_(mod.gradient_snr(g, group["eps"]))
    J.STEPS[rule](fast, grads, fs, fast_group)  # eager: builds and caches the launch tables
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        J.STEPS[rule](fast, grads, fs, fast_group)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
    for _ in range(4):  # one eager step and three replays (capturing runs nothing)
        for p, g, s in zip(ref, grads, rs):
            mod.reference(p, g, s, group)
    torch.cuda.synchronize()
    _assert_same(ref, fast, rs, fs, TOL[torch.float32])
