"""The byte-level BPE: determinism across processes, save/reload, exact round trips, errors."""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from train.config import DataConfig
from train.corpus import is_heldout
from train.data import DataError
from train.tokenizer import (
    MIN_VOCAB,
    load_tokenizer,
    tokenizer_digest,
    train_tokenizer,
    training_texts,
)

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["def", "return", "self", "value", "page", "miner", "window", "λ", "données", "🙂", "\t"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "\n"
        for i in range(n)
    ]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_training_is_deterministic_and_saves_identically(tmp_path: Path) -> None:
    docs = make_docs(200)
    train_tokenizer(docs, 400).save_pretrained(tmp_path / "a")
    train_tokenizer(iter(docs), 400).save_pretrained(tmp_path / "b")
    a = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert a == (tmp_path / "b" / "tokenizer.json").read_bytes()
    # Another process (another hash seed for the Rust trainer's maps) gives the same bytes.
    code = (
        "import sys, random; sys.path.insert(0, 'tests/train');"
        "from test_tokenizer import make_docs; from train.tokenizer import train_tokenizer;"
        f"train_tokenizer(make_docs(200), 400).save_pretrained({str(tmp_path / 'c')!r})"
    )
    env = {**os.environ, "PYTHONHASHSEED": "999"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)
    assert a == (tmp_path / "c" / "tokenizer.json").read_bytes()


def test_special_tokens_and_size() -> None:
    tok = train_tokenizer(make_docs(200), 400)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert MIN_VOCAB < len(tok) <= 400
    assert tok("<|eos|>", add_special_tokens=False)["input_ids"] == [1]
    # A tiny corpus runs out of merges before the vocabulary is full: fewer entries, no error.
    assert MIN_VOCAB <= len(train_tokenizer(["ab"], 4096)) < 300


def test_reload_from_folder_gives_identical_ids(tmp_path: Path) -> None:
    tok = train_tokenizer(make_docs(200), 400)
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "".join(make_docs(20, seed=5)) + "unseen: 中文 ∑ \x00 ~~~"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.eos_token_id == tok.eos_token_id
    assert tokenizer_digest(again) == tokenizer_digest(tok)


@functools.cache
def small_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(make_docs(100), 320)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips(text: str) -> None:
    """Byte-level: every string encodes and decodes back exactly, seen in training or not."""
    tok = small_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids, default=0) < len(tok)
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == text


def test_vocab_too_small(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"model\.vocab_size 258 .* at least 259"):
        train_tokenizer(make_docs(10), 258)
    cfg = DataConfig(max_documents=5)
    with pytest.raises(DataError, match=r"model\.vocab_size"):
        load_tokenizer(cfg, 100, tmp_path)


def test_training_texts_are_the_train_split_up_to_the_cap(tmp_path: Path) -> None:
    docs = make_docs(300)
    cfg = DataConfig(
        source="files", files=[str(write_jsonl(tmp_path / "d.jsonl", docs))], heldout_fraction=0.3
    )
    expected = [d for d in docs if not is_heldout(d, 0.3)]
    assert 0 < len(expected) < len(docs)
    assert list(training_texts(cfg)) == expected
    capped = list(training_texts(cfg, max_chars=1000))
    # Documents are taken whole until the cap is reached.
    assert capped == expected[: len(capped)]
    assert sum(map(len, capped[:-1])) < 1000 <= sum(map(len, capped))


def test_load_tokenizer_trains_once_and_caches(tmp_path: Path) -> None:
    docs = make_docs(300)
    cfg = DataConfig(source="files", files=[str(write_jsonl(tmp_path / "d.jsonl", docs))])
    cache = tmp_path / "cache"
    first = load_tokenizer(cfg, 400, cache)
    (folder,) = cache.glob("tokenizer-*")
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    second = load_tokenizer(cfg, 400, cache)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp
    assert tokenizer_digest(first) == tokenizer_digest(second)
    expected = train_tokenizer([d for d in docs if not is_heldout(d, 0.05)], 400)
    assert tokenizer_digest(first) == tokenizer_digest(expected)
    load_tokenizer(cfg, 500, cache)
    assert len(list(cache.glob("tokenizer-*"))) == 2
    assert not list(cache.glob(".tmp-*"))


def test_named_tokenizer_is_loaded_and_checked(tmp_path: Path) -> None:
    """`data.tokenizer` goes through AutoTokenizer (a local folder stands in for a Hub id)."""
    train_tokenizer(make_docs(200), 400).save_pretrained(tmp_path / "tok")
    cfg = DataConfig(tokenizer=str(tmp_path / "tok"))
    tok = load_tokenizer(cfg, 4096, tmp_path / "cache")
    assert tok.eos_token_id == 1 and not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match=r"raise model\.vocab_size"):
        load_tokenizer(cfg, 300, tmp_path / "cache")
