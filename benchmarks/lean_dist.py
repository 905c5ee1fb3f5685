"""Each rank's measured peak memory of a lean training step under FSDP2 or DDP (gloo, CPU), beside
the per-rank planner's prediction.

The method of ``benchmarks/lean_step.py`` on every rank: the model is built directly in bf16,
wrapped (``slimopt.train.parallel.wrap_model``), the optimizer built with updates during backward,
then the resident-set high-water mark is reset and ``--steps`` steps of ``batch x seq`` random
tokens per rank run. A rank's peak is its high-water mark minus its resident set before the model
was built. The prediction is :func:`slimopt.planner.plan` with ``dist`` and ``world_size``.

    python benchmarks/lean_dist.py --runs llama-350m:2 llama-1b:2 llama-1b:4 \\
        --presets sage-hybrid scale --json benchmarks/lean_dist.jsonl

(``--worker`` is the per-rank entry point that the driver starts under torchrun.)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from lean_step import _rss_kib  # this folder's one-process measurement: the same method


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import slimopt
    from slimopt.lean import return_freed_memory
    from slimopt.planner import plan
    from slimopt.train import parallel
    from slimopt.train.models import model_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = model_config(args.model)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    return_freed_memory()  # as slimopt train does for the lean modes on CPU
    base_kib = _rss_kib("VmRSS")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.activation_checkpointing_enable() if hasattr(
        model, "activation_checkpointing_enable"
    ) else model.gradient_checkpointing_enable()
    model.train()
    wrapped = parallel.wrap_model(model, args.dist)
    target = wrapped if args.dist == "ddp" else parallel.unwrap(wrapped)
    opt = slimopt.create_optimizer(args.preset, target, step_in_backward=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the step's own peak, not the initialisation's transient
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    measured = (_rss_kib("VmHWM") - base_kib) * 1024
    peaks: list = [None] * world
    dist.all_gather_object(peaks, measured)
    if rank == 0:
        p = plan(args.model, args.preset, precision="bf16", step_in_backward=True,
                 grad_checkpointing=True, batch_size=args.batch_size, seq_len=args.seq_len,
                 dist=args.dist, world_size=world)  # fmt: skip
        out = {
            "model": args.model, "preset": args.preset, "dist": args.dist, "world_size": world,
            "batch_size_per_rank": args.batch_size, "seq_len": args.seq_len,
            "mode": p.mode, "measured_peak_bytes_per_rank": peaks,
            "predicted_peak_bytes_per_rank": p.total_bytes,
            "predicted_over_measured": p.total_bytes / max(peaks),
            "step_s": [round(t, 1) for t in times], "threads_per_rank": 1,
            "load_average": os.getloadavg()[0],
        }  # fmt: skip
        Path(args.result).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["llama-350m:2", "llama-1b:2", "llama-1b:4"],
                    help="MODEL:RANKS")  # fmt: skip
    ap.add_argument("--presets", nargs="+", default=["sage-hybrid", "scale"])
    ap.add_argument("--dist", default="fsdp2", choices=("fsdp2", "ddp"))
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per rank")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", default=None, help="append each result to this JSON-lines file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    results = []
    for run in args.runs:
        model, ranks = run.split(":")
        for preset in args.presets:
            result = Path(f"/tmp/lean_dist_{os.getpid()}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", ranks,
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__,
                   "--worker", "--model", model, "--preset", preset, "--dist", args.dist,
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--result", str(result)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{model} x{ranks} {preset}: failed")
            out = json.loads(result.read_text())
            result.unlink()
            results.append(out)
            peaks = ", ".join(f"{b / 1e9:.2f}" for b in out["measured_peak_bytes_per_rank"])
            print(f"{model:>10} {args.dist} x{ranks} {preset:<12} measured per rank [{peaks}] GB, "
                  f"planned {out['predicted_peak_bytes_per_rank'] / 1e9:.2f} GB "
                  f"({out['predicted_over_measured']:.2f}x), step {out['step_s']} s", flush=True)  # fmt: skip
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(out) + "\n")
    return results


if __name__ == "__main__":
    main()
