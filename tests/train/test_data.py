"""Corpora, tokenizer, token cache and batches: deterministic, cached, and loud about bad input."""

from __future__ import annotations

import lzma

import numpy as np
import pytest

from slimopt.train import data
from slimopt.train.data import DataError, PackedBatches, eval_batches, open_corpus, prepare_data

TEXT = "".join(
    f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}\n" for i in range(400)
)


def _text(corpus, split):
    return "".join(t for t, _ in corpus.pieces(split))


def test_stdlib_split_is_deterministic_and_disjoint():
    a, b = open_corpus("stdlib:email"), open_corpus("stdlib:email")
    assert a.key == b.key
    train, valid = _text(a, "train"), _text(a, "valid")
    assert train and valid and valid not in train
    assert _text(b, "valid") == valid
    # the slice is a subset of the whole corpus, with the same train/valid assignment per file
    full = open_corpus("stdlib")
    assert full.key != a.key and valid in _text(full, "valid")


def test_stdlib_slice_that_matches_nothing():
    with pytest.raises(DataError, match="found 0 .py file"):
        open_corpus("stdlib:no_such_package_xyz")


@pytest.mark.parametrize("suffix", [".txt", ".txt.xz"])
def test_directory_corpus(tmp_path, suffix):
    write = (
        (lambda p, s: lzma.open(p, "wt").write(s))
        if suffix.endswith("xz")
        else (lambda p, s: p.write_text(s))
    )
    write(tmp_path / f"train{suffix}", TEXT)
    write(tmp_path / f"valid{suffix}", "valid text\n" * 10)
    corpus = open_corpus(str(tmp_path))
    assert sorted(corpus.splits) == ["train", "valid"]
    assert _text(corpus, "train") == TEXT and _text(corpus, "valid") == "valid text\n" * 10


def test_directory_without_valid_split(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT)
    with pytest.raises(DataError, match="no valid file"):
        open_corpus(str(tmp_path))


def test_single_file_tail_is_validation(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    corpus = open_corpus(str(path))
    train, valid = _text(corpus, "train"), _text(corpus, "valid")
    assert train + valid == TEXT and train.endswith("\n")
    assert 0.03 < len(valid) / len(TEXT) < 0.07


def test_missing_path():
    with pytest.raises(DataError, match="not found"):
        open_corpus("/nonexistent/corpus")


def test_undecodable_corpus_names_the_byte(tmp_path, cache_dir):
    (tmp_path / "train.txt").write_bytes(TEXT.encode() + b"\xff\xfe bad")
    (tmp_path / "valid.txt").write_text("ok\n")
    with pytest.raises(DataError, match=r"train.txt is not UTF-8 text \(byte \d+"):
        prepare_data(str(tmp_path), vocab_size=300, cache_dir=cache_dir)


def test_empty_corpus(tmp_path, cache_dir):
    (tmp_path / "train.txt").write_text("")
    (tmp_path / "valid.txt").write_text("some text\n")
    with pytest.raises(DataError, match="training split has no text"):
        prepare_data(str(tmp_path), vocab_size=300, cache_dir=cache_dir)


def test_hf_without_datasets(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no module named datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=r"optional 'datasets' library.*slimopt\[hf\]"):
        open_corpus("hf:wikitext:wikitext-2-raw-v1")


def test_tokens_are_cached(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text(TEXT)
    cache = tmp_path / "cache"
    _, tok, first = prepare_data(str(tmp_path / "corpus.txt"), vocab_size=300, cache_dir=cache)
    assert first.vocab_size == 300 and first["train"].dtype == np.uint16
    assert tok.decode(list(map(int, first["valid"]))) == _text(
        open_corpus(str(tmp_path / "corpus.txt")), "valid"
    )

    def refuse(*args, **kwargs):
        raise AssertionError("the second run must read the cache")

    monkeypatch.setattr(data, "train_tokenizer", refuse)
    monkeypatch.setattr(data, "_tokenize_split", refuse)
    _, _, second = prepare_data(str(tmp_path / "corpus.txt"), vocab_size=300, cache_dir=cache)
    assert second.directory == first.directory
    assert np.array_equal(second["train"], first["train"])
    # a changed corpus is a different cache entry
    (tmp_path / "corpus.txt").write_text(TEXT + "one more line\n")
    with pytest.raises(AssertionError, match="must read the cache"):
        prepare_data(str(tmp_path / "corpus.txt"), vocab_size=300, cache_dir=cache)


def test_tokenizer_file(tmp_path, cache_dir):
    (tmp_path / "corpus.txt").write_text(TEXT)
    _, tok, shards = prepare_data(str(tmp_path / "corpus.txt"), vocab_size=300, cache_dir=cache_dir)
    tok.save(str(tmp_path / "tok.json"))
    _, tok2, shards2 = prepare_data(
        str(tmp_path / "corpus.txt"), tokenizer=str(tmp_path / "tok.json"), cache_dir=cache_dir
    )
    assert np.array_equal(shards2["train"], shards["train"])
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
        data.load_tokenizer(tmp_path / "broken.json")


def test_packed_batches_are_seeded_and_resumable():
    tokens = np.arange(1001)
    a = PackedBatches(tokens, seq_len=10, batch_size=7, seed=3)
    batches = [a.next_batch() for _ in range(40)]  # 280 windows: crosses two epoch boundaries
    for x, y in batches:
        assert (y == x + 1).all()
        assert ((x[:, 0] % 10) == 0).all()  # windows start on multiples of seq_len
    first_epoch = np.concatenate([x[:, 0].numpy() for x, _ in batches])[:100]
    assert sorted(first_epoch // 10) == list(range(100))  # each window once per epoch
    b = PackedBatches(tokens, seq_len=10, batch_size=7, seed=3)
    b.load_state_dict({"position": 7 * 25, "n_windows": 100, "seq_len": 10})
    x, y = b.next_batch()
    assert (x == batches[25][0]).all() and (y == batches[25][1]).all()
    other = PackedBatches(tokens, seq_len=10, batch_size=7, seed=4).next_batch()[0]
    assert not (other == batches[0][0]).all()
    with pytest.raises(DataError, match="fewer than seq_len"):
        PackedBatches(np.arange(5), seq_len=10, batch_size=1, seed=0)


def test_eval_batches_predict_every_token_once():
    tokens = np.arange(1, 104)
    targets = np.concatenate([y.flatten().numpy() for _, y in eval_batches(tokens, 10, 3)])
    assert list(targets) == list(range(2, 104))
    limited = np.concatenate(
        [y.flatten().numpy() for _, y in eval_batches(tokens, 10, 3, limit=25)]
    )
    assert list(limited) == list(range(2, 26))
