"""The Triton kernels (``slimopt.kernels.triton_ops``) against each rule's reference.

Without a GPU the kernels run under Triton's interpreter on CPU tensors. The interpreter has to be
chosen before ``triton`` is first imported (triton's own helpers are defined at import), which the
rest of a test session may already have done; so, unless this process was started with
``TRITON_INTERPRET=1``, the interpreter tests run in one child pytest process started with it
(``test_interpreter_battery``), and the tests that need the compiler (or no interpreter) run in
this process. Where a CUDA device is present, the same kernel tests also run in this process,
compiled, on CUDA tensors (``DEVICE``; ``benchmarks/gpu_check.sh`` runs them so).

Tolerances (measured maxima in brackets, on the shapes below over two steps):
    float32: rtol 1e-5, atol 1e-6 on parameters and state [<= 4.8e-7 absolute on values of O(1);
             SGD-SaI without momentum is bit-exact]. The kernels compute every element in float32
             like the references; what differs is the summation order of the norms and where the
             reference's eager ops fuse a multiply-add.
    bfloat16: all but 1% (or 2) of the elements within rtol 2**-7, atol 2**-6 (one bf16 ulp at
             the tensors' magnitude, |x| < 4), every element within 0.1 (= 2 lr: a sign that flips
             where the interpolated momentum is within an ulp of zero) [one element of 1,086 off by
             0.047 (SAGE), the rest within one ulp; SGD-SaI without momentum bit-exact]. The
             kernels round to bfloat16 (nearest even) wherever the reference stores a bfloat16
             intermediate and accumulate reductions in float32; the reference's eager CPU ops
             round some coefficients to bfloat16 first (``add_(g, alpha=1-b)`` uses bf16(1-b)),
             the kernels keep them in float32, as torch's CUDA ops do.
"""

from __future__ import annotations

import contextlib
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
from rule_db import presets_covering, reducing_rules, triton_rules  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import slimopt  # noqa: E402
from slimopt.algorithms import get_rule  # noqa: E402
from slimopt.algorithms import sgd_sai as sgd_sai_module  # noqa: E402

# whether triton was imported under its interpreter in this process
INTERPRETED = isinstance(tl.zeros, InterpretedFunction)
needs_compiler = pytest.mark.skipif(INTERPRETED, reason="triton is interpreted in this process")
# where the kernel tests (the ``K`` fixture) run in this process: CPU tensors under the
# interpreter, CUDA tensors with the compiled kernels, or nowhere (the interpreter's child does)
DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)

# non-power-of-two sizes, a [V, d] table, ndim 3, a vector, one element, zero-size tensors
SHAPES = [(7, 13), (40, 9), (3, 4, 5), (5,), (1,), (0,), (0, 4)]
# the registry's rules with Triton kernels (a new one is tested here with its defaults), those
# that reduce over a matrix's rows or columns, and presets that together use every kernel
RULES = triton_rules()
REDUCING = [r for r in reducing_rules() if r in RULES]
KERNEL_PRESETS = presets_covering(RULES)
# each rule with its defaults, then the options that take other kernel paths
CASES = [(rule, {}) for rule in RULES] + [
    ("sgd_sai", {"momentum": 0.0}),
    ("sgd_sai", {"snr_normalize": "max"}),
    ("sage", {"lion_order": True}),
    ("scale", {"momentum": 0.9}),
    ("scale", {"norm_dim": 0}),
    ("scale", {"norm_dim": 0, "momentum": 0.9}),
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
    if DEVICE is None:
        pytest.skip("runs in test_interpreter_battery's child process (no CUDA device here)")
    from slimopt.kernels import triton_ops

    assert triton_ops.interpreted() == INTERPRETED
    return triton_ops


def _group(rule, options):
    mod = get_rule(rule)
    group = dict(mod.DEFAULTS, lr=0.05, **options)
    if rule in ("lion", "sage"):
        group["weight_decay"] = 0.1
    return mod, group


def _run(step, rule, options, dtype, steps=2, shapes=SHAPES, grad_fn=None, fast_setup=None):
    """``steps`` steps of the reference and of ``step`` on the same inputs; returns both sides."""
    mod, group = _group(rule, options)
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]
    fast = [p.clone() for p in ref]
    ref_states = [mod.init_state(p, group) for p in ref]
    fast_states = [mod.init_state(p, group) for p in fast]
    fast_group = dict(group)
    if fast_setup is not None:
        fast_setup(fast_states, fast_group)
    for k in range(steps):
        grads = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]
        if grad_fn is not None:
            grad_fn(k, grads)
        extra = {}
        if rule == "sgd_sai":
            for side, states in ((ref, ref_states), (fast, fast_states)):
                for _p, g, s in zip(side, grads, states):
                    if int(s["step"]) == 0:
                        s["gsnr"].copy_(sgd_sai_module.gradient_snr(g, group["eps"]))
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


@pytest.mark.parametrize(
    "rule,options",
    [(r, {}) for r in REDUCING] + [("scale", {"norm_dim": 0})],
    ids=[*REDUCING, "scale-columns"],
)
def test_reductions_over_many_blocks(K, rule, options):
    """Tall and wide matrices: many row chunks and blocks of partial sums (more than one tile of
    them in a fold), several column tiles per row."""
    shapes = [(300, 3), (2, 300)]
    _assert_same(*_run(K.STEPS[rule], rule, options, torch.float32, 2, shapes), TOL[torch.float32])


def test_sgd_sai_step_that_measures_nothing_leaves_gsnr_unset(K):
    """An all-zero first gradient (what DCP's state initialisation runs) measures nothing: the
    rule's CUDA filter keeps such tensors off the kernels (the multi-tensor path, like the
    reference, only decays, leaves gsnr unset and the step count at 0); the next step with a real
    gradient is a first step, on the kernels."""
    mod = get_rule("sgd_sai")
    group = dict(mod.DEFAULTS, lr=0.05)
    gen = torch.Generator().manual_seed(3)
    ref = [torch.randn(s, generator=gen).to(DEVICE) for s in [(7, 13), (5,)]]
    fast = [p.clone() for p in ref]
    rs = [mod.init_state(p, group) for p in ref]
    fs = [mod.init_state(p, group) for p in fast]
    for grads in (
        [torch.zeros_like(p) for p in ref],
        [torch.randn(p.shape, generator=gen).to(DEVICE) for p in ref],
    ):
        for p, g, s in zip(ref, grads, rs):
            mod.prepare(p, g, s, group)
        for p, g, s in zip(fast, grads, fs):
            mod.prepare(p, g, s, group)
        if not any(g.any() for g in grads):
            assert all(sgd_sai_module.gsnr_unset(s) for s in fs)
        for p, g, s in zip(ref, grads, rs):
            mod.reference(p, g, s, group)
        takes = mod.fused_tensor_filter("cuda")
        kernel = [i for i in range(len(fast)) if takes(fast[i], grads[i], fs[i], group)]
        assert kernel == ([] if not any(g.any() for g in grads) else [0, 1])
        rest = [i for i in range(len(fast)) if i not in kernel]
        for idx, step in ((kernel, K.sgd_sai_step), (rest, mod.foreach)):
            if idx:
                step(*([x[i] for i in idx] for x in (fast, grads, fs)), group)
        _assert_same(ref, fast, rs, fs, TOL[torch.float32])
    assert [int(s["step"]) for s in fs] == [1, 1]


def test_sgd_sai_without_momentum_is_bit_exact(K):
    ref, fast, *_ = _run(K.sgd_sai_step, "sgd_sai", {"momentum": 0.0}, torch.float32)
    for a, b in zip(ref, fast):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", RULES)
def test_tensor_lr_and_tensor_step_counters(K, rule):
    """lr and the step counters (of the rules that count steps) as tensors on the parameters'
    device (the CUDA-graph set-up): read by the kernels, counters advanced in place, same result
    as float lr and int steps."""

    def setup(states, group):
        group["lr"] = torch.tensor(group["lr"], device=DEVICE)
        for s in states:
            if "step" in s:
                s["step"] = torch.tensor(s["step"], dtype=torch.int64, device=DEVICE)

    ref, fast, ref_states, fast_states = _run(
        K.STEPS[rule], rule, {}, torch.float32, fast_setup=setup
    )
    _assert_same(ref, fast, ref_states, fast_states, TOL[torch.float32])
    counters = [s["step"] for s in fast_states if "step" in s]
    assert all(isinstance(c, torch.Tensor) and int(c) == 2 for c in counters)


@pytest.mark.parametrize("rule", REDUCING)
def test_zero_rows_and_columns_stay_finite(K, rule):
    """A gradient with a zero row and a zero column (and an all-zero one): the scalings of
    SinkGD keep their value there instead of growing by sqrt(n)/eps, so nothing overflows."""

    def zero(k, grads):
        grads[0][2].zero_()
        grads[0][:, 5].zero_()
        grads[1].zero_()

    ref, fast, rs, fs = _run(K.STEPS[rule], rule, {}, torch.float32, grad_fn=zero)
    _assert_same(ref, fast, rs, fs, TOL[torch.float32])
    assert all(p.isfinite().all() for p in fast)


def test_mixed_step_counters_are_a_clear_error(K):
    mod, group = _group("sage", {})
    ps = [torch.zeros(3, 4, device=DEVICE), torch.zeros(5, device=DEVICE)]
    states = [mod.init_state(p, group) for p in ps]
    states[0]["step"] = torch.tensor(0, device=DEVICE)
    grads = [torch.ones(3, 4, device=DEVICE), torch.ones(5, device=DEVICE)]
    with pytest.raises(ValueError, match=r"state\['step'\] must be Python ints or tensors"):
        K.sage_step(ps, grads, states, group)


@pytest.mark.parametrize("rule", RULES)
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
    """float64 and a non-contiguous parameter: the rule's CUDA filter keeps them off the kernels
    (``Rule.partition`` steps them with the multi-tensor path, equal to the reference), and a
    kernel handed one directly raises, naming it, instead of stepping it another way."""
    mod, group = _group("lion", {})
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(6, 5, generator=gen), torch.randn(9, generator=gen, dtype=torch.float64)]
    base = [t.to(DEVICE) for t in base]
    ref = [base[0].t().contiguous().t(), base[1].clone()]
    fast = [base[0].t().contiguous().t(), base[1].clone()]
    assert not fast[0].is_contiguous()
    rs, fs = [mod.init_state(p, group) for p in ref], [mod.init_state(p, group) for p in fast]
    grads = [torch.randn(6, 5, generator=gen), torch.randn(9, generator=gen, dtype=torch.float64)]
    grads = [t.to(DEVICE) for t in grads]
    takes = mod.fused_tensor_filter("cuda")
    assert not any(takes(p, g, s, group) for p, g, s in zip(fast, grads, fs))
    for i in range(2):
        with pytest.raises(ValueError, match="tensor 0 .*not one the Triton kernels take"):
            K.lion_step([fast[i]], [grads[i]], [fs[i]], group)
    assert [int(s["step"]) for s in fs] == [0, 0]
    for p, g, s in zip(ref, grads, rs):
        mod.reference(p, g, s, group)
    mod.foreach(fast, grads, fs, group)
    _assert_same(ref, fast, rs, fs, TOL[torch.float32])


def test_self_check_passes_and_reports_a_wrong_kernel(K, monkeypatch):
    from slimopt.algorithms import kernel_check

    for rule in K.STEPS:
        assert kernel_check.self_check(rule, DEVICE)
    monkeypatch.setattr(kernel_check, "_checked", {})
    monkeypatch.setitem(K.STEPS, "lion", lambda params, grads, states, group: None)
    with pytest.warns(RuntimeWarning, match="multi-tensor path is used instead"):
        assert not kernel_check.self_check("lion", DEVICE)
    with pytest.raises(ValueError, match="no Triton kernels for 'adamw'"):
        kernel_check.self_check("adamw")


def test_kernel_modules_import_no_rule():
    """The kernel modules never import slimopt.algorithms: the rules import the kernels and
    check them against their references (slimopt.algorithms.kernel_check), not the reverse."""
    import ast
    from pathlib import Path

    import slimopt.kernels

    for path in Path(slimopt.kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any(n.startswith("slimopt.algorithms") for n in names), (path.name, names)


@needs_compiler
def test_without_the_interpreter_cpu_tensors_take_the_multi_tensor_path():
    from slimopt.kernels import triton_ops as J

    assert not J.interpreted()
    mod = get_rule("sage")
    group = dict(mod.DEFAULTS, lr=0.01)
    p, g = torch.randn(7, 13), torch.randn(7, 13)
    state = mod.init_state(p, group)
    assert not mod.fused_tensor_filter("cuda")(p, g, state, group)  # partition: multi-tensor
    with pytest.raises(ValueError, match="not one the Triton kernels take"):
        J.sage_step([p], [g], [state], group)
    from slimopt.algorithms import kernel_check

    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET"):
        assert not kernel_check.self_check("lion", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("rule", RULES)
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
                s["gsnr"].copy_(sgd_sai_module.gradient_snr(g, group["eps"]))
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


# --------------------------------------------------------------------------- through the optimizer
@pytest.mark.parametrize("preset", KERNEL_PRESETS)
def test_optimizer_steps_through_the_kernels_inside_triton_tier(K, preset):
    """``triton_tier`` routes each rule's multi-tensor step to its kernel (after the self-check)
    and restores it; two optimizer steps of a tiny Llama agree with the multi-tensor path."""
    from lm_models import lm_loss, tiny_llama

    from slimopt import create_optimizer
    from slimopt.bench.profile_cuda import triton_tier

    def backward(model, seed):
        if DEVICE == "cpu":
            lm_loss(model, 32, seed, batch=1, seq=6).backward()
            return
        # on CUDA, gradients drawn on the host: the same in both runs (a CUDA backward sums with
        # atomics, and the sign-based rules would turn its last-bit differences into lr-sized ones)
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)

    results = []
    for use_kernels in (False, True):
        model = tiny_llama(vocab=32, hidden=8, layers=1).to(DEVICE)
        # foreach=True: on CPU tensors the block routes the multi-tensor step to the kernels; on
        # CUDA the kernels are the rules' own fused tier, which foreach=None lets them pick
        on_kernels = DEVICE == "cuda" and use_kernels
        opt = create_optimizer(preset, model, foreach=None if on_kernels else True)
        tier = triton_tier(DEVICE) if use_kernels else contextlib.nullcontext({})
        with tier as status:
            for seed in range(2):
                backward(model, seed)
                opt.step()
                opt.zero_grad()
        if use_kernels:
            assert set(status.values()) == {"triton"}
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert get_rule("sage").foreach.__module__ == "slimopt.algorithms.sage"


# --------------------------------------------------------------------------- slimopt profile --device cuda
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "llama-tiny"], "CUDA is not available"),
        (["--model", "llama-tiny", "--presets", "adam"], "unknown preset 'adam'"),
        (["--model", "llama-tiny", "--steps", "0"], "--steps must be >= 1"),
        (["--model", "llama-tiny", "--dtype", "fp32", "--json"], "CUDA is not available"),
    ],
)
def test_profile_cuda_bad_input_is_a_clear_error(argv, message, capsys):
    from slimopt.cli import main

    assert main(["profile", "--device", "cuda", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_profile_cuda_table_reports_bandwidth_share_floor_and_targets():
    from slimopt.bench.profile_cuda import CudaProfile, CudaRow, format_cuda_table

    def row(preset, ms, moved, target):
        gbps = moved / ms / 1e6
        return CudaRow(preset, ms, ms, moved, gbps, gbps / 4000.0, moved / 4e9, ms / (moved / 4e9),
                       ms / 2.0, target, "triton")  # fmt: skip

    result = CudaProfile(
        rows=[row("torch-adamw-fused", 2.0, 7_000_000, None), row("lion", 1.5, 5_000_000, 0.75)],
        copy_gbps=4000.0,
        conditions={"model": "m", "dtype": "bf16", "kernels": {"lion": "triton"}},
    )
    table = format_cuda_table(result)
    assert "% copy" in table and "x floor" in table and "x fused" in table
    lion = next(line for line in table.splitlines() if line.startswith("lion"))
    assert "<=0.75" in lion and "0.75" in lion.split()[-3]  # 1.5 ms over 2.0 ms


@needs_compiler
def test_triton_tier_falls_back_where_the_kernels_cannot_run():
    """Without a GPU or the interpreter the self-check fails with a warning and every rule
    keeps its multi-tensor path."""
    from slimopt.bench.profile_cuda import triton_tier

    before = {name: get_rule(name).foreach for name in ("lion", "sage")}
    with pytest.warns(RuntimeWarning, match="self-check"), triton_tier("cpu") as status:
        assert get_rule("lion").foreach is before["lion"]
    assert set(status.values()) == {"multi-tensor (self-check failed)"}
    assert {name: get_rule(name).foreach for name in before} == before


def test_training_rate_runs_a_whole_step_per_preset():
    from slimopt.bench.profile_cuda import training_rate

    rates = training_rate(
        "llama-tiny", ["lion"], device="cpu", dtype="fp32", batch=1, seq_len=8, steps=1,
        warmup=0, triton=False, vocab_size=64,
    )  # fmt: skip
    assert set(rates) == {"torch-adamw-fused", "lion"} and all(r > 0 for r in rates.values())


# --------------------------------------------------------------------------- compiled for a GPU
def _ptxas_available() -> bool:
    import shutil

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


def _kernel_variants():
    """(kernel name, argument types, constexprs) of each kernel in bfloat16, its fullest path."""
    from slimopt.kernels import triton_ops as J

    P, F, D = "*i64", "fp32", tl.bfloat16
    ew = {"tab": P, "prog": "*i32", "lr_ptr": "*fp32", "lr": F, "decay": F, "wd": F}
    sr = {"srt": P, "sr_base": "i64"}
    return [
        (J._lion_kernel, dict(ew, b1=F, b2=F), dict(LR_PTR=True, DTYPE=D, BLOCK=1024)),
        (J._sgd_sai_kernel, dict(ew, gmax_ptr="*fp32", mu=F),
         dict(LR_PTR=True, NORM=True, MOM=True, STEP_PTR=True, FIRST=False, DTYPE=D,
              STEP_DTYPE=tl.int64, BLOCK=1024)),
        (J._sage_update_kernel, dict(ew, hws="*fp32", b1=F, b2=F),
         dict(LR_PTR=True, LION_ORDER=False, DTYPE=D, BLOCK=1024)),
        (J._scale_by_columns_kernel, dict(ew, ws="*fp32"),
         dict(LR_PTR=True, SINKHORN=True, DTYPE=D, BLOCK=1024)),
        (J._col_partials_kernel, {"tab": P, "prog": P, "part": "*fp32", "b": F, "a": F},
         dict(MODE=2, DTYPE=D, TILE_ROWS=32, COLS=128)),
        (J._col_partials_kernel, {"tab": P, "prog": P, "part": "*fp32", "b": F, "a": F},
         dict(MODE=4, DTYPE=D, TILE_ROWS=32, COLS=128)),
        (J._sage_damping_kernel,
         {"tab": P, "part": "*fp32", "ws": "*fp32", "steps_ptr": P, "b2": F, "a2": F,
          "bc_host": "*fp32", "eps": F, "s32_off": "i64"},
         dict(STEP_PTR=True, STEP_DTYPE=tl.int64, DTYPE=D, PURE=False, R=D, COLS=128,
              CHUNK_TILE=16)),
        (J._sage_damping_kernel,
         {"tab": P, "part": "*fp32", "ws": "*fp32", "steps_ptr": P, "b2": F, "a2": F,
          "bc_host": "*fp32", "eps": F, "s32_off": "i64"},
         dict(STEP_PTR=True, STEP_DTYPE=tl.int64, DTYPE=D, PURE=True, R=tl.float32, COLS=128,
              CHUNK_TILE=16)),
        (J._col_finish_kernel, {"tab": P, "part": "*fp32", "ws": "*fp32", "eps": F},
         dict(MODE=3, COLS=128, CHUNK_TILE=16)),
        (J._scale_rows_kernel, dict(ew, b=F, eps=F),
         dict(LR_PTR=True, MOM=True, DTYPE=D, ROWS=4, COLS=128)),
        (J._sinkgd_sweep_kernel, {"tab": P, "prog": P, "ws": "*fp32", "part": "*fp32", "eps": F},
         dict(INIT=False, DTYPE=D, ROWS=16, COLS=128)),
        # pure bf16: the rounding table and its base count
        (J._lion_bf16_kernel, dict(ew, b1=F, b2=F, a1=F, a2=F, **sr),
         dict(LR_PTR=True, STOCHASTIC=True, BLOCK=1024)),
        (J._sgd_sai_bf16_kernel,
         {"tab": P, "prog": "*i32", "steps": "*fp32", "decay": F, "mu": F, "a": F, **sr},
         dict(STOCHASTIC=True, BLOCK=1024)),
        (J._sage_update_bf16_kernel, dict(ew, hws="*fp32", b1=F, b2=F, a1=F, a2=F, **sr),
         dict(LR_PTR=True, LION_ORDER=False, STOCHASTIC=True, BLOCK=1024)),
        (J._scale_by_columns_bf16_kernel, dict(ew, ws="*fp32", b=F, a=F, **sr),
         dict(LR_PTR=True, SINKHORN=False, MOM=True, STOCHASTIC=True, BLOCK=1024)),
        (J._scale_by_columns_bf16_kernel, dict(ew, ws="*fp32", b=F, a=F, **sr),
         dict(LR_PTR=False, SINKHORN=True, MOM=False, STOCHASTIC=False, BLOCK=1024)),
        (J._scale_rows_bf16_kernel, dict(ew, b=F, a=F, eps=F, **sr),
         dict(LR_PTR=True, MOM=True, STOCHASTIC=True, ROWS=4, COLS=128)),
    ]  # fmt: skip


@needs_compiler
@pytest.mark.skipif(not _ptxas_available(), reason="triton's CUDA backend (ptxas) is not installed")
def test_every_kernel_compiles_for_a_gpu_without_one():
    """Each kernel through Triton's whole CUDA pipeline to an sm_90 binary (ptxas included), so a
    kernel that only the interpreter accepts fails here rather than at a GPU's first step."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for fn, types, constexprs in _kernel_variants():
        signature = {n: "constexpr" if n in constexprs else types[n] for n in fn.arg_names}
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32)
        )
        assert compiled.asm.get("cubin"), fn.__name__


def test_a_kernel_that_fails_its_self_check_gives_no_fused_step(monkeypatch):
    """A rule's ``"cuda"`` loader returns its kernel step only when the kernels pass their
    self-check on the device: a failing rule's loader returns None, so Rule.partition puts its
    tensors on the multi-tensor path (the kernels never fall back on their own)."""
    import slimopt.kernels as kernels
    from slimopt.algorithms import get_rule, kernel_check
    from slimopt.kernels import triton_ops

    monkeypatch.setattr(kernels, "_triton_failed", None)
    load = get_rule("lion").fused["cuda"]
    monkeypatch.setattr(kernel_check, "self_check", lambda rule, device=None: False)
    assert load() is None
    monkeypatch.setattr(kernel_check, "self_check", lambda rule, device=None: True)
    assert load() is triton_ops.lion_step


@pytest.mark.parametrize("seed", [0, 2**63 + 99, 2**64 - 1])
@pytest.mark.parametrize("offset", [0, 5, 2**33 + 3])
def test_triton_stochastic_rounding_is_bit_identical_to_the_reference(K, seed, offset):
    # tl.philox with the spec's key and counter layout: the same 16-bit integers as the torch
    # reference (itself checked against Philox4x32-10's known answers), so the same bf16 bits
    from slimopt import rounding

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3001, generator=g) * torch.logspace(-30, 30, 3001)
    x[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    ref, out = (
        torch.empty(x.shape, dtype=torch.bfloat16),
        torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE),
    )
    rounding._round_reference(ref, x, seed, 7, offset)
    K.sr_round_bf16(out, x.to(DEVICE), seed, 7, offset)
    assert torch.equal(ref.view(torch.int16), out.cpu().view(torch.int16))


def test_the_registrys_triton_rules_are_the_kernels_steps():
    """Every rule registered with a Triton CUDA tier has a kernel step, so the lists above (taken
    from the registry) cover exactly the kernels."""
    from slimopt.kernels import triton_ops

    assert set(triton_ops.STEPS) == set(RULES)
    assert {rule for rule, _ in CASES} == set(RULES)


@pytest.mark.parametrize("stochastic", [True, False])
def test_triton_pure_bf16_lion_equals_the_native_loop_bit_for_bit(K, stochastic):
    """Lion's pure-bf16 kernel (bf16 read, fp32 registers, torch's fused multiply-adds, the
    parameter rounded in the kernel) writes the same bits as the native CPU loop, itself equal
    to the torch reference on fp32 copies (tests/test_bf16_kernels.py), at a shard offset that is
    not a multiple of 8; each call counts one rounded write."""
    from slimopt.kernels import cpu
    from slimopt.rounding import Rounding

    if cpu.library() is None:
        pytest.skip("no C compiler for the native loop")
    g = torch.Generator().manual_seed(5)
    p = torch.randn(7, 301, generator=g).bfloat16()
    grad = (torch.randn(7, 301, generator=g) * 1e-2).bfloat16()
    m = (torch.randn(7, 301, generator=g) * 1e-2).bfloat16()
    grad.view(-1)[3] = float("inf")
    group = {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.99)}
    state = {"step": 0, "exp_avg": m.clone().to(DEVICE), "sr_seed": 2**62 + 17, "sr_step": 4}
    state["sr_offset"] = 13
    pk = p.clone().to(DEVICE)
    K.lion_step([pk], [grad.to(DEVICE)], [state], group, stochastic=stochastic)
    want_p, want_m = p.clone(), m.clone()
    rounding = Rounding(2**62 + 17, 5, stochastic, 13)
    cpu.lion_step([(want_p, grad, want_m, rounding)], 1e-3, 0.1, 0.9, 0.99)
    assert state["sr_step"] == 5 and state["step"] == 1
    for got, want in ((pk.cpu(), want_p), (state["exp_avg"].cpu(), want_m)):
        nan = want.isnan()  # the bits of a NaN are the hardware's (its sign differs by device)
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert nan.sum() == 0 and want_p.isnan().sum() == 1  # the inf gradient's element


@pytest.mark.parametrize("stochastic", [True, False])
def test_triton_pure_bf16_sgd_sai_equals_the_native_loop_bit_for_bit(K, stochastic):
    """SGD-SaI's pure-bf16 kernel, a first step (m = g) then a later one, writes the same bits
    as the native CPU loop at a shard offset that is not a multiple of 8."""
    from slimopt.kernels import cpu
    from slimopt.rounding import Rounding

    if cpu.library() is None:
        pytest.skip("no C compiler for the native loop")
    g = torch.Generator().manual_seed(6)
    p = torch.randn(5, 203, generator=g).bfloat16()
    m = torch.zeros_like(p)
    group = {"lr": 1e-2, "weight_decay": 0.1, "momentum": 0.9, "snr_normalize": "none"}
    gsnr = torch.tensor(0.37)
    state = {"step": 0, "momentum_buffer": m.clone().to(DEVICE), "gsnr": gsnr.to(DEVICE)}
    state.update(sr_seed=12345, sr_step=0, sr_offset=3)
    pk, want_p, want_m = p.clone().to(DEVICE), p.clone(), m.clone()
    for t in range(2):
        grad = (torch.randn(5, 203, generator=g) * 1e-2).bfloat16()
        K.sgd_sai_step([pk], [grad.to(DEVICE)], [state], group, stochastic=stochastic)
        step = float((1e-2 * gsnr).to(torch.float32))
        rounding = Rounding(12345, t + 1, stochastic, 3)
        item = (want_p, grad, want_m, step, rounding)
        cpu.sgd_sai_step([item], 1e-2, 0.1, 0.0 if t == 0 else 0.9)
        assert state["sr_step"] == t + 1 and state["step"] == t + 1
        assert torch.equal(pk.cpu().view(torch.int16), want_p.view(torch.int16))
        got_m = state["momentum_buffer"].cpu()
        assert torch.equal(got_m.view(torch.int16), want_m.view(torch.int16))


# --------------------------------------------------------------------------- pure bf16 in kernels
PURE_SHAPES = [(7, 13), (3, 4, 5), (5,), (0,)]
PURE_OFFSET = 13  # the first tensor as a shard starting at global element 13 (not a multiple of 8)


def _reference_on_fp32_copies(mod, p, g, state, group, stochastic, **extra):
    """The rule's reference on fp32 copies of parameter, gradient and state: the state rounded
    back to nearest, the parameter with the counter-based bits of its next write count at its
    shard's offset (or to nearest), as the pure-bf16 copy path (slimopt.lean) does."""
    from slimopt.rounding import stochastic_round_

    p32 = p.float()
    s32 = {k: v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v
           for k, v in state.items()}  # fmt: skip
    mod.reference(p32, g.float(), s32, group, **extra)
    for k, v in s32.items():
        old = state[k]
        if torch.is_tensor(old) and old is not v and old.shape == v.shape:
            old.copy_(v)
        else:
            state[k] = v
    state["sr_step"] += 1
    if stochastic:
        stochastic_round_(p, p32, state["sr_seed"], state["sr_step"], state.get("sr_offset", 0))
    else:
        p.copy_(p32)


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}-{o}" for r, o in CASES])
def test_pure_bf16_kernels_equal_the_reference_on_fp32_copies(K, rule, options, stochastic):
    """Every rule's pure-bf16 kernels (bf16 read, fp32 registers, state rounded to nearest, the
    parameter rounded in the kernel) against its reference on fp32 copies rounded with the same
    counter-based bits, over two steps, a shard offset that is not a multiple of 8, and an
    infinite gradient element (NaN where the reference has NaN). Element-wise rules agree bit for
    bit; reducing rules (float32 sums in another order) within one bf16 spacing in at most 5% of
    the elements [measured: bit for bit on these shapes too]. Each step counts one rounded write
    per tensor, empty ones included."""
    mod, group = _group(rule, options)
    if rule == "sgd_sai" and group["momentum"] == 0:
        pytest.skip("pure-bf16 SGD-SaI without momentum steps on fp32 copies (its fused_takes)")
    gen = torch.Generator().manual_seed(2)
    ref = [torch.randn(s, generator=gen).bfloat16().to(DEVICE) for s in PURE_SHAPES]
    fast = [p.clone() for p in ref]
    sides = []
    for side in (ref, fast):
        states = [dict(mod.init_state(p, group), sr_seed=2**63 + 11 * i, sr_step=4)
                  for i, p in enumerate(side)]  # fmt: skip
        states[0]["sr_offset"] = PURE_OFFSET
        sides.append(states)
    ref_states, fast_states = sides
    for k in range(2):
        grads = [(torch.randn(s, generator=gen) * 0.1).bfloat16().to(DEVICE) for s in PURE_SHAPES]
        if k == 1:
            grads[0].view(-1)[5] = float("inf")
        extra = {}
        if rule == "sgd_sai":
            for side, states in ((ref, ref_states), (fast, fast_states)):
                for p, g, s in zip(side, grads, states):
                    sgd_sai_module.prepare(p, g, s, group)
            if group["snr_normalize"] == "max":
                extra["gsnr_max"] = torch.stack([s["gsnr"] for s in ref_states]).max()
        for p, g, s in zip(ref, grads, ref_states):
            _reference_on_fp32_copies(mod, p, g, s, group, stochastic, **extra)
        K.STEPS[rule](fast, grads, fast_states, dict(group), stochastic=stochastic, **extra)
    exact = get_rule(rule).sharded == "elementwise"
    pairs = list(zip(ref, fast))
    for sa, sb in zip(ref_states, fast_states):
        assert sb["sr_step"] == sa["sr_step"] == 6
        assert sb.get("step") == sa.get("step")
        pairs += [
            (v, sb[key]) for key, v in sa.items() if torch.is_tensor(v) and v.is_floating_point()
        ]
    off = total = 0
    for want, got in pairs:
        want, got = want.cpu(), got.cpu()
        assert got.dtype == want.dtype
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        if exact:
            assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
            continue
        keep = ~nan & (got != want)  # infinities equal, the rest within a spacing
        diff = (got[keep].double() - want[keep].double()).abs()
        bits = want[keep].float().abs().view(torch.int32) & -65536
        spacing = (bits + 65536).view(torch.float32).double() - bits.view(torch.float32).double()
        assert (diff <= spacing).all()
        off += diff.numel()
        total += want.numel()
    assert off <= max(2, total // 20)
    assert not ref[0].isfinite().all()  # the infinite gradient reached the parameter


@pytest.mark.parametrize("rule", RULES)
def test_pure_bf16_steps_copy_no_table_after_the_first(K, rule):
    """The launch and rounding tables of a pure-bf16 step stay the same from step to step (the
    write counts enter as the launch's smallest count, a kernel scalar), so a training loop builds
    and copies them once; the bits still follow each step's count."""
    mod, group = _group(rule, {})
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).bfloat16().to(DEVICE) for s in [(6, 9), (4,)]]
    states = [dict(mod.init_state(p, group), sr_seed=5 + i, sr_step=i)
              for i, p in enumerate(params)]  # fmt: skip
    grads = [torch.randn(p.shape, generator=gen).bfloat16().to(DEVICE) for p in params]
    seen = []
    for _ in range(3):
        if rule == "sgd_sai":
            for p, g, s in zip(params, grads, states):
                sgd_sai_module.prepare(p, g, s, group)
        K.STEPS[rule](params, grads, states, group)
        seen.append(set(K._tables))
    assert seen[1] == seen[2]  # the first step is a first (SGD-SaI: momentum 0), the others alike
    assert [s["sr_step"] for s in states] == [3, 4]
