"""Small Hugging Face models built from configs (no download), shared by the tests.

A module of its own, not conftest.py: tests/train has a conftest.py too, and a plain
``from conftest import ...`` would pick whichever was imported first."""

from __future__ import annotations

import torch


def tiny_llama(vocab: int = 64, hidden: int = 16, layers: int = 2, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=kw.pop("intermediate", 2 * hidden + 4),
        num_hidden_layers=layers,
        num_attention_heads=kw.pop("heads", 2),
        num_key_value_heads=kw.pop("kv_heads", 2),
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **kw,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(vocab: int = 64, hidden: int = 16, layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_positions=64)
    return GPT2LMHeadModel(cfg)


def lm_loss(model, vocab: int, seed: int, batch: int = 2, seq: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return model(input_ids=ids, labels=ids).loss
