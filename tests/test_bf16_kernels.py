"""The native loops in pure bf16 against the torch reference on fp32 copies.

Every rule of the registry (every case of the battery) steps bf16 parameters three times through
its default tier, where the native loop reads bf16 and rounds inside, and through ``foreach=False``
(the reference on fp32 copies of parameter, gradient and state, written back rounded by
:func:`slimopt.rounding.stochastic_round_`). Element-wise rules agree bit for bit in weights and
state; reducing rules (their statistics summed in another order) within a few bf16 spacings in a
few percent of the elements.
"""

from __future__ import annotations

import pytest
import torch
from rule_db import RULE_CASES, fill_grads, make_optimizer, make_params

from slimopt.algorithms import get_rule
from slimopt.kernels import cpu

CASE_IDS = [c.id for c in RULE_CASES]
pytestmark = pytest.mark.skipif(cpu.library() is None, reason="no C compiler")


def _spacing(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().abs().view(torch.int32) & -65536
    return (bits + 65536).view(torch.float32).double() - bits.view(torch.float32).double()


def _run(case, tier: str, steps: int = 3):
    params = make_params(torch.bfloat16, seed=3)
    opt = make_optimizer(case, params, tier)
    for t in range(steps):
        fill_grads(params, t)
        opt.step()
    return params, opt


@pytest.mark.parametrize("case", RULE_CASES, ids=CASE_IDS)
def test_the_bf16_loops_equal_the_reference_on_fp32_copies(case):
    before = sum(cpu.calls.values())
    fast, opt_fast = _run(case, "default")
    assert sum(cpu.calls.values()) > before, "no native loop ran"
    ref, opt_ref = _run(case, "reference")
    elementwise = get_rule(case.algorithm).sharded == "elementwise"
    off = total = 0
    for a, b in zip(fast, ref):
        assert a.dtype == b.dtype == torch.bfloat16
        sa, sb = opt_fast.state[a], opt_ref.state[b]
        assert sa.get("sr_step") == sb.get("sr_step")
        if elementwise:
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), case
            for k, v in sa.items():
                if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16:
                    assert torch.equal(v.view(torch.int16), sb[k].view(torch.int16)), k
            continue
        diff = (a.double() - b.double()).abs()
        assert (diff <= 3 * _spacing(b) + 1e-6).all(), case
        off += int((diff > 0).sum())
        total += diff.numel()
    if not elementwise:
        assert off <= 0.05 * total, (off, total)


def test_a_bf16_loop_rounds_with_the_counter_based_bits_and_to_nearest_when_asked():
    from slimopt.rounding import Rounding, stochastic_round_

    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 1000, generator=g).bfloat16()
    grad = (torch.randn(3, 1000, generator=g) * 1e-2).bfloat16()
    m = torch.zeros_like(p)
    for stochastic in (True, False):
        # the reference: Lion on fp32 copies, the parameter rounded afterwards
        p32, m32 = p.float(), m.float()
        c = m32.mul(0.9).add_(grad.float(), alpha=0.1)
        p32.add_(c.sign(), alpha=-1e-3)
        want = torch.empty_like(p)
        if stochastic:
            stochastic_round_(want, p32, seed=11, step=4)
        else:
            want.copy_(p32)
        got, mk = p.clone(), m.clone()
        cpu.lion_step([(got, grad, mk, Rounding(11, 4, stochastic))], 1e-3, 0.0, 0.9, 0.99)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
