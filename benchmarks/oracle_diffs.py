"""Print slimopt's max relative difference to the official implementations after each of 20 steps.

    python benchmarks/oracle_diffs.py

Trains two copies of a small LlamaForCausalLM on identical batches, one with slimopt and one with
the official optimizer, and reports the worst max |a - b| / max |b| over all parameters and steps.
The test suite (tests/test_oracles.py) asserts the same bound; this prints the numbers.
"""

from __future__ import annotations

import copy

import lion_pytorch
import sgd_sai
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimopt
from slimopt.presets import preset_lrs

VOCAB, STEPS = 64, 20


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=36,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def worst_difference(ours, theirs) -> float:
    base = model()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a, opt_b = ours(a), theirs(b)
    worst = 0.0
    for t in range(STEPS):
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(t))
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        with torch.no_grad():
            for p, q in zip(a.parameters(), b.parameters()):
                worst = max(worst, float((p - q).abs().max() / q.abs().max()))
    return worst


CASES = {
    "SGDSaI (foreach) vs sgd-sai 1.0.3": (
        lambda m: slimopt.SGDSaI(m.parameters()),
        lambda m: sgd_sai.SGD_sai(m.parameters()),
    ),
    "SGDSaI (reference) vs sgd-sai 1.0.3": (
        lambda m: slimopt.SGDSaI(m.parameters(), foreach=False),
        lambda m: sgd_sai.SGD_sai(m.parameters()),
    ),
    "Lion (foreach, wd=0.1) vs lion-pytorch": (
        lambda m: slimopt.Lion(m.parameters(), weight_decay=0.1),
        lambda m: lion_pytorch.Lion(m.parameters(), weight_decay=0.1),
    ),
    "Lion (reference) vs lion-pytorch": (
        lambda m: slimopt.Lion(m.parameters(), foreach=False),
        lambda m: lion_pytorch.Lion(m.parameters()),
    ),
    "preset adamw (foreach) vs torch.optim.AdamW": (
        lambda m: slimopt.create_optimizer("adamw", m),
        lambda m: torch.optim.AdamW(
            m.parameters(), lr=preset_lrs("adamw")["adamw"], weight_decay=0.0
        ),
    ),
    "preset adamw (reference) vs torch.optim.AdamW": (
        lambda m: slimopt.create_optimizer("adamw", m, foreach=False),
        lambda m: torch.optim.AdamW(
            m.parameters(), lr=preset_lrs("adamw")["adamw"], weight_decay=0.0
        ),
    ),
}

if __name__ == "__main__":
    print(f"| comparison ({STEPS} steps, float32, LlamaForCausalLM) | max relative difference |")
    print("|---|---|")
    for name, (ours, theirs) in CASES.items():
        print(f"| {name} | {worst_difference(ours, theirs):.2e} |")
