"""slimopt against the official implementations, step by step on a small LlamaForCausalLM."""

from __future__ import annotations

import copy

import pytest
import torch
from lm_models import lm_loss, tiny_llama

import slimopt
from slimopt.presets import PRIMARY_RULE, preset_lrs

STEPS = 20
# each preset's default peak learning rate of its single rule, given to the official optimizer
LR = {p: preset_lrs(p)[PRIMARY_RULE[p]] for p in ("adamw", "lion", "sgd-sai")}


def max_rel_diff(model_a, model_b) -> float:
    worst = 0.0
    with torch.no_grad():
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            diff = (a - b).abs().max() / b.abs().max().clamp(min=1e-30)
            worst = max(worst, float(diff))
    return worst


def lockstep(ours_factory, theirs_factory, model, steps=STEPS):
    """Train two copies on identical batches; return the worst max relative difference seen."""
    ours_model, theirs_model = copy.deepcopy(model), copy.deepcopy(model)
    ours, theirs = ours_factory(ours_model), theirs_factory(theirs_model)
    worst = 0.0
    for t in range(steps):
        for m, opt in ((ours_model, ours), (theirs_model, theirs)):
            opt.zero_grad()
            lm_loss(m, 64, seed=t).backward()
            opt.step()
        worst = max(worst, max_rel_diff(ours_model, theirs_model))
    return worst


@pytest.mark.parametrize("foreach", [True, False])
def test_sgd_sai_matches_official_package(foreach):
    sgd_sai = pytest.importorskip("sgd_sai")
    model = tiny_llama()
    assert all(p.numel() > 1 for p in model.parameters())  # the official code mishandles those
    worst = lockstep(
        lambda m: slimopt.SGDSaI(m.parameters(), lr=1e-2, weight_decay=1e-2, foreach=foreach),
        lambda m: sgd_sai.SGD_sai(m.parameters(), lr=1e-2, weight_decay=1e-2),
        model,
    )
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("foreach", [True, False])
def test_sgd_sai_preset_matches_official_package(foreach):
    sgd_sai = pytest.importorskip("sgd_sai")
    worst = lockstep(
        lambda m: slimopt.create_optimizer("sgd-sai", m, foreach=foreach),
        lambda m: sgd_sai.SGD_sai(
            m.parameters(), lr=LR["sgd-sai"], momentum=0.9, weight_decay=1e-2
        ),
        tiny_llama(),
    )
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lion_matches_lion_pytorch(foreach, wd):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    worst = lockstep(
        lambda m: slimopt.Lion(m.parameters(), lr=1e-4, weight_decay=wd, foreach=foreach),
        lambda m: lion_pytorch.Lion(m.parameters(), lr=1e-4, weight_decay=wd),
        tiny_llama(),
    )
    assert worst <= 1e-6, worst


def test_lion_preset_matches_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    worst = lockstep(
        lambda m: slimopt.create_optimizer("lion", m),
        lambda m: lion_pytorch.Lion(m.parameters(), lr=LR["lion"]),
        tiny_llama(),
    )
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_preset_matches_torch_adamw(foreach):
    worst = lockstep(
        lambda m: slimopt.create_optimizer("adamw", m, foreach=foreach),
        lambda m: torch.optim.AdamW(m.parameters(), lr=LR["adamw"], weight_decay=0.0),
        tiny_llama(),
    )
    assert worst <= 1e-6, worst


def test_adamw_fused_matches_torch_fused():
    worst = lockstep(
        lambda m: slimopt.AdamW(m.parameters(), lr=1e-3, fused=True),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True),
        tiny_llama(),
    )
    assert worst == 0.0, worst


def test_sage_with_unit_damping_is_lion():
    """When H is all ones SAGE is Lion: check it on vectors whose |g| is constant, in Lion order."""
    lion_pytorch = pytest.importorskip("lion_pytorch")
    a = torch.zeros(16, requires_grad=True)
    b = torch.zeros(16, requires_grad=True)
    ours = slimopt.SAGE([a], lr=1e-3, weight_decay=0.0, eps=0.0, lion_order=True)
    theirs = lion_pytorch.Lion([b], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        grad = torch.where(torch.rand(16, generator=g) > 0.5, 1.0, -1.0)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.equal(a, b)
