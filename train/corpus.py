"""Documents: the corpus a run trains on, and its split into train and held-out.

    from train.corpus import load_documents, iter_texts, is_heldout

    docs = load_documents(cfg.data)       # datasets.Dataset (or IterableDataset), column "text"
    for batch in iter_texts(docs):        # lists of non-empty strings, in corpus order
        train = [t for t in batch if not is_heldout(t, cfg.data.heldout_fraction)]

`data.source` picks the corpus:

- `stdlib` (default): the Python standard library's own `.py` files, found under
  `sysconfig.get_paths()["stdlib"]`; one file is one document. It exists on every machine
  with Python and needs no download. `site-packages` and the stdlib's test suites are left
  out, files come in sorted path order, and `data.max_documents` keeps the first ones.
- `files`: local files matched by the globs in `data.files`, loaded with `datasets`' own
  loaders: `.txt` (one file is one document), `.json`/`.jsonl` and `.parquet` (one row is
  one document, its text in `data.text_field`); compressed variants (`.jsonl.gz`, ...) too.
- `hub`: any Hub dataset, `load_dataset(data.dataset, data.dataset_config,
  split=data.split, streaming=data.streaming)`.

A document is held out iff the sha256 of its UTF-8 text, read as a fraction of 2⁶⁴, is
below `data.heldout_fraction` (`is_heldout`). The split depends on a document's content
alone, so it is the same on every machine, whatever the order of the corpus, and a
document duplicated in the corpus lands on the same side every time.

Every document also has a *topic* (column "topic"), the key by which `data.expert_affinity`
partitions the corpus among expert groups (`train.pages.topic_groups`): for `stdlib` the
top-level package or module a file belongs to (`asyncio`, `email`, `json`, ...); for
`files` and `hub` the column `data.topic_field` names (a source, a URL's site, a label),
or, without one, none: each document is then a topic of its own (`iter_documents` yields
its topic as None; a `.txt` file, one document, has none either).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from common.errors import TensormineError
from train.config import DataConfig

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

TEXT = "text"
"""The documents' column in the dataset that `load_documents` returns."""
TOPIC = "topic"
"""Each document's topic (a string), when the corpus has one: see the module's docstring."""

# `datasets` (pandas, pyarrow: ~0.8 s) is imported where documents are read, not at start-up:
# a miner or validator with its pages cached never needs it.
Documents: TypeAlias = "datasets.Dataset | datasets.IterableDataset"

# Test suites are a third of the stdlib and mostly fixtures; the rest reads like real code.
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})

_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_COMPRESSED = frozenset({".gz", ".bz2", ".xz", ".zst", ".lz4"})


class DataError(TensormineError, ValueError):
    """The data settings cannot give a corpus, a tokenizer or pages; the message says which."""


def heldout_score(text: str) -> float:
    """The document's place in [0, 1): the first 8 bytes of sha256(UTF-8 text) / 2⁶⁴."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(text: str, fraction: float) -> bool:
    """True iff the document belongs to the held-out split (a function of its content only)."""
    return heldout_score(text) < fraction


def stdlib_files(max_documents: int | None = None) -> list[Path]:
    """The stdlib's `.py` files in sorted order, without site-packages and test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    # Pruning while walking matters: site-packages can hold more files than the stdlib.
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _STDLIB_SKIP]
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    files = sorted(path for path in files if path.is_file())
    if not files:
        raise DataError(f"data.source = stdlib: no .py files under {root}")
    return files[:max_documents]


def match_files(patterns: list[str]) -> list[Path]:
    """Every file the globs in `data.files` match, resolved, deduplicated, sorted."""
    found: set[Path] = set()
    for pattern in patterns:
        # Path.glob takes no absolute patterns; glob.glob takes both kinds.
        expanded = str(Path(pattern).expanduser())
        matched = [Path(p) for p in glob.glob(expanded, recursive=True)]  # noqa: PTH207
        matched = [p for p in matched if p.is_file()]
        if not matched:
            raise DataError(f"data.files pattern {pattern!r} matches no file")
        found.update(p.resolve() for p in matched)
    return sorted(found)


def _builder(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    if ext not in _BUILDERS:
        raise DataError(
            f"data.files: {path} is not one of {', '.join(sorted(_BUILDERS))} "
            "(optionally compressed)"
        )
    return _BUILDERS[ext]


def corpus_identity(cfg: DataConfig) -> dict[str, Any]:
    """What names this corpus in cache keys (JSON-able), without tokenizing anything.

    stdlib: the Python version and a sha256 over the selected files' paths and contents, so
    two machines with the same stdlib agree. files: each file's path, size and mtime (the
    same rule as `datasets`' own cache; cheap for big corpora). hub: the dataset's name,
    config and split (a Hub dataset is not read to name it).
    """
    identity: dict[str, Any] = {"source": cfg.source}
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        digest = hashlib.sha256()
        for path in stdlib_files(cfg.max_documents):
            name = path.relative_to(root).as_posix().encode()
            digest.update(len(name).to_bytes(8, "big") + name)
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        identity |= {
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "content": digest.hexdigest(),
        }
    elif cfg.source == "files":
        files = []
        for path in match_files(cfg.files):
            stat = path.stat()
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
        identity |= {
            "files": files,
            "text_field": cfg.text_field,
            "topic_field": cfg.topic_field,
            "streaming": cfg.streaming,
        }
    else:
        identity |= {
            "dataset": cfg.dataset,
            "config": cfg.dataset_config,
            "split": cfg.split,
            "text_field": cfg.text_field,
            "topic_field": cfg.topic_field,
            "streaming": cfg.streaming,
        }
    return identity


def _text_column(ds: Documents, field: str, where: str, topic_field: str | None) -> Documents:
    """`ds` with only its text column, named `TEXT`, typed as a plain string, and its
    `topic_field` column as `TOPIC` when one is named."""
    import datasets

    columns = ds.column_names
    wanted = [field] if topic_field is None else [field, topic_field]
    for name, setting in zip(wanted, ("data.text_field", "data.topic_field"), strict=False):
        if columns is not None and name not in columns:
            raise DataError(f"{setting} {name!r} is not a column of {where} (columns: {columns})")
    if topic_field == field:
        raise DataError(f"data.topic_field {topic_field!r} is the text itself: name another column")
    ds = ds.select_columns(wanted)
    renames = {f: c for f, c in ((field, TEXT), (topic_field, TOPIC)) if f is not None and f != c}
    if renames:
        ds = ds.rename_columns(renames)
    features = ds.features
    # Parquet files may hold large_string; concatenating sources needs one string type. A
    # topic may be a label or a number: as a string, every source agrees on its hash.
    for column in (TEXT, TOPIC) if topic_field is not None else (TEXT,):
        if features is not None and features[column] != datasets.Value("string"):
            ds = ds.cast_column(column, datasets.Value("string"))
    return ds


def _features(ds: Documents) -> Any:
    """The features of `ds` with a string `TOPIC` column added."""
    import datasets

    features = ds.features.copy() if ds.features is not None else datasets.Features()
    features[TOPIC] = datasets.Value("string")
    return features


def stdlib_topic(path: Path) -> str:
    """A stdlib file's topic: its top-level package, or its module for a lone file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def _stdlib_documents(cfg: DataConfig) -> Documents:
    import datasets

    files = stdlib_files(cfg.max_documents)
    # Decoding with "replace" keeps the odd non-UTF-8 file deterministic instead of fatal.
    texts = [path.read_bytes().decode("utf-8", "replace") for path in files]
    logger.info("stdlib corpus: %d files, %.1f MB", len(texts), sum(map(len, texts)) / 1e6)
    return datasets.Dataset.from_dict({TEXT: texts, TOPIC: [stdlib_topic(p) for p in files]})


def _file_documents(cfg: DataConfig) -> Documents:
    import datasets

    groups: dict[str, list[str]] = {}
    for path in match_files(cfg.files):
        groups.setdefault(_builder(path), []).append(str(path))
    parts = []
    for builder in sorted(groups):  # a fixed order of builders, files sorted within each
        options: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(
            builder,
            data_files=groups[builder],
            split="train",
            streaming=cfg.streaming,
            **options,
        )
        where = f"the {builder} files {groups[builder]}"
        if builder != "text":
            parts.append(_text_column(ds, cfg.text_field, where, cfg.topic_field))
            continue
        ds = _text_column(ds, TEXT, where, None)
        if cfg.topic_field is not None:
            # A text file has no columns to name a topic: each one is a topic of its own
            # (None), beside json or parquet rows that have one.
            ds = ds.map(lambda _: {TOPIC: None}, features=_features(ds))
        parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _hub_documents(cfg: DataConfig) -> Documents:
    import datasets

    where = f"data.dataset {cfg.dataset!r} (config {cfg.dataset_config!r}, split {cfg.split!r})"
    try:
        ds = datasets.load_dataset(
            cfg.dataset, cfg.dataset_config, split=cfg.split, streaming=cfg.streaming
        )
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise DataError(f"{where} could not be loaded: {err}") from err
    return _text_column(ds, cfg.text_field, where, cfg.topic_field)


def load_documents(cfg: DataConfig) -> Documents:
    """The corpus as a `datasets` dataset with one string column `TEXT`, in a fixed order.

    An `IterableDataset` when `data.streaming` (files or hub), else a `Dataset`; at most
    `data.max_documents` documents. Raises `DataError` for an empty corpus, a glob that
    matches nothing or a missing text field.
    """
    import datasets

    if cfg.source == "stdlib":
        ds = _stdlib_documents(cfg)
    elif cfg.source == "files":
        ds = _file_documents(cfg)
    else:
        ds = _hub_documents(cfg)
    if cfg.max_documents is not None:
        if isinstance(ds, datasets.IterableDataset):
            ds = ds.take(cfg.max_documents)
        elif len(ds) > cfg.max_documents:
            ds = ds.select(range(cfg.max_documents))
    if isinstance(ds, datasets.Dataset) and len(ds) == 0:
        raise DataError(f"data.source = {cfg.source}: the corpus has no documents")
    return ds


def iter_texts(documents: Documents, batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of the documents' texts in corpus order, empty and null ones left out."""
    for batch in iter_documents(documents, batch_size):
        yield [text for text, _ in batch]


def iter_documents(
    documents: Documents, batch_size: int = 1000
) -> Iterator[list[tuple[str, str | None]]]:
    """Batches of (text, topic) in corpus order, empty and null texts left out; the topic
    is None where the corpus has none (the document is then a topic of its own)."""
    for batch in documents.iter(batch_size=batch_size):
        if TEXT not in batch:
            raise DataError(f"the documents have no {TEXT!r} column (columns: {list(batch)})")
        topics = batch.get(TOPIC) or [None] * len(batch[TEXT])
        docs: list[tuple[str, str | None]] = []
        for text, topic in zip(batch[TEXT], topics, strict=True):
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise DataError(f"data.text_field holds {type(text).__name__}, not text")
            docs.append((text, None if topic is None else str(topic)))
        if docs:
            yield docs
