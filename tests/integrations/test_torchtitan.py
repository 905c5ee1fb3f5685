"""slimopt in torchtitan (0.3 or 0.2, whichever is installed): the container and config a job
names, its state round-tripped through torchtitan's own helpers and, on 0.3, torchtitan's own
trainer on 2 gloo ranks with a checkpoint and a resume."""

from __future__ import annotations

import doctest
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan", reason="the torchtitan integration is tested with torchtitan")

import slimopt  # noqa: E402
from slimopt.integrations import torchtitan as stt  # noqa: E402

V03 = stt.TORCHTITAN_API >= (0, 3)
only_v02 = pytest.mark.skipif(V03, reason="torchtitan 0.2 API")
only_v03 = pytest.mark.skipif(not V03, reason="torchtitan 0.3 API")

VOCAB = 64


def _model(seed: int = 0):
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    torch.manual_seed(seed)
    model = Transformer(
        TransformerModelArgs(dim=16, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=VOCAB)
    )
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model


def _job(*args: str):
    from torchtitan.config import ConfigManager

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
    from torchtitan.components.lr_scheduler import build_lr_schedulers

    model = _model()
    optimizers = stt.build_optimizers([model], job.optimizer, None)
    schedulers = build_lr_schedulers(optimizers, job.lr_scheduler, job.training.steps)
    return model, optimizers, schedulers


@pytest.mark.parametrize("preset", ["sage-hybrid", "sgd-sai"])
@only_v02
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


@only_v02
def test_a_preset_name_selects_slimopt_and_other_names_stay_torchtitan():
    model = _model()
    job = _job("--optimizer.name", "lion", "--optimizer.use_preset_lr")
    built = stt.build_optimizers([model], job.optimizer, None)
    assert isinstance(built, stt.SlimoptOptimizersContainer)
    assert [g["lr"] for g in built.optimizers[0].param_groups] == [1.6e-3] * 4
    job = _job("--optimizer.name", "AdamW", "--optimizer.implementation", "foreach")
    built = stt.build_optimizers([model], job.optimizer, None)
    assert type(built.optimizers[0]) is torch.optim.AdamW


@only_v02
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


@only_v02
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


def test_the_register_module():
    if V03:
        with pytest.raises(ImportError, match="--module slimopt.integrations.torchtitan"):
            importlib.import_module("slimopt.integrations.torchtitan_register")
    else:
        register_module = importlib.import_module("slimopt.integrations.torchtitan_register")
        assert "llama3_slimopt" in register_module.REGISTERED


def test_versions_outside_0_2_and_0_3_are_refused_clearly(monkeypatch):
    import importlib.metadata

    for refused in ("0.4.0", "0.1.0"):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=refused: v)
        with pytest.raises(ImportError, match=rf"supports torchtitan 0.2.x and 0.3.x.*{refused}"):
            stt._check_torchtitan_version()
    for served, api in (("0.2.2", (0, 2)), ("0.3.0", (0, 3))):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=served: v)
        assert stt._check_torchtitan_version() == api


def test_roles_come_from_torchtitan_names():
    model = torch.nn.ModuleDict(
        {
            "tok_embeddings": torch.nn.Embedding(8, 4),
            "layers": torch.nn.ModuleList([torch.nn.ModuleDict({
                "attention_norm": torch.nn.RMSNorm(4), "wq": torch.nn.Linear(4, 4, bias=False)})]),
            "norm": torch.nn.RMSNorm(4),
            "lm_head": torch.nn.Linear(4, 8, bias=False),
        }
    )  # fmt: skip
    assert stt.torchtitan_roles(model) == {
        "tok_embeddings.weight": "embedding",
        "layers.0.attention_norm.weight": "vector",
        "layers.0.wq.weight": "matrix",
        "norm.weight": "vector",
        "lm_head.weight": "lm_head",
    }
    assert stt.torchtitan_roles(model, {"layers.0.wq.weight": "vector"})["layers.0.wq.weight"] == (
        "vector"
    )
    assert stt.clean_name("layers.0._checkpoint_wrapped_module.wq.weight") == "layers.0.wq.weight"
    with pytest.raises(ValueError, match="does not have"):
        stt.torchtitan_roles(model, {"nope.weight": "vector"})


def test_container_on_fsdp2_two_ranks_round_trips_exactly():
    worker = Path(__file__).with_name("torchtitan_fsdp2_worker.py")
    proc = _torchrun(worker)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("ok")) == [
        "ok 0",
        "ok 1",
    ]


def _torchrun(script: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    src = str(Path(slimopt.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), *args],
        capture_output=True, text=True, timeout=400, env=env, cwd=cwd,
    )  # fmt: skip


# ---------------------------------------------------------------------------- torchtitan 0.3


class _Tiny(torch.nn.Module):
    """torchtitan's parameter names on a model small enough to train in a test."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(VOCAB, 16)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"ffn_norm": torch.nn.RMSNorm(16), "w1": torch.nn.Linear(16, 16)})
            for _ in range(2)
        )
        self.norm = torch.nn.RMSNorm(16)
        self.lm_head = torch.nn.Linear(16, VOCAB, bias=False)

    def forward(self, ids):
        h = self.tok_embeddings(ids)
        for layer in self.layers:
            h = h + torch.tanh(layer["w1"](layer["ffn_norm"](h)))
        return self.lm_head(self.norm(h))


def _v03_build(config, seed=0):
    from torchtitan.components.optimizer import LRSchedulersContainer

    torch.manual_seed(seed)
    model = _Tiny()
    optimizers = config.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.5).build(
        optimizers=optimizers, training_steps=6
    )
    return model, optimizers, schedulers


@only_v03
def test_v03_cli_config_builds_the_preset_on_torchtitans_llama3():
    from torchtitan.config import ConfigManager

    config = ConfigManager().parse_args(
        ["--module", "slimopt.integrations.torchtitan", "--config", "llama3_debugmodel",
         "--optimizer.preset", "lion", "--optimizer.lr", "1e-4", "--optimizer.weight_decay", "0.05",
         "--optimizer.overrides", "vector_lr=2e-5", "--optimizer.roles", "norm.weight=matrix"]
    )  # fmt: skip
    assert isinstance(config.optimizer, stt.SlimoptOptimizersContainer.Config)
    with torch.device("meta"):
        model = config.model_spec.model.build()
    optimizers = config.optimizer.build(model_parts=[model])
    (opt,) = optimizers.optimizers
    role_of = {n: g["role"] for g in opt.param_groups for n in g["param_names"]}
    assert role_of["tok_embeddings.weight"] == "embedding"
    assert role_of["lm_head.weight"] == "lm_head"
    assert role_of["layers.0.attention_norm.weight"] == "vector"
    assert role_of["norm.weight"] == "matrix"  # the override
    assert role_of["layers.0.feed_forward.w1.weight"] == "matrix"
    for g in opt.param_groups:
        assert g["algorithm"] == "lion" and g["weight_decay"] == 0.05
        assert g["lr"] == (2e-5 if g["role"] == "vector" else pytest.approx(1e-4, rel=1e-12))
    # every torchtitan model config function is reachable by its own name
    assert stt.qwen3_debugmodel.__name__ == "qwen3_debugmodel"
    with pytest.raises(AttributeError, match="nor is it a torchtitan model config"):
        stt.no_such_config  # noqa: B018


@only_v03
@pytest.mark.parametrize("preset", ["sage-hybrid", "sgd-sai", "scale"])
def test_v03_state_round_trips_and_taking_it_early_changes_nothing(tmp_path, preset):
    config = stt.slimopt_config(preset, lr=torch.tensor(3e-3), weight_decay=0.01)  # a tensor lr
    model, optimizers, schedulers = _v03_build(config)
    (opt,) = optimizers.optimizers
    primary = slimopt.presets.PRIMARY_RULE[preset]
    for g in opt.param_groups:
        assert not isinstance(g["lr"], torch.Tensor)
        if g["algorithm"] == primary:
            assert g["initial_lr"] == pytest.approx(3e-3, rel=1e-6)
    early = optimizers.state_dict()  # torchtitan's flat dict, before any step
    assert any(k.startswith("state.") for k in early)
    assert opt.state and all(
        torch.equal(p, q) for p, q in zip(model.parameters(), _v03_build(config)[0].parameters())
    )
    _train(model, optimizers, schedulers, [0, 1])
    torch.save(
        {"model": model.state_dict(), "optim": optimizers.state_dict(), "lr": schedulers.state_dict()},
        tmp_path / "ckpt.pt",
    )  # fmt: skip
    after = _train(model, optimizers, schedulers, [2, 3])

    model2, optimizers2, schedulers2 = _v03_build(config, seed=1)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model2.load_state_dict(ckpt["model"])
    optimizers2.load_state_dict(ckpt["optim"])
    schedulers2.load_state_dict(ckpt["lr"])
    assert _train(model2, optimizers2, schedulers2, [2, 3]) == after
    model3, optimizers3, schedulers3 = _v03_build(config)  # never asked for its state
    _train(model3, optimizers3, schedulers3, [0, 1, 2, 3])
    for (name, a), b, c in zip(model.named_parameters(), model2.parameters(), model3.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c), name


@only_v03
@pytest.mark.parametrize("preset", sorted(slimopt.PRESETS))
def test_v03_torchtitans_zero_grad_lr0_init_leaves_the_model_alone(preset):
    """torchtitan's init_optim_state called on a bare slimopt optimizer (a step with zero
    gradients at lr 0, a tensor lr when the group's is one) changes no parameter."""
    from torchtitan.components.optimizer.utils import init_optim_state

    torch.manual_seed(0)
    model = _Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    opt = stt.SlimoptOptimizersContainer.from_preset([model], preset).optimizers[0]
    for g in opt.param_groups[::2]:
        g["lr"] = torch.tensor(g["lr"])
    init_optim_state(opt)
    assert opt.state
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
        assert p.grad is None
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.isfinite(v).all()


@only_v03
def test_v03_param_group_patterns_mix_slimopt_and_torchtitans_adamw():
    from torchtitan.components.optimizer import ParamGroupConfig as PG

    config = stt.slimopt_config(
        "sinkgd-hybrid",
        param_groups=[
            PG(pattern=r"norm\.", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3}),
            PG(
                pattern=r"^lm_head\.", optimizer_name="slimopt", optimizer_kwargs={"role": "matrix"}
            ),
            PG(pattern=r".*", optimizer_name="slimopt"),
        ],
        implementation="foreach",
    )
    model, optimizers, schedulers = _v03_build(config)
    slim, adamw = optimizers.optimizers
    assert isinstance(slim, slimopt.SlimOptimizer) and type(adamw) is torch.optim.AdamW
    assert sorted(n for g in adamw.param_groups for n in g["param_names"]) == [
        "layers.0.ffn_norm.weight", "layers.1.ffn_norm.weight", "norm.weight"
    ]  # fmt: skip
    role_of = {n: g["role"] for g in slim.param_groups for n in g["param_names"]}
    assert role_of == {
        "tok_embeddings.weight": "embedding", "lm_head.weight": "matrix",
        "layers.0.w1.weight": "matrix", "layers.0.w1.bias": "vector",
        "layers.1.w1.weight": "matrix", "layers.1.w1.bias": "vector",
    }  # fmt: skip
    _train(model, optimizers, schedulers, [0])
    model2, optimizers2, _ = _v03_build(config, seed=1)
    optimizers2.load_state_dict(optimizers.state_dict())
    assert (
        adamw.state_dict()["state"].keys() == optimizers2.optimizers[1].state_dict()["state"].keys()
    )

    with pytest.raises(ValueError, match="is a slimopt preset"):
        stt.slimopt_config(param_groups=[PG(pattern=".*", optimizer_name="lion")]).build(
            model_parts=[_Tiny()]
        )
    with pytest.raises(ValueError, match="takes only optimizer_kwargs"):
        stt.slimopt_config(
            param_groups=[PG(pattern=".*", optimizer_name="slimopt", optimizer_kwargs={"lr": 1})]
        ).build(model_parts=[_Tiny()])
    with pytest.raises(ValueError, match="matched no parameters"):
        stt.slimopt_config(
            param_groups=[PG(pattern="nope", optimizer_name="slimopt"),
                          PG(pattern=".*", optimizer_name="slimopt")]
        ).build(model_parts=[_Tiny()])  # fmt: skip
    with pytest.raises(ValueError, match="lr must be a number"):
        stt.slimopt_config(lr=torch.ones(2)).build(model_parts=[_Tiny()])


def _train_assets(root: Path) -> None:
    """A tokenizer and a c4_test-style data set where torchtitan's debug config looks for them."""
    import inspect

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [inspect.getsource(m) for m in (json, doctest, subprocess)]
    data = root / "tests" / "assets" / "c4_test"
    data.mkdir(parents=True)
    with open(data / "data.json", "w") as f:
        for text in texts:
            for i in range(0, len(text), 1000):
                f.write(json.dumps({"text": text[i : i + 1000]}) + "\n")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    special = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=special))
    tok_dir = root / "tests" / "assets" / "tokenizer"
    tok_dir.mkdir(parents=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": special[1], "eos_token": special[2]})
    )


@only_v03
def test_v03_torchtitan_trainer_two_ranks_checkpoint_and_resume(tmp_path):
    """torchtitan's own trainer (FSDP2 on 2 gloo ranks) trains 4 steps with sgd-sai, saving at
    step 2; resumed from step 2 it repeats steps 3 and 4 exactly."""
    _train_assets(tmp_path)
    launcher = Path(__file__).with_name("torchtitan_cpu_train.py")
    args = ["--module", "__main__", "--config", "llama3_debugmodel_sdpa",
            "--training.steps", "4", "--training.seq_len", "64", "--training.local_batch_size", "2",
            "--checkpoint.enable", "--checkpoint.interval", "2", "--training.disable_cuda_graphs",
            "--validator.no-enable", "--parallelism.spmd_backend", "partial_dtensor",
            "--debug.seed", "0", "--debug.deterministic", "--dump_folder", str(tmp_path / "out"),
            "--optimizer.preset", "sgd-sai", "--optimizer.lr", "1e-3"]  # fmt: skip

    def losses(proc) -> dict[int, str]:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        found = {}
        for line in (proc.stdout + proc.stderr).splitlines():
            words = re.sub(r"\x1b\[[0-9;]*m", " ", line).split()
            if "step:" in words and "loss:" in words:
                found[int(words[words.index("step:") + 1].rstrip("m"))] = words[
                    words.index("loss:") + 1
                ]
        return found

    first = losses(_torchrun(launcher, *args, cwd=tmp_path))
    assert sorted(first) == [1, 2, 3, 4]
    assert float(first[4]) < float(first[1])
    checkpoints = tmp_path / "out" / "checkpoint"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4"]
    import shutil

    shutil.rmtree(checkpoints / "step-4")
    resumed = losses(_torchrun(launcher, *args, cwd=tmp_path))
    assert resumed == {3: first[3], 4: first[4]}
