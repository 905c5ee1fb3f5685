"""Lean modes: stochastic rounding to bf16, pure-bf16 steps, updates applied during backward."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from lm_models import lm_loss, tiny_gpt2, tiny_llama

import slimopt
from slimopt.lean import (
    LeanModeError,
    check_no_global_clip,
    round_to_bf16,
    stochastic_round_,
)

VOCAB = 64


# --------------------------------------------------------------------------- rounding
def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above |x| (in magnitude), as float64."""
    bits = x.view(torch.int32)
    low = (bits & -65536).view(torch.float32).double()
    high = ((bits & -65536) + 65536).view(torch.float32).double()
    return low, high


def test_stochastic_rounding_is_unbiased_within_a_statistical_bound():
    torch.manual_seed(0)
    x = torch.randn(64) * torch.logspace(-3, 3, 64)
    n = 4000
    rounded = torch.stack([round_to_bf16(x, seed=s).double() for s in range(n)])
    low, high = _bf16_neighbours(x)
    # every draw is one of the two neighbours
    assert ((rounded == low) | (rounded == high)).all()
    # Each draw is a Bernoulli between the neighbours: its std is at most spacing/2, so the mean
    # of n draws lies within 5 standard errors (5 * spacing / (2 sqrt(n))) of x but for ~1e-6.
    spacing = (high - low).abs()
    err = (rounded.mean(0) - x.double()).abs()
    assert (err <= 5 * spacing / (2 * math.sqrt(n))).all(), (err / spacing).max()
    # round-to-nearest is biased by up to half a spacing: the bound above is tight enough to see it
    rtn_err = (x.to(torch.bfloat16).double() - x.double()).abs()
    assert (rtn_err > 5 * spacing / (2 * math.sqrt(n))).sum() > 20


def test_stochastic_rounding_keeps_exact_values_and_non_finite():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0**127, float("inf"), float("-inf"), float("nan")])
    y = round_to_bf16(x, seed=3)
    assert torch.equal(y[:5].float(), x[:5])
    assert y[5] == float("inf") and y[6] == float("-inf") and y[7].isnan()
    with pytest.raises(TypeError, match="float32 into bfloat16"):
        stochastic_round_(torch.empty(2), torch.zeros(2), torch.Generator())


def _bf16_lion(sr):
    p = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    opt = slimopt.Lion([p], lr=1e-4, stochastic_rounding=sr)
    for _ in range(50):
        p.grad = torch.ones_like(p)
        opt.step()
    return p


def test_updates_below_bf16_spacing_move_the_weights_only_with_stochastic_rounding():
    # Lion moves each weight by lr = 1e-4 per step; bf16's spacing at 1.0 is 2^-7 = 0.0078.
    moved = _bf16_lion(None).double().mean().item()
    assert abs(moved - (1.0 - 50 * 1e-4)) < 2e-4
    assert torch.equal(_bf16_lion(False), torch.ones(20000, dtype=torch.bfloat16))


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_pure_bf16_step_is_the_fp32_step_rounded(preset):
    # One step (the first, from zero state) from bf16 weights equals the fp32 step from the same
    # values, rounded: to nearest exactly, stochastically to one of the two bf16 neighbours. SAGE
    # and SCALE keep bf16 state that enters this step (SAGE's S, SCALE's head momentum), which
    # moves their update by bf16's relative precision (2^-8): there the result is within one bf16
    # spacing plus 1% of the update of the fp32 result.
    base = tiny_llama(vocab=VOCAB).to(torch.bfloat16)
    lm_loss(base, VOCAB, seed=1).backward()
    ref = copy.deepcopy(base).float()
    for p, q in zip(ref.parameters(), base.parameters()):
        p.grad = q.grad.float()
    slimopt.create_optimizer(preset, ref).step()
    for sr in (False, True):
        model = copy.deepcopy(base)
        for p, q in zip(model.parameters(), base.parameters()):
            p.grad = q.grad.clone()
        opt = slimopt.create_optimizer(preset, model, stochastic_rounding=sr)
        opt.step()
        exact = preset not in ("sage-hybrid", "sage-pure", "scale")
        for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), base.parameters()):
            assert p.dtype == torch.bfloat16
            low, high = _bf16_neighbours(q.detach().clone())
            if exact and not sr:
                assert torch.equal(p, q.to(torch.bfloat16)), (preset, name)
            elif exact:
                assert ((p.double() == low) | (p.double() == high)).all(), (preset, name)
            else:
                spacing = (high - low).abs()
                update = (q.double() - p0.double()).abs()
                bound = spacing + 0.01 * update
                assert ((p.double() - q.double()).abs() <= bound).all(), (preset, name)
            for k, v in opt.state[p].items():
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    assert v.dtype == torch.bfloat16, (preset, name, k)


def _train(model, opt, steps, seed=0, sched=None):
    for t in range(steps):
        loss = lm_loss(model, VOCAB, seed=seed + t)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def test_pure_bf16_resume_is_bit_exact():
    model = tiny_llama(vocab=VOCAB).to(torch.bfloat16)
    opt = slimopt.create_optimizer("sage-hybrid", model)
    _train(model, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 2, seed=10)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # a different global seed must not matter after a resume
    resumed = tiny_llama(vocab=VOCAB).to(torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    opt2 = slimopt.create_optimizer("sage-hybrid", resumed)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, 2, seed=10)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- step in backward
def _pair(build, preset, **kw):
    a = build()
    b = copy.deepcopy(a)
    return (a, slimopt.create_optimizer(preset, a, **kw)), (
        b,
        slimopt.create_optimizer(preset, b, step_in_backward=True, **kw),
    )


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_step_in_backward_equals_the_ordinary_step_float64(preset):
    def build():
        return tiny_llama(vocab=VOCAB).double()

    (a, opt_a), (b, opt_b) = _pair(build, preset)
    sched_a = torch.optim.lr_scheduler.LinearLR(opt_a, 1.0, 0.5, total_iters=3)
    sched_b = torch.optim.lr_scheduler.LinearLR(opt_b, 1.0, 0.5, total_iters=3)
    _train(a, opt_a, 3, sched=sched_a)
    _train(b, opt_b, 3, sched=sched_b)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=f"{preset}: {name}")
    assert opt_a.state_dict()["param_groups"] == opt_b.state_dict()["param_groups"]


def test_step_in_backward_frees_gradients_and_equals_in_bf16():
    (a, opt_a), (b, opt_b) = _pair(lambda: tiny_llama(vocab=VOCAB).to(torch.bfloat16), "scale")
    seen = []
    for p in b.parameters():
        p.register_post_accumulate_grad_hook(lambda q: seen.append(q.grad is not None))
    _train(a, opt_a, 2)
    lm_loss(b, VOCAB, seed=0).backward()
    assert all(p.grad is None for p in b.parameters())
    opt_b.step()
    opt_b.zero_grad()  # harmless: nothing left to clear
    lm_loss(b, VOCAB, seed=1).backward()
    opt_b.step()
    # stochastic rounding draws per parameter and step, so the order of updates does not matter
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_step_in_backward_with_tied_weights_and_checkpointing():
    (a, opt_a), (b, opt_b) = _pair(
        lambda: tiny_gpt2(vocab=VOCAB).double().eval(), "sage-hybrid"
    )  # no dropout
    assert a.lm_head.weight is a.transformer.wte.weight
    _train(a, opt_a, 2)
    _train(b, opt_b, 2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)

    (c, opt_c), (d, opt_d) = _pair(lambda: tiny_llama(vocab=VOCAB).double(), "sinkgd-hybrid")
    for m in (c, d):
        m.gradient_checkpointing_enable()
        m.train()
    _train(c, opt_c, 2)
    _train(d, opt_d, 2)
    for p, q in zip(c.parameters(), d.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_step_in_backward_resume_from_state_dict():
    (a, opt_a), (b, opt_b) = _pair(lambda: tiny_llama(vocab=VOCAB).double(), "sage-hybrid")
    _train(a, opt_a, 3)
    _train(b, opt_b, 1)
    c = copy.deepcopy(b)
    opt_c = slimopt.create_optimizer("sage-hybrid", c, step_in_backward=True)
    opt_c.load_state_dict(opt_b.state_dict())
    _train(c, opt_c, 2, seed=1)
    for p, q in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_step_in_backward_errors_before_any_update():
    model = tiny_llama(vocab=VOCAB)
    opt = slimopt.create_optimizer("lion", model, step_in_backward=True)
    lm_loss(model, VOCAB, seed=0).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LeanModeError, match="gradient accumulation"):
        lm_loss(model, VOCAB, seed=1).backward()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    opt.step()
    lm_loss(model, VOCAB, seed=1).backward()  # fine after step()

    with pytest.raises(LeanModeError, match="snr_normalize"):
        slimopt.create_optimizer("sgd-sai", model, step_in_backward=True, snr_normalize="max")
    with pytest.raises(LeanModeError, match="DataParallel"):
        slimopt.create_optimizer("scale", torch.nn.DataParallel(model), step_in_backward=True)
    with pytest.raises(LeanModeError, match="gradient-norm clip"):
        check_no_global_clip(opt, 1.0)
    check_no_global_clip(opt, None)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        slimopt.Lion(model.parameters(), stochastic_rounding="yes")


@pytest.mark.parametrize("name", ["slimopt.lean", "slimopt.planner"])
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
