"""Corpora, tokenizer training, cached token shards and packed batches with a resumable position.

Text flows one way: a corpus (``open_corpus``) gives the text of each split; a byte-level BPE
tokenizer is trained on the training split (``train_tokenizer``) or loaded from a file; each split is
tokenized once into a flat numpy memmap (``tokenize_corpus``), cached under ``SLIMOPT_CACHE`` or
``~/.cache/slimopt`` and keyed by a hash of the corpus content and of the tokenizer;
``PackedBatches`` cuts the training tokens into sequences of ``seq_len`` next-token pairs.

Corpus specs (``--data``):

- ``stdlib`` (the default): the ``.py`` sources of the running Python's standard library (its test
  suites and ``site-packages`` left out). Each file goes to ``valid`` when the hash of its relative
  path falls in the lowest 1/20 (so about 5% of the files, the same files on every machine with the
  same Python), otherwise to ``train``. ``stdlib:json,email`` keeps only the files whose path starts
  with one of the prefixes, a small corpus for quick runs.
- a directory holding ``train`` and ``valid`` (and optionally ``test``) as ``.txt`` or ``.txt.xz``.
- a single text file (``.txt`` or ``.txt.xz``): its last 5% (cut at a line end) becomes ``valid``.
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset through the optional ``datasets`` library.

>>> from slimopt.train.data import open_corpus
>>> corpus = open_corpus("stdlib:json")
>>> sorted(corpus.splits)
['train', 'valid']
>>> text = "".join(piece for piece, _ in corpus.pieces("train"))
>>> "def dumps(" in text
True
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import lzma
import os
import shutil
import sys
import sysconfig
import tempfile
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimopt.train.checkpoint import sha256_file

EOT = "<|endoftext|>"
# Tokens that end a document in tokenizers trained elsewhere, in order of preference.
_EOT_CANDIDATES = (EOT, "</s>", "<eos>", "<|end_of_text|>")
# Bump when the way text is read, split, tokenized or stored changes: it invalidates the cache.
FORMAT_VERSION = "1"
_PIECE_CHARS = 1 << 20  # text is read and tokenized in pieces of about this many characters
_VALID_BUCKETS = 20  # stdlib: 1 file in 20 goes to validation
_SINGLE_FILE_VALID_FRACTION = 0.05

Piece = tuple[str, bool]  # (text, whether a document ends after it)


class DataError(ValueError):
    """A corpus, tokenizer or cache that cannot be used, with the reason."""


# ----------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    """Text split into named splits; ``key`` is a hash of the content (and of how it is read)."""

    description: str
    key: str
    splits: dict[str, Callable[[], Iterator[Piece]]] = field(repr=False)

    def pieces(self, split: str) -> Iterator[Piece]:
        """The text of ``split`` as ``(text, ends_document)`` pieces, in order."""
        if split not in self.splits:
            raise DataError(f"{self.description} has no {split!r} split")
        return self.splits[split]()


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$SLIMOPT_CACHE``, else ``$XDG_CACHE_HOME/slimopt`` or ``~/.cache/slimopt``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("SLIMOPT_CACHE"):
        return Path(os.environ["SLIMOPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slimopt"


def open_corpus(spec: str) -> Corpus:
    """The corpus named by ``spec`` (see the module docstring); a clear error if there is none."""
    if spec == "stdlib" or spec.startswith("stdlib:"):
        prefixes = [p for p in spec[len("stdlib:") :].split(",") if p] if ":" in spec else []
        return _stdlib_corpus(prefixes)
    if spec.startswith("hf:"):
        return _hf_corpus(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _directory_corpus(path)
    if path.is_file():
        return _single_file_corpus(path)
    raise DataError(
        f"data {spec!r} not found: give 'stdlib', 'stdlib:PREFIX[,PREFIX]', a directory with "
        "train/valid .txt or .txt.xz files, a text file, or hf:NAME[:CONFIG]"
    )


def _hash_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in filenames:
            if name.endswith(".py"):
                rels.append(Path(dirpath, name).relative_to(root).as_posix())
    return root, sorted(rels)


def _path_bucket(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")


def _decode_source(path: Path, data: bytes) -> str:
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
        raise DataError(f"cannot decode {path}: {exc}") from exc


def _stdlib_corpus(prefixes: list[str]) -> Corpus:
    root, rels = _stdlib_files()
    if prefixes:
        rels = [r for r in rels if any(r.startswith(p) for p in prefixes)]
    description = "stdlib" + (":" + ",".join(prefixes) if prefixes else "") + f" ({root})"
    if len(rels) < 2:
        raise DataError(
            f"{description}: found {len(rels)} .py file(s), need at least 2 "
            "(one for training, one for validation)"
        )
    # A file goes to validation when its path hash is in the lowest 1/20 of the hash range; a
    # selection too small to hit that range still gets its lowest-hash file as validation.
    buckets = {r: _path_bucket(r) for r in rels}
    threshold = (1 << 64) // _VALID_BUCKETS
    valid = [r for r in rels if buckets[r] < threshold] or [min(rels, key=buckets.__getitem__)]
    if len(valid) == len(rels):
        valid = [min(rels, key=buckets.__getitem__)]
    valid_set = set(valid)
    train = [r for r in rels if r not in valid_set]
    contents = {r: (root / r).read_bytes() for r in rels}
    key = _hash_bytes(
        b"stdlib",
        FORMAT_VERSION.encode(),
        *(
            part
            for r in rels
            for part in (r.encode(), b"V" if r in valid_set else b"T", contents[r])
        ),
    )

    def split_pieces(files: list[str]) -> Callable[[], Iterator[Piece]]:
        def gen() -> Iterator[Piece]:
            for r in files:
                text = _decode_source(root / r, contents[r])
                if text.strip():
                    yield text, True

        return gen

    return Corpus(description, key, {"train": split_pieces(train), "valid": split_pieces(valid)})


def _read_text_pieces(path: Path) -> Iterator[str]:
    """The text of a UTF-8 (optionally xz) file, in pieces of about ``_PIECE_CHARS`` cut after a newline."""
    opener = lzma.open if path.name.endswith(".xz") else open
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    pending = ""
    offset = 0  # bytes decoded so far, to say where a decoding error is
    try:
        with opener(path, "rb") as fh:
            while True:
                raw = fh.read(_PIECE_CHARS)
                try:
                    pending += decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path} is not UTF-8 text (byte {offset + exc.start} cannot be decoded)"
                    ) from exc
                offset += len(raw)
                if not raw:
                    break
                if len(pending) >= _PIECE_CHARS:
                    cut = pending.rfind("\n") + 1 or len(pending)
                    yield pending[:cut]
                    pending = pending[cut:]
    except (OSError, lzma.LZMAError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if pending:
        yield pending


def _file_hash(path: Path) -> bytes:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return h.digest()


def _file_pieces(path: Path) -> Callable[[], Iterator[Piece]]:
    def gen() -> Iterator[Piece]:
        for piece in _read_text_pieces(path):
            yield piece, False

    return gen


def _directory_corpus(root: Path) -> Corpus:
    found: dict[str, Path] = {}
    for split in ("train", "valid", "test"):
        candidates = [root / f"{split}.txt", root / f"{split}.txt.xz"]
        present = [p for p in candidates if p.is_file()]
        if len(present) > 1:
            raise DataError(f"{root}: both {present[0].name} and {present[1].name}; keep one")
        if present:
            found[split] = present[0]
    missing = [s for s in ("train", "valid") if s not in found]
    if missing:
        raise DataError(
            f"{root}: no {' or '.join(missing)} file; a data directory needs train.txt (or "
            "train.txt.xz) and valid.txt (or valid.txt.xz), and may have test.txt"
        )
    key = _hash_bytes(
        b"dir",
        FORMAT_VERSION.encode(),
        *(part for s, p in found.items() for part in (s.encode(), _file_hash(p))),
    )
    return Corpus(str(root), key, {s: _file_pieces(p) for s, p in found.items()})


def _single_file_corpus(path: Path) -> Corpus:
    key = _hash_bytes(
        b"file",
        FORMAT_VERSION.encode(),
        _file_hash(path),
        str(_SINGLE_FILE_VALID_FRACTION).encode(),
    )
    halves: list[str] = []

    def load() -> list[str]:
        # Read once, on the first request (a cached run never reads the text at all).
        if not halves:
            text = "".join(_read_text_pieces(path))
            cut = text.find("\n", int(len(text) * (1 - _SINGLE_FILE_VALID_FRACTION))) + 1
            if cut <= 0 or cut >= len(text):
                cut = int(len(text) * (1 - _SINGLE_FILE_VALID_FRACTION))
            halves.extend([text[:cut], text[cut:]])
        return halves

    def split_pieces(i: int) -> Callable[[], Iterator[Piece]]:
        def gen() -> Iterator[Piece]:
            text = load()[i]
            for start in range(0, len(text), _PIECE_CHARS):
                yield text[start : start + _PIECE_CHARS], False

        return gen

    return Corpus(
        f"{path} (its last {_SINGLE_FILE_VALID_FRACTION:.0%} as validation)",
        key,
        {"train": split_pieces(0), "valid": split_pieces(1)},
    )


def _hf_corpus(spec: str) -> Corpus:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 2:
        raise DataError(f"data {spec!r}: expected hf:NAME or hf:NAME:CONFIG")
    name, config = parts[0], (parts[1] if len(parts) == 2 else None)
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"data {spec!r} needs the optional 'datasets' library: pip install 'slimopt[hf]'"
        ) from exc
    try:
        dsd = datasets.load_dataset(name, config)
    except Exception as exc:  # the library raises many kinds; all mean "cannot load"
        raise DataError(f"cannot load Hugging Face dataset {spec!r}: {exc}") from exc
    names = {"train": ["train"], "valid": ["validation", "valid", "dev"], "test": ["test"]}
    chosen = {s: next((c for c in cands if c in dsd), None) for s, cands in names.items()}
    if chosen["train"] is None or chosen["valid"] is None:
        raise DataError(
            f"Hugging Face dataset {spec!r} has splits {sorted(dsd)}; need 'train' and 'validation'"
        )
    columns = dsd[chosen["train"]].column_names
    text_col = "text" if "text" in columns else (columns[0] if len(columns) == 1 else None)
    if text_col is None:
        raise DataError(f"Hugging Face dataset {spec!r} has no 'text' column (columns: {columns})")
    key = _hash_bytes(
        b"hf",
        FORMAT_VERSION.encode(),
        spec.encode(),
        *(str(getattr(dsd[c], "_fingerprint", "")).encode() for c in chosen.values() if c),
    )

    def split_pieces(split_name: str) -> Callable[[], Iterator[Piece]]:
        def gen() -> Iterator[Piece]:
            for row in dsd[split_name]:
                text = row[text_col]
                if text and text.strip():
                    yield text, True

        return gen

    return Corpus(spec, key, {s: split_pieces(c) for s, c in chosen.items() if c})


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: Corpus, vocab_size: int, *, max_chars: int | None = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on the corpus' training split.

    ``<|endoftext|>`` (id 0) separates documents. ``max_chars`` caps the training text read.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE (needs ≥ 258)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0
    has_text = False

    def texts() -> Iterator[str]:
        nonlocal seen, has_text
        for text, _ in corpus.pieces("train"):
            if max_chars is not None and seen >= max_chars:
                return
            seen += len(text)
            has_text = has_text or not text.isspace()
            yield text

    tok.train_from_iterator(texts(), trainer)
    if not has_text:
        raise DataError(f"{corpus.description}: the training split has no text")
    return tok


def load_tokenizer(path: str | os.PathLike[str]):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file, with a clear error otherwise."""
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"{path} is not a Hugging Face tokenizer.json: {exc}") from exc


def tokenizer_vocab_size(tok) -> int:
    """The embedding rows a model needs for this tokenizer (largest id + 1)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def tokenizer_hash(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def eot_id(tok) -> int | None:
    """The id that ends a document, or None when the tokenizer has no such token."""
    for token in _EOT_CANDIDATES:
        i = tok.token_to_id(token)
        if i is not None:
            return i
    return None


def cached_tokenizer(
    corpus: Corpus, vocab_size: int, cache_dir: str | os.PathLike[str] | None = None, log=None
):
    """The tokenizer trained on ``corpus`` at ``vocab_size``, trained once and then read from cache."""
    path = cache_root(cache_dir) / "tokenizers" / f"{corpus.key[:24]}-bpe{vocab_size}.json"
    if path.is_file():
        return load_tokenizer(path)
    if log:
        log(f"training a {vocab_size}-token byte-level BPE on {corpus.description}")
    tok = train_tokenizer(corpus, vocab_size)
    try:
        _atomic_write_text(path, tok.to_str())
    except OSError as exc:
        raise _cache_write_error(path.parent, exc) from exc
    return tok


def _cache_write_error(where: Path, exc: OSError) -> DataError:
    reason = exc.strerror or str(exc)
    return DataError(
        f"cannot write the cache under {where}: {reason}; set --cache-dir (or SLIMOPT_CACHE) to a "
        "writable directory"
    )


# ----------------------------------------------------------------------------- token shards


@dataclass
class TokenShards:
    """The tokens of each split as read-only memmaps, and where they are stored."""

    splits: dict[str, np.ndarray]
    directory: Path
    vocab_size: int

    def __getitem__(self, split: str) -> np.ndarray:
        return self.splits[split]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenize_corpus(
    corpus: Corpus, tok, cache_dir: str | os.PathLike[str] | None = None, log=None
) -> TokenShards:
    """Tokenize every split once into ``{cache}/shards/<corpus>-<tokenizer>/{split}.bin``."""
    vocab = tokenizer_vocab_size(tok)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    directory = cache_root(cache_dir) / "shards" / f"{corpus.key[:24]}-{tokenizer_hash(tok)[:16]}"
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        if log:
            log(f"tokenizing {corpus.description} into {directory}")
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        except OSError as exc:
            raise _cache_write_error(directory.parent, exc) from exc
        try:
            counts, sums = {}, {}
            for s in corpus.splits:
                counts[s], sums[s] = _tokenize_split(corpus, s, tok, dtype, tmp / f"{s}.bin")
            meta = {
                "format": FORMAT_VERSION,
                "corpus": corpus.description,
                "dtype": dtype.name,
                "vocab_size": vocab,
                "tokens": counts,
                "sha256": sums,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if directory.exists() and not meta_path.is_file():
                shutil.rmtree(directory)  # an incomplete entry left by hand; never by this code
            try:
                os.replace(tmp, directory)
            except OSError:  # another process finished the same shards first
                if not meta_path.is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = json.loads(meta_path.read_text())
        splits = {}
        for s, n in meta["tokens"].items():
            if n == 0:
                splits[s] = np.zeros(0, dtype=meta["dtype"])
                continue
            path = directory / f"{s}.bin"
            expected = n * np.dtype(meta["dtype"]).itemsize
            if path.stat().st_size != expected:
                raise ValueError(f"{path.name} has {path.stat().st_size} bytes, not {expected}")
            want = meta.get("sha256", {}).get(s)
            if want is not None and sha256_file(path) != want:
                raise ValueError(f"{path.name} does not match its checksum")
            splits[s] = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(n,))
            top = int(splits[s].max())
            if top >= vocab:
                raise ValueError(
                    f"{path.name} holds token id {top}, outside the tokenizer's {vocab} tokens"
                )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"token cache {directory} is damaged ({exc}); delete it and rerun") from exc
    return TokenShards(splits, directory, vocab)


def _tokenize_split(
    corpus: Corpus, split: str, tok, dtype: np.dtype, path: Path
) -> tuple[int, str]:
    """Write ``split``'s token ids to ``path``; (how many, the sha256 of the bytes written)."""
    end = eot_id(tok)
    n = 0
    digest = hashlib.sha256()
    batch: list[Piece] = []
    batch_chars = 0

    def flush(fh) -> int:
        encodings = tok.encode_batch([t for t, _ in batch], add_special_tokens=False)
        count = 0
        for (_, ends_doc), enc in zip(batch, encodings):
            ids = enc.ids + ([end] if ends_doc and end is not None else [])
            data = np.asarray(ids, dtype=dtype).tobytes()
            digest.update(data)
            fh.write(data)
            count += len(ids)
        batch.clear()
        return count

    with open(path, "wb") as fh:
        for piece in corpus.pieces(split):
            batch.append(piece)
            batch_chars += len(piece[0])
            if batch_chars >= 8 * _PIECE_CHARS:
                n += flush(fh)
                batch_chars = 0
        if batch:
            n += flush(fh)
    return n, digest.hexdigest()


def prepare_data(
    spec: str,
    *,
    tokenizer: Any = None,
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], Any] | None = None,
) -> tuple[Corpus, Any, TokenShards]:
    """Corpus, tokenizer and token shards for ``spec``: the one call the training loop makes.

    ``tokenizer`` is a ``tokenizer.json`` path or a loaded ``tokenizers.Tokenizer``; when None, a
    BPE of ``vocab_size`` tokens is trained on the training split (once; then read from cache).

    >>> import tempfile
    >>> corpus, tok, shards = prepare_data("stdlib:json", vocab_size=512, cache_dir=tempfile.mkdtemp())
    >>> shards.vocab_size, len(shards["train"]) > 10_000
    (512, True)
    """
    corpus = open_corpus(spec)
    if tokenizer is None:
        tok = cached_tokenizer(corpus, vocab_size, cache_dir, log)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tok = load_tokenizer(tokenizer)
    else:
        tok = tokenizer
    shards = tokenize_corpus(corpus, tok, cache_dir, log)
    for split in ("train", "valid"):
        if len(shards[split]) == 0:
            raise DataError(f"{corpus.description}: the {split} split has no text")
    return corpus, tok, shards


# ----------------------------------------------------------------------------- batches


class PackedBatches:
    """Endless batches of ``seq_len`` next-token pairs cut from one token stream.

    The stream is cut into ``(len - 1) // seq_len`` windows; window ``i`` gives inputs
    ``tokens[i*L : i*L+L]`` and targets ``tokens[i*L+1 : i*L+L+1]``, so every token but the first is
    a target once per epoch. Each epoch visits the windows in a fresh order drawn from
    ``(seed, epoch)``, so the whole sequence of batches is fixed by the seed and ``position`` (the
    number of windows handed out) is the only state a checkpoint needs.

    >>> import numpy as np
    >>> b = PackedBatches(np.arange(101), seq_len=10, batch_size=4, seed=0)
    >>> x, y = b.next_batch()
    >>> x.shape, bool((y == x + 1).all()), b.position
    (torch.Size([4, 10]), True, 4)
    """

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, position: int = 0
    ):
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"the training split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        self.position = position
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _window(self, p: int) -> int:
        epoch, i = divmod(p, self.n_windows)
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return int(self._order[i])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.seq_len
        rows = []
        for p in range(self.position, self.position + self.batch_size):
            start = self._window(p) * L
            rows.append(self.tokens[start : start + L + 1])
        self.position += self.batch_size
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "n_windows": self.n_windows, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n_windows"] != self.n_windows or state["seq_len"] != self.seq_len:
            raise DataError(
                f"data position is for {state['n_windows']} windows of {state['seq_len']} tokens, "
                f"this run has {self.n_windows} of {self.seq_len}"
            )
        self.position = int(state["position"])


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows over the first ``limit`` tokens (all when None), last one possibly short.

    Every token after the first is a target exactly once.

    >>> import numpy as np
    >>> [tuple(x.shape) for x, _ in eval_batches(np.arange(26), seq_len=10, batch_size=2)]
    [(2, 10), (1, 5)]
    """
    n = len(tokens) if limit is None else min(limit, len(tokens))
    full = (n - 1) // seq_len
    for start in range(0, full, batch_size):
        stop = min(start + batch_size, full)
        chunk = np.asarray(tokens[start * seq_len : stop * seq_len + 1]).astype(np.int64)
        x = torch.from_numpy(chunk[:-1].reshape(stop - start, seq_len))
        y = torch.from_numpy(chunk[1:].reshape(stop - start, seq_len))
        yield x, y
    rest = n - 1 - full * seq_len
    if rest > 0:
        chunk = torch.from_numpy(np.asarray(tokens[full * seq_len : n]).astype(np.int64))
        yield chunk[None, :-1], chunk[None, 1:]


def _main() -> None:  # pragma: no cover - a manual check: python -m slimopt.train.data SPEC
    corpus, tok, shards = prepare_data(sys.argv[1], log=print)
    print({s: len(v) for s, v in shards.splits.items()}, shards.directory)


if __name__ == "__main__":  # pragma: no cover
    _main()
