"""The int8-weight training step's time against the pure-bf16 lean step of the same model.

Both models are built in one process from the same initialisation: pure bf16 (weights, gradients
and state in bf16, stochastic rounding) and the same model with its linear layers as int8 codes
(:mod:`slimopt.quant`); both update during backward with activation checkpointing, batch
``--batch-size`` x ``--seq-len`` random tokens. Their steps alternate (bf16, int8, bf16, ...) so
that a busy machine slows both alike; the median of ``--reps`` steps of each is reported, with
the ratio int8 / bf16, per thread count, and the load average before and after.

    python benchmarks/int8_speed.py --model llama-60m --preset sage-hybrid --threads 1,2 \\
        --reps 5 --json benchmarks/int8_speed.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-60m")
    ap.add_argument("--presets", default="sage-hybrid,scale")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--json", default=None, help="append one JSON line per preset and thread count")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    import slimopt
    from slimopt import quant
    from slimopt.train.models import build_model

    rows = []
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        base = build_model(args.model).to(torch.bfloat16)
        vocab = base.config.vocab_size
        models = {
            "bf16": base,
            "int8": quant.quantize_weights(copy.deepcopy(base), block=args.block),
        }
        opts = {}
        for name, model in models.items():
            # transformers >= 5.x names it activation_checkpointing_enable
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
            model.train()
            opts[name] = slimopt.create_optimizer(preset, model, step_in_backward=True)
        gen = torch.Generator().manual_seed(1)

        def step(name: str, models=models, opts=opts, gen=gen, vocab=vocab) -> float:
            ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
            t0 = time.perf_counter()
            models[name](input_ids=ids, labels=ids).loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            load0 = os.getloadavg()[0]
            step("bf16"), step("int8")  # warm-up (native loops, allocator)
            times: dict[str, list[float]] = {"bf16": [], "int8": []}
            for _ in tqdm(range(args.reps), desc=f"{preset} {threads} thr", leave=False):
                for name in ("bf16", "int8"):
                    times[name].append(step(name))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {
                "model": args.model,
                "preset": preset,
                "threads": threads,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "block": args.block,
                "bf16_step_s": round(med["bf16"], 4),
                "int8_step_s": round(med["int8"], 4),
                "int8_over_bf16": round(med["int8"] / med["bf16"], 3),
                "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
                "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
            }
            print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
            rows.append(row)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
