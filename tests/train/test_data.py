"""Documents and pages: the held-out split, page arithmetic, sources, the cache, bad input."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from train.config import DataConfig
from train.corpus import heldout_score, is_heldout, iter_texts, load_documents, stdlib_files
from train.data import DataError, Pages, build_pages, load_pages, pages_fingerprint
from train.tokenizer import EOS, load_tokenizer, train_tokenizer

WORDS = ["def", "return", "self", "value", "page", "miner", "window", "λ", "données", "\n"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80)))
        for i in range(n)
    ]


@functools.cache
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(make_docs(300, seed=1), 400)


def decode(pages: np.ndarray) -> str:
    text = tokenizer().decode(pages.ravel().tolist(), clean_up_tokenization_spaces=False)
    assert isinstance(text, str)
    return text


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expected_stream(docs: list[str], fraction: float, heldout: bool) -> list[int]:
    """The split's token stream built the slow, obvious way: one document at a time."""
    tok = tokenizer()
    stream: list[int] = []
    for doc in docs:
        if doc and is_heldout(doc, fraction) == heldout:
            stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return stream


# ---- the held-out split ------------------------------------------------------------------


def test_split_is_by_content_hash() -> None:
    doc = "print('hello')\n"
    digest = hashlib.sha256(doc.encode()).digest()
    assert heldout_score(doc) == int.from_bytes(digest[:8], "big") / 2**64
    assert is_heldout(doc, 0.49) == (heldout_score(doc) < 0.49)


def test_split_is_disjoint_and_stable_under_reordering_and_duplication() -> None:
    docs = make_docs(500)
    held = {d for d in docs if is_heldout(d, 0.2)}
    train = {d for d in docs if not is_heldout(d, 0.2)}
    assert held and train and not held & train and held | train == set(docs)
    shuffled = docs * 2
    random.Random(3).shuffle(shuffled)
    assert {d for d in shuffled if is_heldout(d, 0.2)} == held
    # Pages built from either order hold each split's documents only.
    tok = tokenizer()
    for order in (docs, shuffled):
        train_pages, held_pages, _, _ = build_pages([order], tok, 8, 0.2)
        for pages, side in ((train_pages, train), (held_pages, held)):
            whole = decode(pages).split(EOS)[:-1]
            assert whole and set(whole) <= side


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.45])
def test_heldout_fraction_within_binomial_bound(fraction: float) -> None:
    n = 20_000
    held = sum(is_heldout(f"document number {i}", fraction) for i in range(n))
    sd = math.sqrt(n * fraction * (1 - fraction))
    assert abs(held - n * fraction) < 5 * sd


# ---- pages --------------------------------------------------------------------------------


def test_page_counts_and_contents_match_the_token_streams() -> None:
    docs = make_docs(400)
    docs.insert(7, "")  # empty documents contribute nothing, not even an EOS
    batches = [docs[i : i + 37] for i in range(0, len(docs), 37)]
    train, heldout, _, counts = build_pages(batches, tokenizer(), 24, 0.25)
    for pages, is_held in ((train, False), (heldout, True)):
        stream = expected_stream(docs, 0.25, is_held)
        n = len(stream) // 24
        assert pages.dtype == np.int32 and pages.shape == (n, 24)
        assert pages.ravel().tolist() == stream[: n * 24]
    assert counts["train_tokens"] == len(expected_stream(docs, 0.25, False))
    assert counts["train_documents"] + counts["heldout_documents"] == 400


def test_pages_decode_to_the_documents() -> None:
    docs = make_docs(300)
    train, _, _, _ = build_pages([docs], tokenizer(), 16, 0.1)
    pieces = decode(train).split(EOS)
    train_docs = [d for d in docs if not is_heldout(d, 0.1)]
    # Whole documents in order, then the start of the one the last page cut.
    assert pieces[:-1] == train_docs[: len(pieces) - 1]
    assert train_docs[len(pieces) - 1].startswith(pieces[-1][:-3])  # a cut may split a char


def test_max_pages_caps_train_and_keeps_the_prefix() -> None:
    docs = make_docs(400)
    full, _, _, _ = build_pages([docs[i : i + 10] for i in range(0, 400, 10)], tokenizer(), 16, 0.1)
    capped, held, _, _ = build_pages(
        [docs[i : i + 10] for i in range(0, 400, 10)], tokenizer(), 16, 0.1, max_pages=20
    )
    assert capped.shape == (20, 16) and np.array_equal(capped, full[:20])
    assert held.shape[0] >= 0


# ---- sources ------------------------------------------------------------------------------


def test_stdlib_corpus_end_to_end_and_cached(tmp_path: Path) -> None:
    cfg = DataConfig(max_documents=40, seq_len=64, cache_dir=tmp_path)
    files = stdlib_files(40)
    assert len(files) == 40 and files == sorted(files)
    assert not any("site-packages" in p.parts or "test" in p.parts for p in files)
    tok = load_tokenizer(cfg, 512, tmp_path)
    started = time.perf_counter()
    first = load_pages(cfg, tok, tmp_path)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    second = load_pages(cfg, tok, tmp_path)
    load_s = time.perf_counter() - started
    assert load_s < build_s
    assert np.array_equal(first.train, second.train)
    assert np.array_equal(first.heldout, second.heldout)
    assert first.fingerprint == second.fingerprint and first.digest == second.digest
    assert first.train.shape[1] == 64 and first.heldout.shape[0] >= 1
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    stream = expected_stream_for(texts, tok, cfg.heldout_fraction)
    assert first.train.shape[0] == len(stream) // 64
    assert first.train.ravel().tolist() == stream[: first.train.size]
    (folder,) = tmp_path.glob("pages-*")
    assert folder == first.folder
    for name in ("train.npy", "heldout.npy"):
        assert np.load(folder / name, allow_pickle=False).dtype == np.int32
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fingerprint"] == first.fingerprint and meta["train_pages"] == len(first.train)


def expected_stream_for(texts: list[str], tok: PreTrainedTokenizerBase, frac: float) -> list[int]:
    stream: list[int] = []
    for text in texts:
        if text and not is_heldout(text, frac):
            stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return stream


@pytest.fixture
def mixed_files(tmp_path: Path) -> tuple[Path, list[str]]:
    """A folder with .txt (a file = a document), .jsonl and .parquet (a row = a document)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = make_docs(90)
    (root / "sub" / "a.txt").write_text(docs[0] + "\n\nsecond paragraph\n")
    (root / "b.txt").write_text(docs[1])
    write_jsonl(root / "c.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs[2:50])])
    table = pa.table({"text": docs[50:], "score": list(range(40))})
    pq.write_table(table, root / "d.parquet")
    # Builders in name order (json, parquet, text), files sorted within each.
    expected = [*docs[2:50], *docs[50:], docs[1], docs[0] + "\n\nsecond paragraph\n"]
    return root, expected


def test_files_source_reads_txt_jsonl_parquet(mixed_files: tuple[Path, list[str]]) -> None:
    root, expected = mixed_files
    cfg = DataConfig(source="files", files=[str(root / "**" / "*.txt"), str(root / "*.*")])
    texts = [t for batch in iter_texts(load_documents(cfg), batch_size=7) for t in batch]
    assert texts == expected
    cfg = cfg.model_copy(update={"max_documents": 10})
    assert [t for b in iter_texts(load_documents(cfg)) for t in b] == expected[:10]


def test_streaming_files_give_the_same_pages(
    mixed_files: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, _ = mixed_files
    files = [str(root / "**" / "*.*")]
    plain = DataConfig(source="files", files=files, seq_len=16, heldout_fraction=0.2)
    streamed = plain.model_copy(update={"streaming": True, "max_pages": 30})
    full = load_pages(plain, tokenizer(), tmp_path / "a")
    capped = load_pages(streamed, tokenizer(), tmp_path / "b")
    assert np.array_equal(capped.train, full.train[:30])
    assert capped.fingerprint != full.fingerprint
    with pytest.raises(DataError, match=r"data\.streaming needs data\.max_pages"):
        load_pages(streamed.model_copy(update={"max_pages": None}), tokenizer(), tmp_path)


def test_hub_source_with_a_local_dataset_folder(tmp_path: Path) -> None:
    """`source: hub` calls load_dataset(name, ...); a local folder is a valid name offline."""
    docs = make_docs(50)
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"content": d} for d in docs])
    for streaming in (False, True):
        cfg = DataConfig(
            source="hub", dataset=str(tmp_path / "ds"), text_field="content", streaming=streaming
        )
        assert [t for b in iter_texts(load_documents(cfg)) for t in b] == docs
    with pytest.raises(DataError, match=r"data\.text_field 'text' is not a column"):
        load_documents(DataConfig(source="hub", dataset=str(tmp_path / "ds")))
    with pytest.raises(DataError, match=r"data\.dataset .* could not be loaded"):
        load_documents(DataConfig(source="hub", dataset=str(tmp_path / "ds"), split="nope"))


# ---- the cache ----------------------------------------------------------------------------


def test_changed_inputs_rebuild(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(200)])
    cfg = DataConfig(source="files", files=[str(path)], seq_len=16)
    base = load_pages(cfg, tokenizer(), tmp_path / "cache")
    longer = load_pages(cfg.model_copy(update={"seq_len": 32}), tokenizer(), tmp_path / "cache")
    assert longer.fingerprint != base.fingerprint and longer.train.shape[1] == 32
    # Same tokens, longer rows: the 32-token pages are the 16-token ones two by two.
    n = longer.train.shape[0]
    assert np.array_equal(longer.train.ravel(), base.train.ravel()[: n * 32])
    other = cfg.model_copy(update={"heldout_fraction": 0.3})
    assert pages_fingerprint(other, tokenizer()) != base.fingerprint
    other_tok = train_tokenizer(make_docs(300, seed=9), 300)
    assert pages_fingerprint(cfg, other_tok) != base.fingerprint
    # Editing the corpus changes its identity (size and mtime) and so the pages.
    write_jsonl(path, [{"text": d} for d in make_docs(150)])
    assert pages_fingerprint(cfg, tokenizer()) != base.fingerprint
    assert len(list((tmp_path / "cache").glob("pages-*"))) == 2


def test_concurrent_builders_share_one_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="train.data")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(300)])
    cfg = DataConfig(source="files", files=[str(path)], seq_len=16)
    results: list[Pages] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(load_pages(cfg, tokenizer(), tmp_path / "cache"))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert len({r.digest for r in results}) == 1
    cached = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert cached == [results[0].folder.name]  # type: ignore[union-attr]
    # One of the four built the pages while the others waited on the lock.
    assert sum("building pages" in r.getMessage() for r in caplog.records) == 1


def test_mmap_is_read_only(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(200)])
    cfg = DataConfig(source="files", files=[str(path)], seq_len=16)
    pages = load_pages(cfg, tokenizer(), tmp_path, mmap=True)
    assert isinstance(pages.train, np.memmap) and not pages.train.flags.writeable


# ---- bad input ----------------------------------------------------------------------------


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.files pattern .* matches no file"):
        load_documents(DataConfig(source="files", files=[str(tmp_path / "*.jsonl")]))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"data\.files: .*x\.csv is not one of"):
        load_documents(DataConfig(source="files", files=[str(tmp_path / "x.csv")]))
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(DataError, match="no non-empty document"):
        load_pages(DataConfig(source="files", files=[str(blank)]), tokenizer(), tmp_path)
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=r"data\.text_field 'text' is not a column"):
        load_documents(DataConfig(source="files", files=[str(other)]))
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": d} for d in make_docs(60)])
    cfg = DataConfig(source="files", files=[str(small)], seq_len=16, heldout_fraction=0.1)
    with pytest.raises(DataError, match=r"train\.batch_size"):
        load_pages(cfg, tokenizer(), tmp_path, min_train_pages=10_000)
    assert not is_heldout("a few words only", 0.05)
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "a few words only"}] * 3)
    cfg = DataConfig(source="files", files=[str(tiny)], seq_len=16)
    with pytest.raises(DataError, match=r"no held-out page of data\.seq_len = 16"):
        load_pages(cfg, tokenizer(), tmp_path)
