import math

import pytest
import torch

from slimopt.bench.frequency import (
    EmbeddingRowActivity,
    bucket_names,
    evaluate_by_frequency,
    frequency_buckets,
)


def test_buckets_follow_training_frequency_not_token_id():
    # token 4 is the most frequent, token 0 never occurs
    train = torch.tensor([4] * 5 + [2] * 3 + [1, 1] + [3])
    b = frequency_buckets(train, vocab_size=5, edges=(1, 3))
    assert b.tolist() == [2, 1, 1, 2, 0]


@pytest.mark.parametrize("edges", [(), (3, 1), (0, 2), (2, 2)])
def test_bad_edges_are_named(edges):
    with pytest.raises(ValueError, match="edges"):
        frequency_buckets(torch.tensor([0, 1]), vocab_size=4, edges=edges)


def test_out_of_range_ids_are_an_error():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        frequency_buckets(torch.tensor([0, 7]), vocab_size=4, edges=(1,))


class _Bigram(torch.nn.Module):
    def __init__(self, v):
        super().__init__()
        self.table = torch.nn.Embedding(v, v)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table(input_ids)})()


def test_loss_split_equals_the_per_token_losses_grouped_by_bucket():
    torch.manual_seed(0)
    v = 6
    model = _Bigram(v)
    x = torch.randint(0, v, (3, 5))
    y = torch.randint(0, v, (3, 5))
    buckets = torch.tensor([0, 0, 1, 1, 2, 2])
    names = bucket_names((2, 4), vocab_size=v)
    out = {b["bucket"]: b for b in evaluate_by_frequency(model, [(x, y)], buckets, names)}
    with torch.no_grad():
        per_token = torch.nn.functional.cross_entropy(
            model.table(x).flatten(0, 1), y.flatten(), reduction="none"
        )
    for i, name in enumerate(names):
        mask = buckets[y.flatten()] == i
        if mask.any():
            assert out[name]["loss"] == pytest.approx(float(per_token[mask].mean()), rel=1e-6)
        else:
            assert math.isnan(out[name]["loss"])
        assert out[name]["tokens"] == int(mask.sum())
    assert sum(o["tokens"] for o in out.values()) == y.numel()


def test_row_activity_counts_rows_with_a_gradient():
    emb = torch.nn.Embedding(8, 3)
    act = EmbeddingRowActivity(emb.weight)
    emb(torch.tensor([0, 0, 5])).sum().backward()
    emb.weight.grad = None
    emb(torch.tensor([1, 2, 3, 4])).sum().backward()
    assert act.shares == [2 / 8, 4 / 8]
    act.close()
    emb(torch.tensor([1])).sum().backward()
    assert len(act.shares) == 2


def test_summary_keeps_the_seeds_range_and_plots(tmp_path):
    from slimopt.bench.frequency import PLOT_LOSS_BY_FREQUENCY, PLOT_ROWS_TOUCHED, plot, summarize

    def rec(preset, seed, rare):
        split = [{"bucket": "top 1k", "loss": 4.0 + seed, "tokens": 9},
                 {"bucket": "1k-32k", "loss": rare, "tokens": 3}]  # fmt: skip
        return {"preset": preset, "seed": seed, "val_loss_by_frequency": split,
                "rows_curve": [[1, 0.03], [2, 0.05]]}  # fmt: skip

    rows = summarize([rec("adamw", 0, 11.0), rec("adamw", 1, 11.4), rec("sage-hybrid", 0, 10.8)],
                     ["sage-hybrid", "adamw"])  # fmt: skip
    adamw = next(r for r in rows if r["preset"] == "adamw")
    assert adamw["loss"]["1k-32k"] == pytest.approx(11.2)
    assert (adamw["loss_min"]["1k-32k"], adamw["loss_max"]["1k-32k"]) == (11.0, 11.4)
    assert adamw["seeds"] == 2 and adamw["rows_touched"] == pytest.approx(0.04)
    files = plot(rows, tmp_path)
    assert [f.rsplit("/", 1)[-1] for f in files] == [PLOT_LOSS_BY_FREQUENCY, PLOT_ROWS_TOUCHED]
    for f in files:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
