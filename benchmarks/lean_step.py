"""Measured peak memory of one training step in the lean modes, beside the planner's prediction.

One process per measurement (the peak RSS of a process only grows): the model is built directly in
its training dtype (``from_config(dtype=...)``, no fp32 copy of a bf16 model), one forward and
backward of ``batch x seq`` random tokens runs, then ``optimizer.step()``. The peak is the
process's resident-set high-water mark (VmHWM) during the training step, minus its resident set
just before the model was built (the mark is reset once the model is built, so a transient of the
initialisation is reported apart, as ``build_peak_bytes``); on CUDA
``torch.cuda.max_memory_allocated``. The planner's prediction
(:func:`slimopt.planner.plan`) and, for comparison, AdamW's plan are printed beside it.

    python benchmarks/lean_step.py --model llama-1b --preset sage-hybrid --precision bf16 \\
        --step-in-backward --grad-checkpointing --batch-size 1 --seq-len 256 --json out.json

``--weights int8`` (:mod:`slimopt.quant`) builds the model on the meta device, quantizes its
linear layers and allocates and initializes it a block of rows at a time (no bf16 copy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-60m")
    ap.add_argument("--preset", default="sage-hybrid")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16-mixed", "bf16"))
    ap.add_argument("--step-in-backward", action="store_true")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--weights", default="auto", choices=("auto", "int8"))
    ap.add_argument("--weights-block", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="append the result to this JSON-lines file")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="leave the C allocator as it is (slimopt train --keep-freed-memory)",
    )
    args = ap.parse_args(argv)

    import torch

    import slimopt
    from slimopt.lean import return_freed_memory
    from slimopt.planner import plan
    from slimopt.train.models import model_config

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    config = model_config(args.model)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)

    from transformers import AutoModelForCausalLM

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    lean_mode = args.precision == "bf16" or args.step_in_backward
    freed_returned = False
    if not cuda and lean_mode and not args.keep_freed_memory:
        freed_returned = return_freed_memory()  # as slimopt train does for the lean modes on CPU
    base_kib = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    if args.weights == "int8":
        from slimopt import quant

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        quant.quantize_weights(model, block=args.weights_block)
        quant.materialize_(model, device)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    build_s = time.perf_counter() - t0
    build_peak = (_rss_kib("VmHWM") - base_kib) * 1024
    if not cuda:
        # the step's own peak: reset the high-water mark to the current RSS (Linux >= 4.0), so a
        # transient of the model's initialisation is not counted as training memory
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    if args.grad_checkpointing:
        # transformers >= 5.x names it activation_checkpointing_enable; older releases do not
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    model.train()
    opt = slimopt.create_optimizer(args.preset, model, step_in_backward=args.step_in_backward)
    times = []
    for _ in range(args.steps):
        t1 = time.perf_counter()
        if args.precision == "bf16-mixed":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t1)
    if cuda:
        measured = torch.cuda.max_memory_allocated() - base
    else:
        measured = (_rss_kib("VmHWM") - base_kib) * 1024
    kw = dict(
        precision=args.precision,
        step_in_backward=args.step_in_backward,
        grad_checkpointing=args.grad_checkpointing,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    predicted = plan(args.model, args.preset, **kw, weights=args.weights, block=args.weights_block,
                     returns_freed_memory=freed_returned if not cuda else None)  # fmt: skip
    adamw_fp32 = plan(
        args.model,
        "adamw",
        precision="fp32",
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    out = {
        "model": args.model,
        "preset": args.preset,
        **kw,
        "weights": args.weights,
        "weights_block": args.weights_block if args.weights == "int8" else None,
        "device": str(device),
        "params": sum(p.numel() for p in model.parameters()),
        "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "loss": float(loss),
        "measured_peak_bytes": measured,
        "predicted_peak_bytes": predicted.total_bytes,
        "predicted_over_measured": predicted.total_bytes / measured,
        "adamw_fp32_predicted_bytes": adamw_fp32.total_bytes,
        "build_s": round(build_s, 1),
        "build_peak_bytes": build_peak,
        "step_s": [round(t, 2) for t in times],
        "tokens_per_s": round(args.batch_size * args.seq_len / min(times), 1),
        "torch_threads": torch.get_num_threads(),
        "freed_memory_returned": freed_returned,
        "command": "python benchmarks/lean_step.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
