"""Every input answered: silent wrong results refused, tracebacks turned into one line naming the
problem, frozen integer parameters left out, and the messages a user reads while stopping or
resuming a run (one test per defect)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_helpers import DATA, cli_args

import slimopt
from slimopt.cli import main
from slimopt.train import TrainConfig, train
from slimopt.train import data as data_mod
from slimopt.train.faults import Interrupted
from slimopt.train.loop import ConfigError, OutOfMemoryError


def _last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


# ------------------------------------------------------------------ silent wrong results
def test_flags_typed_with_config_override_the_record_even_at_their_default(make_config):
    recorded = make_config(preset="scale", seq_len=64, max_steps=2)
    train(recorded)
    rerun = Path(recorded.out).parent / "rerun"
    code = main(["train", "--config", str(Path(recorded.out) / "config.json"), "--preset",
                 "sage-hybrid", "--seq-len", "256", "--out", str(rerun), "--progress", "none"])  # fmt: skip
    assert code == 0
    saved = json.loads((rerun / "config.json").read_text())
    # sage-hybrid and 256 are the defaults: they used to be dropped for the recorded values
    assert saved["preset"] == "sage-hybrid" and saved["seq_len"] == 256
    assert saved["batch_size"] == recorded.batch_size  # what was not typed comes from the record


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval_tokens": 1}, "eval_tokens 1 is less than one evaluation sequence"),
        ({"out": ""}, "out is empty"),
        ({"batch_size": True}, "batch_size must be an integer, got True"),
        ({"optimizer_args": {"lr": 5}}, "the learning rate is --lr"),
    ],
)
def test_settings_that_trained_silently_wrong_are_refused(make_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(make_config(max_steps=1, **overrides))


def test_an_empty_out_directory_leaves_the_current_directory_alone(make_config, capsys, tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["train", *cli_args(make_config(max_steps=1)), "--out", ""]) == 2
    finally:
        os.chdir(cwd)
    assert "out is empty" in _last_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_infinite_learning_rates_are_refused_like_nan():
    model = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="finite"):
        slimopt.create_optimizer("sage-hybrid", model, lr=float("inf"))
    for cls in (slimopt.SAGE, slimopt.SinkGD, slimopt.SCALE, slimopt.SGDSaI, slimopt.Lion,
                slimopt.AdamW):  # fmt: skip
        with pytest.raises(ValueError, match="'lr' must be finite"):
            cls(model.parameters(), lr=float("inf"))


def test_a_parameter_listed_twice_is_refused_not_updated_twice():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="listed twice"):
        slimopt.Lion([p, p], lr=0.1)
    with pytest.raises(ValueError, match="'w' is listed twice"):
        slimopt.SlimOptimizer([{"params": [p, p], "param_names": ["w", "w"], "algorithm": "sage"}])


def test_deepspeed_partitions_and_engines_are_refused_naming_them():
    """A ZeRO-3 partitioned parameter (DeepSpeed marks it with ds_id / ds_tensor) and a
    DeepSpeed engine are refused before any state exists, naming the parameter or the wrapper."""
    p = torch.nn.Parameter(torch.ones(4, 3))
    p.ds_id = 7  # what deepspeed.zero.Init sets on a partitioned parameter
    with pytest.raises(ValueError, match="'w' is partitioned by DeepSpeed ZeRO"):
        slimopt.SlimOptimizer([{"params": [p], "param_names": ["w"], "algorithm": "sage"}])
    engine_type = type("DeepSpeedEngine", (torch.nn.Module,), {})
    engine_type.__module__ = "deepspeed.runtime.engine"
    engine = engine_type()
    engine.layer = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="DeepSpeedEngine \\(DeepSpeed\\)"):
        slimopt.create_optimizer("sage-hybrid", engine)


# ------------------------------------------------------------------ one line, not a traceback
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", "abc", "lr must be a number, got 'abc'"),
        ("warmup", "x", "warmup must be a number, got 'x'"),
        ("min_lr_ratio", None, "min_lr_ratio must not be null"),
        ("grad_clip", "big", "grad_clip must be a number, got 'big'"),
        ("data", 5, "data must be a string, got 5"),
        ("seed", -1, r"seed must be an integer in \[0, 2\*\*63 - 1\], got -1"),
        ("seed", 2**70, "seed must be an integer in"),
    ],
)
def test_wrongly_typed_config_values_are_one_line(make_config, capsys, tmp_path, key, value,
                                                   message):  # fmt: skip
    config = tmp_path / "config.json"
    settings = {"model": "llama-tiny", "data": DATA, "vocab_size": 512, "seq_len": 32,
                "max_steps": 1, key: value}  # fmt: skip
    config.write_text(json.dumps(settings))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 2
    err = _last_error(capsys)
    assert err.startswith("slimopt train: error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not (out / "config.json").exists()  # refused before anything was written


def test_an_invalid_model_config_is_one_line_in_train_and_memory(make_config, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": -5}))
    assert main(["memory", "--model-config", str(bad)]) == 2
    assert "hidden_size must be a positive integer, got -5" in _last_error(capsys)
    cfg = make_config(max_steps=1)
    assert main(["train", *cli_args(cfg), "--model-config", str(bad)]) == 2
    assert "hidden_size must be a positive integer, got -5" in _last_error(capsys)


def test_a_read_only_token_cache_is_one_line(tmp_path, capsys):
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        if os.access(cache, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root without CAP checks)")
        with pytest.raises(data_mod.DataError, match="cannot write the cache under"):
            data_mod.prepare_data(DATA, vocab_size=512, cache_dir=cache)
    finally:
        cache.chmod(0o700)


def test_a_read_only_token_cache_as_root_too(tmp_path, monkeypatch):
    # root writes through file modes: make the cache's mkdir fail as a read-only file system does
    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if "ro" in self.parts:
            raise OSError(30, "Read-only file system")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(data_mod.DataError, match="Read-only file system; set --cache-dir"):
        data_mod.prepare_data(DATA, vocab_size=512, cache_dir=tmp_path / "ro")


def test_a_torn_last_metrics_line_is_dropped_on_resume(make_config):
    cfg = make_config(max_steps=4, save_every=2)
    train(dataclass_replace(cfg, max_steps=4))
    metrics = Path(cfg.out) / "metrics.jsonl"
    (Path(cfg.out) / "final.json").unlink()
    with open(metrics, "a") as fh:
        fh.write('{"step": 5, "lo')  # a kill in the middle of a write
    result = train(dataclass_replace(cfg, max_steps=4, resume=True))
    assert result["status"] == "completed"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def dataclass_replace(cfg: TrainConfig, **kw) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_token_ids_beyond_the_vocabulary_or_a_changed_shard_are_caught(tmp_path):
    cache = tmp_path / "cache"
    _, _, shards = data_mod.prepare_data(DATA, vocab_size=512, cache_dir=cache)
    shard = shards.directory / "valid.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[0] = 600  # >= the vocabulary: an embedding lookup would fail far from here
    ids.tofile(shard)
    with pytest.raises(data_mod.DataError, match="does not match its checksum"):
        data_mod.prepare_data(DATA, vocab_size=512, cache_dir=cache)
    meta = json.loads((shards.directory / "meta.json").read_text())
    meta.pop("sha256")  # a cache written before checksums: the ids are still checked
    (shards.directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(data_mod.DataError, match="token id 600, outside the tokenizer's 512"):
        data_mod.prepare_data(DATA, vocab_size=512, cache_dir=cache)


def test_a_batch_far_beyond_memory_is_refused_with_the_planners_estimate(make_config, capsys):
    cfg = make_config(batch_size=1_000_000, max_steps=1)
    with pytest.raises(OutOfMemoryError, match=r"the planned peak of one step is [\d.]+ GB"):
        train(cfg)
    assert main(["train", *cli_args(cfg)]) == 2
    assert "reduce --batch-size (1000000)" in _last_error(capsys)


def test_an_allocation_failure_in_a_step_names_the_planners_estimate(make_config, monkeypatch):
    from slimopt.train import loop

    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 TB")

    monkeypatch.setattr(loop, "_forward_backward", fail)
    with pytest.raises(OutOfMemoryError, match="out of memory on cpu .*the planner's peak"):
        train(make_config(max_steps=1))


# ------------------------------------------------------------------ wrong refusal
def test_frozen_integer_parameters_are_left_out():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    frozen = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    model[1].register_parameter("qweight", frozen)  # a quantized base under LoRA
    opt = slimopt.create_optimizer("sage-hybrid", model)
    assert all(p is not frozen for g in opt.param_groups for p in g["params"])
    assert slimopt.param_roles(model).get("1.qweight") is None


# ------------------------------------------------------------------ messages
def test_sigterm_while_training_the_tokenizer_says_so_and_leaves_no_temporary(
    make_config, monkeypatch, tmp_path
):
    real = data_mod.train_tokenizer

    def interrupted(*args, **kwargs):
        tok = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return tok

    monkeypatch.setattr(data_mod, "train_tokenizer", interrupted)
    cache = tmp_path / "fresh-cache"
    with pytest.raises(Interrupted, match="SIGTERM received while preparing the data"):
        train(make_config(max_steps=1, cache_dir=str(cache), vocab_size=300))
    leftovers = [p for p in cache.rglob(".*") if p.name.startswith(".")]
    assert leftovers == []


def test_sigterm_while_tokenizing_removes_the_half_written_shards(make_config, monkeypatch,
                                                                   tmp_path):  # fmt: skip
    real = data_mod._tokenize_split

    def interrupted(corpus, split, *args, **kwargs):
        out = real(corpus, split, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(data_mod, "_tokenize_split", interrupted)
    cache = tmp_path / "fresh-cache"
    with pytest.raises(Interrupted, match="nothing was trained"):
        train(make_config(max_steps=1, cache_dir=str(cache), vocab_size=300))
    assert not [p for p in (cache / "shards").iterdir() if p.name.startswith(".")]


def test_sigterm_during_the_final_evaluation_says_how_to_finish(make_config, monkeypatch):
    from slimopt.train import loop

    real = loop._evaluate
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_evaluate", interrupted)
    cfg = make_config(max_steps=2, save_every=2, eval_every=0)
    with pytest.raises(Interrupted, match="during the final evaluation; every step is saved"):
        train(cfg)
    monkeypatch.setattr(loop, "_evaluate", real)
    result = train(dataclass_replace(cfg, resume=True))
    assert result["status"] == "completed" and result["steps"] == 2


def test_a_second_ctrl_c_names_the_directory(make_config, monkeypatch, capsys):
    def ctrl_c(config):
        raise KeyboardInterrupt

    monkeypatch.setattr("slimopt.train.loop.train", ctrl_c)
    cfg = make_config(max_steps=1)
    assert main(["train", *cli_args(cfg)]) == 130
    err = _last_error(capsys)
    assert "DIR" not in err and f"--resume --out {cfg.out}" in err


def test_the_precision_refusal_on_resume_names_each_difference_once(make_config):
    from slimopt.train.checkpoint import CheckpointError

    cfg = make_config(max_steps=2, save_every=2)
    train(cfg)
    (Path(cfg.out) / "final.json").unlink()
    with pytest.raises(CheckpointError) as info:
        train(dataclass_replace(cfg, resume=True, precision="bf16"))
    text = str(info.value)
    assert "precision: checkpoint 'fp32', this run 'bf16'" in text
    assert text.count("'hidden_size'") == 0 and len(text) < 600, text


def test_a_run_directory_in_use_names_the_flags(make_config):
    from slimopt.train.outputs import RunDirError

    cfg = make_config(max_steps=1)
    train(cfg)
    with pytest.raises(RunDirError, match="pass --resume to continue it or --overwrite"):
        train(cfg)
