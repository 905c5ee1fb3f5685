"""slimopt presets selected in the real Hugging Face ``Trainer`` by ``optimizer_cls_and_kwargs``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import slimopt  # noqa: E402
from slimopt.integrations import hf  # noqa: E402
from slimopt.presets import preset_lrs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_models import tiny_llama  # noqa: E402

VOCAB, SEQ = 64, 16


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=4e-3,
        weight_decay=0.05,
        warmup_steps=1,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        **kw,
    )


def _trainer(args, preset="sage-hybrid") -> Trainer:
    return Trainer(
        model=tiny_llama(vocab=VOCAB, seed=0),
        args=args,
        train_dataset=_Tokens(),
        optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs(args, preset),
    )


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_trainer_builds_the_preset_and_resumes_exactly(tmp_path):
    args = _args(tmp_path / "full")
    full = _trainer(args)
    full.train()
    opt = full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer
    assert isinstance(opt, slimopt.SlimOptimizer)
    # roles, not the Trainer's two unnamed groups
    assert {(g["role"], g["algorithm"]) for g in opt.param_groups} == {
        ("embedding", "sage"),
        ("lm_head", "sage"),
        ("matrix", "sinkgd"),
        ("vector", "sage"),
    }
    # learning_rate is the primary rule's peak rate; the others keep the preset's ratio
    ratio = args.learning_rate / preset_lrs("sage-hybrid")["sage"]
    for g in opt.param_groups:
        expected = preset_lrs("sage-hybrid")[g["algorithm"]] * ratio
        assert g["initial_lr"] == pytest.approx(expected, rel=1e-12), g["role"]
        assert g["weight_decay"] == (0.0 if g["role"] == "vector" else args.weight_decay)
    # the same parameters decay as under the Trainer's own optimizers
    decayed = {n for g in opt.param_groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert decayed == set(full.get_decay_parameter_names(full.model))
    full_losses = _losses(full)
    assert sorted(full_losses) == [1, 2, 3, 4]

    resumed = _trainer(_args(tmp_path / "resumed"))
    counter = _CountSteps()
    resumed.add_callback(counter)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert counter.steps == 2  # steps 3 and 4 only; 1 and 2 come from the checkpoint
    resumed_losses = _losses(resumed)
    for step in (3, 4):
        assert resumed_losses[step] == full_losses[step], (step, resumed_losses, full_losses)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_factory_without_args_keeps_the_preset_and_takes_overrides():
    model = tiny_llama(vocab=VOCAB, seed=0)
    cls, kwargs = hf.optimizer_cls_and_kwargs(None, "scale", lm_head_momentum=0.8)
    opt = cls()(model, **kwargs)
    reference = slimopt.create_optimizer("scale", model, lm_head_momentum=0.8)
    assert len(opt.param_groups) == len(reference.param_groups)
    for g, r in zip(opt.param_groups, reference.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {
            k: v for k, v in r.items() if k != "params"
        }


def test_a_learning_rate_left_at_the_trainers_default_keeps_the_presets_rates(tmp_path):
    """TrainingArguments() without learning_rate carries HF's 5e-5: not a rate for SAGE (8e-3)
    or SinkGD (1e-3). The preset's rates are used, and a warning says so."""
    model = tiny_llama(vocab=VOCAB, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert args.learning_rate == 5e-5  # HF's default, never chosen here
    with pytest.warns(UserWarning, match=r"Trainer's default 5e-05.*sage 0.008, sinkgd 0.001") as w:
        cls, kwargs = hf.optimizer_cls_and_kwargs(args, "sage-hybrid")
    assert w[0].filename == __file__  # points at the caller's line
    assert "lr" not in kwargs
    lrs = {g["algorithm"]: g["lr"] for g in cls()(model, **kwargs).param_groups}
    assert lrs == preset_lrs("sage-hybrid")
    # a rate that was set is used; lr= makes the default rate deliberate
    chosen = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to=[])
    assert hf.optimizer_cls_and_kwargs(chosen, "sage-hybrid")[1]["lr"] == 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf.optimizer_cls_and_kwargs(args, "sage-hybrid", lr=5e-5)[1]["lr"] == 5e-5


def test_factory_errors_are_clear():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        hf.optimizer_cls_and_kwargs(None, "nope")
    with pytest.raises(TypeError, match="predates optimizer factories"):
        hf.SlimoptFactory([{"params": []}], lr=1e-3)
    with pytest.raises(TypeError, match="TrainingArguments"):
        hf.optimizer_cls_and_kwargs(object())
    with pytest.raises(ValueError, match="weight_decay must be"):
        hf.SlimoptFactory()(tiny_llama(vocab=VOCAB), weight_decay=-1.0)
