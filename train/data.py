"""Pages: the run's documents tokenized into fixed-length rows, train and held-out, cached.

    from train.data import load_pages
    from train.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size, cache_dir)
    pages = load_pages(cfg.data, tokenizer, cache_dir, min_train_pages=cfg.train.batch_size)
    pages.train      # int32 [n_train_pages, data.seq_len]
    pages.heldout    # int32 [n_heldout_pages, data.seq_len]
    pages.fingerprint, pages.digest   # cache key; sha256 of the page arrays

How pages are made: every document (see `train.corpus`) goes to the train or the held-out
split by the hash of its content; each split's documents are tokenized in corpus order
without special tokens, each followed by EOS, concatenated, and cut into rows of
`data.seq_len` tokens; the last partial row is dropped. Which rows a miner trains on in a
window is `train.pages`' business.

`data.max_pages` caps the train pages: documents are read only until the train split has
that many, and the held-out split keeps the pages of the documents read by then. A
streaming corpus needs it, since its pages are materialized into the cache.

The cache: `cache_dir/pages-<fingerprint[:16]>/` holds `train.npy`, `heldout.npy` (plain
int32, loaded with `allow_pickle=False`) and `meta.json`. The fingerprint is a sha256 over
the corpus identity (`train.corpus.corpus_identity`), the tokenizer's digest, `seq_len`,
`heldout_fraction`, `max_documents` and `max_pages`; change any of them and the pages are
rebuilt in a new folder. The folder is written under a temporary name and renamed into
place, so miners that share a cache directory never read half a cache: when two build at
once, the first rename wins and the other loads the winner's (identical) pages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from train.buildlock import build_lock
from train.config import DataConfig, ModelConfig
from train.corpus import DataError, corpus_identity, is_heldout, iter_documents, load_documents
from train.pages import Affinity, topic_groups
from train.tokenizer import tokenizer_digest

__all__ = [
    "DataError",
    "Pages",
    "build_pages",
    "load_pages",
    "pages_digest",
    "pages_fingerprint",
    "shard_affinities",
    "topic_id",
]

logger = logging.getLogger(__name__)

_FORMAT = "tensormine/pages/v2"  # v2: each train page's topic (train_topics.npy)
_SPLITS = ("train", "heldout")


@dataclass(frozen=True, eq=False)
class Pages:
    """The train and held-out pages of a run; rows are token ids, int32."""

    train: np.ndarray
    heldout: np.ndarray
    seq_len: int
    fingerprint: str
    """sha256 hex of the inputs (corpus, tokenizer, settings): the cache key."""
    digest: str
    """sha256 hex of the page arrays themselves: equal on two machines ⇔ same pages."""
    folder: Path | None = None
    topics: np.ndarray | None = None
    """Each train page's topic id (uint64, `topic_id` of the topic of the document the
    page starts in): what `train.pages.topic_groups` partitions for expert affinity."""

    def groups(self, count: int) -> np.ndarray:
        """The train pages' partition into `count` groups by topic (`topic_groups`)."""
        if self.topics is None:
            raise DataError("these pages carry no topics (built without them): rebuild them")
        cached = self._groups.get(count)
        if cached is None:
            cached = self._groups[count] = topic_groups(self.topics, count)
        return cached

    _groups: dict[int, np.ndarray] = field(default_factory=dict, repr=False)


def pages_fingerprint(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """The cache key of the pages that `cfg` and `tokenizer` give (sha256 hex)."""
    key = {
        "format": _FORMAT,
        "corpus": corpus_identity(cfg),
        "tokenizer": tokenizer_digest(tokenizer),
        "seq_len": cfg.seq_len,
        "heldout_fraction": cfg.heldout_fraction,
        "max_documents": cfg.max_documents,
        "max_pages": cfg.max_pages,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def pages_digest(train: np.ndarray, heldout: np.ndarray, topics: np.ndarray | None = None) -> str:
    """sha256 over both splits' shapes and little-endian int32 bytes, and the train pages'
    topics (little-endian uint64) when given: equal digests, equal partitions."""
    digest = hashlib.sha256()
    for name, array in zip(_SPLITS, (train, heldout), strict=True):
        digest.update(f"{name}{list(array.shape)}".encode())
        digest.update(np.ascontiguousarray(array, dtype="<i4").tobytes())
    if topics is not None:
        digest.update(f"topics{list(topics.shape)}".encode())
        digest.update(np.ascontiguousarray(topics, dtype="<u8").tobytes())
    return digest.hexdigest()


def topic_id(topic: str) -> int:
    """A topic's id: the first 8 bytes of sha256 over a domain tag and its UTF-8 text."""
    raw = hashlib.sha256(b"tensormine/topic/v1\0" + topic.encode("utf-8")).digest()
    return int.from_bytes(raw[:8], "big")


def _encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], list[list[int]]]:
    """Batch encoding without special tokens, on the Rust tokenizer directly when it can."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The backend would apply truncation or padding saved in tokenizer.json; the HF call
    # turns them off per call, so only a backend without them is safe to use directly.
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
    ):

        def fast(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

        return fast

    def slow(texts: list[str]) -> list[list[int]]:
        ids: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return ids

    return slow


class _Split:
    """One split's token stream, kept as int32 chunks until cut into pages, with where
    each document starts in it and its topic id."""

    def __init__(self, seq_len: int, eos: int) -> None:
        self.seq_len, self.eos = seq_len, eos
        self.chunks: list[np.ndarray] = []
        self.starts: list[int] = []
        self.topics: list[int] = []
        self.tokens = 0
        self.documents = 0

    def add(self, encoded: list[list[int]], topics: list[int]) -> None:
        flat: list[int] = []
        for ids, topic in zip(encoded, topics, strict=True):
            self.starts.append(self.tokens + len(flat))
            self.topics.append(topic)
            flat.extend(ids)
            flat.append(self.eos)
        self.chunks.append(np.asarray(flat, dtype=np.int32))
        self.tokens += len(flat)
        self.documents += len(encoded)

    @property
    def n_pages(self) -> int:
        return self.tokens // self.seq_len

    def pages(self, limit: int | None = None) -> np.ndarray:
        n = self.n_pages if limit is None else min(self.n_pages, limit)
        stream = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int32)
        return stream[: n * self.seq_len].reshape(n, self.seq_len)

    def page_topics(self, n: int) -> np.ndarray:
        """The topic of the document each of the first `n` pages starts in (uint64)."""
        first = np.arange(n, dtype=np.int64) * self.seq_len
        doc = np.searchsorted(np.asarray(self.starts, dtype=np.int64), first, side="right") - 1
        return np.asarray(self.topics, dtype=np.uint64)[doc]


def build_pages(
    batches: Iterable[Sequence[str] | Sequence[tuple[str, str | None]]],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    heldout_fraction: float,
    max_pages: int | None = None,
    total_documents: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(train pages, held-out pages, train pages' topic ids, counts) from batches of
    documents; no cache.

    A document is its text, or (text, topic) as `train.corpus.iter_documents` yields it; a
    bare text or a None topic makes the document a topic of its own (`topic_id` of its
    text). Empty documents are skipped (they would add a lone EOS). Holds every token in
    memory (4 bytes each); bound a big corpus with `max_pages`.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token, which pages need between documents")
    encode = _encoder(tokenizer)
    splits = {name: _Split(seq_len, eos) for name in _SPLITS}
    with tqdm(
        total=total_documents, unit="doc", desc="tokenizing", disable=None, mininterval=1.0
    ) as bar:
        for batch in batches:
            docs = [(d, None) if isinstance(d, str) else d for d in batch]
            docs = [(text, topic) for text, topic in docs if text]
            held = [is_heldout(text, heldout_fraction) for text, _ in docs]
            for name in _SPLITS:
                part = [d for d, h in zip(docs, held, strict=True) if h == (name == "heldout")]
                if part:
                    texts = [text for text, _ in part]
                    ids = [topic_id(text if t is None else t) for text, t in part]
                    splits[name].add(encode(texts), ids)
            bar.update(len(batch))
            if max_pages is not None and splits["train"].n_pages >= max_pages:
                break
    counts = {
        f"{name}_{what}": getattr(split, what)
        for name, split in splits.items()
        for what in ("documents", "tokens")
    }
    train = splits["train"].pages(max_pages)
    topics = splits["train"].page_topics(train.shape[0])
    return train, splits["heldout"].pages(), topics, counts


def load_pages(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: Path | str,
    *,
    min_train_pages: int = 1,
    mmap: bool = False,
) -> Pages:
    """The run's pages: from `cache_dir` when they are there, else built and cached.

    `min_train_pages` (e.g. `train.batch_size`) and one held-out page are the least the
    corpus must give, else `DataError` says which setting to change. `mmap=True` maps the
    cached arrays read-only instead of reading them into memory (for big corpora).
    """
    if cfg.streaming and cfg.max_pages is None:
        raise DataError("data.streaming needs data.max_pages: the cache holds a finite corpus")
    fingerprint = pages_fingerprint(cfg, tokenizer)
    folder = Path(cache_dir) / f"pages-{fingerprint[:16]}"
    if not (folder / "meta.json").is_file():
        with build_lock(folder):
            if not (folder / "meta.json").is_file():
                _build_into(folder, cfg, tokenizer, fingerprint)
    pages = _read(folder, fingerprint, cfg.seq_len, mmap)
    _require_enough(pages, cfg, min_train_pages)
    return pages


def _build_into(
    folder: Path, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, fingerprint: str
) -> None:
    started = time.perf_counter()
    documents = load_documents(cfg)
    import datasets

    total = len(documents) if isinstance(documents, datasets.Dataset) else None
    logger.info(
        "building pages of %d tokens from %s documents (%s)",
        cfg.seq_len,
        total if total is not None else "streamed",
        cfg.source,
    )
    train, heldout, topics, counts = build_pages(
        iter_documents(documents), tokenizer, cfg.seq_len, cfg.heldout_fraction, cfg.max_pages,
        total,
    )  # fmt: skip
    if counts["train_documents"] + counts["heldout_documents"] == 0:
        raise DataError(f"data.source = {cfg.source}: the corpus has no non-empty document")
    seconds = time.perf_counter() - started
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "fingerprint": fingerprint,
        "digest": pages_digest(train, heldout, topics),
        "seq_len": cfg.seq_len,
        "train_pages": int(train.shape[0]),
        "heldout_pages": int(heldout.shape[0]),
        **counts,
    }
    logger.info(
        "built %d train and %d held-out pages (%d + %d tokens, %d + %d documents) in %.1f s",
        train.shape[0],
        heldout.shape[0],
        counts["train_tokens"],
        counts["heldout_tokens"],
        counts["train_documents"],
        counts["heldout_documents"],
        seconds,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        np.save(tmp / "train.npy", train, allow_pickle=False)
        np.save(tmp / "heldout.npy", heldout, allow_pickle=False)
        np.save(tmp / "train_topics.npy", topics, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            logger.info("pages %s were cached by another process first", folder.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(folder: Path, fingerprint: str, seq_len: int, mmap: bool) -> Pages:
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != _FORMAT or meta.get("fingerprint") != fingerprint:
        raise DataError(f"the page cache {folder} belongs to other inputs: delete it")
    mode: Literal["r"] | None = "r" if mmap else None
    train = np.load(folder / "train.npy", mmap_mode=mode, allow_pickle=False)
    heldout = np.load(folder / "heldout.npy", mmap_mode=mode, allow_pickle=False)
    expected = {
        "train": (meta["train_pages"], seq_len),
        "heldout": (meta["heldout_pages"], seq_len),
    }
    for name, array in (("train", train), ("heldout", heldout)):
        if array.dtype != np.int32 or array.shape != expected[name]:
            raise DataError(f"the page cache {folder} is damaged ({name}.npy): delete it")
    topics = np.load(folder / "train_topics.npy", mmap_mode=mode, allow_pickle=False)
    if topics.dtype != np.uint64 or topics.shape != (meta["train_pages"],):
        raise DataError(f"the page cache {folder} is damaged (train_topics.npy): delete it")
    logger.info(
        "loaded %d train and %d held-out pages from %s", train.shape[0], heldout.shape[0], folder
    )
    return Pages(train, heldout, seq_len, fingerprint, meta["digest"], folder, topics)


def _require_enough(pages: Pages, cfg: DataConfig, min_train_pages: int) -> None:
    advice = (
        "use a bigger corpus (data.source/data.files/data.max_documents/data.max_pages) "
        "or a shorter data.seq_len"
    )
    if pages.heldout.shape[0] < 1:
        raise DataError(
            f"the corpus gives no held-out page of data.seq_len = {cfg.seq_len} tokens "
            f"with data.heldout_fraction = {cfg.heldout_fraction}: {advice}"
        )
    if pages.train.shape[0] < min_train_pages:
        raise DataError(
            f"the corpus gives {pages.train.shape[0]} train pages, fewer than the "
            f"{min_train_pages} needed (train.batch_size): {advice}"
        )


def shard_affinities(pages: Pages, model: ModelConfig, data: DataConfig) -> dict[int, Affinity]:
    """The page affinity of each expert shard (`data.expert_affinity`), by shard index.

    Empty when affinity is off or the model has no expert shards. Shard 0, the shared
    parameters, draws its pages from the whole corpus and has none; shard k ≥ 1 (expert
    group k − 1) draws `data.expert_affinity` of its pages from group k − 1 of the
    corpus's partition by topic (`train.pages.topic_groups` into `model.shards − 1`
    groups). Miners and validators call it with the same pages and config, so they agree
    on every assignment. `DataError` when a group gets no page (fewer topics than groups).
    """
    if data.expert_affinity == 0 or not model.expert_shards:
        return {}
    groups = model.shards - 1
    of_page = pages.groups(groups)
    out: dict[int, Affinity] = {}
    for g in range(groups):
        pool = np.flatnonzero(of_page == g).astype(np.int64)
        if pool.size == 0:
            topics = np.unique(np.asarray(pages.topics)).size
            raise DataError(
                f"data.expert_affinity: expert group {g} gets no page, the corpus has "
                f"{topics} topic(s) for {groups} expert groups; use more documents "
                "(data.max_documents) or a data.topic_field with more values"
            )
        out[g + 1] = Affinity(pool, data.expert_affinity)
    return out
