"""The table-driven battery: every rule and every preset through the same checks."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from lm_models import lm_loss, tiny_llama

import slimopt
from slimopt.algorithms import ALGORITHMS, get_rule

# rule -> extra group options exercised by the battery (beyond the defaults)
RULE_CONFIGS: list[tuple[str, dict]] = [
    ("sage", {"weight_decay": 0.1}),
    ("sage", {"lion_order": True}),
    ("sinkgd", {"weight_decay": 0.1}),
    ("sinkgd", {"iters": 1}),
    ("scale", {}),
    ("scale", {"momentum": 0.9, "norm_dim": 0}),
    ("sgd_sai", {}),
    ("sgd_sai", {"momentum": 0.0}),
    ("sgd_sai", {"snr_normalize": "max"}),
    ("lion", {"weight_decay": 0.1}),
    ("adamw", {}),
]
SHAPES = [(0, 5), (1,), (7,), (50, 8), (4, 3, 5), (6, 9), ()]


def make_params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def fill_grads(params, step, skip_every=3):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        # every third parameter misses a gradient on some steps (and one misses the first)
        if (i + step) % skip_every == 0:
            p.grad = None
        else:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * (1 + i)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    scale = b.abs().max().clamp(min=1e-30)
    return float((a - b).abs().max() / scale)


def run_rule(algorithm, options, foreach, steps=6, dtype=torch.float64):
    params = make_params(dtype)
    opt = slimopt.SlimOptimizer(
        [{"params": params, "algorithm": algorithm, **options}], foreach=foreach
    )
    for t in range(steps):
        fill_grads(params, t)
        opt.step()
    return params, opt


@pytest.mark.parametrize("algorithm,options", RULE_CONFIGS, ids=lambda x: str(x))
def test_fast_path_equals_reference_float64(algorithm, options):
    fast, _ = run_rule(algorithm, options, foreach=True)
    ref, _ = run_rule(algorithm, options, foreach=False)
    start = make_params()
    for f, r in zip(fast, ref):
        assert torch.isfinite(r).all()
        assert rel_err(f.detach(), r.detach()) <= 1e-10, f.shape
    moved = [not torch.equal(r, s) for r, s in zip(ref, start) if r.numel() > 1]
    assert all(moved), moved


def test_every_rule_is_in_the_battery():
    assert {a for a, _ in RULE_CONFIGS} == set(ALGORITHMS)


@pytest.mark.parametrize("algorithm,options", RULE_CONFIGS, ids=lambda x: str(x))
@pytest.mark.parametrize("foreach", [True, False])
def test_state_dict_round_trip_and_exact_resume(algorithm, options, foreach):
    dtype = torch.float32
    params = make_params(dtype)
    opt = slimopt.SlimOptimizer(
        [{"params": params, "algorithm": algorithm, **options}], foreach=foreach
    )
    for t in range(3):
        fill_grads(params, t)
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    params2 = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2 = slimopt.SlimOptimizer([{"params": params2, "algorithm": algorithm}], foreach=foreach)
    opt2.load_state_dict(ckpt["opt"])
    for t in range(3, 7):
        fill_grads(params, t)
        opt.step()
        fill_grads(params2, t)
        opt2.step()
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    for p, q in zip(params, params2):
        for k, v in opt.state[p].items():
            w = opt2.state[q][k]
            assert type(v) is type(w)
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and torch.equal(v, w)
            else:
                assert v == w


@pytest.mark.parametrize("algorithm,options", RULE_CONFIGS, ids=lambda x: str(x))
def test_zero_gradients_and_tiny_tensors_stay_finite(algorithm, options):
    params = make_params(torch.float32)
    opt = slimopt.SlimOptimizer([{"params": params, "algorithm": algorithm, **options}])
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p in params:
        assert torch.isfinite(p).all()
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                assert torch.isfinite(v).all()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("foreach", [True, False])
def test_nonfinite_gradient_is_not_hidden(algorithm, bad, foreach):
    torch.manual_seed(0)
    matrix = torch.randn(6, 4, requires_grad=True)
    vector = torch.randn(5, requires_grad=True)
    opt = slimopt.SlimOptimizer(
        [{"params": [matrix, vector], "algorithm": algorithm}], foreach=foreach
    )
    for p in (matrix, vector):
        p.grad = torch.randn_like(p)
    opt.step()  # one clean step first, so that stateful rules have history
    for p in (matrix, vector):
        p.grad = torch.randn_like(p)
        p.grad.view(-1)[1] = bad
    opt.step()
    for p in (matrix, vector):
        assert not torch.isfinite(p).all(), f"{algorithm} hid a {bad} gradient"


@pytest.mark.parametrize("algorithm,options", RULE_CONFIGS, ids=lambda x: str(x))
def test_bf16_parameters_keep_state_in_their_dtype(algorithm, options):
    params = make_params(torch.bfloat16)
    opt = slimopt.SlimOptimizer([{"params": params, "algorithm": algorithm, **options}])
    for t in range(3):
        fill_grads(params, t)
        opt.step()
    for p in params:
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                assert v.dtype == torch.bfloat16, (algorithm, k)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_closure_is_evaluated_and_returned(algorithm):
    w = torch.randn(4, 3, requires_grad=True)
    opt = slimopt.SlimOptimizer([{"params": [w], "algorithm": algorithm}])
    calls = []

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        calls.append(1)
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss)
    assert not torch.equal(before, w)


# ---------------------------------------------------------------- presets on a small LLaMA
def train_preset(preset, foreach, steps=4, dtype=torch.float64, model=None):
    model = copy.deepcopy(model) if model is not None else tiny_llama()
    model.to(dtype)
    opt = slimopt.create_optimizer(preset, model, foreach=foreach)
    for t in range(steps):
        opt.zero_grad()
        lm_loss(model, 64, seed=t).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_preset_fast_path_equals_reference_float64(preset):
    base = tiny_llama()
    fast, _ = train_preset(preset, True, model=base)
    ref, _ = train_preset(preset, False, model=base)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert rel_err(a.detach(), b.detach()) <= 1e-10, name


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_preset_exact_resume(preset):
    base = tiny_llama()
    model, opt = train_preset(preset, True, steps=3, dtype=torch.float32, model=base)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = tiny_llama(seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = slimopt.create_optimizer(preset, model2)
    opt2.load_state_dict(ckpt["opt"])
    for m, o in ((model, opt), (model2, opt2)):
        for t in range(3, 6):
            o.zero_grad()
            lm_loss(m, 64, seed=t).backward()
            o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def expected_state_bytes(preset: str, model) -> int:
    """The spec's memory formula, written independently of the optimizer code."""
    roles = slimopt.param_roles(model)
    rules = slimopt.presets.PRESET_RULES[preset]
    total = 0
    for name, p in model.named_parameters():
        role, rule = roles[name], rules[roles[name]]
        n, size = p.numel(), p.element_size()
        if rule == "adamw":
            total += 2 * n * size + 4  # exp_avg, exp_avg_sq, float32 step
        elif rule == "lion":
            total += n * size
        elif rule == "sage":
            columns = math.prod(p.shape[1:]) if p.ndim >= 2 else n
            total += (n + columns) * size  # momentum + O(d) statistic (2 per vector entry)
        elif rule == "sinkgd":
            total += 0
        elif rule == "scale":
            total += n * size if role == "lm_head" else 0
        elif rule == "sgd_sai":
            total += n * size + 4  # momentum + float32 gsnr
    return total


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_state_bytes_matches_the_spec_formula(preset):
    model, opt = train_preset(preset, True, steps=1, dtype=torch.float32)
    assert slimopt.state_bytes(opt) == expected_state_bytes(preset, model)
    if preset == "sinkgd-pure":
        assert slimopt.state_bytes(opt) == 0


def test_state_bytes_sage_hybrid_is_embedding_head_columns_and_two_per_vector():
    model, opt = train_preset("sage-hybrid", True, steps=1, dtype=torch.float32)
    V, d = model.model.embed_tokens.weight.shape
    vectors = sum(p.numel() for p in model.parameters() if p.ndim <= 1)
    assert slimopt.state_bytes(opt) == 4 * (2 * (V * d + d) + 2 * vectors)


def test_rules_report_names_in_defaults():
    for name in ALGORITHMS:
        rule = get_rule(name)
        assert rule.NAME == name and "lr" in rule.DEFAULTS
