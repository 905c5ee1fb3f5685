"""Named model configurations: shapes from the spec, no download, buildable on the meta device."""

from __future__ import annotations

import json

import pytest
import torch

from slimopt.train.models import (
    MODEL_NAMES,
    ModelConfigError,
    build_model,
    model_config,
    parameter_count,
)

# (hidden, intermediate, heads, layers) from the GaLore table in docs/algorithms.md
GALORE = {
    "llama-60m": (512, 1376, 8, 8),
    "llama-130m": (768, 2048, 12, 12),
    "llama-350m": (1024, 2736, 16, 24),
    "llama-1b": (2048, 5461, 32, 24),
    "llama-7b": (4096, 11008, 32, 32),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_named_model_builds_on_meta(name):
    with torch.device("meta"):
        model = build_model(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    expected_vocab = {"gpt2": 50257, "llama-tiny": 8192, "llama-20m": 8192}.get(
        name.split("-")[0] if name.startswith("gpt2") else name, 32000
    )
    assert model.config.vocab_size == expected_vocab


@pytest.mark.parametrize("name", sorted(GALORE))
def test_galore_configs_follow_the_spec_table(name):
    cfg = model_config(name)
    hidden, inter, heads, layers = GALORE[name]
    assert (cfg.hidden_size, cfg.intermediate_size) == (hidden, inter)
    assert (cfg.num_attention_heads, cfg.num_hidden_layers) == (heads, layers)
    assert cfg.vocab_size == 32000 and cfg.rms_norm_eps == 1e-6 and cfg.hidden_act == "silu"
    assert cfg.tie_word_embeddings is False and cfg.initializer_range == 0.02
    assert not cfg.attention_bias and not cfg.mlp_bias


def test_parameter_counts():
    with torch.device("meta"):
        counts = {n: parameter_count(build_model(n)) for n in ("llama-60m", "llama-7b", "gpt2-xl")}
    # llama-7b is the LLaMA-7B shape; gpt2-xl is the 1.5B GPT-2 with its tied head counted once.
    assert counts == {"llama-60m": 58_073_600, "llama-7b": 6_738_415_616, "gpt2-xl": 1_557_611_200}
    assert 2.5e6 < parameter_count(build_model("llama-tiny")) < 3.5e6
    assert 18e6 < parameter_count(build_model("llama-20m", device="meta")) < 22e6


def test_vocabulary_follows_the_tokenizer_and_llama_head_is_untied():
    model = build_model("llama-tiny", vocab_size=300)
    assert model.model.embed_tokens.weight.shape[0] == 300 == model.lm_head.weight.shape[0]
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    gpt2 = build_model("gpt2-small", vocab_size=300, device="meta")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # GPT-2 keeps its tied head


def test_model_config_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 2,
                "num_hidden_layers": 1,
                "vocab_size": 100,
            }
        )
    )
    model = build_model(str(path), vocab_size=128)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 128


def test_bad_model_names_and_files(tmp_path):
    with pytest.raises(ModelConfigError, match="unknown model 'llama-3m'.*llama-tiny"):
        model_config("llama-3m")
    with pytest.raises(ModelConfigError, match="does not exist"):
        model_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        model_config(str(bad))
    other = tmp_path / "bert.json"
    other.write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelConfigError, match="'bert' is not supported"):
        model_config(str(other))
