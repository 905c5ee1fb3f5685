"""Counter-based stochastic rounding (slimopt.rounding): Philox4x32-10 known answers, the bits'
independence from splits, and every tier (torch reference, native C) giving the same bits."""

from __future__ import annotations

import pytest
import torch

import slimopt
from slimopt import lean, rounding
from slimopt.kernels import cpu

# Random123's published known-answer vectors for Philox4x32-10 (counter, key, output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
SEEDS = [0, 12345, 2**63 + 99, 2**64 - 1]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_torch_reference_philox_known_answers(counter, key, expected):
    c = [torch.tensor([w], dtype=torch.int64) for w in counter]
    assert tuple(int(w) for w in rounding.philox4x32_10(*c, *key)) == expected


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_native_philox_known_answers(counter, key, expected):
    if cpu.library() is None:
        pytest.skip(f"native kernels unavailable: {cpu.unavailable_reason()}")
    assert cpu.philox(counter, key) == expected


def test_bits_follow_the_spec_layout():
    # element i takes half i % 2 (low first) of word (i % 8) // 2 of the call at counter i // 8
    seed, step = 2**40 + 7, 3
    bits = rounding.rounding_bits(seed, step, 0, 24)
    for j in range(3):
        c = [torch.tensor([v], dtype=torch.int64) for v in (j, 0, step, 0)]
        words = [int(w) for w in rounding.philox4x32_10(*c, seed & 0xFFFFFFFF, seed >> 32)]
        want = [h for w in words for h in (w & 0xFFFF, w >> 16)]
        assert bits[8 * j : 8 * j + 8].tolist() == want
    assert int(bits.min()) >= 0 and int(bits.max()) < 2**16


@pytest.mark.parametrize("offset", [0, 1, 5, 8, 13, 2**35 + 3])
def test_bits_do_not_depend_on_where_a_tensor_is_split(offset):
    whole = rounding.rounding_bits(11, 2, offset, 100)
    for cut in (1, 7, 8, 50, 99):
        left = rounding.rounding_bits(11, 2, offset, cut)
        right = rounding.rounding_bits(11, 2, offset + cut, 100 - cut)
        assert torch.equal(torch.cat([left, right]), whole)
    # another step or seed gives other bits
    assert not torch.equal(rounding.rounding_bits(11, 3, offset, 100), whole)
    assert not torch.equal(rounding.rounding_bits(12, 2, offset, 100), whole)


def _values(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)
    x[:6] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 3.4e38])
    return x


@pytest.mark.parametrize("seed", SEEDS)
# 2**35 - 1003: the Philox counter i // 8 carries into its high word inside the tensor (and inside
# one batch of the vectorised generator)
@pytest.mark.parametrize("offset", [0, 3, 2**33 + 5, 2**35 - 1003])
def test_native_rounding_is_bit_identical_to_the_reference(seed, offset):
    if cpu.library() is None:
        pytest.skip(f"native kernels unavailable: {cpu.unavailable_reason()}")
    x = _values(300_007)  # several jobs of the threaded loop, a ragged end
    ref = torch.empty(x.shape, dtype=torch.bfloat16)
    native = torch.empty_like(ref)
    rounding._round_reference(ref, x, seed, 9, offset)
    assert cpu.sr_round_bf16(native, x, seed, 9, offset)
    assert torch.equal(ref.view(torch.int16), native.view(torch.int16))


def test_rounding_keeps_non_finite_and_exact_values_and_rounds_up_to_inf():
    x = _values(64)
    y = rounding.round_to_bf16(x, seed=1, step=1)
    assert y[0] == float("inf") and y[1] == float("-inf") and y[2].isnan()
    assert y[3] == 0 and y[4] == 0 and torch.signbit(y[4])
    # 3.4e38 lies above bf16's largest finite value: it rounds to that value or to inf
    assert y[5].float().item() in (float("inf"), 3.3895313892515355e38)


def test_a_non_contiguous_destination_uses_the_reference_with_the_same_bits():
    x = _values(200).reshape(20, 10)
    want = rounding.round_to_bf16(x, seed=4, step=2)
    dst = torch.empty(10, 20, dtype=torch.bfloat16).t()
    rounding.stochastic_round_(dst, x, seed=4, step=2)
    assert torch.equal(dst.view(torch.int16), want.view(torch.int16))


def test_row_blocks_round_like_the_whole_tensor():
    x = _values(12 * 9).reshape(12, 9)
    whole = rounding.round_to_bf16(x, seed=3, step=5)
    out = torch.empty_like(whole)
    for r in range(0, 12, 5):
        blk = x[r : r + 5].contiguous()
        out[r : r + 5] = rounding.round_to_bf16(blk, seed=3, step=5, offset=r * 9)
    assert torch.equal(out.view(torch.int16), whole.view(torch.int16))


@pytest.mark.parametrize("preset", slimopt.PRESETS)
def test_a_bf16_state_dict_resumes_bit_for_bit_and_init_state_allocates_the_rounding_numbers(
    preset,
):
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(40, 8), torch.nn.Linear(8, 40, bias=False))
        return model.to(torch.bfloat16)

    def step(model, opt, t):
        ids = torch.arange(t, t + 6) % 40
        model(ids).float().logsumexp(-1).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    roles = {"0.weight": "embedding", "1.weight": "lm_head"}
    model = build()
    opt = slimopt.create_optimizer(preset, model, roles=roles)
    for t in range(4):
        step(model, opt, t)
    # resume after two steps into a fresh optimizer whose state was allocated first (as a
    # torch.distributed.checkpoint load does): the rounding numbers must be allocated and loaded
    model_b = build()
    opt_b = slimopt.create_optimizer(preset, model_b, roles=roles)
    for t in range(2):
        step(model_b, opt_b, t)
    saved_model, saved_opt = model_b.state_dict(), opt_b.state_dict()
    model_c = build()
    model_c.load_state_dict(saved_model)
    opt_c = slimopt.create_optimizer(preset, model_c, roles=roles)
    opt_c.init_state()
    for p in model_c.parameters():
        assert set(lean.STATE_KEYS) <= set(opt_c.state[p]), sorted(opt_c.state[p])
    opt_c.load_state_dict(saved_opt)
    for t in range(2, 4):
        step(model_c, opt_c, t)
    for a, c in zip(model.parameters(), model_c.parameters()):
        assert torch.equal(a.view(torch.int16), c.view(torch.int16))
    assert [s["sr_step"] for s in opt.state.values()] == [
        s["sr_step"] for s in opt_c.state.values()
    ]


def test_a_state_from_the_earlier_generator_is_refused_or_converted():
    p = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
    opt = slimopt.Lion([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    del sd["state"][0]["sr_scheme"]  # as slimopt wrote it before the counter-based bits
    fresh = slimopt.Lion([torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))], lr=1e-3)
    with pytest.raises(ValueError, match="upgrade_rounding_state"):
        fresh.load_state_dict(sd)
    assert lean.upgrade_rounding_state(sd) == 1
    fresh.load_state_dict(sd)
    assert fresh.state[fresh.param_groups[0]["params"][0]]["sr_step"] == 1
