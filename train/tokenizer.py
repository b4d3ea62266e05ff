"""The run's tokenizer: a byte-level BPE trained on the run's own corpus, or a Hub tokenizer.

    from train.tokenizer import load_tokenizer, tokenizer_digest

    tok = load_tokenizer(cfg.data, cfg.model.vocab_size, cache_dir)
    tok.save_pretrained(folder)        # stored with every checkpoint
    AutoTokenizer.from_pretrained(folder)   # gives the same ids; same tokenizer_digest

With `data.tokenizer` set, that name is loaded with `AutoTokenizer.from_pretrained` (a
real run's path; it needs the Hub or its cache). Otherwise a byte-level BPE is trained
with the `tokenizers` library on the first `TRAIN_CHARS` characters of the corpus's train
split (held-out documents never shape the vocabulary), with `model.vocab_size` entries
at most: the 256 byte symbols, `<|bos|>` `<|eos|>` `<|pad|>` (ids 0, 1, 2) and merges.
Training is deterministic: the same corpus and vocabulary size give a byte-identical
`tokenizer.json` in any process (checked by the tests). The trained tokenizer is kept in
`cache_dir/tokenizer-<key>/`, written to a temporary folder and renamed into place, so
several processes may call `load_tokenizer` at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from train.buildlock import build_lock
from train.config import DataConfig
from train.corpus import DataError, corpus_identity, is_heldout, iter_texts, load_documents

logger = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
# 4 M characters train a 4k vocabulary in about a second and give within 2 % of the
# tokens per character of the whole 12 MB stdlib; more text mostly costs time.
TRAIN_CHARS = 4_000_000
_FORMAT = "tensormine/tokenizer/v1"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with at most `vocab_size` entries trained on `texts`, deterministically.

    Every byte has a symbol, so any text encodes and decodes back exactly. Raises
    `DataError` if `vocab_size` cannot hold the bytes and the special tokens, or if `texts`
    is empty.
    """
    _require_vocab(vocab_size)
    seen = {"docs": 0}

    def counted() -> Iterator[str]:
        for text in texts:
            seen["docs"] += 1
            yield text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(counted(), trainer)
    if seen["docs"] == 0:
        raise DataError("no training text for the tokenizer: the corpus's train split is empty")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def _require_vocab(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"model.vocab_size {vocab_size} is too small for a byte-level BPE: it needs "
            f"at least {MIN_VOCAB} (256 bytes + {', '.join(SPECIAL_TOKENS)})"
        )


def training_texts(cfg: DataConfig, max_chars: int = TRAIN_CHARS) -> Iterator[str]:
    """The train split's documents in corpus order, until `max_chars` characters are out."""
    total = 0
    for batch in iter_texts(load_documents(cfg)):
        for text in batch:
            if is_heldout(text, cfg.heldout_fraction):
                continue
            yield text
            total += len(text)
            if total >= max_chars:
                return


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 naming what the tokenizer does to text: equal before and after a save/reload."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state: dict[str, Any] = {"eos": tokenizer.eos_token_id}
    if backend is not None:
        state["tokenizer"] = backend.to_str()
    else:  # a slow (Python) tokenizer: its class and vocabulary are what we can name
        state["class"] = type(tokenizer).__name__
        state["vocab"] = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _check(tokenizer: PreTrainedTokenizerBase, vocab_size: int, name: str) -> None:
    if tokenizer.eos_token_id is None:
        raise DataError(f"{name} has no eos token, which pages need between documents")
    if len(tokenizer) > vocab_size:
        raise DataError(
            f"{name} has {len(tokenizer)} tokens but model.vocab_size is {vocab_size}: "
            "raise model.vocab_size"
        )


def load_tokenizer(
    cfg: DataConfig, vocab_size: int, cache_dir: Path | str
) -> PreTrainedTokenizerBase:
    """The run's tokenizer: `data.tokenizer` from the Hub, or the BPE trained on the corpus.

    The trained one is cached under `cache_dir`, keyed by the corpus, `vocab_size`,
    `data.heldout_fraction` and `data.max_documents`; a cached one is loaded the way a
    checkpoint's is (`AutoTokenizer.from_pretrained(folder)`).
    """
    if cfg.tokenizer is not None:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        _check(tokenizer, vocab_size, f"data.tokenizer {cfg.tokenizer!r}")
        return tokenizer
    key = {
        "format": _FORMAT,
        "corpus": corpus_identity(cfg),
        "vocab_size": vocab_size,
        "heldout_fraction": cfg.heldout_fraction,
        "max_documents": cfg.max_documents,
        "train_chars": TRAIN_CHARS,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir) / f"tokenizer-{digest[:16]}"
    if not (folder / "tokenizer.json").is_file():
        _require_vocab(vocab_size)  # before reading the corpus
        with build_lock(folder):
            if not (folder / "tokenizer.json").is_file():
                started = time.perf_counter()
                tokenizer = train_tokenizer(training_texts(cfg), vocab_size)
                logger.info(
                    "trained a %d-token byte-level BPE in %.1f s",
                    len(tokenizer),
                    time.perf_counter() - started,
                )
                _save_atomically(tokenizer, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    _check(tokenizer, vocab_size, f"the tokenizer in {folder}")
    return tokenizer


def _save_atomically(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save into a temporary sibling, then rename: readers see no folder or a whole one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():
                raise
            # Another process renamed its (identical) tokenizer into place first.
            logger.debug("tokenizer %s was written by another process", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
