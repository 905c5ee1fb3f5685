"""The GPU claims, measured in one short run on one GPU (``benchmarks/gpu_check.sh`` calls this).

    python benchmarks/gpu_check.py [--out DIR] [--parts triton,graphs,bandwidth,memory-7b]
    python benchmarks/gpu_check.py --dry-run     # parse, import, stop at the first CUDA check

Parts, in order (each within what is left of ``--budget-s``; a part that fails or runs out of
time is recorded as such and the next one runs):

1. ``triton``: ``tests/test_triton.py`` with the compiler, not the interpreter
   (``TRITON_INTERPRET`` unset): the kernel battery runs in the test process on CUDA tensors
   (``DEVICE = "cuda"`` there), beside the CUDA graph capture of each rule's kernel step and the
   sm_90 compile of every kernel. ``test_interpreter_battery`` (the same battery under the
   interpreter on CPU tensors, which CI runs) is left out.
2. ``graphs``: one ``optimizer.step()`` of every preset captured in a CUDA graph
   (``torch.cuda.graph``) with a tensor lr on the device, llama-tiny in fp32 with the step
   counters as the rules keep them (``host``: Python ints, AdamW's CPU tensor), in fp32 with the
   counters as device tensors (``device``), and in pure bf16 with device counters (the Triton
   kernels round the bf16 parameters; a replay rounds with the bits of the captured step's
   write count, so it is within rounding of the eager steps, not bit for bit). Per case:
   whether it captured (or the error), and whether three replays give what three eager steps of
   an identical optimizer give (within rounding, and bit for bit). Each preset runs in a child process
   (a failed capture can leave the CUDA context unusable); after a failure the remaining cases
   of that preset run in a fresh one.
3. ``bandwidth``: :func:`slimopt.bench.profile_cuda.profile_cuda` on llama-60m in bf16 and fp32,
   every preset beside torch's fused AdamW (GB/s, x fused AdamW, share of a large copy), and per
   row a ``Tensor.copy_`` of the same bytes (half read, half written) timed the same way: the
   step's time over that copy's.
4. ``memory-7b``: ``benchmarks/lean_step.py`` on llama-7b, sage-hybrid, pure bf16 with the step
   in backward and gradient checkpointing, batch 1 x 256, on CUDA:
   ``torch.cuda.max_memory_allocated`` beside the planner's prediction.

Every record is one JSON line in ``DIR/gpu_check.jsonl`` (``{"part": ..., ...}``); a Markdown
summary goes to ``DIR/gpu_check.md`` and the pytest report of part 1 to ``DIR/triton_junit.xml``.
``DIR`` defaults to ``$OUT/gpu-check`` when ``$OUT`` is set, else ``runs/gpu-check``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimopt.bench.profile import _Timer, build_profile_model  # noqa: E402
from slimopt.bench.profile_cuda import (  # noqa: E402
    TARGET_X_FUSED,
    _triton_version,
    format_cuda_table,
    profile_cuda,
)
from slimopt.presets import PRESETS, create_optimizer  # noqa: E402

PARTS = ("triton", "graphs", "bandwidth", "memory-7b")
TRITON_TESTS = ROOT / "tests" / "test_triton.py"
LEAN_STEP = ROOT / "benchmarks" / "lean_step.py"
LEAN_STEP_ARGS = [
    "--model", "llama-7b", "--preset", "sage-hybrid", "--precision", "bf16",
    "--step-in-backward", "--grad-checkpointing", "--batch-size", "1", "--seq-len", "256",
    "--device", "cuda",
]  # fmt: skip
GRAPH_MODEL = "llama-tiny"
# (dtype, step counters) of each capture
GRAPH_CASES = (("fp32", "host"), ("fp32", "device"), ("bf16", "device"))
GRAPH_REPLAYS = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NO_GPU = "gpu_check: no CUDA device here"


def _log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu-check" if out else ROOT / "runs" / "gpu-check"


# --------------------------------------------------------------------------- 1. triton tests
def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and the failed and skipped tests (with why) of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed, skipped = [], {}
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            failed.append(f"{name}: {(node.get('message') or '').splitlines()[0][:300]}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            why = (case.find("skipped").get("message") or "").splitlines()[0][:200]
            skipped[why] = skipped.get(why, 0) + 1
        else:
            counts["passed"] += 1
    cuda_kernel_tests = sum(
        1
        for case in root.iter("testcase")
        if case.get("name", "").startswith("test_kernel_matches_reference")
        and case.find("skipped") is None
        and case.find("failure") is None
        and case.find("error") is None
    )
    return {**counts, "failed_tests": failed, "skipped_why": skipped,
            "kernel_battery_passed": cuda_kernel_tests}  # fmt: skip


def part_triton(out: Path, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("TRITON_INTERPRET", None)  # compiled kernels on CUDA tensors
    junit = out / "triton_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
           "--junitxml", str(junit), "-k", "not interpreter_battery", str(TRITON_TESTS)]  # fmt: skip
    t0 = time.perf_counter()
    try:
        run = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        rc, tail = run.returncode, (run.stdout + run.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", f"stopped after {timeout:.0f} s\n{(exc.stdout or b'')[-2000:]!r}"
    record: dict[str, Any] = {"part": "triton", "command": " ".join(cmd[1:]), "rc": rc,
                              "wall_s": round(time.perf_counter() - t0, 1), "tail": tail}  # fmt: skip
    if junit.exists():
        record.update(junit_summary(junit))
    return record


# --------------------------------------------------------------------------- 2. CUDA graphs
def _to_device_counters(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for state in opt.state.values():
        step = state.get("step")
        if step is None:
            continue
        if isinstance(step, torch.Tensor):
            state["step"] = step.to(device)
        else:
            state["step"] = torch.tensor(step, dtype=torch.int64, device=device)


def graph_case(preset: str, dtype: str, counters: str) -> dict[str, Any]:
    """Capture one ``opt.step()`` of ``preset`` in a CUDA graph and compare its replays with
    eager steps of an identical optimizer (same weights, gradients and warm-up)."""
    dev = torch.device("cuda")
    record: dict[str, Any] = {"part": "graphs", "preset": preset, "dtype": dtype,
                              "counters": counters, "model": GRAPH_MODEL}  # fmt: skip
    net = build_profile_model(GRAPH_MODEL, dev, DTYPES[dtype], vocab_size=1024)
    ref = copy.deepcopy(net)
    for p, q in zip(ref.parameters(), net.parameters()):
        p.grad = q.grad.clone()
    lr = 1e-3

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        return create_optimizer(preset, model, lr=torch.tensor(lr, device=dev))

    opt, ref_opt = make(net), make(ref)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph wants
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        ref_opt.step()
    if counters == "device":
        _to_device_counters(opt, dev)
        _to_device_counters(ref_opt, dev)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            opt.step()
        torch.cuda.synchronize()
    except Exception as exc:  # the measured result: this step does not capture
        record.update(captured=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:400])
        return record
    record["captured"] = True
    timer = _Timer(dev)
    replay_ms = [timer(graph.replay) for _ in range(GRAPH_REPLAYS)]
    eager_ms = [timer(ref_opt.step) for _ in range(GRAPH_REPLAYS)]
    torch.cuda.synchronize()
    worst, worst_rel, identical = 0.0, 0.0, True
    for p, q in zip(net.parameters(), ref.parameters()):
        identical = identical and torch.equal(p, q)
        diff = (p.float() - q.float()).abs().max().item() if p.numel() else 0.0
        scale = q.float().abs().max().item() if q.numel() else 1.0
        worst = max(worst, diff)
        worst_rel = max(worst_rel, diff / max(scale, 1e-30))
    tol = 1e-5 if dtype == "fp32" else 2**-7
    record.update(
        replay_matches_eager=bool(worst_rel <= tol),
        bit_identical=identical,
        max_abs_diff=worst,
        max_rel_diff=worst_rel,
        replay_ms=statistics.median(replay_ms),
        eager_ms=statistics.median(eager_ms),
    )
    return record


def graph_child(preset: str, cases: list[tuple[str, str]]) -> int:
    """Run the capture cases of one preset, one JSON line each; stop at the first that did not
    capture (exit 3), so the caller runs the rest in a fresh process."""
    for dtype, counters in cases:
        try:
            record = graph_case(preset, dtype, counters)
        except Exception as exc:
            record = {"part": "graphs", "preset": preset, "dtype": dtype, "counters": counters,
                      "captured": None, "error": f"set-up failed: {type(exc).__name__}: {exc}"}  # fmt: skip
        print(json.dumps(record), flush=True)
        if not record.get("captured"):
            return 3
    return 0


def part_graphs(deadline: float) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("TRITON_INTERPRET", None)
    for preset in PRESETS:
        pending = [f"{d}:{c}" for d, c in GRAPH_CASES]
        while pending:
            left = deadline - time.perf_counter()
            if left < 10:
                records += [{"part": "graphs", "preset": preset, "case": c, "captured": None,
                             "error": "not run: out of time"} for c in pending]  # fmt: skip
                return records
            cmd = [sys.executable, str(Path(__file__).resolve()), "--graph-child", preset,
                   "--graph-cases", ",".join(pending)]  # fmt: skip
            try:
                run = subprocess.run(
                    cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=min(left, 120)
                )
                lines, tail = run.stdout.splitlines(), run.stderr[-1500:]
            except subprocess.TimeoutExpired as exc:
                out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
                lines, tail = out.splitlines(), "timed out"
            done = [json.loads(line) for line in lines if line.startswith("{")]
            for r in done:
                pending.remove(f"{r['dtype']}:{r['counters']}")
                _log(f"graphs {preset} {r['dtype']} {r['counters']} counters: "
                     f"{'captured' if r.get('captured') else r.get('error')}")  # fmt: skip
            records += done
            if not done:  # the child died before its first case: record why, move on
                records += [{"part": "graphs", "preset": preset, "case": c, "captured": None,
                             "error": f"child process failed: {tail.strip()[-400:]}"}
                            for c in pending]  # fmt: skip
                break
    return records


# --------------------------------------------------------------------------- 3. bandwidth
def _copy_ms(nbytes: int, timer: _Timer, rounds: int) -> float:
    """Median time of ``Tensor.copy_`` that reads and writes ``nbytes`` together."""
    half = max(nbytes // 2, 1)
    src = torch.empty(half, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(rounds)]
    return statistics.median(times)


def part_bandwidth(dtype: str, steps: int) -> dict[str, Any]:
    result = profile_cuda("llama-60m", list(PRESETS), dtype=dtype, steps=steps, warmup=3, log=_log)
    timer = _Timer(torch.device("cuda"))
    rows = []
    for r in result.rows:
        copy_ms = _copy_ms(r.bytes_moved, timer, steps)
        row = dict(vars(r))
        row.update(copy_same_bytes_ms=copy_ms, x_copy_same_bytes=r.step_ms_median / copy_ms,
                   copy_same_bytes_gbps=r.bytes_moved / copy_ms / 1e6)  # fmt: skip
        rows.append(row)
    print(format_cuda_table(result), flush=True)
    return {"part": "bandwidth", "model": "llama-60m", "dtype": dtype,
            "copy_gbps": result.copy_gbps, "conditions": result.conditions, "rows": rows}  # fmt: skip


# --------------------------------------------------------------------------- 4. llama-7b memory
def part_memory(out: Path, timeout: float) -> dict[str, Any]:
    target = out / "lean_step_7b.tmp.jsonl"
    target.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(LEAN_STEP), *LEAN_STEP_ARGS, "--json", str(target)]
    record: dict[str, Any] = {"part": "memory-7b", "command": " ".join(cmd[1:])}
    try:
        run = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        record["rc"] = run.returncode
        if run.returncode != 0:
            record["tail"] = run.stderr[-2000:]
    except subprocess.TimeoutExpired:
        record.update(rc="timeout", tail=f"stopped after {timeout:.0f} s")
    if target.exists():
        result = json.loads(target.read_text().splitlines()[-1])
        target.unlink()
        record.update(result=result, max_memory_allocated_gib=result["measured_peak_bytes"] / 2**30,
                      predicted_gib=result["predicted_peak_bytes"] / 2**30)  # fmt: skip
    return record


# --------------------------------------------------------------------------- summary
def summarize(records: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The Markdown summary of the records (one section per part)."""
    lines = ["# GPU check", "",
             f"{header.get('device')}, torch {header.get('torch')}, triton {header.get('triton')}, "
             f"{header.get('date_utc')} UTC; `{header.get('command')}`", ""]  # fmt: skip
    for r in records:
        if r["part"] == "triton":
            lines += ["## Triton tests, compiled, on CUDA", "",
                      f"`{r['command']}`: exit {r['rc']} in {r['wall_s']} s; "
                      f"{r.get('passed', '?')} passed, {r.get('failed', '?')} failed, "
                      f"{r.get('skipped', '?')} skipped; kernel battery cases passed on CUDA: "
                      f"{r.get('kernel_battery_passed', '?')}", ""]  # fmt: skip
            lines += [f"- failed: `{t}`" for t in r.get("failed_tests", [])]
            lines += [f"- skipped ({n}): {why}" for why, n in r.get("skipped_why", {}).items()]
            lines.append("")
    graphs = [r for r in records if r["part"] == "graphs"]
    if graphs:
        lines += ["## One optimizer step in a CUDA graph (tensor lr)", "",
                  f"{GRAPH_MODEL}; {GRAPH_REPLAYS} replays against {GRAPH_REPLAYS} eager steps "
                  "of an identical optimizer.", "",
                  "| preset | dtype | step counters | captured | replay = eager | bit for bit "
                  "| max rel diff | replay ms | eager ms | error |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in graphs:
            case = f"{r.get('dtype', '')} | {r.get('counters', r.get('case', ''))}"
            same, bits = r.get("replay_matches_eager"), r.get("bit_identical")
            lines.append(
                f"| `{r['preset']}` | {case} | {r.get('captured')} | "
                f"{'' if same is None else same} | {'' if bits is None else bits} | "
                f"{_fmt(r.get('max_rel_diff'), '.2e')} | "
                f"{_fmt(r.get('replay_ms'), '.3f')} | {_fmt(r.get('eager_ms'), '.3f')} | "
                f"{(r.get('error') or '').replace('|', '/')[:160]} |"
            )
        lines.append("")
    for r in records:
        if r["part"] == "bandwidth":
            lines += [f"## Step bandwidth, llama-60m, {r['dtype']}", "",
                      f"large copy {r['copy_gbps']:.0f} GB/s (read + write, best round)", "",
                      "| optimizer | median ms | moved MB | GB/s | % copy | x fused AdamW | target "
                      "| copy of same bytes ms | x that copy | kernels |",
                      "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for row in r["rows"]:
                target = TARGET_X_FUSED.get(row["preset"])
                lines.append(
                    f"| `{row['preset']}` | {row['step_ms_median']:.3f} | "
                    f"{row['bytes_moved'] / 1e6:.1f} | {row['gbps']:.0f} | "
                    f"{100 * row['copy_share']:.1f}% | {row['x_fused_adamw']:.2f} | "
                    f"{'' if target is None else f'<={target}'} | "
                    f"{row['copy_same_bytes_ms']:.3f} | {row['x_copy_same_bytes']:.2f} | "
                    f"{row['kernels']} |"
                )
            lines.append("")
        elif r["part"] == "memory-7b":
            lines += ["## llama-7b, pure bf16, step in backward, checkpointing", "",
                      f"`{r['command']}`: exit {r.get('rc')}"]  # fmt: skip
            if "max_memory_allocated_gib" in r:
                lines.append(
                    f"\n`torch.cuda.max_memory_allocated`: **{r['max_memory_allocated_gib']:.2f} "
                    f"GiB**; planner: {r['predicted_gib']:.2f} GiB"
                )
            elif r.get("tail"):
                lines += ["", "```", r["tail"].strip()[-1200:], "```"]
            lines.append("")
        elif r["part"] == "error":
            lines += [f"## {r['of']}: failed", "", "```", r["traceback"][-1500:], "```", ""]
        elif r["part"] == "skipped":
            lines += [f"## {r['of']}: skipped", "", r["why"], ""]
    return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


# --------------------------------------------------------------------------- main
def dry_run_checks() -> list[str]:
    """What a dry run checks before it stops: the files the parts run parse and take the options
    given them, the models and presets exist (built on the meta device), what they import."""
    from slimopt.train.models import build_model, model_config

    found = []
    for path in (TRITON_TESTS, LEAN_STEP):
        compile(path.read_text(), str(path), "exec")  # parses
        found.append(path.name)
    source = LEAN_STEP.read_text()
    missing = [a for a in LEAN_STEP_ARGS if a.startswith("--") and f'"{a}"' not in source]
    if missing:
        raise SystemExit(f"gpu_check: lean_step.py has no option {', '.join(missing)}")
    for name in ("llama-60m", "llama-7b"):
        model_config(name)
    meta = build_model(GRAPH_MODEL, 1024, device="meta")
    for preset in PRESETS:
        create_optimizer(preset, meta, lr=torch.tensor(1e-3))
    found.append(f"{len(PRESETS)} presets on {GRAPH_MODEL}")
    for module in ("pytest", "transformers", "triton"):
        found.append(f"{module} {'found' if importlib.util.find_spec(module) else 'MISSING'}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="default: $OUT/gpu-check or runs/gpu-check")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds of the bandwidth part")
    parser.add_argument("--dry-run", action="store_true",
                        help="parse and import everything, stop at the first CUDA check")  # fmt: skip
    parser.add_argument("--graph-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--graph-cases", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.graph_child:
        cases = [tuple(c.split(":")) for c in args.graph_cases.split(",")]
        return graph_child(args.graph_child, cases)  # type: ignore[arg-type]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    dry = args.dry_run or os.environ.get("GPU_CHECK_DRY_RUN") == "1"
    if dry:
        _log(f"dry run: parts {', '.join(parts)}; checked {', '.join(dry_run_checks())}")
    # the first CUDA check
    if not torch.cuda.is_available():
        if dry:
            print(f"{NO_GPU} (dry run): everything parsed and imported; stopping before the "
                  "first CUDA check, nothing measured", flush=True)  # fmt: skip
            return 0
        print(f"{NO_GPU}; nothing measured (--dry-run checks the script on a CPU)", file=sys.stderr)
        return 2
    if dry:
        print(f"gpu_check: dry run on {torch.cuda.get_device_name()}: stopping before the first "
              "measurement", flush=True)  # fmt: skip
        return 0
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md = out / "gpu_check.jsonl", out / "gpu_check.md"
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    header = {
        "part": "conditions",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "budget_s": args.budget_s,
    }
    records: list[dict[str, Any]] = []

    def keep(new: list[dict[str, Any]]) -> None:
        records.extend(new)
        with jsonl.open("a") as f:
            for r in new:
                f.write(json.dumps(r, default=str) + "\n")
        md.write_text(summarize(records, header))

    jsonl.write_text(json.dumps(header) + "\n")
    # the parts' own caps; each also ends within what is left of the budget
    caps = {"triton": 240.0, "graphs": 150.0, "memory-7b": 180.0}
    for part in parts:
        left = deadline - time.perf_counter()
        if left < 15:
            keep(
                [
                    {
                        "part": "skipped",
                        "of": part,
                        "why": f"the {args.budget_s:.0f} s budget is spent",
                    }
                ]
            )
            continue
        _log(f"{part} ({time.perf_counter() - t0:.0f} s in, {left:.0f} s left)")
        try:
            if part == "triton":
                keep([part_triton(out, min(left, caps[part]))])
            elif part == "graphs":
                keep(part_graphs(time.perf_counter() + min(left, caps[part])))
            elif part == "bandwidth":
                for dtype in ("bf16", "fp32"):
                    keep([part_bandwidth(dtype, args.steps)])
                    torch.cuda.empty_cache()
            elif part == "memory-7b":
                keep([part_memory(out, min(left, caps[part]))])
        except Exception as exc:  # record it and go on: one failed part must not lose the rest
            _log(traceback.format_exc())
            keep([{"part": "error", "of": part, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}])  # fmt: skip
        torch.cuda.empty_cache()
    _log(f"done in {time.perf_counter() - t0:.0f} s; results in {out}")
    print(md.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
