"""How an optimizer treats rare tokens: validation loss split by training frequency, and the share
of embedding rows that receive a gradient at each step.

The SAGE paper's argument is about the embedding of a large vocabulary: with Zipfian token
frequencies most rows of the [V, d] table are updated rarely and noisily. Two measurements show
whether an optimizer's handling of those rows pays:

- :func:`frequency_buckets` ranks the vocabulary by how often each token occurs in the training
  split and cuts the ranking at ``edges`` (by default the top 1k tokens, ranks 1k-8k, the rest);
  :func:`evaluate_by_frequency` then reports the mean next-token loss per bucket of the *target*
  token, so a preset that learns frequent tokens well and rare ones badly shows it.
- :class:`EmbeddingRowActivity` records, at every backward pass, the fraction of the embedding's
  rows whose gradient is non-zero (a row is touched only when its token appears in the batch).

Example:
    >>> import torch
    >>> from slimopt.bench.frequency import frequency_buckets, bucket_names
    >>> train = torch.tensor([0, 0, 0, 1, 1, 2, 0, 1, 3])
    >>> frequency_buckets(train, vocab_size=5, edges=(1, 3)).tolist()
    [0, 1, 1, 2, 2]
    >>> bucket_names((1, 3), vocab_size=5)
    ['top 1', '1-3', '3-5']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_EDGES: tuple[int, ...] = (1000, 8000)


def _check_edges(edges: Sequence[int]) -> tuple[int, ...]:
    edges = tuple(int(e) for e in edges)
    if not edges or any(e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
        raise ValueError(f"frequency edges must be increasing positive ranks, got {edges}")
    return edges


def _count(n: int) -> str:
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def bucket_names(edges: Sequence[int] = DEFAULT_EDGES, vocab_size: int | None = None) -> list[str]:
    """Readable names of the buckets that ``edges`` cut: ``['top 1k', '1k-8k', '8k-32k']``."""
    edges = _check_edges(edges)
    names = [f"top {_count(edges[0])}"]
    for lo, hi in zip(edges, edges[1:]):
        names.append(f"{_count(lo)}-{_count(hi)}")
    names.append(f"{_count(edges[-1])}-{_count(vocab_size)}" if vocab_size else f"{edges[-1]}+")
    return names


def token_counts(tokens: Tensor | Any, vocab_size: int) -> Tensor:
    """How often each token id occurs in ``tokens`` (a tensor or a numpy array of ids)."""
    if isinstance(tokens, Tensor):
        t = tokens.reshape(-1).to(torch.int64)
    else:  # a numpy array or a read-only memmap of token shards: copy it as int64
        import numpy as np

        t = torch.from_numpy(np.asarray(tokens).astype(np.int64).reshape(-1))
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}), got {int(t.min())}..{int(t.max())}"
        )
    return torch.bincount(t, minlength=vocab_size)


def frequency_buckets(
    train_tokens: Tensor | Any, vocab_size: int, edges: Sequence[int] = DEFAULT_EDGES
) -> Tensor:
    """Bucket index (0 = most frequent) of every token id, by its rank of frequency in training.

    Ties are broken by token id, so the buckets are deterministic; tokens never seen in training
    rank last.
    """
    edges = _check_edges(edges)
    counts = token_counts(train_tokens, vocab_size)
    # stable sort on -count keeps equal counts in id order
    order = torch.sort(-counts, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(vocab_size)
    return torch.bucketize(rank, torch.tensor(edges), right=True)


@torch.no_grad()
def evaluate_by_frequency(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    buckets: Tensor,
    names: Sequence[str],
    *,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Mean next-token loss per frequency bucket of the target token.

    ``batches`` yields ``(input_ids, targets)`` pairs (as ``slimopt.train.data.eval_batches`` does);
    the model returns an object with ``.logits``. The result lists, most frequent bucket first,
    ``{"bucket": name, "loss": mean loss, "tokens": count}`` (a list, so that the order survives
    JSON); a bucket with no target token has loss NaN.
    """
    if buckets.ndim != 1:
        raise ValueError("buckets must be a 1-D tensor: one bucket index per token id")
    n = len(names)
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(input_ids=x).logits.float().flatten(0, 1)
            target = y.flatten()
            loss = F.cross_entropy(logits, target, reduction="none").double().cpu()
            b = buckets[target.cpu()]
            sums += torch.bincount(b, weights=loss, minlength=n)[:n]
            counts += torch.bincount(b, minlength=n)[:n]
    finally:
        model.train(was_training)
    return [
        {
            "bucket": name,
            "loss": float(sums[i] / counts[i]) if counts[i] else float("nan"),
            "tokens": int(counts[i]),
        }
        for i, name in enumerate(names)
    ]


class EmbeddingRowActivity:
    """Records the share of an embedding table's rows whose gradient is non-zero, per backward.

    It hooks the parameter's completed gradient (``register_post_accumulate_grad_hook``), so it
    needs no change to the training loop and works when the optimizer steps during backward.

    Example:
        >>> import torch
        >>> emb = torch.nn.Embedding(10, 4)
        >>> act = EmbeddingRowActivity(emb.weight)
        >>> emb(torch.tensor([1, 2, 2])).sum().backward()
        >>> act.shares
        [0.2]
        >>> act.close()
    """

    def __init__(self, weight: Tensor) -> None:
        if weight.ndim != 2:
            raise ValueError(f"an embedding table is [V, d]; got shape {tuple(weight.shape)}")
        self.shares: list[float] = []
        self._handle = weight.register_post_accumulate_grad_hook(self._record)

    def _record(self, p: Tensor) -> None:
        g = p.grad
        if g is None:
            return
        touched = g.detach().ne(0).any(dim=1)
        self.shares.append(int(touched.sum()) / max(touched.numel(), 1))

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()


# ----------------------------------------------------------------------------- the report

PLOT_LOSS_BY_FREQUENCY = "loss_by_frequency.png"
PLOT_ROWS_TOUCHED = "embedding_rows_touched.png"


def summarize(records: Sequence[dict[str, Any]], order: Sequence[str]) -> list[dict[str, Any]]:
    """Per preset (in ``order``): the mean over finished seeds of the loss per frequency bucket
    (and its min and max over seeds), the mean share of embedding rows touched per step, and its curve (step, share) averaged over
    seeds. Records are ``slimopt compare``'s (``val_loss_by_frequency`` and ``rows_curve``)."""
    rows = []
    for name in order:
        done = [r for r in records if r["preset"] == name and r.get("val_loss_by_frequency")]
        if not done:
            continue
        splits = [{b["bucket"]: b for b in r["val_loss_by_frequency"]} for r in done]
        buckets = list(splits[0])
        loss, lo, hi = {}, {}, {}
        for b in buckets:
            vals = [split[b]["loss"] for split in splits]
            vals = [v for v in vals if v == v]  # NaN: a bucket with no validation token
            loss[b] = sum(vals) / len(vals) if vals else float("nan")
            lo[b] = min(vals) if vals else float("nan")
            hi[b] = max(vals) if vals else float("nan")
        curves = [dict((int(s), v) for s, v in r.get("rows_curve") or []) for r in done]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        curve = [(s, sum(c[s] for c in curves) / len(curves)) for s in steps]
        shares = [v for _, v in curve]
        rows.append({
            "preset": name,
            "seeds": len(done),
            "loss": loss,
            "loss_min": lo,  # over seeds
            "loss_max": hi,
            "tokens": {b: splits[0][b]["tokens"] for b in buckets},
            "rows_touched": sum(shares) / len(shares) if shares else None,
            "rows_curve": curve,
        })  # fmt: skip
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Validation loss per frequency bucket of the target token, per preset, best overall first
    in the given order; the last column is the mean share of embedding rows touched per step."""
    if not rows:
        return ""
    buckets = list(rows[0]["loss"])
    head = ["preset", *(f"loss {b} ({rows[0]['tokens'][b]:,} tok)" for b in buckets)]
    head.append("rows touched / step")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["preset"], *(f"{r['loss'][b]:.3f}" for b in buckets)]
        share = r["rows_touched"]
        cells.append(f"{100 * share:.1f}%" if share is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], out_dir: Any, title: str = "") -> list[str]:
    """Two figures in ``out_dir``: the loss per frequency bucket and the share of embedding rows
    with a gradient against the step.

    The first has two panels of grouped bars, one group per bucket: the loss itself, and each
    preset's difference from the reference preset (AdamW when it is there, else the first row),
    where the differences between presets, small beside the loss, can be seen; its error bars span
    the preset's seeds (min to max)."""
    import os

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not rows:
        return []
    buckets = list(rows[0]["loss"])
    ref = next((r for r in rows if r["preset"] == "adamw"), rows[0])
    width = 0.8 / len(rows)
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(buckets))]
        ax.bar(xs, [r["loss"][b] for b in buckets], width, label=r["preset"], color=f"C{i % 10}")
        diff = [r["loss"][b] - ref["loss"][b] for b in buckets]
        lo = [r["loss"][b] - r.get("loss_min", r["loss"])[b] for b in buckets]
        hi = [r.get("loss_max", r["loss"])[b] - r["loss"][b] for b in buckets]
        dx.bar(xs, diff, width, yerr=[lo, hi], capsize=2, color=f"C{i % 10}", label=r["preset"])
    for a in (ax, dx):
        a.set_xticks(range(len(buckets)), buckets)
        a.set_xlabel("target token's rank by training frequency")
    ax.set_ylabel("validation loss of the target token")
    ax.set_title(title or "loss by token frequency")
    ax.legend(fontsize=8)
    dx.axhline(0, color="black", lw=0.8)
    dx.set_ylabel(f"loss minus {ref['preset']}'s (nats; bars: seeds' range)")
    dx.set_title(f"difference from {ref['preset']} (lower is better)")
    fig.tight_layout()
    first = os.path.join(out_dir, PLOT_LOSS_BY_FREQUENCY)
    fig.savefig(first, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["rows_curve"]:
            steps, shares = zip(*r["rows_curve"])
            ax.plot(steps, [100 * s for s in shares], label=r["preset"])
    ax.set_xlabel("step")
    ax.set_ylabel("embedding rows with a gradient (%)")
    ax.set_title(title or "embedding rows touched per step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    second = os.path.join(out_dir, PLOT_ROWS_TOUCHED)
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]


__all__ = [
    "DEFAULT_EDGES",
    "EmbeddingRowActivity",
    "bucket_names",
    "evaluate_by_frequency",
    "frequency_buckets",
    "markdown_table",
    "plot",
    "summarize",
    "token_counts",
]
