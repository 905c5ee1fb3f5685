"""slimopt optimizers inside the real Hugging Face ``Trainer``, unchanged."""

from __future__ import annotations

import pytest
import torch

import slimopt
from slimopt.train.data import prepare_data
from slimopt.train.loop import lr_schedule
from slimopt.train.models import build_model

pytest.importorskip("accelerate")


class _Windows(torch.utils.data.Dataset):
    def __init__(self, tokens, seq_len):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self):
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i):
        ids = torch.from_numpy(
            self.tokens[i * self.seq_len : (i + 1) * self.seq_len].astype("int64")
        )
        return {"input_ids": ids, "labels": ids.clone()}


def test_trainer_runs_a_slimopt_optimizer(tmp_path, cache_dir):
    preset = "sage-hybrid"
    from transformers import Trainer, TrainingArguments

    _, _, shards = prepare_data("stdlib:email", vocab_size=512, cache_dir=cache_dir)
    torch.manual_seed(0)
    model = build_model("llama-tiny", vocab_size=shards.vocab_size)
    optimizer = slimopt.create_optimizer(preset, model)
    steps = 12
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(2, steps, 0.1))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Windows(shards["train"], 64),
        optimizers=(optimizer, scheduler),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert trainer.optimizer.optimizer is optimizer or trainer.optimizer is optimizer
    assert slimopt.state_bytes(optimizer) > 0
    # the scheduler scaled every group by the same factor
    factor = lr_schedule(2, steps, 0.1)(steps - 1)
    base = slimopt.create_optimizer(preset, build_model("llama-tiny", vocab_size=512)).param_groups
    for group, start in zip(optimizer.param_groups, base):
        assert group["lr"] == pytest.approx(start["lr"] * factor)
