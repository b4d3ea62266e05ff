"""Expert affinity (`data.expert_affinity`): pages carry the topic of their document, the
corpus splits into one partition per expert group by topic, and a miner of an expert group
draws its configured share of pages from its partition, as anyone can recompute."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tensormine.config import load_config
from train.config import DataConfig, ModelConfig
from train.corpus import iter_documents, load_documents, stdlib_files, stdlib_topic
from train.data import DataError, Pages, build_pages, load_pages, shard_affinities, topic_id
from train.pages import Affinity, assigned_pages, topic_groups, unassigned_pages
from train.tokenizer import load_tokenizer


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of a small vocabulary (and [EOS]): token streams by hand."""
    vocab = {"[EOS]": 0, **{f"w{i}": i + 1 for i in range(60)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[EOS]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]")


def doc(n: int, start: int) -> str:
    return " ".join(f"w{(start + i) % 60}" for i in range(n))


# ---- topics of pages ------------------------------------------------------------------


def test_each_page_has_the_topic_of_the_document_it_starts_in() -> None:
    # Documents of 5, 9, 3 and 12 words: with their EOS, tokens [0, 6), [6, 16), [16, 20),
    # [20, 33) of the stream. Pages of 4 tokens start at 0, 4, 8, ..., 28 (8 pages).
    docs = [(doc(5, 0), "a"), (doc(9, 5), None), (doc(3, 14), "c"), (doc(12, 17), "a")]
    train, heldout, topics, counts = build_pages([docs], word_tokenizer(), 4, 1e-9)
    assert heldout.shape[0] == 0 and train.shape == (8, 4) and counts["train_documents"] == 4
    own = topic_id(doc(9, 5))  # no topic: the document is a topic of its own
    a, c = topic_id("a"), topic_id("c")
    assert topics.dtype == np.uint64
    assert topics.tolist() == [a, a, own, own, c, a, a, a]
    # Bare texts are documents without a topic.
    _, _, bare, _ = build_pages([[text for text, _ in docs]], word_tokenizer(), 4, 1e-9)
    assert bare.tolist() == [topic_id(t) for t in [docs[i][0] for i in (0, 0, 1, 1, 2, 3, 3, 3)]]


def test_stdlib_pages_carry_their_package(tmp_path: Path) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    assert stdlib_topic(root / "abc.py") == "abc"
    files = stdlib_files()
    nested = next(p for p in files if p.parent.name == "asyncio")
    assert stdlib_topic(nested) == "asyncio"
    cfg = DataConfig(max_documents=60, seq_len=64, cache_dir=tmp_path)
    pages = load_pages(cfg, load_tokenizer(cfg, 512, tmp_path), tmp_path)
    expected = {topic_id(stdlib_topic(p)) for p in stdlib_files(60)}
    assert pages.topics is not None and pages.topics.shape == (pages.train.shape[0],)
    assert set(pages.topics.tolist()) <= expected and len(set(pages.topics.tolist())) > 4
    # Cached beside the pages, read back equal; a damaged topics file is refused.
    again = load_pages(cfg, load_tokenizer(cfg, 512, tmp_path), tmp_path)
    assert again.topics is not None and np.array_equal(again.topics, pages.topics)
    assert pages.folder is not None
    np.save(pages.folder / "train_topics.npy", pages.topics[:-1].copy(), allow_pickle=False)
    with pytest.raises(DataError, match=r"train_topics\.npy"):
        load_pages(cfg, load_tokenizer(cfg, 512, tmp_path), tmp_path)


def test_files_name_topics_by_a_column(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}", "src": i % 3}) + "\n" for i in range(6))
    )
    pq.write_table(pa.table({"text": ["p0", "p1"], "src": ["x", None]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("a whole file")
    cfg = DataConfig(source="files", files=[str(tmp_path / "*")], topic_field="src")
    docs = [d for batch in iter_documents(load_documents(cfg)) for d in batch]
    assert docs == [
        *[(f"doc {i}", str(i % 3)) for i in range(6)],
        ("p0", "x"), ("p1", None),  # a null topic: the document's own
        ("a whole file", None),  # a text file has no columns
    ]  # fmt: skip
    with pytest.raises(DataError, match=r"data\.topic_field 'nope'"):
        load_documents(cfg.model_copy(update={"topic_field": "nope"}))
    with pytest.raises(DataError, match="is the text itself"):
        load_documents(cfg.model_copy(update={"topic_field": "text"}))


# ---- the partition ----------------------------------------------------------------------


def test_topics_go_whole_to_the_least_loaded_group() -> None:
    # Topic sizes 5, 3, 3, 2, 1 (ids 10..14) into 2 groups, largest first, each to the group
    # with fewer pages, ties to the lower: 10 → 0 (5, 0); 11 → 1 (5, 3); 12 → 1 (5, 6);
    # 13 → 0 (7, 6); 14 → 1 (7, 7).
    sizes = {10: 5, 11: 3, 12: 3, 13: 2, 14: 1}
    topics = np.asarray([t for t, n in sizes.items() for _ in range(n)], dtype=np.uint64)
    order = np.random.default_rng(0).permutation(topics.size)
    groups = topic_groups(topics[order], 2)
    by_topic = {int(t): int(g) for t, g in zip(topics[order], groups, strict=True)}
    assert by_topic == {10: 0, 11: 1, 12: 1, 13: 0, 14: 1}
    assert np.bincount(groups).tolist() == [7, 7]
    # Many topics: groups within one topic's size of each other.
    many = np.random.default_rng(1).integers(0, 300, 5000).astype(np.uint64)
    loads = np.bincount(topic_groups(many, 4), minlength=4)
    assert loads.sum() == 5000 and loads.max() - loads.min() <= np.bincount(many).max()
    with pytest.raises(ValueError, match="at least 1"):
        topic_groups(many, 0)


def test_shard_affinities_follow_the_config(tmp_path: Path) -> None:
    topics = np.asarray([topic_id(str(i % 7)) for i in range(70)], dtype=np.uint64)
    pages = Pages(
        np.zeros((70, 4), np.int32), np.zeros((1, 4), np.int32), 4, "f", "d", None, topics
    )
    moe = ModelConfig(arch="mixtral", num_experts=8, experts_per_token=2, shards=5)
    data = DataConfig(expert_affinity=0.75)
    got = shard_affinities(pages, moe, data)
    assert sorted(got) == [1, 2, 3, 4]  # the shared shard 0 draws from the whole corpus
    pools = [got[k].pool for k in range(1, 5)]
    assert np.array_equal(np.sort(np.concatenate(pools)), np.arange(70))
    assert all(got[k].fraction == 0.75 for k in got)
    assert shard_affinities(pages, moe, DataConfig()) == {}
    assert shard_affinities(pages, moe.model_copy(update={"shards": 1}), data) == {}
    few = Pages(pages.train, pages.heldout, 4, "f", "d", None, topics[:1].repeat(70))
    with pytest.raises(DataError, match="expert group 1 gets no page"):
        shard_affinities(few, moe, data)
    with pytest.raises(DataError, match="no topics"):
        Pages(pages.train, pages.heldout, 4, "f", "d").groups(2)


def test_affinity_needs_an_expert_model() -> None:
    with pytest.raises(ValueError, match=r"needs model\.arch mixtral"):
        load_config("configs/tiny.yaml", ["data.expert_affinity=0.5"])
    cfg = load_config("configs/moe.yaml", ["data.expert_affinity=0.5"])
    assert cfg.data.expert_affinity == 0.5
    with pytest.raises((ValueError, ValidationError)):
        load_config("configs/moe.yaml", ["data.expert_affinity=1.5"])


# ---- assignments --------------------------------------------------------------------------


def test_an_affine_assignment_takes_its_share_from_the_pool() -> None:
    n, count = 1000, 40
    pool = np.arange(0, n, 4, dtype=np.int64)  # 250 pages
    affinity = Affinity(pool, 0.75)
    order = assigned_pages("5Key", 3, 0, n, count, affinity)
    assert order.size == count and np.unique(order).size == count
    assert np.isin(order, pool).sum() == affinity.split(count) == 30
    # Interleaved: the pool's pages are not all at the front.
    assert not np.isin(order[:30], pool).all()
    # Public: the same inputs give the same order; other windows and keys differ.
    assert np.array_equal(order, assigned_pages("5Key", 3, 0, n, count, affinity))
    assert not np.array_equal(order, assigned_pages("5Key", 4, 0, n, count, affinity))
    assert not np.array_equal(order, assigned_pages("5Other", 3, 0, n, count, affinity))
    # All from the pool at fraction 1; without an affinity the plain assignment.
    assert np.isin(assigned_pages("5Key", 3, 0, n, count, Affinity(pool, 1.0)), pool).all()
    plain = assigned_pages("5Key", 3, 0, n, count)
    assert np.isin(plain, pool).sum() < 20  # about a quarter by chance
    # Control pages lie outside the affine assignment.
    control = unassigned_pages(
        "5Key", 3, 0, n, 50, b"salt", assigned_count=count, affinity=affinity
    )
    assert not np.isin(control, order).any() and np.unique(control).size == 50


def test_bad_affinities_are_refused() -> None:
    pool = np.arange(10, dtype=np.int64)
    for fraction in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            Affinity(pool, fraction)
    with pytest.raises(ValueError, match="non-empty"):
        Affinity(np.zeros(0, dtype=np.int64), 0.5)
    with pytest.raises(ValueError, match=r"outside 0\.\.9"):
        assigned_pages("5Key", 1, 0, 10, 4, Affinity(np.arange(5, 12, dtype=np.int64), 0.5))
