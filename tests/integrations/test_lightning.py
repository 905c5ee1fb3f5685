"""slimopt presets in a real Lightning ``Trainer``: OneCycleLR with its defaults, and a checkpoint
restore that continues exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning", reason="the Lightning integration is tested with lightning")

import slimopt  # noqa: E402
from slimopt.integrations import lightning as sl  # noqa: E402

VOCAB, TOTAL_STEPS = 32, 4


class TinyLM(L.LightningModule):
    def __init__(self, preset: str, one_cycle: dict):
        super().__init__()
        torch.manual_seed(0)
        self.preset, self.one_cycle = preset, one_cycle
        self.net = nn.Sequential(
            nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, VOCAB)
        )
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.net(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        # OneCycleLR, one peak per param group
        return sl.configure_optimizers(
            self,
            self.preset,
            scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=sl.peak_lrs(opt), total_steps=TOTAL_STEPS, **self.one_cycle
            ),
        )


def _data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (8, 7), generator=g)
    # two batches per epoch
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)


def _trainer(max_epochs: int):
    # whole epochs: Lightning resumes a plain DataLoader exactly only at an epoch boundary
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


@pytest.mark.parametrize(
    ("preset", "one_cycle"),
    [
        ("adamw", {}),  # OneCycleLR's defaults: it cycles beta1 (or momentum) too
        ("sage-hybrid", {}),
        ("sage-hybrid", {"cycle_momentum": False}),
    ],
)
def test_lightning_one_cycle_and_checkpoint_restore(tmp_path, preset, one_cycle):
    full = TinyLM(preset, one_cycle)
    trainer = _trainer(2)
    trainer.fit(full, _data())
    assert len(full.losses) == TOTAL_STEPS
    opt = trainer.optimizers[0]
    assert isinstance(opt, slimopt.SlimOptimizer)
    assert {g["role"] for g in opt.param_groups} == {"embedding", "matrix", "lm_head", "vector"}
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)
    assert sched.last_epoch == TOTAL_STEPS

    part = TinyLM(preset, one_cycle)
    first = _trainer(1)
    first.fit(part, _data())
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)

    resumed = TinyLM(preset, one_cycle)
    _trainer(2).fit(resumed, _data(), ckpt_path=str(ckpt))
    assert part.losses == full.losses[:2]
    assert resumed.losses == full.losses[2:]
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_configure_optimizers_checks_its_input():
    module = nn.Linear(3, 3)
    assert set(sl.configure_optimizers(module, "lion")) == {"optimizer"}
    with pytest.raises(ValueError, match="interval"):
        sl.configure_optimizers(module, "lion", interval="batch")
    with pytest.raises(ValueError, match="must return a scheduler of that optimizer"):
        other = torch.optim.SGD(module.parameters(), lr=0.1)
        sl.configure_optimizers(
            module, "lion", scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(other, 1)
        )
