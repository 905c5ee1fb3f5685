"""Named model configurations, built from Hugging Face ``transformers`` with no download.

The GaLore LLaMA family (``llama-60m`` … ``llama-7b``, the table at the end of
``docs/algorithms.md``: RMSNorm eps 1e-6, SwiGLU, untied head, no biases, init std 0.02),
two CPU-sized LLaMAs (``llama-tiny``, ``llama-20m``), GPT-2 (``gpt2-small`` … ``gpt2-xl``) and
Meta's ``llama2-7b``, ``llama2-13b`` and ``llama2-70b`` (grouped-query attention). Any other architecture that ``transformers`` knows comes from a JSON config file.

The vocabulary follows the tokenizer: ``vocab_size`` overrides the config's own. When it is None,
the named configuration's default applies (the paper's 32000 for the GaLore LLaMAs and the Llama-2 shapes,
50257 for GPT-2, 8192 for the CPU-sized LLaMAs).

Every model can be built on the ``meta`` device, which allocates nothing, so the memory estimates
for a 7B model cost milliseconds:

>>> import torch
>>> from slimopt.train.models import build_model
>>> with torch.device("meta"):
...     model = build_model("llama-7b")
>>> sum(p.numel() for p in model.parameters())
6738415616
>>> tiny = build_model("llama-tiny", vocab_size=512)
>>> tiny.config.tie_word_embeddings
False
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Fields common to every LLaMA below (GaLore's configs/llama_*.json).
_LLAMA_COMMON: dict[str, Any] = {
    "model_type": "llama",
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "max_position_embeddings": 1024,
    "use_cache": False,
}


def _llama(hidden: int, intermediate: int, heads: int, layers: int, vocab: int, **extra: Any):
    return {
        **_LLAMA_COMMON,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        **extra,
    }


def _gpt2(n_embd: int, n_layer: int, n_head: int) -> dict[str, Any]:
    # GPT-2 keeps its tied head, as released; dropout is off, as usual for pretraining (nanoGPT).
    return {
        "model_type": "gpt2",
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_positions": 1024,
        "vocab_size": 50257,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "use_cache": False,
    }


# name -> transformers config fields. Parameter counts are at the default vocabulary.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # CPU-sized: about 2.9M and 20.5M parameters at an 8192-token vocabulary.
    "llama-tiny": _llama(128, 352, 4, 4, 8192, max_position_embeddings=2048),
    "llama-20m": _llama(384, 1024, 6, 8, 8192, max_position_embeddings=2048),
    # GaLore LLaMA family (sequence length 256 in the papers).
    "llama-60m": _llama(512, 1376, 8, 8, 32000),
    "llama-130m": _llama(768, 2048, 12, 12, 32000),
    "llama-350m": _llama(1024, 2736, 16, 24, 32000),
    "llama-1b": _llama(2048, 5461, 32, 24, 32000),
    "llama-7b": _llama(4096, 11008, 32, 32, 32000, max_position_embeddings=2048),
    # Meta's Llama-2-7B shape (used by the SGD-SaI memory table).
    "llama2-7b": _llama(
        4096, 11008, 32, 32, 32000, rms_norm_eps=1e-5, max_position_embeddings=4096
    ),
    # Meta's Llama-2-13B (multi-head attention) and Llama-2-70B (grouped-query attention, 8
    # key-value heads): the shapes of the multi-GPU planner's answers.
    "llama2-13b": _llama(
        5120, 13824, 40, 40, 32000, rms_norm_eps=1e-5, max_position_embeddings=4096
    ),
    "llama2-70b": _llama(
        8192,
        28672,
        64,
        80,
        32000,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        num_key_value_heads=8,
    ),  # fmt: skip
    "gpt2-small": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
}

MODEL_NAMES: tuple[str, ...] = tuple(NAMED_CONFIGS)

# Architectures a JSON config may name; these are the ones the harness is tested with.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "gpt2")


class ModelConfigError(ValueError):
    """An unknown model name, or a config file that cannot be turned into a model."""


def _load_config_fields(name_or_path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    name = str(name_or_path)
    if name in NAMED_CONFIGS:
        return dict(NAMED_CONFIGS[name]), name
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ModelConfigError(f"model config file {name!r} does not exist")
        try:
            fields = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelConfigError(f"model config file {name!r} is not valid JSON: {exc}") from exc
        if not isinstance(fields, dict) or "model_type" not in fields:
            raise ModelConfigError(
                f"model config file {name!r} must be a JSON object with a 'model_type' "
                f"(one of {', '.join(SUPPORTED_MODEL_TYPES)}), as a transformers config.json is"
            )
        return fields, str(path)
    raise ModelConfigError(
        f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}, "
        "or give the path of a transformers config .json file"
    )


def model_config(name_or_path: str | os.PathLike[str], vocab_size: int | None = None):
    """The ``transformers`` config for a named model or a JSON config file.

    ``vocab_size`` (the tokenizer's) replaces the config's own when given.

    >>> cfg = model_config("llama-60m")
    >>> cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.tie_word_embeddings
    (512, 8, 32000, False)
    >>> model_config("gpt2-small", vocab_size=8192).vocab_size
    8192
    """
    from transformers import AutoConfig

    fields, source = _load_config_fields(name_or_path)
    fields = {k: v for k, v in fields.items() if k not in ("architectures", "transformers_version")}
    model_type = fields.pop("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"use one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if vocab_size is not None:
        if int(vocab_size) < 1:
            raise ModelConfigError(f"vocab_size must be positive, got {vocab_size}")
        fields["vocab_size"] = int(vocab_size)
    # Token ids come from our tokenizer, not from the original releases.
    fields.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    for key in _SIZE_FIELDS:
        value = fields.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ModelConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(f"{source}: invalid config: {exc}") from exc
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if hidden and heads and hidden % heads:
        raise ModelConfigError(
            f"{source}: the hidden size {hidden} does not divide into {heads} attention heads"
        )
    kv = getattr(config, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise ModelConfigError(
            f"{source}: {heads} attention heads do not divide into {kv} key-value heads"
        )
    return config


# the size fields of the supported architectures: positive integers
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "n_embd",
                "n_layer", "n_head", "n_inner", "n_positions")  # fmt: skip


def build_model(
    name_or_config_path: str | os.PathLike[str],
    vocab_size: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A freshly initialised causal LM (``LlamaForCausalLM`` or ``GPT2LMHeadModel``).

    Initialisation draws from torch's global RNG, so ``torch.manual_seed`` makes it repeatable.
    Under ``with torch.device("meta"):`` (or ``device="meta"``) nothing is allocated.

    >>> m = build_model("llama-tiny", vocab_size=512)
    >>> type(m).__name__, m.lm_head.weight.shape
    ('LlamaForCausalLM', torch.Size([512, 128]))
    """
    from transformers import AutoModelForCausalLM

    config = model_config(name_or_config_path, vocab_size)
    if device is not None:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def parameter_count(model: nn.Module) -> int:
    """Number of distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# the weights' dtypes the planner and ``slimopt memory`` build models in
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def check_dtype(dtype: str) -> torch.dtype:
    """The torch dtype named ``dtype`` (a key of :data:`DTYPES`), or a ValueError naming it."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_meta_model(model: str, dtype: str = "fp32", vocab_size: int | None = None) -> nn.Module:
    """The named model (or a transformers config .json) on the meta device, in ``dtype``:
    nothing is allocated (what the planner counts)."""
    return build_model(model, vocab_size, device="meta").to(check_dtype(dtype))
