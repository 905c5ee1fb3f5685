"""``slimopt compare``: a complete table and both plots, resume after an interruption, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest

import slimopt
from slimopt.bench import compare, report
from slimopt.bench.baselines import BASELINES, deep_state_bytes, is_available
from slimopt.bench.compare import CompareConfig, CompareError, run_compare

PNG = b"\x89PNG\r\n\x1a\n"
# A comparison small enough for the test suite: 4 steps of 4 x 32 tokens on the json package.
TINY = dict(
    data="stdlib:json",
    vocab_size=512,
    seq_len=32,
    batch_size=4,
    tokens=512,
    evals=2,
    eval_tokens=1024,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("slimopt-cache"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These runs are tiny: one thread is faster than two, by far on a busy machine.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quiet(*_args) -> None:
    pass


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return {r["preset"]: r for r in csv.DictReader(fh)}


def test_cli_writes_table_and_plots_and_reuses_finished_runs(tmp_path, cache_dir, capsys):
    from slimopt.cli import main

    out = tmp_path / "cmp"
    argv = ["compare", "--presets", "adamw,sgd-sai", "--data", "stdlib:json", "--vocab-size",
            "512", "--seq-len", "32", "--batch-size", "4", "--tokens", "512", "--evals", "2",
            "--eval-tokens", "1024", "--out", str(out), "--cache-dir", cache_dir]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "adamw" in printed and "sgd-sai" in printed and "vs AdamW" in printed

    rows = _rows(out)
    assert set(rows) == {"adamw", "sgd-sai"}
    for name, r in rows.items():
        assert r["status"] == "ok"
        assert r["seeds_done"] == "1"
        for field in ("val_ppl_mean", "val_loss_mean", "state_bytes", "state_vs_adamw",
                      "step_time_ms", "tokens_per_s", "wall_time_s", "lrs"):  # fmt: skip
            assert r[field] != "", (name, field)
        assert 1 < float(r["val_ppl_mean"]) < math.inf
        # the state measured by compare is the one the harness reports after training
        final = json.loads((out / "runs" / name / "seed-0" / "final.json").read_text())
        assert int(r["state_bytes"]) == final["optimizer_state_bytes"]
        assert final["tokens_seen"] == 512
    assert float(rows["adamw"]["state_vs_adamw"]) == 1.0
    # SGD-SaI keeps one momentum and a scalar per tensor: about half of AdamW's two moments
    assert 0.45 < float(rows["sgd-sai"]["state_vs_adamw"]) < 0.55

    md = (out / "results.md").read_text()
    assert "| preset | val perplexity | optimizer state | vs AdamW |" in md
    assert "slimopt compare --presets adamw,sgd-sai" in md
    for plot in (report.PLOT_PPL_VS_TOKENS, report.PLOT_PPL_VS_MEMORY):
        assert (out / plot).read_bytes()[:8] == PNG
        assert f"]({plot})" in md
    # finished runs are not retrained, and their checkpoints are gone
    finals = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed-0/final.json")}
    assert not list(out.glob("runs/*/seed-0/checkpoints"))
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed-0/final.json")} == finals
    summary = json.loads(capsys.readouterr().out)  # --json: the results, nothing else, on stdout
    assert {r["preset"] for r in summary["rows"]} == {"adamw", "sgd-sai"}
    assert summary["out"] == str(out) and str(out / "results.csv") in summary["files"]


def test_interrupted_comparison_resumes_where_it_stopped(tmp_path, cache_dir, monkeypatch):
    import slimopt.train.loop as loop

    cfg = CompareConfig(presets=("adamw", "sgd-sai"), **{**TINY, "tokens": 1024, "evals": 4},
                        out=str(tmp_path / "cmp"), cache_dir=cache_dir)  # fmt: skip
    real_train = loop.train

    def interrupted_train(config, *, callback=None, optimizer_factory=None):
        def cb(row):
            callback(row)
            # 8 steps, evaluated and saved every 2: stop the second preset at step 6's evaluation,
            # before its checkpoint, so the newest one is step 4's
            if config.preset == "sgd-sai" and row.get("step") == 6 and "val_loss" in row:
                raise KeyboardInterrupt

        return real_train(config, callback=cb, optimizer_factory=optimizer_factory)

    monkeypatch.setattr(loop, "train", interrupted_train)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, log=_quiet)
    monkeypatch.setattr(loop, "train", real_train)
    adamw_final = tmp_path / "cmp" / "runs" / "adamw" / "seed-0" / "final.json"
    stamp = adamw_final.stat().st_mtime_ns
    assert not (tmp_path / "cmp" / "runs" / "sgd-sai" / "seed-0" / "final.json").exists()

    result = run_compare(cfg, log=_quiet)
    assert adamw_final.stat().st_mtime_ns == stamp  # finished preset not retrained
    resumed = json.loads((tmp_path / "cmp/runs/sgd-sai/seed-0/final.json").read_text())
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 8
    rows = {r["preset"]: r for r in result["rows"]}
    assert rows["sgd-sai"]["status"] == "ok"

    # the resumed run ends where an uninterrupted one does
    straight = run_compare(
        CompareConfig(**{**vars(cfg), "presets": ("sgd-sai",), "out": str(tmp_path / "straight")}),
        log=_quiet,
    )
    assert straight["rows"][0]["val_loss_mean"] == pytest.approx(
        rows["sgd-sai"]["val_loss_mean"], rel=1e-6
    )


def test_diverged_preset_is_reported_not_dropped(tmp_path, cache_dir, monkeypatch):
    from slimopt import presets

    monkeypatch.setitem(presets.PRESET_HPARAMS["sgd-sai"]["sgd_sai"], "lr", 1e30)
    result = run_compare(
        CompareConfig(presets=("adamw", "sgd-sai"), **TINY, out=str(tmp_path / "cmp"),
                      cache_dir=cache_dir),
        log=_quiet,
    )  # fmt: skip
    rows = {r["preset"]: r for r in result["rows"]}
    assert rows["adamw"]["status"] == "ok"
    assert rows["sgd-sai"]["status"] == "diverged"
    assert rows["sgd-sai"]["diverged_step"] >= 1
    csv_rows = _rows(tmp_path / "cmp")
    assert csv_rows["sgd-sai"]["status"] == "diverged" and csv_rows["sgd-sai"]["val_ppl_mean"] == ""
    assert "diverged" in (tmp_path / "cmp" / "results.md").read_text()
    assert (tmp_path / "cmp" / report.PLOT_PPL_VS_MEMORY).read_bytes()[:8] == PNG


def test_sweep_picks_each_rule_and_records_the_choice(tmp_path, cache_dir):
    result = run_compare(
        CompareConfig(presets=("sage-hybrid",), **TINY, sweep=(0.5, 2.0), sweep_tokens=256,
                      sweep_extend=0, out=str(tmp_path / "cmp"), cache_dir=cache_dir),
        log=_quiet,
    )  # fmt: skip
    sweep = result["sweeps"]["sage-hybrid"]
    assert list(sweep["by_rule"]) == ["sage", "sinkgd"]  # the primary rule first
    for rule, trials in sweep["by_rule"].items():
        assert [m for m, _, _ in trials] == [0.5, 2.0]
        losses = {m: loss for m, loss, _ in trials}
        assert sweep["chosen"][rule] == min(losses, key=losses.get)
        assert sweep["lrs"][rule] == pytest.approx(sweep["defaults"][rule] * sweep["chosen"][rule])
    # the full run uses the chosen rates, and the table says which
    row = _rows(tmp_path / "cmp")["sage-hybrid"]
    assert row["lr_multipliers"] == ";".join(f"{r}={m:g}" for r, m in sweep["chosen"].items())
    spec = json.loads((tmp_path / "cmp/runs/sage-hybrid/seed-0/config.json").read_text())
    for rule, m in sweep["chosen"].items():
        if m != 1.0:
            assert spec["optimizer_args"][f"{rule}_lr"] == pytest.approx(sweep["lrs"][rule])
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "## Learning-rate sweep" in md and (tmp_path / "cmp" / report.PLOT_SWEEP).exists()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr=a,1", "'a' is not a number"),
        ("lr=", "'' is not a number"),
        ("lr=0,1", "must be a finite number > 0"),
        ("lr=1,1", "repeated"),
        ("wd=1,2", "only the learning rate"),
        ("0.5,1,2", "expected lr="),
    ],
)
def test_unparsable_sweep_grid_is_a_clear_error(text, message):
    with pytest.raises(CompareError, match=message):
        compare.parse_sweep(text)


def test_bad_input_fails_before_any_training(tmp_path, cache_dir, capsys):
    from slimopt.cli import main

    out = tmp_path / "cmp"
    common = ["--data", "stdlib:json", "--vocab-size", "512", "--seq-len", "32",
              "--batch-size", "4", "--out", str(out), "--cache-dir", cache_dir]  # fmt: skip
    cases = [
        (["--presets", "adamw,adamx"], "unknown preset 'adamx'"),
        (["--presets", "adamw", "--sweep", "lr=1,two"], "'two' is not a number"),
        (["--presets", "adamw", "--tokens", "100"], "smaller than one optimizer step"),
        (["--presets", "adamw", "--tokens", "1k", "--sweep", "lr=1,2", "--sweep-tokens", "64"],
         "sweep budget"),
        (["--presets", "adamw", "--tokens", "12x"], "not a count"),
        (["--presets", "adamw", "--data", str(tmp_path / "missing")], "not found"),
        (["--presets", "adamw", "--model", "llama-huge"], "unknown model"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(["compare", *common, *args]) == 2, args
        err = capsys.readouterr().err
        assert "slimopt compare: error:" in err and message in err, (args, err)
        assert not (out / "runs").exists()


def test_rerun_with_other_settings_is_refused(tmp_path, cache_dir):
    cfg = CompareConfig(presets=("adamw",), **TINY, out=str(tmp_path / "cmp"), cache_dir=cache_dir)
    run_compare(cfg, log=_quiet)
    with pytest.raises(CompareError, match="tokens: 512 there, 1024 now"):
        run_compare(CompareConfig(**{**vars(cfg), "tokens": 1024}), log=_quiet)
    # adding a preset to the same comparison is fine
    result = run_compare(CompareConfig(**{**vars(cfg), "presets": ("adamw", "lion")}), log=_quiet)
    assert {r["preset"] for r in result["rows"]} == {"adamw", "lion"}


def test_sigterm_stops_a_comparison_that_the_same_command_continues(
    tmp_path, cache_dir, monkeypatch, capsys
):
    import os
    import signal

    import slimopt.train.loop as loop
    from slimopt.cli import main

    argv = ["compare", "--presets", "adamw", "--data", "stdlib:json", "--vocab-size", "512",
            "--seq-len", "32", "--batch-size", "4", "--tokens", "1024", "--evals", "4",
            "--eval-tokens", "1024", "--out", str(tmp_path / "cmp"), "--cache-dir", cache_dir,
            "--progress", "none"]  # fmt: skip
    real_train = loop.train

    def signalled_train(config, *, callback=None, optimizer_factory=None):
        def cb(row):
            callback(row)
            if row.get("step") == 4 and "val_loss" in row:
                os.kill(os.getpid(), signal.SIGTERM)  # stops at the end of step 4, saved

        return real_train(config, callback=cb, optimizer_factory=optimizer_factory)

    monkeypatch.setattr(loop, "train", signalled_train)
    assert main(argv) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "slimopt compare: stopped by SIGTERM; the same command continues where it stopped"
    monkeypatch.setattr(loop, "train", real_train)
    assert main(argv) == 0
    final = json.loads((tmp_path / "cmp/runs/adamw/seed-0/final.json").read_text())
    assert final["status"] == "completed" and final["resumed_from_step"] == 4


# ----------------------------------------------------------------------------- baselines


def test_muon_baseline_appears_like_a_preset(tmp_path, cache_dir, monkeypatch):
    if not is_available("muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    import slimopt.train.loop as loop

    real_train, create, presets = loop.train, slimopt.create_optimizer, slimopt.PRESETS
    factories = {}

    def observed_train(config, *, callback=None, optimizer_factory=None):
        # the baseline reaches the harness as train()'s own parameter; the library is untouched
        assert slimopt.create_optimizer is create and slimopt.PRESETS is presets
        factories[config.preset] = optimizer_factory
        return real_train(config, callback=callback, optimizer_factory=optimizer_factory)

    monkeypatch.setattr(loop, "train", observed_train)
    result = run_compare(
        CompareConfig(presets=("adamw", "muon"), **TINY, out=str(tmp_path / "cmp"),
                      cache_dir=cache_dir),
        log=_quiet,
    )  # fmt: skip
    assert factories["adamw"] is None and callable(factories["muon"])
    rows = {r["preset"]: r for r in result["rows"]}
    assert rows["muon"]["kind"] == "baseline" and rows["muon"]["status"] == "ok"
    # Muon keeps one momentum on the hidden matrices, AdamW's two moments on the rest
    assert 0 < rows["muon"]["state_vs_adamw"] < 1


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_each_installed_baseline_trains_and_is_measured(name):
    if not is_available(name):
        pytest.skip(f"baseline {name} is not installed (pip install 'slimopt[baselines]')")
    import torch

    from slimopt.bench.baselines import create_baseline
    from slimopt.train.models import build_model

    torch.manual_seed(0)
    model = build_model("llama-tiny", vocab_size=256)
    opt = create_baseline(name, model)
    ids = torch.randint(0, 256, (2, 16))
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert deep_state_bytes(opt) > 0
    assert compare.measure_state_bytes(name, "llama-tiny", 256) == deep_state_bytes(opt)


def test_missing_baseline_package_is_a_clear_error(monkeypatch):
    from slimopt.bench import baselines

    monkeypatch.setattr(baselines, "is_available", lambda name: False)
    with pytest.raises(CompareError, match=r"pip install galore-torch"):
        compare.parse_presets("adamw,galore")


def test_deep_state_bytes_equals_state_bytes_for_every_preset():
    import torch

    import slimopt
    from slimopt.train.models import build_model

    for preset in slimopt.PRESETS:
        torch.manual_seed(0)
        model = build_model("llama-tiny", vocab_size=256)
        opt = slimopt.create_optimizer(preset, model)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        assert deep_state_bytes(opt) == slimopt.state_bytes(opt), preset


def test_a_run_held_by_another_process_is_not_trained_twice(tmp_path):
    pytest.importorskip("fcntl")
    with compare._run_lock(tmp_path / "run", wait=False) as first:
        assert first
        with compare._run_lock(tmp_path / "run", wait=False) as second:
            assert not second  # another holder: skip it for now
    with compare._run_lock(tmp_path / "run", wait=False) as again:
        assert again


def test_frequency_eval_adds_the_rare_token_table_and_plots(tmp_path, cache_dir):
    from slimopt.bench import frequency

    out = tmp_path / "cmp"
    cfg = CompareConfig(presets=("adamw", "sage-hybrid"), **TINY, frequency_eval=(16, 128),
                        out=str(out), cache_dir=cache_dir)  # fmt: skip
    run_compare(cfg, log=_quiet)
    md = (out / "results.md").read_text()
    assert "## Rare tokens" in md and "rows touched / step" in md
    for name in ("adamw", "sage-hybrid"):
        final = json.loads((out / "runs" / name / "seed-0" / "final.json").read_text())
        split = {b["bucket"]: b for b in final["val_loss_by_frequency"]}
        assert list(split) == ["top 16", "16-128", "128-512"]
        # the table shows each preset's measured losses
        cells = [f"{split[b]['loss']:.3f}" for b in split]
        assert any(line.startswith(f"| {name} | {' | '.join(cells)} |") for line in md.splitlines())
    result = run_compare(cfg, log=_quiet)  # every run done: nothing retrained
    for plot in (frequency.PLOT_LOSS_BY_FREQUENCY, frequency.PLOT_ROWS_TOUCHED):
        assert (out / plot).read_bytes()[:8] == PNG
        assert out / plot in result["files"]
    assert "--frequency-eval 16,128" in compare.command_line(cfg)
    # a comparison with other frequency buckets is another comparison
    with pytest.raises(CompareError):
        run_compare(dataclasses.replace(cfg, frequency_eval=(8, 64)), log=_quiet)


def test_frequency_eval_ranks_are_checked():
    assert compare.parse_ranks("1k,8k") == (1000, 8000)
    for bad in ("8k,1k", "0,5", "a,b", "5,5"):
        with pytest.raises(CompareError, match="frequency-eval|count|whole"):
            compare.parse_ranks(bad)


def test_report_only_writes_the_finished_runs_and_trains_nothing(tmp_path, cache_dir):
    out = tmp_path / "cmp"
    base = CompareConfig(presets=("adamw",), out=str(out), cache_dir=cache_dir, **TINY)
    run_compare(base, log=_quiet)
    assert " of training in this invocation." in (out / "results.md").read_text()
    # rerun with everything finished: it trains nothing and claims no training time
    run_compare(base, log=_quiet)
    assert "- Progress: 1/1 runs finished.\n" in (out / "results.md").read_text()
    finals = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/final.json")}
    # more presets and seeds than have run: they are reported as unfinished, not trained
    wider = dataclasses.replace(base, presets=("adamw", "sgd-sai"), seeds=2, report_only=True)
    lines: list[str] = []
    result = run_compare(wider, log=lines.append)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/final.json")} == finals
    assert not (out / "runs" / "sgd-sai").exists()
    assert any("not finished" in line for line in lines)
    rows = _rows(out)
    assert rows["adamw"]["seeds_done"] == "1" and rows["adamw"]["seeds"] == "2"
    assert rows["sgd-sai"]["seeds_done"] == "0"
    assert "- Progress: 1/4 runs finished.\n" in (out / "results.md").read_text()
    assert (out / report.PLOT_PPL_VS_TOKENS).read_bytes()[:8] == PNG
    assert {r["preset"] for r in result["rows"]} >= {"adamw"}

    with pytest.raises(CompareError, match="cannot be combined"):
        run_compare(dataclasses.replace(wider, overwrite=True), log=_quiet)
    with pytest.raises(CompareError, match="holds no comparison"):
        run_compare(dataclasses.replace(wider, out=str(tmp_path / "none")), log=_quiet)


def test_sweep_plot_skips_unfinished_and_diverged_trials(tmp_path):
    import warnings

    sweeps = {
        "sage-hybrid": {
            "chosen": {"sage": 1.0, "sinkgd": 1.0},
            "lrs": {"sage": 0.008, "sinkgd": 0.001},
            "by_rule": {
                "sage": [
                    (0.5, 7.1, "completed"),
                    (1.0, 6.9, "completed"),
                    (2.0, math.inf, "diverged"),
                ],
                "sinkgd": [(0.5, math.inf, "pending"), (1.0, 6.9, "completed")],
            },
        },
        "lion-hybrid": {"chosen": {"lion": 1.0}, "by_rule": {"lion": [(1.0, math.inf, "pending")]}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no legend warning for a panel with nothing finished
        report.plot_sweep(sweeps, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG
    table = report.sweep_table(sweeps)
    # an unfinished rule shows which trials are missing and no choice yet
    assert "| sinkgd | ×0.5: not finished, ×1: 6.900 |" in table
    assert "**×1: 6.900**, ×2: diverged | 0.008 |" in table  # the finished rule's choice
    (sinkgd,) = [line for line in table.splitlines() if "| sinkgd |" in line]
    assert sinkgd.endswith("×1: 6.900 |  |")  # the unfinished rule's: none yet
    assert "×2: diverged" in table and "inf" not in table


def test_a_seed_added_to_some_presets_counts_in_later_reports(tmp_path, cache_dir):
    out = tmp_path / "cmp"
    base = CompareConfig(presets=("adamw", "sgd-sai"), out=str(out), cache_dir=cache_dir, **TINY)
    run_compare(base, log=_quiet)
    # a second seed for adamw only
    run_compare(dataclasses.replace(base, presets=("adamw",), seeds=2), log=_quiet)
    assert (out / "runs" / "adamw" / "seed-1" / "final.json").is_file()
    assert not (out / "runs" / "sgd-sai" / "seed-1").exists()
    # the whole comparison, reported with its original --seeds 1, counts it
    result = run_compare(dataclasses.replace(base, report_only=True), log=_quiet)
    rows = {r["preset"]: r for r in result["rows"]}
    assert rows["adamw"]["seeds_done"] == 2 and rows["adamw"]["val_ppl_std"] is not None
    assert rows["sgd-sai"]["seeds_done"] == 1 and rows["sgd-sai"]["status"] == "ok"
    # the report says so: the planned runs, the added seed, and which preset has it
    text = (out / "results.md").read_text()
    assert "Progress: 2/2 runs finished, and 1 added seed." in text
    assert "seeds: 1 (2 for adamw)." in text
    (adamw_line,) = [line for line in text.splitlines() if line.startswith("| adamw |")]
    assert "(2 seeds)" in adamw_line


def test_the_report_states_the_tokens_trained_not_the_budget_asked(tmp_path):
    """--tokens 16k at 2,048 tokens a step trains 8 whole steps: 16,384 tokens, which the report
    states (with the 16,000 asked beside it), as for the sweep trials."""
    from slimopt.bench.compare import _markdown, _Plan

    cfg = CompareConfig(presets=("adamw",), model="llama-tiny", data="stdlib:json",
                        batch_size=8, seq_len=256, tokens=16_000, sweep=(0.5, 1.0),
                        sweep_tokens=5_000, out=str(tmp_path))  # fmt: skip
    plan = _Plan(tokens_per_step=2048, steps=8, sweep_tokens=5_000, sweep_steps=3,
                 vocab_size=512, corpus="c", corpus_key="k", train_tokens=10**6,
                 valid_tokens=10**5)  # fmt: skip
    md = _markdown(cfg, plan, [], {}, None)
    assert "- Budget: 16,384 tokens per run (8 steps of 8 × 1 × 256 tokens; 16,000 asked, " in md
    assert "(seed 0, 6,144 tokens per trial; 5,000 asked, rounded up to whole steps)" in md
    assert "16,000 tokens per run" not in md
    exact = dataclasses.replace(cfg, tokens=16_384)
    assert "- Budget: 16,384 tokens per run (8 steps of 8 × 1 × 256 tokens), " in _markdown(
        exact, plan, [], {}, None
    )
