"""Roles and routing: every preset sends every role to the rule the spec's table says."""

from __future__ import annotations

import pytest
import torch
from lm_models import lm_loss, tiny_gpt2, tiny_llama
from torch import nn

import slimopt
from slimopt.presets import PRESET_RULES

# The spec's preset table, written out again here so that a change to the code's table fails.
SPEC_TABLE = {
    "adamw": ("adamw", "adamw", "adamw", "adamw"),
    "lion": ("lion", "lion", "lion", "lion"),
    "sage-hybrid": ("sage", "sage", "sinkgd", "sage"),
    "sage-pure": ("sage", "sage", "sage", "sage"),
    "lion-hybrid": ("lion", "lion", "sinkgd", "lion"),
    "sinkgd-hybrid": ("adamw", "adamw", "sinkgd", "adamw"),
    "sinkgd-pure": ("sinkgd", "sinkgd", "sinkgd", "sinkgd"),
    "scale": ("scale", "scale", "scale", "adamw"),
    "sgd-sai": ("sgd_sai", "sgd_sai", "sgd_sai", "sgd_sai"),
}
ROLES = ("embedding", "lm_head", "matrix", "vector")


def lora_llama():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(model, cfg)


def test_presets_list_is_the_spec_table():
    assert set(slimopt.PRESETS) == set(SPEC_TABLE)
    for preset, rules in SPEC_TABLE.items():
        assert tuple(PRESET_RULES[preset][r] for r in ROLES) == rules


def test_llama_roles():
    model = tiny_llama()
    roles = slimopt.param_roles(model)
    assert roles["model.embed_tokens.weight"] == "embedding"
    assert roles["lm_head.weight"] == "lm_head"
    assert roles["model.layers.0.self_attn.q_proj.weight"] == "matrix"
    assert roles["model.layers.0.mlp.down_proj.weight"] == "matrix"
    assert roles["model.norm.weight"] == "vector"
    assert set(roles) == {n for n, _ in model.named_parameters()}


def test_gpt2_tied_head_is_one_embedding_parameter():
    model = tiny_gpt2()
    roles = slimopt.param_roles(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert roles["transformer.wte.weight"] == "embedding"
    assert "lm_head.weight" not in roles and "lm_head" not in roles.values()
    assert roles["transformer.wpe.weight"] == "embedding"  # an nn.Embedding is an embedding
    assert roles["transformer.h.0.attn.c_attn.weight"] == "matrix"
    assert roles["transformer.h.0.ln_1.bias"] == "vector"


def test_lora_roles_and_frozen_parameters_left_out():
    model = lora_llama()
    roles = slimopt.param_roles(model)
    lora = [n for n in roles if "lora_A" in n or "lora_B" in n]
    assert lora and all(roles[n] == "matrix" for n in lora)
    opt = slimopt.create_optimizer("sage-hybrid", model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable and len(trainable) == len(lora)


@pytest.mark.parametrize("preset", slimopt.PRESETS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "lora"])
def test_routing(preset, family):
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "lora": lora_llama}[family]()
    roles = slimopt.param_roles(model)
    opt = slimopt.create_optimizer(preset, model)
    expected = dict(zip(ROLES, SPEC_TABLE[preset]))
    seen = set()
    for group in opt.param_groups:
        assert set(group) >= {"algorithm", "role", "lr", "params", "param_names"}
        assert group["algorithm"] == expected[group["role"]]
        for name in group["param_names"]:
            assert roles[name] == group["role"]
            seen.add(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert seen == trainable
    # and the optimizer trains
    opt.zero_grad()
    lm_loss(model, 64, seed=0).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scale_norm_dims():
    opt = slimopt.create_optimizer("scale", tiny_llama())
    by_role = {}
    for g in opt.param_groups:
        if g["algorithm"] == "scale":
            by_role.setdefault(g["role"], set()).add((g["norm_dim"], g["momentum"]))
    assert by_role == {"embedding": {(0, 0.0)}, "lm_head": {(1, 0.9)}, "matrix": {(1, 0.0)}}
    # GPT-2's Conv1D weights are [in, out]: SCALE normalizes over dim 0 there
    gpt = slimopt.create_optimizer("scale", tiny_gpt2())
    dims = {
        n: g["norm_dim"]
        for g in gpt.param_groups
        if g["role"] == "matrix"
        for n in g["param_names"]
    }
    assert set(dims.values()) == {0}


def test_lr_sets_primary_rule_and_scales_the_others():
    default = slimopt.presets.preset_lrs("sage-hybrid")
    opt = slimopt.create_optimizer("sage-hybrid", tiny_llama(), lr=4e-3)
    lrs = {g["algorithm"]: g["lr"] for g in opt.param_groups}
    assert lrs["sage"] == pytest.approx(4e-3)
    assert lrs["sinkgd"] == pytest.approx(default["sinkgd"] * 4e-3 / default["sage"])
    assert lrs["sinkgd"] != default["sinkgd"]


def test_overrides_by_rule_role_and_everywhere():
    opt = slimopt.create_optimizer(
        "sage-hybrid", tiny_llama(), sinkgd_lr=5e-4, lm_head_betas=(0.8, 0.9), weight_decay=0.2
    )
    for g in opt.param_groups:
        if g["algorithm"] == "sinkgd":
            assert g["lr"] == 5e-4
        if g["role"] == "lm_head":
            assert g["betas"] == (0.8, 0.9)
        assert g["weight_decay"] == 0.2
    opt = slimopt.create_optimizer("sgd-sai", tiny_llama(), sgd_sai_snr_normalize="max")
    assert all(g["snr_normalize"] == "max" for g in opt.param_groups)


def test_scheduler_clipping_and_amp_work_unchanged():
    model = tiny_llama()
    opt = slimopt.create_optimizer("sage-hybrid", model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    base = [g["initial_lr"] for g in opt.param_groups]
    lm_loss(model, 64, seed=0).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * 0.5 for b in base])
    scaler = torch.amp.GradScaler("cpu")
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(model, 64, seed=1)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- bad input
def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'adam'"):
        slimopt.create_optimizer("adam", tiny_llama())


def test_the_model_may_come_first_as_in_timm_and_pytorch_optimizer():
    model = tiny_llama()
    first = slimopt.create_optimizer(model, "sage-hybrid", lr=1e-3)
    second = slimopt.create_optimizer("sage-hybrid", model, lr=1e-3)
    assert [(g["role"], g["algorithm"], g["lr"], g["param_names"]) for g in first.param_groups] == [
        (g["role"], g["algorithm"], g["lr"], g["param_names"]) for g in second.param_groups
    ]
    # an unknown name in the model-first order names the preset, not the model's repr
    with pytest.raises(
        ValueError, match=r"unknown preset 'adam' \(did you mean 'adamw'\?\)"
    ) as info:
        slimopt.create_optimizer(model, "adam")
    assert "LlamaForCausalLM" not in str(info.value) and "presets are adamw, lion" in str(
        info.value
    )


@pytest.mark.parametrize("name", ["sage_hybrid", "SAGE-Hybrid", "Sage_Hybrid", " sage hybrid "])
def test_preset_names_are_normalised(name):
    opt = slimopt.create_optimizer(name, tiny_llama())
    assert sorted({g["algorithm"] for g in opt.param_groups}) == ["sage", "sinkgd"]
    assert slimopt.presets.check_preset(name) == "sage-hybrid"
    assert slimopt.presets.preset_lrs(name) == {"sage": 8e-3, "sinkgd": 1e-3}


@pytest.mark.parametrize("params", ["generator", "list", "groups"])
def test_a_parameter_iterable_is_a_clear_error_that_asks_for_the_module(params):
    model = tiny_llama()
    given = {
        "generator": model.parameters(),
        "list": list(model.parameters()),
        "groups": [{"params": list(model.parameters())}],
    }[params]
    with pytest.raises(TypeError, match=r"needs the model \(an nn.Module\).*by its role") as info:
        slimopt.create_optimizer("sage-hybrid", given)
    assert "slimopt.SAGE(params" in str(info.value)
    with pytest.raises(TypeError, match="needs the model"):
        slimopt.create_optimizer(given, "sage-hybrid")  # either order


def test_the_harness_accepts_normalised_preset_names(tmp_path):
    from slimopt.train.loop import ConfigError, TrainConfig, _check_config

    cfg = TrainConfig(preset="SGD_SaI", out=str(tmp_path))
    _check_config(cfg, custom_optimizer=False)
    assert cfg.preset == "sgd-sai"
    with pytest.raises(ConfigError, match="unknown preset 'sgd'"):
        _check_config(TrainConfig(preset="sgd"), custom_optimizer=False)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("sinkgd_betas", (0.9, 0.9), "'betas' is not an option"),
        ("momentum_x", 1, "'momentum_x' is not an option"),
        ("sage_lr", 1e-3, "'lr' is not an option of the sage groups"),
    ],
)
def test_unknown_override(key, value, match):
    preset = "sinkgd-hybrid"
    with pytest.raises(ValueError, match=match):
        slimopt.create_optimizer(preset, tiny_llama(), **{key: value})


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (slimopt.SAGE, {"lr": -1.0}, "'lr' must be >= 0"),
        (slimopt.SAGE, {"eps": -1e-8}, "'eps' must be >= 0"),
        (slimopt.SAGE, {"betas": (0.9, 1.0)}, r"betas\[1\]' must be in \[0, 1\)"),
        (slimopt.Lion, {"betas": (-0.1, 0.99)}, r"betas\[0\]' must be in \[0, 1\)"),
        (slimopt.SinkGD, {"iters": 0}, "'iters' must be an integer >= 1"),
        (slimopt.SCALE, {"momentum": 1.0}, "'momentum' must be in"),
        (slimopt.SCALE, {"norm_dim": 2}, "'norm_dim' must be one of"),
        (slimopt.SGDSaI, {"snr_normalize": "mean"}, "'snr_normalize' must be one of"),
        (slimopt.SGDSaI, {"weight_decay": -0.1}, "'weight_decay' must be >= 0"),
        (slimopt.AdamW, {"lr": float("nan")}, "'lr' must be >= 0"),
    ],
)
def test_bad_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(3, requires_grad=True)], **kwargs)


def test_unknown_group_option_and_algorithm():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"sinkgd: unknown option\(s\) \['betas'\]"):
        slimopt.SlimOptimizer([{"params": [w], "algorithm": "sinkgd", "betas": (0.9, 0.9)}])
    with pytest.raises(ValueError, match="unknown algorithm 'adam'"):
        slimopt.SlimOptimizer([w], "adam")


@pytest.mark.parametrize("cls", [slimopt.SAGE, slimopt.Lion, slimopt.SGDSaI, slimopt.SCALE])
def test_sparse_gradient_is_refused_with_the_parameter_name(cls):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = cls(list(emb.named_parameters()))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*weight"):
        opt.step()


def test_unclassifiable_parameter_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))

    with pytest.raises(slimopt.RoleError, match="'table'"):
        slimopt.param_roles(Odd())
    assert slimopt.param_roles(Odd(), overrides={"table": "matrix"}) == {"table": "matrix"}


def test_model_without_trainable_parameters():
    model = tiny_llama()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        slimopt.create_optimizer("adamw", model)


def test_parameters_without_gradient_are_left_untouched():
    model = tiny_llama()
    opt = slimopt.create_optimizer("sage-hybrid", model)
    before = model.lm_head.weight.detach().clone()
    lm_loss(model, 64, seed=0).backward()
    model.lm_head.weight.grad = None
    opt.step()
    assert torch.equal(before, model.lm_head.weight)
    assert not opt.state[model.lm_head.weight]


def test_sgd_sai_late_parameter_gets_its_gsnr_then():
    a = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    opt = slimopt.SGDSaI([a, b])
    a.grad = torch.randn(5, 4)
    opt.step()
    assert b not in opt.state or not opt.state[b]
    b.grad = torch.randn(5, 4) * 3
    opt.step()
    expected = b.grad.norm() / (b.grad.std() + 1e-8)
    assert torch.allclose(opt.state[b]["gsnr"], expected)


def test_sgd_sai_one_element_gsnr_is_one_and_max_normalization():
    scalar = torch.zeros(1, requires_grad=True)
    w = torch.randn(6, 3, requires_grad=True)
    v = torch.randn(8, requires_grad=True)
    params = (scalar, w, v)
    before = [p.detach().clone() for p in params]
    opt = slimopt.SGDSaI(list(params), lr=0.1, snr_normalize="max", weight_decay=0.0)
    scalar.grad, w.grad, v.grad = torch.ones(1), torch.randn(6, 3), torch.randn(8) + 5
    opt.step()
    assert float(opt.state[scalar]["gsnr"]) == 1.0
    gsnrs = [opt.state[p]["gsnr"] for p in params]
    top = max(gsnrs)
    assert float(top) > 1.0
    # first step: m = g, so each parameter moves by lr * (gsnr / max gsnr) * g
    for p, b, gsnr in zip(params, before, gsnrs):
        assert torch.allclose(p.detach(), b - 0.1 * (gsnr / top) * p.grad, atol=1e-7)


def test_a_tensor_lr_is_accepted_and_scales_every_rule():
    model = torch.nn.ModuleDict(
        {
            "emb": torch.nn.Embedding(20, 6),
            "proj": torch.nn.Linear(6, 6, bias=False),
            "head": torch.nn.Linear(6, 20, bias=False),
        }  # fmt: skip
    )
    opt = slimopt.create_optimizer("sage-hybrid", model, lr=torch.tensor(4e-3))
    lrs = {g["algorithm"]: g["lr"] for g in opt.param_groups}
    assert all(isinstance(v, torch.Tensor) for v in lrs.values())
    assert lrs["sage"].item() == pytest.approx(4e-3)
    assert lrs["sinkgd"].item() == pytest.approx(4e-3 / 8)  # the preset's ratio, 1e-3 / 8e-3
    # each group holds its own tensor: a scheduler's fill_ on one leaves the others
    tensors = [g["lr"] for g in opt.param_groups]
    assert len({t.data_ptr() for t in tensors}) == len(tensors)
    for bad in (torch.tensor(-1.0), torch.tensor(float("inf")), torch.tensor([1e-3, 2e-3])):
        with pytest.raises(ValueError, match="lr"):
            slimopt.create_optimizer("sage-hybrid", model, lr=bad)
