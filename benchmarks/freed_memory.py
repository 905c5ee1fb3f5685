"""The C allocator's share of a lean step's peak on CPU, and its price in step time.

A 2-layer llama with a 32,000 x 1024 bf16 table, sage-hybrid, pure bf16, updates during backward,
activation checkpointing, batch 1 x 256 tokens, one torch thread: four steps per process, each
process with glibc's mmap threshold left as it is ("kept") or fixed by
``slimopt.lean.return_freed_memory(threshold)``; the processes alternate, so the machine's load
falls on all of them alike. Prints the peak RSS above the RSS before the model was built and the
step times.

    python benchmarks/freed_memory.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch, transformers, slimopt
torch.set_num_threads(1)
threshold = int(sys.argv[1])
if threshold:
    slimopt.lean.return_freed_memory(threshold)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
base = rss()
cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2736,
                               num_hidden_layers=2, num_attention_heads=16,
                               max_position_embeddings=256)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
model.gradient_checkpointing_enable()
model.config.use_cache = False
x = torch.randint(0, 32000, (1, 256))
opt = slimopt.create_optimizer("sage-hybrid", model, step_in_backward=True)
times = []
for _ in range(4):
    t = time.perf_counter()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    times.append(time.perf_counter() - t)
print(json.dumps({"threshold": threshold, "peak_bytes": hwm() - base, "step_s": times}))
"""

SETTINGS = {"kept": 0, "1 MB": 1 << 20, "16 MB": 16 << 20}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    rows = []
    for _ in range(args.rounds):
        for name, threshold in SETTINGS.items():
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(threshold)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["setting"] = name
            rows.append(row)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| freed memory | peak MB | step s (4 steps) |")
    print("|---|---|---|")
    for r in rows:
        steps = ", ".join(f"{t:.1f}" for t in r["step_s"])
        print(f"| {r['setting']} | {r['peak_bytes'] / 1e6:.0f} | {steps} |")
    return rows


if __name__ == "__main__":
    main()
