"""8-bit weights (slimopt.quant): the step against a float64 reference of "dequantize, rule,
stochastic round to the grid", the rounding's statistics, resume, and what is refused."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from lm_models import lm_loss, tiny_gpt2, tiny_llama

import slimopt
from slimopt import quant
from slimopt.lean import LeanModeError
from slimopt.rounding import rounding_bits

VOCAB = 64
BLOCK = 8  # tiny_llama's intermediate width 36 leaves a short last block of 4


def _int8_llama(block: int = BLOCK) -> torch.nn.Module:
    return quant.quantize_weights(tiny_llama(vocab=VOCAB).to(torch.bfloat16), block=block)


def _fl32(t: torch.Tensor) -> torch.Tensor:
    """float64 -> the nearest fp32 value, back in float64."""
    return t.float().double()


def _reference_round(x32, scale, block, seed, step):
    """The spec in float64, a block at a time: new scales where needed, then
    code = (floor(fl32(x / s) * 2^16) + r) >> 16 with r the counter-based bits."""
    x, s = x32.double(), scale.double().clone()
    rows, cols = x.shape
    r = rounding_bits(seed, step, 0, x.numel()).view(rows, cols).double()
    codes = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for b in range(s.shape[1]):
            sl = slice(b * block, min(cols, (b + 1) * block))
            a = x[i, sl].abs().max()
            qmax = _fl32(a / s[i, b])
            if qmax > 127 or (qmax < 63.5 and a > 0):
                new = _fl32(a / 127)
                while _fl32(a / new) > 127:
                    new = torch.nextafter(new.float(), torch.tensor(math.inf)).double()
                s[i, b] = new
            z = torch.floor(_fl32(x[i, sl] / s[i, b]) * 65536)
            codes[i, sl] = torch.floor((z + r[i, sl]) / 65536)
    return codes, s


@pytest.mark.parametrize("preset", ["sage-hybrid", "scale", "sinkgd-hybrid", "lion"])
def test_int8_step_equals_the_float64_reference(preset, monkeypatch):
    model = _int8_llama()
    opt = slimopt.create_optimizer(preset, model, step_in_backward=True, foreach=False, fused=False)
    seen = []
    original = quant.Int8Linear.apply_update

    def record(self, grad):
        p = self.weight
        state = copy.deepcopy(opt.state[p])
        seen.append((self, grad.clone(), p.detach().clone(), self.weight_scale.clone(), state))
        original(self, grad)

    monkeypatch.setattr(quant.Int8Linear, "apply_update", record)
    for step in range(2):  # the first write, and one with state and new scales
        lm_loss(model, VOCAB, seed=step).backward()
        opt.step()
    assert len(seen) == 2 * sum(isinstance(m, quant.Int8Linear) for m in model.modules())
    for module, grad, codes0, scale0, state0 in seen[-len(seen) // 2 :]:
        p = module.weight
        gi = opt._group_map()[id(p)]
        group = opt.param_groups[gi]
        # dequantize (exact in float64, one rounding to fp32), then the rule's fp32 reference
        w = (codes0.double() * _expand(scale0, module.block, p.shape[1]).double()).float()
        state = dict(state0)
        if not state:
            index = next(i for i, q in enumerate(group["params"]) if q is p)
            opt._new_state(slimopt.algorithms.get_rule(group["algorithm"]), group, index, p)
            state = copy.deepcopy(opt.state[p])
            state["sr_step"] = 0
        rule = slimopt.algorithms.get_rule(group["algorithm"])
        ref_group = {**group, "lr": float(group["lr"])}
        kwargs = rule.step_kwargs(opt) if rule.step_kwargs else {}
        if rule.prepare is not None:
            rule.prepare(w, grad.float(), state, ref_group)
        rule.reference(w, grad.float(), state, ref_group, **kwargs)
        codes, scale = _reference_round(w, scale0, module.block, state["sr_seed"],
                                        state["sr_step"] + 1)  # fmt: skip
        assert torch.equal(p.double(), codes), (preset, module)
        assert torch.equal(module.weight_scale.double(), scale), (preset, module)


def _expand(scale, block, cols):
    return scale.repeat_interleave(block, dim=1)[:, :cols]


def test_grid_rounding_is_unbiased_within_five_standard_errors():
    torch.manual_seed(0)
    rows, cols = 4, 64
    scale = torch.full((rows, 1), 0.01)
    x = (torch.rand(rows, cols) * 200 - 100) * 0.01  # |q| < 100: no new scales
    x[:, 0] = 1.2  # keeps every block's range in [63.5, 127]
    n = 3000
    total = torch.zeros(rows, cols, dtype=torch.float64)
    codes = torch.empty(rows, cols, dtype=torch.int8)
    for step in range(1, n + 1):
        s = scale.clone()
        quant.round_to_grid(x, s, codes, block=cols, seed=11, step=step)
        assert torch.equal(s, scale)
        total += codes.double()
    q = (x / scale).double()
    frac = q - torch.floor(q)
    mean = total / n
    se = torch.sqrt(frac * (1 - frac) / n).clamp_min(1e-12)
    bias = (mean - q).abs()
    assert (bias <= 5 * se + 2**-16).all(), float((bias / se).max())
    assert ((codes.double() == torch.floor(q)) | (codes.double() == torch.floor(q) + 1)).all()


def test_scales_grow_and_shrink_and_never_clip():
    x = torch.tensor([[0.5, -3.0, 0.25, 0.0], [0.001, 0.002, 0.0, 0.0]])
    scale = torch.tensor([[0.01, 0.01], [1.0, 1.0]])
    codes = torch.empty(2, 4, dtype=torch.int8)
    quant.round_to_grid(x, scale, codes, block=2, seed=1, step=1)

    # block (0, 0): |x| up to 3 needs 300 codes of 0.01 -> a new scale 3/127; the other
    # blocks: under half the range -> new scales; the zero block keeps its scale
    # (fl32(max|x| / 127), or the next fp32 number above it where a code would exceed 127)
    def near(a, b):
        return bool(torch.isclose(a, torch.tensor(b), rtol=2**-22, atol=0))

    assert near(scale[0, 0], 3.0 / 127) and codes[0, 1] == -127
    assert near(scale[0, 1], 0.25 / 127) and codes[0, 2] == 127
    assert scale[1, 1] == 1.0 and near(scale[1, 0], 0.002 / 127)
    assert codes.abs().max() <= 127
    with pytest.raises(quant.QuantError, match="non-finite"):
        quant.round_to_grid(torch.tensor([[math.inf, 1.0]]), torch.ones(1, 1), codes[:1, :2],
                            block=2, seed=1, step=1)  # fmt: skip


def test_int8_training_moves_the_weights_and_lowers_the_loss():
    model = _int8_llama()
    opt = slimopt.create_optimizer("sage-hybrid", model, step_in_backward=True)
    losses = []
    for _ in range(8):
        loss = lm_loss(model, VOCAB, seed=0)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert all(p.grad is None for p in model.parameters())
    assert losses[-1] < losses[0]
    w = model.model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.int8 and opt.state[w]["sr_step"] == 8 and opt.state[w]["q_bits"] == 8


def _train(model, opt, steps, seed=0):
    for t in range(steps):
        lm_loss(model, VOCAB, seed=seed + t).backward()
        opt.step()


def test_int8_resume_continues_bit_for_bit():
    model = _int8_llama()
    opt = slimopt.create_optimizer("scale", model, step_in_backward=True)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, seed=3)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # another seed: everything must come from the state dicts
    again = _int8_llama()
    again.load_state_dict(saved["model"])
    opt2 = slimopt.create_optimizer("scale", again, step_in_backward=True)
    opt2.load_state_dict(saved["opt"])
    _train(again, opt2, 3, seed=3)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_dequantized_state_dict_is_an_ordinary_bf16_model():
    model = _int8_llama()
    opt = slimopt.create_optimizer("scale", model, step_in_backward=True)
    _train(model, opt, 2)
    plain = tiny_llama(vocab=VOCAB).to(torch.bfloat16)
    plain.load_state_dict(quant.dequantized_state_dict(model))
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0.02, atol=0.02)
    assert all(p.dtype == torch.bfloat16 for p in plain.parameters())


def test_checkpoints_of_int8_and_bf16_runs_do_not_load_into_each_other():
    model = _int8_llama()
    opt = slimopt.create_optimizer("scale", model, step_in_backward=True)
    _train(model, opt, 1)
    plain = tiny_llama(vocab=VOCAB).to(torch.bfloat16)
    plain_opt = slimopt.create_optimizer("scale", plain, step_in_backward=True)
    _train(plain, plain_opt, 1)
    with pytest.raises(quant.QuantError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        _int8_llama().load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match="q_proj.weight_scale"):
        tiny_llama(vocab=VOCAB).to(torch.bfloat16).load_state_dict(model.state_dict())
    fresh = slimopt.create_optimizer("scale", tiny_llama(vocab=VOCAB).to(torch.bfloat16),
                                     step_in_backward=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"q_proj\.weight.*int8 weight"):
        fresh.load_state_dict(opt.state_dict())
    fresh8 = slimopt.create_optimizer("scale", _int8_llama(), step_in_backward=True)
    with pytest.raises(ValueError, match=r"q_proj\.weight.*floating-point weight"):
        fresh8.load_state_dict(plain_opt.state_dict())


def test_what_int8_weights_refuse_before_any_update():
    with pytest.raises(quant.QuantError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight'"):
        quant.quantize_weights(tiny_gpt2(vocab=VOCAB))
    model = _int8_llama()
    with pytest.raises(quant.QuantError, match="step_in_backward=True"):
        slimopt.create_optimizer("scale", model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(quant.QuantError, match="step_in_backward=True"):
        lm_loss(model, VOCAB, seed=0).backward()  # no slimopt optimizer holds the weights
    opt = slimopt.create_optimizer("scale", model, step_in_backward=True)
    lm_loss(model, VOCAB, seed=0).backward()
    with pytest.raises(LeanModeError, match="gradient accumulation"):
        lm_loss(model, VOCAB, seed=1).backward()
    opt.step()
    for k, v in before.items():
        assert v.shape == model.state_dict()[k].shape
    with pytest.raises(quant.QuantError, match="only 8-bit"):
        quant.quantize_weights(tiny_llama(vocab=VOCAB), bits=4)


def test_planner_counts_codes_scales_and_the_int8_update():
    from slimopt.planner import plan

    bf16 = plan("llama-60m", "scale", precision="bf16", step_in_backward=True,
                grad_checkpointing=True)  # fmt: skip
    int8 = plan("llama-60m", "scale", precision="bf16", step_in_backward=True,
                grad_checkpointing=True, weights="int8")  # fmt: skip
    meta = _meta_int8("llama-60m")
    codes = sum(m.weight.numel() for m in meta.modules() if isinstance(m, quant.Int8Linear))
    assert int8.weight_bytes == bf16.weight_bytes - codes + quant.scale_bytes(meta)
    assert int8.total_bytes < bf16.total_bytes and "int8-weights" in int8.mode
    with pytest.raises(ValueError, match="int8 weights need"):
        plan("llama-60m", "scale", precision="fp32", weights="int8")


def _meta_int8(name):
    from slimopt.train.models import build_meta_model

    return quant.quantize_weights(build_meta_model(name, "bf16"))


def test_memory_budget_searches_int8_weights(capsys):
    from slimopt.cli import main
    from slimopt.planner import plan

    kw = dict(precision="bf16", step_in_backward=True, grad_checkpointing=True)
    int8 = plan("llama-7b", "scale", **kw, weights="int8")
    bf16 = plan("llama-7b", "scale", **kw)
    assert int8.total_bytes < 10**10 < bf16.total_bytes  # the 10 GB, planned
    # "does llama-7b fit in 10 GB?": only with int8 weights, in the modes that allow them
    argv = ["memory", "--model", "llama-7b", "--budget", "10GB", "--preset", "scale", "--json"]
    assert main(argv) == 0
    assert not any(r["fits"] for r in json.loads(capsys.readouterr().out))
    assert main([*argv, "--weights", "int8"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["step_in_backward"], r["precision"], r["weights"]) for r in rows} == {
        (True, "bf16", "int8")
    }
    (fit,) = [r for r in rows if r["grad_checkpointing"]]
    assert fit["fits"] and fit["total_bytes"] == int8.total_bytes
    # the largest model per preset: llama-7b with int8 weights where bf16 stops at llama-1b
    assert main(["memory", "--budget", "10GB", "--preset", "scale", "--weights", "int8"]) == 0
    out = capsys.readouterr().out
    assert "int8 codes" in out and "llama-7b (bf16 int8-weights" in out
    # a mode that cannot hold int8 weights is an error, not a silent bf16 search
    assert main(["memory", "--budget", "10GB", "--weights", "int8", "--precision", "fp32"]) == 2
    assert "int8 weights need" in capsys.readouterr().err
