"""The pure-bf16 optimizer step against the same preset's fp32 step, side by side in one process.

For each preset, two copies of the model (fp32, and bf16 built directly in bf16) get the same
random gradients; ``opt.step()`` of each is timed in turns (fp32, bf16, fp32, ...) after warm-up
steps, and the median of each is reported with their ratio (bf16 / fp32; the target is <= 0.8:
half the bytes, plus the rounding bits). Run at 1 and 2 threads:

    python benchmarks/lean_speed.py --model llama-60m --threads 1 2 --json benchmarks/lean_speed.jsonl

The load average when the run started is printed and recorded (time only on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _model(name: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from slimopt.train.models import model_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(name), dtype=dtype)


def _fill_grads(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype)


def measure(model_name: str, preset: str, threads: int, reps: int, warmup: int) -> dict:
    import torch

    import slimopt

    torch.set_num_threads(threads)
    runs = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = _model(model_name, dtype)
        opt = slimopt.create_optimizer(preset, model)
        _fill_grads(model, 0)
        for _ in range(warmup):  # first steps (SGD-SaI measures its gsnr) and the kernel build
            opt.step()
        runs[label] = (model, opt)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(reps):
        for label in ("fp32", "bf16"):
            _, opt = runs[label]
            t0 = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - t0)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return {
        "model": model_name,
        "preset": preset,
        "threads": threads,
        "fp32_s": round(fp32, 4),
        "bf16_s": round(bf16, 4),
        "ratio": round(bf16 / fp32, 3),
        "reps": reps,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-60m")
    ap.add_argument("--presets", nargs="*", default=None, help="default: every preset")
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None, help="append each row to this JSON-lines file")
    args = ap.parse_args(argv)

    import slimopt

    presets = args.presets or list(slimopt.PRESETS)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'preset':<14} {'threads':>7} {'fp32 s':>8} {'bf16 s':>8} {'bf16/fp32':>9}")
    rows = []
    for threads in args.threads:
        for preset in presets:
            row = measure(args.model, preset, threads, args.reps, args.warmup)
            row["load_average"] = [round(x, 2) for x in load]
            rows.append(row)
            print(
                f"{preset:<14} {threads:>7} {row['fp32_s']:>8.4f} {row['bf16_s']:>8.4f} "
                f"{row['ratio']:>9.3f}",
                flush=True,
            )
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
