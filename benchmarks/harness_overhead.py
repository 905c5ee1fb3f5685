"""What does the training harness cost? ``slimopt train`` against a bare loop, side by side.

Both train the same model (``llama-tiny`` by default, same seed), with the same optimizer preset,
batch size and sequence length, for the same number of steps. The bare loop is the minimum a
training loop must do (forward, loss, backward, optimizer step, zero_grad) on batches prepared in
memory beforehand; the harness run is ``slimopt.train.train`` with everything it does per step
(memmap batches, gradient norm, non-finite check, LR schedule, metrics.jsonl, progress lines).
Evaluation and checkpoints are switched off: they are work a user asks for, not overhead.

Throughput is timed from the end of step ``--warmup-steps`` to the end of the last step, for both
(the harness through its metrics callback, so what happens between steps counts too), both in wall
time and per second of this process's CPU time, which is steadier when other jobs share the cores.
The two alternate, ``--rounds`` times, with the order flipped every round, so that drifting machine load
hits both alike; the overhead is ``1 - harness/bare`` of each round's pair, and its median. As a
cross-check that load blurs less, the harness-only work per step (batch from the memmap, gradient
norm, loss check, schedule step, metrics row) is also timed part by part and set against a bare step.

    python benchmarks/harness_overhead.py                      # llama-tiny, adamw, stdlib
    python benchmarks/harness_overhead.py --preset sage-hybrid --rounds 7 --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import slimopt
from slimopt.train import TrainConfig, train
from slimopt.train.data import PackedBatches, prepare_data
from slimopt.train.loop import lr_schedule
from slimopt.train.models import build_model
from slimopt.train.parallel import grad_norm as _grad_norm


def _clocks() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is less disturbed by other jobs."""
    return time.perf_counter(), time.process_time()


def _rates(
    tokens: int, start: tuple[float, float], end: tuple[float, float]
) -> tuple[float, float]:
    return tokens / (end[0] - start[0]), tokens / (end[1] - start[1])


def harness_tokens_per_s(cfg: TrainConfig, warmup_steps: int) -> tuple[float, float]:
    stamps: dict[int, tuple[float, float]] = {}

    def callback(row: dict) -> None:
        if "loss" in row:
            stamps[row["step"]] = _clocks()

    with tempfile.TemporaryDirectory() as out:
        train(TrainConfig(**{**cfg.__dict__, "out": out}), callback=callback)
    tokens = (cfg.max_steps - warmup_steps) * cfg.batch_size * cfg.seq_len
    return _rates(tokens, stamps[warmup_steps], stamps[cfg.max_steps])


def bare_tokens_per_s(
    cfg: TrainConfig, vocab_size: int, batches: list, warmup_steps: int
) -> tuple[float, float]:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, vocab_size)
    optimizer = slimopt.create_optimizer(cfg.preset, model)
    start = _clocks()
    for step, (x, y) in enumerate(batches, start=1):
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == warmup_steps:
            start = _clocks()
    tokens = (len(batches) - warmup_steps) * cfg.batch_size * cfg.seq_len
    return _rates(tokens, start, _clocks())


def harness_work_per_step(cfg: TrainConfig, shards, reps: int = 50) -> dict[str, float]:
    """Seconds per step of the work only the harness does, each part timed alone ``reps`` times.

    A cross-check of the side-by-side ratio that machine load cannot blur as much: the parts are
    small and timed in isolation, then compared with the bare loop's whole step.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, shards.vocab_size)
    optimizer = slimopt.create_optimizer(cfg.preset, model)
    feeder = PackedBatches(shards["train"], cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    x, y = feeder.next_batch()
    F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(10, 10_000, 0.1))
    optimizer.step()  # (only so that the scheduler does not warn about its order)
    loss = torch.tensor(3.0)

    def per_call(fn) -> float:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps

    with tempfile.TemporaryFile("w") as fh:
        row = {"step": 1, "tokens": 1, "loss": 3.0, "lr": 1e-3, "lr_scale": 1.0, "grad_norm": 1.0}
        parts = {
            "batch_from_memmap": per_call(feeder.next_batch),
            "grad_norm": per_call(lambda: _grad_norm(params, None)),
            "loss_item_and_checks": per_call(lambda: math.isfinite(loss.item())),
            "lr_schedule_step": per_call(scheduler.step),
            "metrics_row": per_call(lambda: (fh.write(json.dumps(row) + "\n"), fh.flush())),
        }
    return parts


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--preset", default="adamw")
    p.add_argument("--data", default="stdlib")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="write the measurements here as JSON")
    args = p.parse_args()
    if args.steps % 10 or args.warmup_steps % 10:
        p.error("--steps and --warmup-steps must be multiples of 10 (the harness logs every 10)")

    cfg = TrainConfig(
        model=args.model, preset=args.preset, data=args.data, seq_len=args.seq_len,
        batch_size=args.batch_size, max_steps=args.steps, eval_every=0, eval_tokens=args.seq_len + 1,
        save_every=0, log_every=10, progress="none",
    )  # fmt: skip
    _, _, shards = prepare_data(args.data, vocab_size=8192, log=print)  # warm the token cache
    feeder = PackedBatches(shards["train"], args.seq_len, args.batch_size, seed=0)
    batches = [feeder.next_batch() for _ in range(args.steps)]

    rounds = []
    for r in range(args.rounds):
        order = ("harness", "bare") if r % 2 == 0 else ("bare", "harness")
        m: dict[str, float] = {}
        for kind in order:
            if kind == "harness":
                m["harness"], m["harness_cpu"] = harness_tokens_per_s(cfg, args.warmup_steps)
            else:
                m["bare"], m["bare_cpu"] = bare_tokens_per_s(
                    cfg, shards.vocab_size, batches, args.warmup_steps
                )
        m["overhead"] = 1 - m["harness"] / m["bare"]
        m["overhead_cpu"] = 1 - m["harness_cpu"] / m["bare_cpu"]
        m["load_average"] = os.getloadavg()[0]
        rounds.append(m)
        print(
            f"round {r + 1}: harness {m['harness']:.0f} tok/s, bare {m['bare']:.0f} tok/s, "
            f"overhead {m['overhead']:+.1%} (per CPU-second {m['overhead_cpu']:+.1%}), "
            f"load {m['load_average']:.1f}",
            flush=True,
        )
    keys = ("harness", "bare", "overhead", "harness_cpu", "bare_cpu", "overhead_cpu")
    summary = {f"{k}_median": statistics.median(m[k] for m in rounds) for k in keys}
    print(
        f"median of {len(rounds)} rounds: harness {summary['harness_median']:.0f} tok/s, "
        f"bare {summary['bare_median']:.0f} tok/s, overhead {summary['overhead_median']:+.1%}; "
        f"per CPU-second: harness {summary['harness_cpu_median']:.0f}, bare "
        f"{summary['bare_cpu_median']:.0f}, overhead {summary['overhead_cpu_median']:+.1%}"
    )
    parts = harness_work_per_step(cfg, shards)
    bare_step = args.batch_size * args.seq_len / summary["bare_median"]
    # every step fetches a batch, takes the grad norm, checks the loss and steps the schedule;
    # a metrics row is written every log_every (10) steps
    extra = sum(v for k, v in parts.items() if k != "metrics_row") + parts["metrics_row"] / 10
    summary["harness_work_per_step_s"] = extra
    summary["bare_step_s"] = bare_step
    summary["harness_work_fraction"] = extra / bare_step
    print(
        "harness-only work per step, timed alone: "
        + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in parts.items())
        + f"; in all {extra * 1e3:.2f} ms per step = {extra / bare_step:.2%} of a bare step "
        f"({bare_step * 1e3:.0f} ms)"
    )
    if args.out:
        result = {
            "args": vars(args),
            "rounds": rounds,
            "harness_work_parts_s": parts,
            **summary,
            "machine": {
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "load_average_at_end": os.getloadavg(),
            },
        }
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
