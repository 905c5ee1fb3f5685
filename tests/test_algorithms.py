"""The table-driven battery: every rule configuration of ``rule_db`` and every preset through the
same checks (every tier against the reference in float64, resume, bad input, state bytes)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from lm_models import lm_loss, tiny_llama
from rule_db import (
    RULE_CASES,
    TIERS,
    check_covered,
    fill_grads,
    has_fused,
    make_optimizer,
    make_params,
    rel_err,
    run_case,
)
from rule_db import (
    expected_state_bytes as expected_case_state_bytes,
)

import slimopt
from slimopt.algorithms import ALGORITHMS

CASE_IDS = [c.id for c in RULE_CASES]


@pytest.mark.parametrize("tier", ["foreach", "fused", "default"])
@pytest.mark.parametrize("case", RULE_CASES, ids=CASE_IDS)
def test_every_tier_equals_reference_float64(case, tier):
    if tier == "fused" and not has_fused(case.algorithm):
        pytest.skip(f"no fused CPU tier for {case.algorithm} here")
    fast, _ = run_case(case, tier)
    ref, _ = run_case(case, "reference")
    start = make_params()
    for f, r in zip(fast, ref):
        assert torch.isfinite(r).all()
        assert rel_err(f.detach(), r.detach()) <= 1e-10, f.shape
    moved = [not torch.equal(r, s) for r, s in zip(ref, start) if r.numel() > 1]
    assert all(moved), moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", RULE_CASES, ids=CASE_IDS)
def test_state_bytes_of_every_rule_configuration(case, dtype):
    params, opt = run_case(case, steps=2, dtype=dtype)
    stepped = [p for p in params if p in opt.state]
    assert stepped
    assert slimopt.state_bytes(opt) == sum(expected_case_state_bytes(case, p) for p in stepped)


def test_every_rule_is_in_the_battery():
    assert check_covered() == set()


@pytest.mark.parametrize("case", RULE_CASES, ids=CASE_IDS)
def test_bad_hyperparameters_are_rejected_by_name(case):
    for key, value in case.bad.items():
        with pytest.raises(ValueError, match=key.split("[")[0]):
            slimopt.SlimOptimizer(
                [{"params": make_params(), "algorithm": case.algorithm, **case.options, key: value}]
            )


@pytest.mark.parametrize("tier", ["reference", "default"])
@pytest.mark.parametrize("case", RULE_CASES, ids=CASE_IDS)
def test_state_dict_round_trip_and_exact_resume(case, tier):
    dtype = torch.float32
    params, opt = run_case(case, tier, steps=3, dtype=dtype)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    params2 = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2 = slimopt.SlimOptimizer([{"params": params2, "algorithm": case.algorithm}], **TIERS[tier])
    opt2.load_state_dict(ckpt["opt"])
    run_case(case, steps=4, start=3, params=params, opt=opt)
    run_case(case, steps=4, start=3, params=params2, opt=opt2)
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


@pytest.mark.parametrize("case", RULE_CASES, ids=CASE_IDS)
def test_zero_gradients_and_tiny_tensors_stay_finite(case):
    params = make_params(torch.float32)
    opt = make_optimizer(case, params)
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
@pytest.mark.parametrize("tier", ["reference", "foreach", "default"])
def test_nonfinite_gradient_is_not_hidden(algorithm, bad, tier):
    torch.manual_seed(0)
    matrix = torch.randn(6, 4, requires_grad=True)
    vector = torch.randn(5, requires_grad=True)
    opt = slimopt.SlimOptimizer(
        [{"params": [matrix, vector], "algorithm": algorithm}], **TIERS[tier]
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


@pytest.mark.parametrize("case", RULE_CASES, ids=CASE_IDS)
def test_bf16_parameters_keep_state_in_their_dtype(case):
    algorithm = case.algorithm
    params = make_params(torch.bfloat16)
    opt = make_optimizer(case, params)
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
def train_preset(preset, tier="default", steps=4, dtype=torch.float64, model=None):
    model = copy.deepcopy(model) if model is not None else tiny_llama()
    model.to(dtype)
    opt = slimopt.create_optimizer(preset, model, **TIERS[tier])
    for t in range(steps):
        opt.zero_grad()
        lm_loss(model, 64, seed=t).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_preset_fast_path_equals_reference_float64(preset):
    base = tiny_llama()
    ref, _ = train_preset(preset, "reference", model=base)
    for tier in ("default", "foreach"):
        fast, _ = train_preset(preset, tier, model=base)
        for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
            assert rel_err(a.detach(), b.detach()) <= 1e-10, (tier, name)


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_preset_exact_resume(preset):
    base = tiny_llama()
    model, opt = train_preset(preset, steps=3, dtype=torch.float32, model=base)
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
    model, opt = train_preset(preset, steps=1, dtype=torch.float32)
    assert slimopt.state_bytes(opt) == expected_state_bytes(preset, model)
    if preset == "sinkgd-pure":
        assert slimopt.state_bytes(opt) == 0


def test_state_bytes_sage_hybrid_is_embedding_head_columns_and_two_per_vector():
    model, opt = train_preset("sage-hybrid", steps=1, dtype=torch.float32)
    V, d = model.model.embed_tokens.weight.shape
    vectors = sum(p.numel() for p in model.parameters() if p.ndim <= 1)
    assert slimopt.state_bytes(opt) == 4 * (2 * (V * d + d) + 2 * vectors)


# ---------------------------------------------------------------- loading another optimizer's state
def test_loading_another_presets_state_names_the_rule():
    model, opt = train_preset("sage-hybrid", steps=1, dtype=torch.float32)
    other = slimopt.create_optimizer("lion", model)
    with pytest.raises(ValueError, match=r"param group 0: .*algorithm 'sage'.* 'lion'"):
        other.load_state_dict(opt.state_dict())
    assert all(g["algorithm"] == "lion" for g in other.param_groups)


def test_loading_a_state_of_another_model_size_names_the_parameter():
    _, opt = train_preset("lion", steps=1, dtype=torch.float32)
    bigger = tiny_llama(hidden=24)
    other = slimopt.create_optimizer("lion", bigger)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*\(64, 16\).*\(64, 24\)"):
        other.load_state_dict(opt.state_dict())


def test_loading_a_state_with_another_role_is_refused():
    model, opt = train_preset("adamw", steps=1, dtype=torch.float32)
    sd = opt.state_dict()
    sd["param_groups"][0]["role"] = "matrix"
    with pytest.raises(ValueError, match="role 'matrix'"):
        slimopt.create_optimizer("adamw", model).load_state_dict(sd)


# ---------------------------------------------------------------- SGD-SaI under DCP's state init
def test_sgd_sai_learns_after_dcp_state_initialisation():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    base = tiny_llama()
    runs = []
    for through_dcp in (False, True):
        model = copy.deepcopy(base)
        opt = slimopt.create_optimizer("sgd-sai", model)
        if through_dcp:  # runs a step at lr 0 with zero gradients on the fresh optimizer
            get_optimizer_state_dict(model, opt)
            assert all(s["step"] == 0 for s in opt.state.values())
        for t in range(3):
            opt.zero_grad()
            lm_loss(model, 64, seed=t).backward()
            opt.step()
        runs.append(model)
    moved = [not torch.equal(a, b) for a, b in zip(runs[1].parameters(), base.parameters())]
    assert all(moved)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)


def test_sgd_sai_all_zero_first_gradient_leaves_gsnr_unset():
    w = torch.ones(4, 3, requires_grad=True)
    opt = slimopt.SGDSaI([w], lr=0.1, weight_decay=0.0)
    w.grad = torch.zeros(4, 3)
    opt.step()
    assert opt.state[w]["step"] == 0 and float(opt.state[w]["gsnr"]) < 0
    w.grad = torch.arange(12.0).view(4, 3)
    opt.step()
    assert opt.state[w]["step"] == 1 and float(opt.state[w]["gsnr"]) > 0
    assert not torch.equal(w, torch.ones(4, 3))


# ---------------------------------------------------------------- schedulers and group keys
PUBLIC_CLASSES = [
    slimopt.SAGE,
    slimopt.SinkGD,
    slimopt.SCALE,
    slimopt.SGDSaI,
    slimopt.Lion,
    slimopt.AdamW,
]


def _schedulers(opt):
    from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

    yield OneCycleLR(opt, max_lr=1e-3, total_steps=10)
    yield CyclicLR(opt, base_lr=1e-4, max_lr=1e-3)


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_one_cycle_and_cyclic_lr_work_with_default_arguments_for_every_preset(preset):
    model = tiny_llama()
    for make in range(2):
        opt = slimopt.create_optimizer(preset, model)
        sched = list(_schedulers(opt))[make]
        for t in range(3):
            opt.zero_grad()
            lm_loss(model, 64, seed=t).backward()
            opt.step()
            sched.step()
        key = "betas" if "betas" in opt.defaults else "momentum"
        assert all(key in g for g in opt.param_groups)


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda c: c.__name__)
def test_one_cycle_and_cyclic_lr_work_with_every_public_class(cls):
    for make in range(2):
        w = torch.randn(5, 4, requires_grad=True)
        opt = cls([w])
        sched = list(_schedulers(opt))[make]
        for _ in range(3):
            w.grad = torch.randn_like(w)
            opt.step()
            sched.step()
        assert torch.isfinite(w).all()


def test_scheduled_momentum_reaches_rules_that_have_it_and_no_other():
    from torch.optim.lr_scheduler import OneCycleLR

    def run(momentum_of_sinkgd):
        torch.manual_seed(0)
        a, b = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
        opt = slimopt.SlimOptimizer(
            [{"params": [a], "algorithm": "sage"}, {"params": [b], "algorithm": "sinkgd"}]
        )
        sched = OneCycleLR(opt, max_lr=1e-2, total_steps=10)
        for t in range(3):
            opt.param_groups[1]["betas"] = (momentum_of_sinkgd, 0.0)
            g = torch.Generator().manual_seed(t)
            a.grad, b.grad = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
            opt.step()
            sched.step()
        return opt, b.detach().clone()

    opt, b1 = run(0.0)
    _, b2 = run(0.95)
    assert torch.equal(b1, b2)  # the inert key changes nothing in SinkGD
    assert opt.param_groups[0]["betas"][0] != 0.9  # SAGE's beta1 is scheduled


def test_torchtitan_style_fused_and_foreach_group_keys_are_accepted():
    w, v = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = slimopt.SlimOptimizer(
        [
            {"params": [w], "algorithm": "sage", "fused": None, "foreach": None},
            {"params": [v], "algorithm": "adamw", "fused": False, "foreach": True},
        ]
    )
    w.grad, v.grad = torch.randn_like(w), torch.randn_like(v)
    opt.step()
    assert opt.param_groups[1]["fused"] is False
    with pytest.raises(ValueError, match="'fused' must be None, True or False"):
        slimopt.SlimOptimizer([{"params": [w], "algorithm": "sage", "fused": "yes"}])


def test_step_params_steps_only_the_given_parameters():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    ref_a = a.detach().clone().requires_grad_()
    opt = slimopt.Lion([a, b], lr=0.1)
    ref = slimopt.Lion([ref_a], lr=0.1)
    a.grad, b.grad = torch.randn(5, 3), torch.randn(5, 3)
    ref_a.grad = a.grad.clone()
    before_b = b.detach().clone()
    opt.step_params([a])
    ref.step()
    assert torch.equal(a, ref_a) and torch.equal(b, before_b)
    assert opt.state[a]["step"] == 1 and not opt.state[b]
    with pytest.raises(ValueError, match="in none of this optimizer's param groups"):
        opt.step_params([torch.zeros(2, requires_grad=True)])


def test_every_public_class_defaults_to_its_rules_defaults():
    """The classes' keyword defaults are the Rule's, for every registered rule."""
    import inspect

    from slimopt.algorithms import ALGORITHMS, get_rule

    classes = {
        cls: cls.__init__
        for cls in vars(slimopt.optimizer).values()
        if isinstance(cls, type)
        and issubclass(cls, slimopt.SlimOptimizer)
        and cls is not slimopt.SlimOptimizer
    }
    covered = set()
    for cls, init in classes.items():
        source = inspect.getsource(init)
        (name,) = [a for a in ALGORITHMS if f'"{a}"' in source]
        covered.add(name)
        rule = get_rule(name)
        params = inspect.signature(init).parameters
        for key, value in rule.defaults.items():
            assert key in params, (cls.__name__, key)
            assert params[key].default == value, (cls.__name__, key, params[key].default, value)
    assert covered <= set(ALGORITHMS)  # a rule needs no class; a class names its rule
