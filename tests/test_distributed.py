"""slimopt under torch.distributed: every preset under FSDP2 and DDP equals one process.

Two gloo ranks are spawned once for the whole module; they run every scenario and write their
results to files that the tests below read, next to one-process runs made here:

- every preset for 5 steps on a small LLaMA with odd sizes (intermediate 21, vocab 33) plus a
  [1, d] and a one-element parameter (empty shards on rank 1), under FSDP2 and under DDP, against
  one process on the same global batch (<= 1e-6 relative, float32);
- DCP checkpoints saved by 2 ranks after step 3, resumed by 2 ranks (bit-exact) and by 1 process;
- every rule on sharded tensors of many shapes (uneven, empty, ndim > 2) against its reference,
  with the collectives each step makes, which must be those docs/distributed.md states;
- unsupported placements, a rank failing mid-checkpoint, and a rank killed mid-checkpoint.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rule_db import RULE_CASES as RULE_DB_CASES
from rule_db import presets_covering, reducing_rules, rules_of
from torch import nn

import slimopt
from slimopt import sharding as sh
from slimopt.algorithms import ALGORITHMS, get_rule
from slimopt.train import checkpoint as tc  # DCP checkpoint I/O (the harness)
from slimopt.train import parallel as tp  # process group, wrapping, batch slicing (the harness)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD = 2
VOCAB, BATCH, SEQ, STEPS, SAVE_AT = 33, 4, 8, 5, 3
TOLERANCE = 1e-6
FULL_BATCH_TOLERANCE = 1e-5
# presets whose DDP checkpoints are resumed on one process: a few that together use every rule
# (their states differ in kind: SAGE's integer step and O(d) statistic, SCALE's momentum beside
# AdamW, Lion's momentum, SGD-SaI's gsnr)
DDP_CHECKPOINTS = tuple(presets_covering())
KILL_EXIT_CODE = 17
DOCS = Path(__file__).parents[1] / "docs" / "distributed.md"


# ------------------------------------------------------------------ model and data
def llama(layers: int = 2, seed: int = 0) -> nn.Module:
    """A small LlamaForCausalLM with sizes that do not divide by 2. (Built here rather than with
    conftest's helper: the spawned ranks import this module by name, where another conftest
    may come first on the path.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=12,
        intermediate_size=21,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


class OddLlama(nn.Module):
    """A LLaMA with sizes that do not divide by 2 (intermediate 21, vocab 33), and two parameters
    smaller than the world size: a [1, 12] row gain (role matrix) and a one-element scale."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.lm = llama(seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.row = nn.Parameter(1 + 0.1 * torch.randn(1, 12, generator=g))
        self.one = nn.Parameter(torch.ones(1))

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()(ids) * self.row * self.one
        return self.lm(inputs_embeds=emb, labels=ids).loss


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    count: bool = False,
    micro: int = 1,
):
    """Steps on this rank's share of each global batch; the collectives of each opt.step().

    ``micro=WORLD`` on one process accumulates the global batch as the ranks split it, each
    slice's mean loss divided by ``micro``: the gradient is then the same sum of the same
    per-slice gradients as the ranks' averaged one (division by 2 is exact), so what remains of a
    difference from the ranks is the optimizer's own arithmetic on sharded tensors."""
    counts = []
    for t in steps:
        opt.zero_grad(set_to_none=True)
        if micro > 1:
            for i in range(micro):
                (model(tp.shard_batch(global_batch(t), i, micro)) / micro).backward()
        else:
            model(tp.shard_batch(global_batch(t))).backward()
        if not count:
            opt.step()
            continue
        with sh.count_collectives() as comm:
            opt.step()
        counts.append((comm.total, comm.total_bytes))
    return counts


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in tp.unwrap(model).named_parameters():
        out[name] = (p.full_tensor() if sh.is_dtensor(p) else p).detach().clone()
    return out


def replicated_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """State tensors that every rank holds whole (SAGE's matrix statistic S, SGD-SaI's gsnr)."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor) and not sh.is_dtensor(value) and key != "step":
                    out.append(value.clone())
    return out


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The worst, over parameters, max |a - b| / max |b|."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in b:
        scale = b[k].abs().max().clamp(min=1e-30)
        worst = max(worst, float((a[k] - b[k]).abs().max() / scale))
    return worst


# ------------------------------------------------------------------ collectives the docs state
# rule, parameter kind -> (collectives per step, bytes per step), as docs/distributed.md states them
# for a float32 parameter of global shape [m, n] (ndim > 2: n = product of the trailing sizes).
DOC_ROWS: dict[tuple[str, str], tuple[str, str]] = {
    ("SAGE", "matrix, embedding, lm_head [m, n]"): ("1", "4n"),
    ("SAGE", "vector"): ("1", "8"),
    ("SinkGD", "matrix [m, n]"): ("iters (default 5)", "4n · iters"),
    ("SinkGD", "vector"): ("1", "4"),
    ("SCALE", "embedding (norm_dim 0: column RMS)"): ("1", "4n"),
    ("SCALE", "matrix, lm_head (norm_dim 1: row RMS)"): ("0", "0"),
    ("SCALE", "vector"): ("1", "4"),
    ("SGD-SaI", "any, its first step"): ("1", "16"),
    ("SGD-SaI", "any, later steps"): ("0", "0"),
    ("Lion", "any"): ("0", "0"),
    ("AdamW", "any"): ("0", "0"),
}


def expected_comm(
    algorithm: str, options: dict, shape: tuple[int, ...], step: int, itemsize: int = 4
) -> tuple[int, int]:
    """(collectives, bytes) that one step of ``algorithm`` makes for one Shard(0) parameter, from
    the docs' table (``step`` counts from 1; ``itemsize`` 4 for float32 and bfloat16, whose
    statistics are reduced in float32, 8 for float64)."""
    numel = math.prod(shape)
    n = math.prod(shape[1:]) if len(shape) >= 2 else 0
    matrix = len(shape) >= 2
    w = itemsize
    if numel == 0:
        return 0, 0
    if algorithm == "sage":
        return (1, w * n) if matrix else (1, 2 * w)
    if algorithm == "sinkgd":
        iters = options.get("iters", 5)
        return (iters, w * n * iters) if matrix else (1, w)
    if algorithm == "scale":
        if not matrix:
            return 1, w
        return (1, w * n) if options.get("norm_dim", 1) == 0 else (0, 0)
    if algorithm == "sgd_sai":
        return (1, 16) if step == 1 and numel > 1 else (0, 0)
    if algorithm in reducing_rules():
        raise AssertionError(f"no collective count for the reducing rule {algorithm!r}; add one")
    return 0, 0


# every rule configuration of the battery's table (tests/rule_db.py) on Shard(0) tensors of these shapes
RULE_CASES: list[tuple[str, dict]] = [(c.algorithm, c.options) for c in RULE_DB_CASES]
SHARD_SHAPES = [(21, 12), (12,), (1, 12), (1,), (5, 3, 4), (7,), (0, 5)]


# ------------------------------------------------------------------ the spawned ranks
def _scenario(results: dict, name: str, fn, *args) -> None:
    t0 = time.monotonic()
    try:
        results[name] = fn(*args)
    except Exception:  # reported by the test that reads this scenario
        results[name] = {"error": traceback.format_exc()}
    results.setdefault("timings", {})[name] = time.monotonic() - t0


def _presets_scenario(out: Path) -> dict:
    res = {}
    for preset in slimopt.PRESETS:
        # FSDP2, 5 steps, a checkpoint after step 3; then 2 ranks resume from it
        model = tp.wrap_model(OddLlama(), "fsdp2")
        opt = slimopt.create_optimizer(preset, model)
        counts = train(model, opt, range(SAVE_AT), count=True)
        tc.save_checkpoint_dcp(out / "fsdp2" / preset, model, opt, {"step": SAVE_AT}, step=SAVE_AT)
        counts += train(model, opt, range(SAVE_AT, STEPS), count=True)
        fsdp2 = full_params(model)
        sharded_state = [
            (sh.is_dtensor(v), tuple(v.placements) if sh.is_dtensor(v) else None)
            for p in model.parameters()
            for v in opt.state[p].values()
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.ndim > 0
        ]
        replicated = replicated_state(opt)

        model2 = tp.wrap_model(OddLlama(seed=11), "fsdp2")
        opt2 = slimopt.create_optimizer(preset, model2)
        extra = tc.load_checkpoint_dcp(out / "fsdp2" / preset, model2, opt2)
        train(model2, opt2, range(extra["step"], STEPS))
        resumed = full_params(model2)

        # DDP, 5 steps, a checkpoint after step 3 for some presets
        ddp = tp.wrap_model(OddLlama(), "ddp")
        opt3 = slimopt.create_optimizer(preset, tp.unwrap(ddp))
        train(ddp, opt3, range(SAVE_AT))
        if preset in DDP_CHECKPOINTS:
            ckpt = out / "ddp" / preset
            tc.save_checkpoint_dcp(ckpt, ddp, opt3, {"step": SAVE_AT}, step=SAVE_AT)
        train(ddp, opt3, range(SAVE_AT, STEPS))
        res[preset] = {
            "fsdp2": fsdp2,
            "fsdp2_counts": counts,
            "fsdp2_state_sharded": sharded_state,
            "fsdp2_replicated_state": replicated,
            "fsdp2_resumed_2": resumed,
            "ddp": full_params(ddp),
            "ddp_replicated_state": replicated_state(opt3),
        }
    return res


def _rules_scenario() -> dict:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    res = {}
    for case, (algorithm, options) in enumerate(RULE_CASES):
        for i, shape in enumerate(SHARD_SHAPES):
            gen = torch.Generator().manual_seed(100 * case + i)  # the same tensors on every rank
            start = torch.randn(shape, generator=gen, dtype=torch.float64)
            grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
            plain = nn.Parameter(start.clone())
            shard = nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
            group = {"algorithm": algorithm, **options}
            ref = slimopt.SlimOptimizer([{"params": [plain], **group}], foreach=False)
            opt = slimopt.SlimOptimizer([{"params": [shard], **group}])
            comm = []
            for g in grads:
                plain.grad = g.clone()
                ref.step()
                shard.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                with sh.count_collectives() as c:
                    opt.step()
                comm.append((c.total, c.total_bytes, dict(c.counts)))
            key = f"{algorithm} {options} {shape}"
            res[key] = {
                "algorithm": algorithm,
                "options": options,
                "shape": shape,
                "start": start,
                "shard": shard.full_tensor().detach(),
                "reference": plain.detach().clone(),
                "comm": comm,
            }
    return res


def _placements_scenario() -> dict:
    from torch.distributed.tensor import (
        DTensor,
        Partial,
        Replicate,
        Shard,
        distribute_tensor,
        init_device_mesh,
    )

    mesh = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
    res = {}

    def attempt(name: str, p: nn.Parameter, grad: torch.Tensor, algorithm: str) -> None:
        p.grad = grad
        before = p.full_tensor().clone() if sh.is_dtensor(p) else p.detach().clone()
        opt = slimopt.SlimOptimizer(
            [{"params": [p], "param_names": [name], "algorithm": algorithm}]
        )
        try:
            opt.step()
            res[name] = {"raised": None}
        except sh.PlacementError as exc:
            after = p.full_tensor() if sh.is_dtensor(p) else p.detach()
            res[name] = {"raised": str(exc), "unchanged": bool(torch.equal(before, after))}

    full = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    tp = nn.Parameter(distribute_tensor(full, mesh, [Shard(1)]))
    attempt("tp.colwise.weight", tp, distribute_tensor(full, mesh, [Shard(1)]), "sinkgd")
    fs = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
    partial = DTensor.from_local(full.clone(), mesh, [Partial()], run_check=False)
    attempt("fsdp.partial_grad.weight", fs, partial, "sage")
    tp2 = nn.Parameter(distribute_tensor(full, mesh2, [Replicate(), Shard(1)]))
    attempt(
        "mesh2d.tp.weight", tp2, distribute_tensor(full, mesh2, [Replicate(), Shard(1)]), "lion"
    )

    # HSDP (replicate across one mesh dimension, shard on the other) is supported and exact
    start = full.double()
    hsdp = nn.Parameter(distribute_tensor(start.clone(), mesh2, [Replicate(), Shard(0)]))
    plain = nn.Parameter(start.clone())
    grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hsdp.grad = distribute_tensor(grad, mesh2, [Replicate(), Shard(0)])
    plain.grad = grad.clone()
    for p in (hsdp, plain):
        slimopt.SlimOptimizer([{"params": [p], "algorithm": "sinkgd"}]).step()
    res["hsdp"] = {
        "start": start,
        "shard": hsdp.full_tensor().detach(),
        "reference": plain.detach().clone(),
    }
    return res


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


def _small_run(path: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = tp.wrap_model(_Small(), "fsdp2")
    opt = slimopt.create_optimizer("sage-hybrid", model)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    model(tp.shard_batch(x)).backward()
    opt.step()
    tc.save_checkpoint_dcp(path, model, opt, {"step": 1}, step=1)
    opt.zero_grad()
    model(tp.shard_batch(x)).backward()
    opt.step()
    return model, opt


def _fault_scenario(out: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemWriter

    path = out / "fault"
    model, opt = _small_run(path)
    saved = torch.load(tc.latest_checkpoint(path) / "extra.pt", weights_only=True)
    original = FileSystemWriter.write_data

    def failing(self, plan, planner):  # noqa: ANN001
        if dist.get_rank() == 1:
            raise OSError("injected: disk full")
        return original(self, plan, planner)

    FileSystemWriter.write_data = failing
    t0 = time.monotonic()
    try:
        tc.save_checkpoint_dcp(path, model, opt, {"step": 2}, step=2)
        raised = None
    except tc.CheckpointError as exc:
        raised = str(exc)
    finally:
        FileSystemWriter.write_data = original
    seconds = time.monotonic() - t0
    latest = tc.latest_checkpoint(path).name
    model2 = tp.wrap_model(_Small(), "fsdp2")
    opt2 = slimopt.create_optimizer("sage-hybrid", model2)
    extra = tc.load_checkpoint_dcp(path, model2, opt2)
    # a later save succeeds and leaves no temporary directory behind
    tc.save_checkpoint_dcp(path, model, opt, {"step": 3}, step=3)
    dist.barrier()
    return {
        "raised": raised,
        "seconds": seconds,
        "latest_after_failure": latest,
        "loaded_extra": extra,
        "saved_extra": saved,
        "listing": sorted(os.listdir(path)),
    }


def _kill_scenario(out: Path) -> None:
    """Rank 1 dies (os._exit) while writing the second checkpoint."""
    from torch.distributed.checkpoint import FileSystemWriter

    model, opt = _small_run(out / "kill")
    original = FileSystemWriter.write_data

    def dying(self, plan, planner):  # noqa: ANN001
        if dist.get_rank() == 1:
            os._exit(KILL_EXIT_CODE)
        return original(self, plan, planner)

    FileSystemWriter.write_data = dying
    tc.save_checkpoint_dcp(out / "kill", model, opt, {"step": 2}, step=2)


def _worker(rank: int, world: int, out_dir: str) -> None:
    out = Path(out_dir)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'store'}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    results: dict[str, Any] = {}
    t0 = time.monotonic()
    _scenario(results, "presets", _presets_scenario, out)
    _scenario(results, "rules", _rules_scenario)
    _scenario(results, "placements", _placements_scenario)
    _scenario(results, "depth", _depth_scenario)
    _scenario(results, "fault", _fault_scenario, out)
    results["seconds"] = time.monotonic() - t0
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    try:
        _kill_scenario(out)  # rank 1 exits in here
    except BaseException:  # rank 0: the save fails when rank 1 disappears
        pass
    os._exit(0)  # without waiting on a process group that has lost a rank


# ------------------------------------------------------------------ the parent
def _one_process(preset: str, micro: int = 1) -> dict[str, torch.Tensor]:
    model = OddLlama()
    opt = slimopt.create_optimizer(preset, model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' kernels
    try:
        train(model, opt, range(STEPS), micro=micro)
    finally:
        torch.set_num_threads(threads)
    return full_params(model)


def _resume_one_process(path: Path, preset: str) -> dict[str, torch.Tensor]:
    model = OddLlama(seed=5)
    opt = slimopt.create_optimizer(preset, model)
    extra = tc.load_checkpoint_dcp(path, model, opt)
    train(model, opt, range(extra["step"], STEPS))
    return full_params(model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    t0 = time.monotonic()
    ctx = mp.start_processes(
        _worker, args=(WORLD, str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    killed = None
    deadline = time.monotonic() + 300
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError("the distributed ranks did not finish in 300 s")
    except mp.ProcessExitedException as exc:
        killed = (exc.error_index, exc.exit_code)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    spawned = time.monotonic() - t0
    ranks = []
    for r in range(WORLD):
        f = out / f"rank{r}.pt"
        assert f.is_file(), f"rank {r} wrote no results (it crashed before the end)"
        ranks.append(torch.load(f, weights_only=False))
    single = {preset: _one_process(preset, micro=WORLD) for preset in slimopt.PRESETS}
    full_batch = {preset: _one_process(preset) for preset in slimopt.PRESETS}
    resumed = {("fsdp2", p): _resume_one_process(out / "fsdp2" / p, p) for p in slimopt.PRESETS}
    resumed |= {("ddp", p): _resume_one_process(out / "ddp" / p, p) for p in DDP_CHECKPOINTS}
    return {
        "out": out,
        "ranks": ranks,
        "single": single,
        "full_batch": full_batch,
        "resumed_1": resumed,
        "killed": killed,
        "seconds": (spawned, time.monotonic() - t0),
    }


def _scenario_result(runs, name: str, rank: int = 0):
    res = runs["ranks"][rank][name]
    if isinstance(res, dict) and "error" in res and isinstance(res["error"], str):
        pytest.fail(f"rank {rank}, scenario {name!r} failed:\n{res['error']}")
    return res


# ------------------------------------------------------------------ tests: presets
@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_fsdp2_equals_one_process(runs, preset):
    res = _scenario_result(runs, "presets")[preset]
    a, b = res["fsdp2"], runs["single"][preset]
    assert rel_diff(a, b) <= TOLERANCE, {k: rel_diff({k: a[k]}, {k: b[k]}) for k in b}
    # against one backward over the whole batch the gradients round differently (~1e-7), which
    # AdamW's normalization amplifies on entries with tiny gradients: data parallelism's own noise
    assert rel_diff(a, runs["full_batch"][preset]) <= FULL_BATCH_TOLERANCE


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_ddp_equals_one_process_and_ranks_agree_bitwise(runs, preset):
    r0 = _scenario_result(runs, "presets", 0)[preset]
    r1 = _scenario_result(runs, "presets", 1)[preset]
    assert rel_diff(r0["ddp"], runs["single"][preset]) <= TOLERANCE
    assert rel_diff(r0["ddp"], runs["full_batch"][preset]) <= FULL_BATCH_TOLERANCE
    for name in r0["ddp"]:
        assert torch.equal(r0["ddp"][name], r1["ddp"][name]), name
    # e.g. SGD-SaI's gsnr, from the averaged gradient, is the same number on every rank
    for a, b in zip(r0["ddp_replicated_state"], r1["ddp_replicated_state"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_fsdp2_state_is_sharded_and_statistics_agree_bitwise(runs, preset):
    r0 = _scenario_result(runs, "presets", 0)[preset]
    r1 = _scenario_result(runs, "presets", 1)[preset]
    for is_dtensor, placements in r0["fsdp2_state_sharded"]:
        assert is_dtensor and [repr(p) for p in placements] == ["Shard(dim=0)"]
    for a, b in zip(r0["fsdp2_replicated_state"], r1["fsdp2_replicated_state"], strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ tests: checkpoints
@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_dcp_checkpoint_from_2_ranks_resumes_exactly_on_2_ranks(runs, preset):
    res = _scenario_result(runs, "presets")[preset]
    for name, value in res["fsdp2"].items():
        assert torch.equal(res["fsdp2_resumed_2"][name], value), name


@pytest.mark.parametrize(
    "mode,preset", [("fsdp2", p) for p in slimopt.PRESETS] + [("ddp", p) for p in DDP_CHECKPOINTS]
)
def test_dcp_checkpoint_from_2_ranks_resumes_on_1_process(runs, preset, mode):
    uninterrupted = _scenario_result(runs, "presets")[preset][mode]
    assert rel_diff(runs["resumed_1"][(mode, preset)], uninterrupted) <= TOLERANCE


def test_a_rank_failing_mid_checkpoint_raises_everywhere_and_keeps_the_previous(runs):
    for rank in range(WORLD):
        res = _scenario_result(runs, "fault", rank)
        assert res["raised"] and "rank(s) [1]" in res["raised"], res["raised"]
        assert res["seconds"] < 90  # an error, not a hang until the 120 s collective timeout
        assert res["latest_after_failure"] == "step-00000001"
        assert res["loaded_extra"] == res["saved_extra"] == {"step": 1}
    listing = _scenario_result(runs, "fault")["listing"]
    assert listing == ["latest", "step-00000001", "step-00000003"]


def test_a_rank_killed_mid_checkpoint_leaves_the_previous_loadable(runs):
    assert runs["killed"] == (1, KILL_EXIT_CODE)
    path = runs["out"] / "kill"
    assert tc.latest_checkpoint(path).name == "step-00000001"
    model = _Small()
    opt = slimopt.create_optimizer("sage-hybrid", model)
    assert tc.load_checkpoint_dcp(path, model, opt) == {"step": 1}
    assert [opt.state[p]["step"] for p in (model.a.bias, model.b.bias)] == [1, 1]  # SAGE vectors


# ------------------------------------------------------------------ tests: rules and collectives
def _rule_cases(runs):
    return _scenario_result(runs, "rules").items()


def test_every_rule_on_shards_equals_its_reference_float64(runs):
    cases = list(_rule_cases(runs))
    assert {c["algorithm"] for _, c in cases} == set(ALGORITHMS)
    for key, case in cases:
        ref, got = case["reference"] - case["start"], case["shard"] - case["start"]
        assert got.shape == ref.shape, key
        if ref.numel():
            assert ref.abs().max() > 0, key  # the three steps moved the parameter
            scale = ref.abs().max()
            assert float((got - ref).abs().max() / scale) <= 1e-10, key


def test_collectives_per_step_are_those_the_docs_state(runs):
    for key, case in _rule_cases(runs):
        for step, (count, nbytes, kinds) in enumerate(case["comm"], start=1):
            expected = expected_comm(case["algorithm"], case["options"], case["shape"], step, 8)
            assert (count, nbytes) == expected, (key, step)
            assert set(kinds) <= {"allreduce_"}, kinds
    for doc in (DOCS, DOCS.parents[1] / "README.md"):
        text = doc.read_text()
        for (rule, kind), (count, nbytes) in DOC_ROWS.items():
            assert f"| {rule} | {kind} | {count} | {nbytes} |" in text, (doc.name, rule, kind)


def expected_group_comm(group: dict, step: int) -> tuple[int, int]:
    """(collectives, bytes) of one step of a param group of Shard(0) parameters: the bytes are
    the sum over its parameters; the reducing rules batch them, so the count is a constant per
    group (SAGE, SCALE, SGD-SaI's first step: one; SinkGD: one per iteration)."""
    options = {k: group[k] for k in ("iters", "norm_dim") if k in group}
    per_param = [
        expected_comm(group["algorithm"], options, tuple(p.shape), step) for p in group["params"]
    ]
    nbytes = sum(b for _, b in per_param)
    return max((c for c, _ in per_param), default=0), nbytes


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_collectives_per_preset_step_are_batched_per_group(runs, preset):
    counts = _scenario_result(runs, "presets")[preset]["fsdp2_counts"]
    model = OddLlama()
    opt = slimopt.create_optimizer(preset, model)
    for step, measured in enumerate(counts, start=1):
        per_group = [expected_group_comm(g, step) for g in opt.param_groups]
        expected = (sum(c for c, _ in per_group), sum(b for _, b in per_group))
        assert measured == expected, step


# the presets that use a rule with reductions over a matrix (SGD-SaI reduces once, at its first step)
DEPTH_PRESETS = tuple(p for p in slimopt.PRESETS if rules_of(p) & {*reducing_rules(), "sgd_sai"})


def _depth_scenario() -> dict:
    """The collectives of the first two FSDP2 steps on LLaMAs of 2 and 8 layers."""
    res = {}
    for preset in DEPTH_PRESETS:
        for layers in (2, 8):
            model = tp.wrap_model(llama(layers=layers), "fsdp2")
            opt = slimopt.create_optimizer(preset, model)
            counts = []
            for t in range(2):
                opt.zero_grad(set_to_none=True)
                ids = tp.shard_batch(global_batch(t))
                model(input_ids=ids, labels=ids).loss.backward()
                with sh.count_collectives() as comm:
                    opt.step()
                counts.append(comm.total)
            res[(preset, layers)] = counts
    return res


@pytest.mark.parametrize("preset", DEPTH_PRESETS)
def test_all_reduces_per_step_do_not_grow_with_depth(runs, preset):
    res = _scenario_result(runs, "depth")
    model = llama(layers=8)
    opt = slimopt.create_optimizer(preset, model)
    for step in (1, 2):
        expected = sum(expected_group_comm(g, step)[0] for g in opt.param_groups)
        assert res[(preset, 8)][step - 1] == res[(preset, 2)][step - 1] == expected, step
        assert expected <= len(opt.param_groups) * 5  # not one per parameter


def test_preset_collective_totals_in_the_docs_match_the_measurement(runs):
    text = DOCS.read_text()
    for preset in slimopt.PRESETS:
        counts = _scenario_result(runs, "presets")[preset]["fsdp2_counts"]
        first, later = counts[0], counts[-1]
        row = f"| `{preset}` | {first[0]} ({first[1]} B) | {later[0]} ({later[1]} B) |"
        assert row in text, row


# ------------------------------------------------------------------ tests: placements
@pytest.mark.parametrize(
    "name,placement",
    [
        ("tp.colwise.weight", "Shard(dim=1)"),
        ("fsdp.partial_grad.weight", "Partial(sum)"),
        ("mesh2d.tp.weight", "Replicate(), Shard(dim=1)"),
    ],
)
def test_unsupported_placement_raises_naming_parameter_and_placement(runs, name, placement):
    res = _scenario_result(runs, "placements")[name]
    assert res["raised"] is not None, f"{name} was updated"
    assert name in res["raised"] and placement in res["raised"], res["raised"]
    assert res["unchanged"]


def test_hsdp_placement_is_exact(runs):
    res = _scenario_result(runs, "placements")["hsdp"]
    ref, got = res["reference"] - res["start"], res["shard"] - res["start"]
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-10


# ------------------------------------------------------------------ in-process (no ranks)
def test_every_rule_has_a_sharded_path():
    import inspect

    for name in ALGORITHMS:
        rule = get_rule(name)
        assert rule.sharded in ("elementwise", "reducing"), name
        if rule.sharded == "reducing":
            assert "shard" in inspect.signature(rule.reference).parameters, name
        if rule.prepare is not None:
            assert "shard" in inspect.signature(rule.prepare).parameters, name


def test_reductions_without_a_shard_are_the_plain_torch_ones():
    x = torch.randn(7, 5, dtype=torch.float64)
    assert torch.equal(sh.column_mean(x, None), x.mean(dim=0))
    assert torch.equal(sh.column_norm(x, None, keepdim=True), x.norm(dim=0, keepdim=True))
    assert torch.equal(sh.norms([x], None)[0], torch.linalg.vector_norm(x))
    norm, std = sh.norm_and_std(x, None)
    assert torch.equal(norm, torch.linalg.vector_norm(x)) and torch.equal(std, x.std())
    assert sh.global_numel(x, None) == 35


def test_single_process_helpers():
    info = tp.setup_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    with pytest.raises(ValueError, match="does not split evenly over 2 ranks"):
        tp.shard_batch(torch.zeros(3, 4), rank=0, world_size=2)
    with pytest.raises(ValueError, match="unknown data-parallel mode 'tp'"):
        tp.wrap_model(nn.Linear(2, 2), "tp")
    assert tp.reduce_mean(torch.tensor(2.5)) == 2.5
    blocks = tp.default_fsdp_units(llama(layers=3))
    # the blocks, then the embedding and the untied head, each a unit of its own
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 3 + ["Embedding", "Linear"]


def test_one_process_checkpoint_round_trip_is_exact(tmp_path):
    model, opt = OddLlama(), None
    opt = slimopt.create_optimizer("sgd-sai", model)
    train(model, opt, range(2))
    tc.save_checkpoint_dcp(tmp_path, model, opt, {"step": 2, "note": "x"}, step=2)
    train(model, opt, range(2, 4))
    model2 = OddLlama(seed=9)
    opt2 = slimopt.create_optimizer("sgd-sai", model2)
    assert tc.load_checkpoint_dcp(tmp_path, model2, opt2) == {"step": 2, "note": "x"}
    train(model2, opt2, range(2, 4))
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name


def test_saving_a_step_twice_never_removes_what_latest_names(tmp_path):
    model = nn.Linear(3, 2)
    opt = slimopt.SGDSaI(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    for step in (3, 3, 5, 3):
        tc.save_checkpoint_dcp(tmp_path, model, opt, {"step": step}, step=step, keep=3)
        assert tc.load_checkpoint_dcp(tmp_path, model, opt) == {"step": step}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step-00000003-1", "step-00000003-2", "step-00000005"]
    assert tc.latest_checkpoint(tmp_path).name == "step-00000003-2"
    with pytest.raises(ValueError, match="keep must be >= 1"):
        tc.save_checkpoint_dcp(tmp_path, model, opt, step=6, keep=0)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(tc.CheckpointError, match="no checkpoint under"):
        tc.load_checkpoint_dcp(tmp_path, model, slimopt.SGDSaI(model.parameters()))
    (tmp_path / "latest").write_text("step-00000007\n")
    with pytest.raises(tc.CheckpointError, match="not a complete checkpoint"):
        tc.load_checkpoint_dcp(tmp_path, model)
