"""slimopt in torchtitan: the container and builder a job names, on a small llama3 on CPU, its
state round-tripped through torchtitan's state-dict helpers."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

pytest.importorskip("torchtitan", reason="the torchtitan integration is tested with torchtitan")

from torchtitan.components.lr_scheduler import build_lr_schedulers  # noqa: E402
from torchtitan.config import ConfigManager  # noqa: E402
from torchtitan.models.llama3 import Transformer, TransformerModelArgs  # noqa: E402

import slimopt  # noqa: E402
from slimopt.integrations import torchtitan as stt  # noqa: E402

VOCAB = 64


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(
        TransformerModelArgs(dim=16, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=VOCAB)
    )
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model


def _job(*args: str):
    return ConfigManager().parse_args(
        ["--job.custom_config_module", "slimopt.integrations.torchtitan", *args]
    )


def _train(model, optimizers, schedulers, seeds) -> list[float]:
    losses = []
    for seed in seeds:
        ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(seed))
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        losses.append(loss.item())
    return losses


def _build(job):
    model = _model()
    optimizers = stt.build_optimizers([model], job.optimizer, None)
    schedulers = build_lr_schedulers(optimizers, job.lr_scheduler, job.training.steps)
    return model, optimizers, schedulers


@pytest.mark.parametrize("preset", ["sage-hybrid", "sgd-sai"])
def test_job_config_builds_the_preset_and_its_state_round_trips(tmp_path, preset):
    job = _job(
        "--optimizer.name", "slimopt",
        "--optimizer.preset", preset,
        "--optimizer.lr", "3e-3",
        "--optimizer.weight_decay", "0.05",
        "--optimizer.overrides", "vector_lr=1e-3",
        "--optimizer.roles", "norm.weight=vector",
        "--lr_scheduler.warmup_steps", "2",
        "--training.steps", "6",
    )  # fmt: skip
    model, optimizers, schedulers = _build(job)
    assert isinstance(optimizers, stt.SlimoptOptimizersContainer)
    (opt,) = optimizers.optimizers
    assert isinstance(opt, slimopt.SlimOptimizer)
    assert {g["role"] for g in opt.param_groups} == {"embedding", "matrix", "vector", "lm_head"}
    primary = slimopt.presets.PRIMARY_RULE[preset]
    for g in opt.param_groups:
        assert g["weight_decay"] == 0.05
        if g["role"] == "vector":
            assert g["initial_lr"] == 1e-3
        elif g["algorithm"] == primary:
            assert g["initial_lr"] == pytest.approx(3e-3, rel=1e-12)

    # a state_dict taken before the first step must not change the run (no zero-grad step)
    early = optimizers.state_dict()
    assert all(isinstance(k, str) for k in early)
    _train(model, optimizers, schedulers, [0, 1])
    # through torchtitan's container helpers (flattened, keyed by parameter name) and torch.save
    torch.save(
        {"model": model.state_dict(), "optim": optimizers.state_dict(), "lr": schedulers.state_dict()},
        tmp_path / "ckpt.pt",
    )  # fmt: skip
    after = _train(model, optimizers, schedulers, [2, 3])

    model2, optimizers2, schedulers2 = _build(job)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2.load_state_dict(ckpt["model"])
    optimizers2.load_state_dict(ckpt["optim"])
    schedulers2.load_state_dict(ckpt["lr"])
    assert _train(model2, optimizers2, schedulers2, [2, 3]) == after
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name

    # and equal to a run that never took a state_dict
    model3, optimizers3, schedulers3 = _build(job)
    _train(model3, optimizers3, schedulers3, [0, 1, 2, 3])
    for (name, a), b in zip(model.named_parameters(), model3.parameters()):
        assert torch.equal(a, b), name


def test_a_preset_name_selects_slimopt_and_other_names_stay_torchtitan():
    model = _model()
    job = _job("--optimizer.name", "lion", "--optimizer.use_preset_lr")
    built = stt.build_optimizers([model], job.optimizer, None)
    assert isinstance(built, stt.SlimoptOptimizersContainer)
    assert [g["lr"] for g in built.optimizers[0].param_groups] == [1.6e-3] * 4
    job = _job("--optimizer.name", "AdamW", "--optimizer.implementation", "foreach")
    built = stt.build_optimizers([model], job.optimizer, None)
    assert type(built.optimizers[0]) is torch.optim.AdamW


def test_registered_train_spec_uses_the_slimopt_builder():
    from torchtitan.protocols.train_spec import get_train_spec

    name = stt.register("llama3")
    assert name == "llama3_slimopt" and stt.register("llama3") == name
    spec = get_train_spec(name)
    job = _job("--optimizer.name", "scale")
    built = spec.build_optimizers_fn([_model()], job.optimizer, None)
    assert {g["algorithm"] for g in built.optimizers[0].param_groups} == {"scale", "adamw"}
    job = _job("--optimizer.name", "AdamW", "--optimizer.implementation", "for-loop")
    assert type(spec.build_optimizers_fn([_model()], job.optimizer, None).optimizers[0]) is (
        torch.optim.AdamW
    )


def test_bad_config_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        stt.build_optimizers(
            [model], _job("--optimizer.preset", "nope", "--optimizer.name", "slimopt").optimizer
        )
    with pytest.raises(ValueError, match="expected key=value"):
        stt.parse_overrides("sinkgd_lr")
    with pytest.raises(ValueError, match="not a Python literal"):
        stt.parse_overrides("sinkgd_lr=fast")
    with pytest.raises(ValueError, match="expected param_name=role"):
        stt.parse_roles("output.weight")
    with pytest.raises(NotImplementedError, match="early_step_in_backward"):
        stt.build_optimizers(
            [model],
            _job("--optimizer.name", "lion", "--optimizer.early_step_in_backward").optimizer,
        )


def test_register_module_and_docstrings():
    register_module = importlib.import_module("slimopt.integrations.torchtitan_register")
    assert "llama3_slimopt" in register_module.REGISTERED
    result = doctest.testmod(stt, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_torchtitan_0_3_is_refused_clearly(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.3.0")
    with pytest.raises(ImportError, match=r"supports torchtitan 0.2.x.*torchtitan 0.3.0"):
        stt._check_torchtitan_version()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.2.2")
    stt._check_torchtitan_version()


def test_container_on_fsdp2_two_ranks_round_trips_exactly():
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("torchtitan_fsdp2_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(worker)],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("ok")) == [
        "ok 0",
        "ok 1",
    ]
