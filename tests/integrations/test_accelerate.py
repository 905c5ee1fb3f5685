"""A slimopt optimizer through Hugging Face accelerate: ``prepare()`` and ``save_state``/
``load_state`` continue exactly, with nothing slimopt-specific."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

accelerate = pytest.importorskip("accelerate", reason="the accelerate test needs accelerate")
pytest.importorskip("transformers", reason="the accelerate test trains a tiny transformers model")

import slimopt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_models import lm_loss, tiny_llama  # noqa: E402

VOCAB = 64


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _setup(preset: str):
    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_llama(vocab=VOCAB, seed=0)
    opt = slimopt.create_optimizer(preset, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    return accelerator, model, opt, sched


def _steps(accelerator, model, opt, sched, seeds):
    losses = []
    for seed in seeds:
        loss = lm_loss(model, VOCAB, seed)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("preset", ["sage-hybrid", "sgd-sai"])
def test_prepare_save_state_load_state_continue_exactly(tmp_path, fresh_accelerate_state, preset):
    accelerator, model, opt, sched = _setup(preset)
    assert isinstance(opt.optimizer, slimopt.SlimOptimizer)
    _steps(accelerator, model, opt, sched, [0, 1])
    accelerator.save_state(str(tmp_path / "state"))
    after = _steps(accelerator, model, opt, sched, [2, 3])
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    accelerator, model, opt, sched = _setup(preset)
    accelerator.load_state(str(tmp_path / "state"))
    assert sched.scheduler.last_epoch == 2
    assert slimopt.state_bytes(opt.optimizer) > 0
    assert _steps(accelerator, model, opt, sched, [2, 3]) == after
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name
