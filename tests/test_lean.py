"""Lean modes: stochastic rounding to bf16, pure-bf16 steps, updates applied during backward."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from lm_models import lm_loss, tiny_gpt2, tiny_llama

import slimopt
from slimopt.lean import (
    LeanModeError,
    check_no_global_clip,
    round_to_bf16,
    stochastic_round_,
)

VOCAB = 64


# --------------------------------------------------------------------------- rounding
def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above |x| (in magnitude), as float64."""
    bits = x.view(torch.int32)
    low = (bits & -65536).view(torch.float32).double()
    high = ((bits & -65536) + 65536).view(torch.float32).double()
    return low, high


def test_stochastic_rounding_is_unbiased_within_a_statistical_bound():
    torch.manual_seed(0)
    x = torch.randn(64) * torch.logspace(-3, 3, 64)
    n = 4000
    rounded = torch.stack([round_to_bf16(x, seed=s).double() for s in range(n)])
    low, high = _bf16_neighbours(x)
    # every draw is one of the two neighbours
    assert ((rounded == low) | (rounded == high)).all()
    # Each draw is a Bernoulli between the neighbours: its std is at most spacing/2, so the mean
    # of n draws lies within 5 standard errors (5 * spacing / (2 sqrt(n))) of x but for ~1e-6.
    spacing = (high - low).abs()
    err = (rounded.mean(0) - x.double()).abs()
    assert (err <= 5 * spacing / (2 * math.sqrt(n))).all(), (err / spacing).max()
    # round-to-nearest is biased by up to half a spacing: the bound above is tight enough to see it
    rtn_err = (x.to(torch.bfloat16).double() - x.double()).abs()
    assert (rtn_err > 5 * spacing / (2 * math.sqrt(n))).sum() > 20


def test_stochastic_rounding_keeps_exact_values_and_non_finite():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0**127, float("inf"), float("-inf"), float("nan")])
    y = round_to_bf16(x, seed=3)
    assert torch.equal(y[:5].float(), x[:5])
    assert y[5] == float("inf") and y[6] == float("-inf") and y[7].isnan()
    with pytest.raises(TypeError, match="float32 into bfloat16"):
        stochastic_round_(torch.empty(2), torch.zeros(2), seed=0, step=1)


def _bf16_lion(sr):
    p = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    opt = slimopt.Lion([p], lr=1e-4, stochastic_rounding=sr)
    for _ in range(50):
        p.grad = torch.ones_like(p)
        opt.step()
    return p


def test_updates_below_bf16_spacing_move_the_weights_only_with_stochastic_rounding():
    # Lion moves each weight by lr = 1e-4 per step; bf16's spacing at 1.0 is 2^-7 = 0.0078.
    moved = _bf16_lion(None).double().mean().item()
    assert abs(moved - (1.0 - 50 * 1e-4)) < 2e-4
    assert torch.equal(_bf16_lion(False), torch.ones(20000, dtype=torch.bfloat16))


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_pure_bf16_step_is_the_fp32_step_rounded(preset):
    # One step (the first, from zero state) from bf16 weights equals the fp32 step from the same
    # values, rounded: to nearest exactly, stochastically to one of the two bf16 neighbours. SAGE
    # and SCALE keep bf16 state that enters this step (SAGE's S, SCALE's head momentum), which
    # moves their update by bf16's relative precision (2^-8): there the result is within one bf16
    # spacing plus 1% of the update of the fp32 result.
    base = tiny_llama(vocab=VOCAB).to(torch.bfloat16)
    lm_loss(base, VOCAB, seed=1).backward()
    ref = copy.deepcopy(base).float()
    for p, q in zip(ref.parameters(), base.parameters()):
        p.grad = q.grad.float()
    slimopt.create_optimizer(preset, ref).step()
    for sr in (False, True):
        model = copy.deepcopy(base)
        for p, q in zip(model.parameters(), base.parameters()):
            p.grad = q.grad.clone()
        opt = slimopt.create_optimizer(preset, model, stochastic_rounding=sr)
        opt.step()
        exact = preset not in ("sage-hybrid", "sage-pure", "scale")
        for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), base.parameters()):
            assert p.dtype == torch.bfloat16
            low, high = _bf16_neighbours(q.detach().clone())
            if exact and not sr:
                assert torch.equal(p, q.to(torch.bfloat16)), (preset, name)
            elif exact:
                assert ((p.double() == low) | (p.double() == high)).all(), (preset, name)
            else:
                spacing = (high - low).abs()
                update = (q.double() - p0.double()).abs()
                bound = spacing + 0.01 * update
                assert ((p.double() - q.double()).abs() <= bound).all(), (preset, name)
            for k, v in opt.state[p].items():
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    assert v.dtype == torch.bfloat16, (preset, name, k)


def _train(model, opt, steps, seed=0, sched=None):
    for t in range(steps):
        loss = lm_loss(model, VOCAB, seed=seed + t)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def test_pure_bf16_resume_is_bit_exact():
    model = tiny_llama(vocab=VOCAB).to(torch.bfloat16)
    opt = slimopt.create_optimizer("sage-hybrid", model)
    _train(model, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 2, seed=10)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # a different global seed must not matter after a resume
    resumed = tiny_llama(vocab=VOCAB).to(torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    opt2 = slimopt.create_optimizer("sage-hybrid", resumed)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, 2, seed=10)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- step in backward
def _pair(build, preset, **kw):
    a = build()
    b = copy.deepcopy(a)
    return (a, slimopt.create_optimizer(preset, a, **kw)), (
        b,
        slimopt.create_optimizer(preset, b, step_in_backward=True, **kw),
    )


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_step_in_backward_equals_the_ordinary_step_float64(preset):
    def build():
        return tiny_llama(vocab=VOCAB).double()

    (a, opt_a), (b, opt_b) = _pair(build, preset)
    sched_a = torch.optim.lr_scheduler.LinearLR(opt_a, 1.0, 0.5, total_iters=3)
    sched_b = torch.optim.lr_scheduler.LinearLR(opt_b, 1.0, 0.5, total_iters=3)
    _train(a, opt_a, 3, sched=sched_a)
    _train(b, opt_b, 3, sched=sched_b)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=f"{preset}: {name}")
    assert opt_a.state_dict()["param_groups"] == opt_b.state_dict()["param_groups"]


def test_step_in_backward_frees_gradients_and_equals_in_bf16():
    (a, opt_a), (b, opt_b) = _pair(lambda: tiny_llama(vocab=VOCAB).to(torch.bfloat16), "scale")
    seen = []
    for p in b.parameters():
        p.register_post_accumulate_grad_hook(lambda q: seen.append(q.grad is not None))
    _train(a, opt_a, 2)
    lm_loss(b, VOCAB, seed=0).backward()
    assert all(p.grad is None for p in b.parameters())
    opt_b.step()
    opt_b.zero_grad()  # harmless: nothing left to clear
    lm_loss(b, VOCAB, seed=1).backward()
    opt_b.step()
    # stochastic rounding draws per parameter and step, so the order of updates does not matter
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_step_in_backward_with_tied_weights_and_checkpointing():
    (a, opt_a), (b, opt_b) = _pair(
        lambda: tiny_gpt2(vocab=VOCAB).double().eval(), "sage-hybrid"
    )  # no dropout
    assert a.lm_head.weight is a.transformer.wte.weight
    _train(a, opt_a, 2)
    _train(b, opt_b, 2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)

    (c, opt_c), (d, opt_d) = _pair(lambda: tiny_llama(vocab=VOCAB).double(), "sinkgd-hybrid")
    for m in (c, d):
        m.gradient_checkpointing_enable()
        m.train()
    _train(c, opt_c, 2)
    _train(d, opt_d, 2)
    for p, q in zip(c.parameters(), d.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_step_in_backward_resume_from_state_dict():
    (a, opt_a), (b, opt_b) = _pair(lambda: tiny_llama(vocab=VOCAB).double(), "sage-hybrid")
    _train(a, opt_a, 3)
    _train(b, opt_b, 1)
    c = copy.deepcopy(b)
    opt_c = slimopt.create_optimizer("sage-hybrid", c, step_in_backward=True)
    opt_c.load_state_dict(opt_b.state_dict())
    _train(c, opt_c, 2, seed=1)
    for p, q in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_step_in_backward_errors_before_any_update():
    model = tiny_llama(vocab=VOCAB)
    opt = slimopt.create_optimizer("lion", model, step_in_backward=True)
    lm_loss(model, VOCAB, seed=0).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LeanModeError, match="gradient accumulation"):
        lm_loss(model, VOCAB, seed=1).backward()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    opt.step()
    lm_loss(model, VOCAB, seed=1).backward()  # fine after step()

    with pytest.raises(LeanModeError, match="snr_normalize"):
        slimopt.create_optimizer("sgd-sai", model, step_in_backward=True, snr_normalize="max")
    with pytest.raises(LeanModeError, match="DataParallel"):
        slimopt.create_optimizer("scale", torch.nn.DataParallel(model), step_in_backward=True)
    with pytest.raises(LeanModeError, match="gradient-norm clip"):
        check_no_global_clip(opt, 1.0)
    check_no_global_clip(opt, None)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        slimopt.Lion(model.parameters(), stochastic_rounding="yes")


# --------------------------------------------------------------------------- row blocks
# (rule, hyperparameters, shape): every rule whose large tables pure bf16 steps in row blocks
ROW_CASES = [
    ("sage", {}, (11, 5)),
    ("sage", {"lion_order": True, "weight_decay": 0.1}, (7, 3, 2)),
    ("scale", {"norm_dim": 0}, (11, 5)),
    ("scale", {"norm_dim": 0, "momentum": 0.9, "weight_decay": 0.1}, (11, 5)),
    ("scale", {"norm_dim": 1, "momentum": 0.9}, (9, 4)),
    ("scale", {"norm_dim": 1}, (5, 3, 2)),
    ("lion", {"weight_decay": 0.1}, (11, 5)),
    ("adamw", {"weight_decay": 0.1}, (11, 5)),
    ("sgd_sai", {"weight_decay": 0.1}, (11, 5)),
    ("sinkgd", {"weight_decay": 0.1}, (11, 5)),
    ("sinkgd", {"iters": 2}, (7, 3, 2)),
]


def test_row_cases_cover_every_registered_rule():
    from slimopt.algorithms import ALGORITHMS

    assert {name for name, _, _ in ROW_CASES} == set(ALGORITHMS)


def _rule_and_group(name, options):
    from slimopt.algorithms import get_rule

    rule = get_rule(name)
    group = dict(rule.defaults, lr=0.05, **options)
    rule.validate(group)
    return rule, group


def _run_rule(rule, group, p, g, state, blocked):
    from slimopt.lean import step_rows

    if rule.prepare is not None:
        rule.prepare(p, g, state, group)
    extra = {"gsnr_max": None} if rule.step_kwargs else {}
    if not blocked:
        rule.reference(p, g, state, group, **extra)
        return

    def apply(ps, gs, ss):
        rule.foreach(ps, gs, ss, group, **extra)

    step_rows(apply, rule, group, p, g, state, rows=3)


@pytest.mark.parametrize(("name", "options", "shape"), ROW_CASES)
def test_row_blocks_equal_the_reference_in_float64(name, options, shape):
    # The row-blocked step (three rows at a time, the last block short) on float64 rows in place
    # is the rule's reference on the whole tensor, step counters and state included.
    rule, group = _rule_and_group(name, options)
    torch.manual_seed(0)
    p_ref = torch.randn(shape, dtype=torch.float64)
    p_rows = p_ref.clone()
    s_ref, s_rows = rule.init_state(p_ref, group), rule.init_state(p_rows, group)
    for _ in range(3):
        g = torch.randn(shape, dtype=torch.float64)
        _run_rule(rule, group, p_ref, g.clone(), s_ref, blocked=False)
        _run_rule(rule, group, p_rows, g.clone(), s_rows, blocked=True)
    torch.testing.assert_close(p_rows, p_ref, rtol=1e-12, atol=1e-14)
    for k, v in s_ref.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(s_rows[k], v, rtol=1e-12, atol=1e-14, msg=k)
        else:
            assert s_rows[k] == v, k


def _bf16_table_step(name, options, monkeypatch, chunk, sr=True):
    """Three pure-bf16 steps of a 64 x 48 table through the optimizer, with tables above
    ``chunk`` elements stepped in row blocks."""
    import slimopt.lean as lean
    from slimopt.optimizer import SlimOptimizer

    monkeypatch.setattr(lean, "FP32_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(64, 48).to(torch.bfloat16))
    group = {"params": [p], "algorithm": name, "lr": 0.01, **options}
    opt = SlimOptimizer([group], stochastic_rounding=sr)
    for t in range(3):
        p.grad = torch.randn(64, 48, generator=torch.Generator().manual_seed(t)).to(p.dtype)
        opt.step()
    return p.detach().clone(), opt.state[p]


@pytest.mark.parametrize(("name", "options", "shape"), ROW_CASES)
def test_row_blocked_bf16_step_matches_the_whole_table_step(name, options, shape, monkeypatch):
    # Row blocks of 500 elements (10 rows of 48) against the whole-table fp32 copy. The rounding
    # bits are the whole table's (one generator, drawn block after block), so an element-wise rule
    # gives the same bits. A reducing rule's column sums are added in another order (and the
    # blocks sum a bf16 momentum in fp32 where the whole table's small-matrix sum rounds to bf16),
    # which can send a value near a rounding boundary to the other neighbour: at most one bf16
    # spacing per step, in a few percent of the entries.
    whole, s_whole = _bf16_table_step(name, options, monkeypatch, chunk=1 << 22)
    rows, s_rows = _bf16_table_step(name, options, monkeypatch, chunk=500)
    assert s_rows["sr_step"] == s_whole["sr_step"] == 3
    if get_sharded(name) == "elementwise":
        assert torch.equal(rows, whole)
    else:
        low, high = _bf16_neighbours(whole.float().abs())
        diff = (rows.double() - whole.double()).abs()
        # 3 steps: a spacing of the binade above each, and 1% of lr (0.01) per step for the
        # sums' rounding where a value is near zero and its spacing is far below the update
        assert (diff <= 3 * (2 * (high - low) + 1e-4)).all()
        assert (diff > 0).float().mean() < 0.05


def get_sharded(name):
    from slimopt.algorithms import get_rule

    return get_rule(name).sharded


class _LargestNew(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest fresh allocation (bytes of an output storage no input shares)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_pure_bf16_never_copies_a_large_table_whole(preset, monkeypatch):
    # An embedding and head of 512 x 64 (32k elements). The native loops read the bf16 table and
    # round inside: no tensor of the step is larger than the table itself (64 KB). Without them
    # (the copy path, as on CUDA), tables above 4k elements step in row blocks, no tensor larger
    # than a block's fp32 copy (4k x 4 bytes) or the table; the whole-table copy path makes a
    # 128 KB fp32 copy.
    import slimopt.lean as lean
    from slimopt.algorithms.base import Rule
    from slimopt.kernels import cpu

    model = tiny_llama(vocab=512).to(torch.bfloat16)
    lm_loss(model, 512, seed=0).backward()
    table = model.get_input_embeddings().weight
    largest = {}
    from slimopt.algorithms import sgd_sai

    kernel_filter = Rule.fused_tensor_filter

    def copy_path(self, device):  # no kernel takes a bf16 tensor
        return lambda p, g, state, group: p.dtype != torch.bfloat16

    for native, chunk in ((True, 1 << 22), (False, 4096), (False, 1 << 22)):
        if native and cpu.library() is None:
            continue
        monkeypatch.setattr(Rule, "fused_tensor_filter", kernel_filter if native else copy_path)
        monkeypatch.setattr(lean, "FP32_CHUNK_ELEMENTS", chunk)
        # SGD-SaI's first-step gsnr sums: float64 chunks (of 2k elements with the native loops)
        monkeypatch.setattr(sgd_sai, "_CHUNK", (4096 if native else chunk) // 2)
        m = copy.deepcopy(model)
        for a, b in zip(m.parameters(), model.parameters()):
            a.grad = b.grad.clone()
        opt = slimopt.create_optimizer(preset, m)
        with _LargestNew() as mode:
            opt.step()
        largest[native, chunk] = mode.largest
    assert largest[False, 1 << 22] >= 4 * table.numel()
    assert largest[False, 4096] <= 2 * table.numel(), largest
    assert largest.get((True, 1 << 22), 0) <= 2 * table.numel(), largest


def test_sgd_sai_gsnr_of_a_large_bf16_gradient_is_measured_in_chunks(monkeypatch):
    # The first step's gsnr of a bf16 table from float64 chunk sums equals torch's from an fp32
    # copy of the whole gradient (within float32 rounding).
    from slimopt.algorithms import sgd_sai

    monkeypatch.setattr(sgd_sai, "_CHUNK", 1000)
    g = (torch.randn(130, 77) * 3 + 0.5).to(torch.bfloat16)
    chunked, norm = sgd_sai._snr_and_norm(g, 1e-8, None)
    whole = torch.linalg.vector_norm(g.float()) / (torch.std(g.float()) + 1e-8)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(g.float()), rtol=1e-5, atol=0)


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_row_blocks_copy_no_state_whole_after_the_first_step(preset, monkeypatch):
    # Once the state exists, a row-blocked step allocates nothing as large as the bf16 table: no
    # clone of a table-shaped state tensor (Lion's and AdamW's moments) per block, only blocks of
    # 2k elements (8 KB in fp32, half the 16 KB table).
    import slimopt.lean as lean

    monkeypatch.setattr(lean, "FP32_CHUNK_ELEMENTS", 2048)
    model = tiny_llama(vocab=512).to(torch.bfloat16)
    table = model.get_input_embeddings().weight
    opt = slimopt.create_optimizer(preset, model)
    for t in range(2):
        lm_loss(model, 512, seed=t).backward()
        if t == 0:
            opt.step()
            opt.zero_grad()
    with _LargestNew() as mode:
        opt.step()
    assert mode.largest < 2 * table.numel(), mode.largest


def test_step_in_backward_refuses_a_step_where_no_hook_fired():
    # the model's parameters replaced after the optimizer was built (as fully_shard does): the
    # hooks sit on parameters that never get a gradient, which must not pass silently
    model = torch.nn.Linear(4, 3)
    opt = slimopt.create_optimizer("lion", model, step_in_backward=True)
    model.weight = torch.nn.Parameter(model.weight.detach().clone())
    model.bias = torch.nn.Parameter(model.bias.detach().clone())
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(LeanModeError, match="wrapped .* after the optimizer was built"):
        opt.step()
