"""``torch.compile(opt.step)``: a float lr under a schedule compiles at most two graphs (as torch's
AdamW: the first value, then the lr as a graph input), a tensor lr one, for every preset; the
compiled step equals the eager one; the step reads no tensor on the host (no synchronisation on
an accelerator); a tensor lr that cannot work is a clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import slimopt
from slimopt.presets import PRESET_RULES, PRESETS, PRIMARY_RULE, preset_lrs

CLASSES = [slimopt.SAGE, slimopt.SinkGD, slimopt.SCALE, slimopt.SGDSaI, slimopt.Lion, slimopt.AdamW]
STEPS = 6


class TinyLM(nn.Module):
    """Every role a preset tells apart: an embedding, matrices, vectors and a head."""

    def __init__(self, vocab: int = 24, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 12)
        self.norm = nn.LayerNorm(12)
        self.down = nn.Linear(12, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.down(torch.relu(self.norm(self.up(self.embed(ids))))))


def _grads(params: list[nn.Parameter], t: int) -> None:
    g = torch.Generator().manual_seed(t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _train(make, compiled: bool, steps: int = STEPS) -> tuple[list[torch.Tensor], int]:
    """Parameters after ``steps`` steps under LambdaLR, and the graphs torch.compile made."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    params, opt = make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
    step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
    for t in range(steps):
        _grads(params, t)
        step()
        sched.step()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return [p.detach().clone() for p in params], graphs


def _preset(preset: str, tensor_lr: bool, **kw):
    def make():
        torch.manual_seed(0)
        model = TinyLM()
        lr = None
        if tensor_lr:
            lr = torch.tensor(preset_lrs(preset)[PRIMARY_RULE[preset]])
        return list(model.parameters()), slimopt.create_optimizer(preset, model, lr=lr, **kw)

    return make


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    # float32 rounding: a compiled AdamW group runs torch's capturable formula, which rounds
    # differently from its fused kernel (a few 1e-6 after six steps at SCALE's lr 0.32)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def _measures_first(preset: str) -> bool:
    return "sgd_sai" in PRESET_RULES[preset].values()


@pytest.mark.parametrize("preset", PRESETS)
def test_a_float_lr_under_a_schedule_compiles_at_most_two_graphs(preset):
    eager, _ = _train(_preset(preset, False), compiled=False)
    compiled, graphs = _train(_preset(preset, False), compiled=True)
    assert graphs <= 2
    _close(compiled, eager)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_tensor_lr_compiles_one_graph(preset):
    eager, _ = _train(_preset(preset, True), compiled=False)
    compiled, graphs = _train(_preset(preset, True), compiled=True)
    assert graphs <= (2 if _measures_first(preset) else 1)
    _close(compiled, eager)


def _one_class(cls, lr, **kw):
    def make():
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5))]
        return params, cls(params, lr=lr, **kw)

    return make


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_class_takes_a_tensor_lr_eager_and_compiled(cls):
    floats, _ = _train(_one_class(cls, 1e-2), compiled=False, steps=3)
    for foreach in (None, True, False):
        eager, _ = _train(_one_class(cls, torch.tensor(1e-2), foreach=foreach), False, steps=3)
        _close(eager, floats)
    compiled, graphs = _train(_one_class(cls, torch.tensor(1e-2)), compiled=True, steps=3)
    assert graphs <= (2 if cls is slimopt.SGDSaI else 1)
    _close(compiled, floats)


class _NoHostReads(TorchDispatchMode):
    """Raises on every read of a tensor's value to the host: ``item()``, ``bool()``,
    ``float()`` and a tensor passed where a number is expected all dispatch
    ``aten._local_scalar_dense``, what a CUDA tensor would synchronise for."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError(f"the step read a tensor of shape {tuple(args[0].shape)}")
        return func(*args, **(kwargs or {}))


# torch's multi-tensor AdamW takes a tensor lr only when capturable, which torch allows on
# accelerators alone: on the CPU the value is read on the host, which is no synchronisation.
HOST_SAFE = [c for c in CLASSES if c is not slimopt.AdamW]


@pytest.mark.parametrize("counters", ["int", "tensor"])
@pytest.mark.parametrize("cls", HOST_SAFE, ids=lambda c: c.__name__)
def test_the_multi_tensor_step_reads_no_tensor_on_the_host(cls, counters):
    """The path an accelerator runs without fused kernels (and torch.compile traces): with a
    tensor lr no step reads a value on the host. With Python-int counters SGD-SaI's first step
    decides on the host whether it measured its gradient; tensor counters (what a compiled step
    keeps) make that a ``torch.where`` too."""
    params, opt = _one_class(cls, torch.tensor(1e-2), foreach=True)()
    for t in range(3):
        _grads(params, t)
        if counters == "tensor":
            opt._prepare_compiled_step()
        if counters == "int" and t == 0 and cls is slimopt.SGDSaI:
            opt.step()
            continue
        with _NoHostReads():
            opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", PRESETS)
def test_no_host_synchronisation_on_cuda(preset):
    torch.manual_seed(0)
    model = TinyLM().cuda()
    lr = torch.tensor(preset_lrs(preset)[PRIMARY_RULE[preset]], device="cuda")
    opt = slimopt.create_optimizer(preset, model, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
    for t in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        # the first step allocates the state (and SGD-SaI's with Python-int counters decides on
        # the host whether it measured its gradient)
        torch.cuda.set_sync_debug_mode("error" if t > 0 else "default")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sched.step()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "lr, match",
    [
        (torch.tensor(-1e-3), "'lr' must be >= 0"),
        (torch.tensor(float("nan")), "'lr' must be >= 0"),
        (torch.tensor(float("inf")), "'lr' must be finite"),
        (torch.tensor([1e-3, 2e-3]), "tensor 'lr' must hold one floating value"),
        (torch.tensor(1), "tensor 'lr' must hold one floating value"),
        (torch.tensor(1e-3, device="meta"), "tensor 'lr' is on meta, the parameters on cpu"),
    ],
    ids=["negative", "nan", "inf", "two-values", "integer", "other-device"],
)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_bad_tensor_lr_is_a_clear_error(cls, lr, match):
    with pytest.raises(ValueError, match=match):
        cls([nn.Parameter(torch.randn(3, 2))], lr=lr)


@pytest.mark.parametrize(
    "lr",
    [torch.tensor(-1e-3), torch.tensor(float("nan")), torch.tensor([1e-3, 2e-3])],
    ids=["negative", "nan", "two-values"],
)
def test_create_optimizer_rejects_a_bad_tensor_lr(lr):
    with pytest.raises(ValueError, match="lr"):
        slimopt.create_optimizer("sage-hybrid", TinyLM(), lr=lr)
    with pytest.raises(ValueError, match="lr.*meta"):
        slimopt.create_optimizer("sage-hybrid", TinyLM(), lr=torch.tensor(1e-3, device="meta"))


# the rules with betas, which torch's Adam lets be tensors
BETAS_CLASSES = [slimopt.SAGE, slimopt.Lion, slimopt.AdamW]


def _betas_run(cls, tensor: bool, compiled: bool, **kw) -> tuple[list[torch.Tensor], int]:
    """Three steps with betas (and lr) that a schedule changes every step: in place for tensors,
    by replacing the pair for numbers (as torch's momentum-cycling schedulers do)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5))]
    # float64 tensors hold the numbers exactly (a float32 0.9 is another beta)
    as_hp = (lambda x: torch.tensor(x, dtype=torch.float64)) if tensor else float
    opt = cls(params, lr=as_hp(1e-2), betas=(as_hp(0.9), as_hp(0.99)), **kw)
    step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
    for t in range(3):
        _grads(params, t)
        b1, b2, lr = 0.9 - 0.05 * t, 0.99 - 0.01 * t, 1e-2 / (t + 1)
        group = opt.param_groups[0]
        if tensor:
            group["betas"][0].fill_(b1)
            group["betas"][1].fill_(b2)
            group["lr"].fill_(lr)
        else:
            group["betas"], group["lr"] = (b1, b2), lr
        step()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return [p.detach().clone() for p in params], graphs


@pytest.mark.parametrize("cls", BETAS_CLASSES, ids=lambda c: c.__name__)
def test_tensor_betas_eager_and_compiled(cls):
    """Tensor betas, as torch's Adam allows: every tier in eager mode equals number betas (the
    fused CPU tier bit for bit: it reads CPU tensors as numbers), and a compiled step whose betas
    and lr a schedule changes in place each step compiles one graph, equal to eager."""
    numbers, _ = _betas_run(cls, tensor=False, compiled=False)
    fused, _ = _betas_run(cls, tensor=True, compiled=False)
    for a, b in zip(fused, numbers):
        assert torch.equal(a, b)
    for foreach in (True, False):
        eager, _ = _betas_run(cls, tensor=True, compiled=False, foreach=foreach)
        _close(eager, numbers)
    compiled, graphs = _betas_run(cls, tensor=True, compiled=True)
    assert graphs == 1
    _close(compiled, numbers)


@pytest.mark.parametrize("cls", [slimopt.SAGE, slimopt.Lion], ids=lambda c: c.__name__)
def test_the_multi_tensor_step_reads_no_tensor_betas_on_the_host(cls):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5))]
    opt = cls(params, lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.99)),
              foreach=True)  # fmt: skip
    for t in range(3):
        _grads(params, t)
        with _NoHostReads():
            opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize(
    "betas, match",
    [
        ((torch.tensor(0.9), 0.99), "both numbers or both tensors"),
        ((torch.tensor([0.9, 0.8]), torch.tensor(0.99)), "tensor 'betas\\[0\\]' must hold one"),
        ((torch.tensor(0.9), torch.tensor(1)), "tensor 'betas\\[1\\]' must hold one floating"),
        ((torch.tensor(0.9), torch.tensor(1.0)), "'betas\\[1\\]' must be in \\[0, 1\\)"),
        ((torch.tensor(-0.1), torch.tensor(0.9)), "'betas\\[0\\]' must be in \\[0, 1\\)"),
    ],
    ids=["mixed", "two-values", "integer", "one", "negative"],
)
@pytest.mark.parametrize("cls", BETAS_CLASSES, ids=lambda c: c.__name__)
def test_bad_tensor_betas_are_a_clear_error(cls, betas, match):
    with pytest.raises(ValueError, match=match):
        cls([nn.Parameter(torch.randn(3, 2))], betas=betas)


def test_create_optimizer_passes_tensor_betas_to_its_rules():
    model = TinyLM()
    betas = (torch.tensor(0.9), torch.tensor(0.99))
    opt = slimopt.create_optimizer("sage-hybrid", model, sage_betas=betas)
    groups = [g for g in opt.param_groups if g["algorithm"] == "sage"]
    assert groups and all(g["betas"][0] is betas[0] for g in groups)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_betas_on_an_accelerator_keep_the_fused_kernels_out():
    """The fused accelerator kernels take betas as numbers: tensor betas on that device would be
    read on the host (a synchronisation), so the split sends the tensors to the multi-tensor
    path, and ``fused=True`` names the reason. Here the 'accelerator' is the meta device with a
    stand-in kernel."""
    import dataclasses

    from slimopt.algorithms import get_rule

    rule = dataclasses.replace(
        get_rule("lion"),
        fused={"meta": lambda: lambda *a, **k: None},
        fused_dtypes={"meta": (torch.float32,)},
        fused_takes={"meta": lambda p, g, s, group: True},
    )
    p = torch.empty(4, 3, device="meta")
    state: dict = {}

    def split(betas, **kw):
        group = {"lr": 1e-3, "betas": betas, "weight_decay": 0.0, **kw}
        return [name for name, _, _ in rule.partition(group, [p], [p], [state])]

    assert split((0.9, 0.99)) == ["fused"]
    assert split((torch.tensor(0.9), torch.tensor(0.99))) == ["fused"]  # CPU tensors: numbers
    on_device = (torch.tensor(0.9, device="meta"), torch.tensor(0.99, device="meta"))
    assert split(on_device) == ["foreach"]
    with pytest.raises(RuntimeError, match="betas are tensors on an accelerator"):
        split(on_device, fused=True)
    # FSDP2's pure-bf16 shards decide by the same rule whether a kernel takes them
    from types import SimpleNamespace

    from slimopt import lean

    rule = dataclasses.replace(
        rule, rounds_bf16=("meta",), fused_dtypes={"meta": (torch.bfloat16,)}
    )
    shard = torch.empty(4, 3, device="meta", dtype=torch.bfloat16)
    view = SimpleNamespace(param=shard, grad=shard, state={"sr_seed": 1, "sr_step": 0})
    group = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0}
    assert lean.kernel_views(rule, group, [view]) == ([view], [])
    assert lean.kernel_views(rule, {**group, "betas": on_device}, [view]) == ([], [view])
