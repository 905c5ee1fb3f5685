"""Quality of the lean modes: pure bf16 with stochastic rounding against fp32, on enwiki.

llama-tiny, batch 8 x 256 tokens, the presets' default learning rates, 10% linear warm-up then
cosine to 10% of the peak, no clipping (as ``slimopt train``). Per preset and seed, four runs from
the same initialisation and the same batches:

* ``fp32``: fp32 weights, the ordinary step;
* ``fp32-sib``: fp32, updates applied during backward (its loss curve is compared with ``fp32``'s
  step by step);
* ``bf16-sr``: pure bf16 weights and state, stochastic rounding;
* ``bf16-rtn``: pure bf16, round-to-nearest;
* ``int8-sr``: the linear layers' weights as int8 codes with one scale per ``--block`` elements of
  a row (:mod:`slimopt.quant`, quantized to nearest from the same initialisation), updated
  during backward and rounded stochastically onto the grid; embedding, head and norms pure bf16.

Validation perplexity on the first ``--eval-tokens`` tokens of the validation split (in fp32
arithmetic for the fp32 runs, bf16 for the bf16 ones: each model as it would be served).

    python benchmarks/lean_quality.py --data ../shared/data/enwiki --tokens 1M --seeds 0,1 \\
        --out benchmarks/lean_quality.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time


def _tokens(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/enwiki")
    ap.add_argument("--presets", default="sage-hybrid,scale,sinkgd-hybrid")
    ap.add_argument("--modes", default="fp32,fp32-sib,bf16-sr,bf16-rtn")
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--out", default="benchmarks/lean_quality.jsonl")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--block", type=int, default=256, help="int8-sr: elements per scale")
    args = ap.parse_args(argv)

    import torch

    import slimopt
    from slimopt.train.data import PackedBatches, eval_batches, prepare_data
    from slimopt.train.loop import lr_schedule
    from slimopt.train.models import build_model

    _, _, shards = prepare_data(args.data, vocab_size=args.vocab_size)
    steps = max(1, _tokens(args.tokens) // (args.batch_size * args.seq_len))
    sched = lr_schedule(max(1, round(0.1 * steps)), steps, 0.1)

    def evaluate(model) -> float:
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for x, y in eval_batches(shards["valid"], args.seq_len, 16, args.eval_tokens):
                logits = model(input_ids=x).logits.float()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
                )
                total += float(loss)
                n += y.numel()
        model.train()
        return math.exp(total / n)

    for seed in [int(s) for s in args.seeds.split(",")]:
        for preset in args.presets.split(","):
            torch.manual_seed(seed)
            init = build_model("llama-tiny", vocab_size=shards.vocab_size)
            for mode in args.modes.split(","):
                model = copy.deepcopy(init)
                if mode.startswith(("bf16", "int8")):
                    model = model.to(torch.bfloat16)
                if mode.startswith("int8"):
                    from slimopt.quant import quantize_weights

                    quantize_weights(model, block=args.block)
                opt = slimopt.create_optimizer(
                    preset,
                    model,
                    step_in_backward=mode.endswith("-sib") or mode.startswith("int8"),
                    stochastic_rounding=(mode != "bf16-rtn"),
                )
                lrs = torch.optim.lr_scheduler.LambdaLR(opt, sched)
                batches = PackedBatches(shards["train"], args.seq_len, args.batch_size, seed)
                losses = []
                t0 = time.perf_counter()
                for _ in range(steps):
                    x, y = batches.next_batch()
                    logits = model(input_ids=x).logits.float()
                    loss = torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
                    )
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    lrs.step()
                    losses.append(float(loss.detach()))
                row = {
                    "preset": preset,
                    "mode": mode,
                    "seed": seed,
                    "vocab_size": shards.vocab_size,
                    "block": args.block if mode.startswith("int8") else None,
                    "steps": steps,
                    "tokens": steps * args.batch_size * args.seq_len,
                    "final_loss": losses[-1],
                    "valid_ppl": evaluate(model),
                    "losses": losses,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
