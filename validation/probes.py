"""What the validator measures on: its secret, the pages it draws, and per-page losses.

    secret = validator_secret(keypair.seed)                      # or read from a file
    E = heldout_sample(secret, w, len(pages.heldout), cfg.validation.heldout_pages)
    assigned, control = own_data_pages(secret, hotkey, w, run_seed, len(pages.train),
                                       cfg.train.pages_per_window, cfg.validation.own_data_pairs)
    losses = page_losses(model, ids, batch=8)                    # one loss per page
    with patched_shard(model, names, theta_w, delta, lr=cfg.outer.lr):
        ...                                                      # model holds θ_w ⊕ Δ here

**Private held-out pages** (`validation.heldout_files`, `private_heldout_pages`): the
operator's own documents, made into pages exactly as `train.data` makes the run's (the
run's tokenizer, no special tokens, EOS after each document, concatenated, cut into
`data.seq_len` rows), all of them held out. E is then drawn from these with the secret,
so no miner can train on E even in principle; recommended for real subnets, where the
public held-out split is as downloadable as the train split.

**Generic pages** (`generic_pages`): `validation.heldout_rival_pages` train pages drawn
with the secret, the same for every miner of the window; the held-out-rival check
compares the gain on E with the gain on these.

**The secret** is an HMAC of the validator's hotkey seed (never published, different for
every validator), or the bytes of `validation.secret_file` for an operator who wants a
secret apart from the key. With it, the held-out sample E of window w and the choice of
own-data pages are unpredictable to miners; anyone holding the secret can recompute them.

**Own-data pairs**: `pairs` of the miner's assigned pages (recomputed with
`train.pages.assigned_pages`), taken from the inner steps whose learning rate was high
(a page seen at a high learning rate is learned measurably; one seen during the cosine
tail hardly: on the stdlib corpus the paired gap of pages from the first steps was
0.44–0.57 nats, t = 4–11, and of pages from the last steps −0.15–0.08), each paired
with an unassigned neighbour (the page before or after it, the side picked by the
secret), or, when both neighbours are assigned, an unassigned page drawn with the
secret. Why neighbours: see `validation.scoring`.

`θ_w ⊕ Δ` is `θ_w − lr·Δ` on the contribution's shard, i.e. the outer step of a group of
one without momentum: the change the contribution would cause at the outer learning rate.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from train.config import DataConfig
from train.corpus import DataError, iter_texts, load_documents
from train.data import build_pages
from train.pages import Affinity, assigned_pages, heldout_sample, unassigned_pages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_SECRET_DOMAIN = b"tensormine/validator-secret/v1"

__all__ = [
    "generic_pages",
    "heldout_sample",
    "own_data_pages",
    "page_losses",
    "patched_shard",
    "private_heldout_pages",
    "read_secret_file",
    "validator_secret",
]


def validator_secret(seed: bytes) -> bytes:
    """The sampling secret derived from a hotkey's private seed (HMAC-SHA256, one way)."""
    return hmac.new(seed, _SECRET_DOMAIN, hashlib.sha256).digest()


def signing_seed(key: object, folder: Path) -> bytes:
    """The private bytes a validator's sampling secret derives from: its Ed25519 hotkey's
    seed (so the same key gives the same secret on any machine), or, for keys that do not
    expose one (a Bittensor wallet's sr25519 hotkey), 32 random bytes kept in
    ``<folder>/sampling.secret`` (hex, mode 0600), made on first use and reused after a
    restart. `validation.secret_file` overrides both."""
    seed = getattr(key, "seed", None)
    if isinstance(seed, bytes) and len(seed) >= 16:
        return seed
    path = folder / "sampling.secret"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secrets.token_hex(32))
    return read_secret_file(path)


def read_secret_file(path: Path) -> bytes:
    """A secret kept in a file as hex (at least 16 bytes); `ValueError` otherwise."""
    text = path.read_text(encoding="utf-8").strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: the secret must be hex digits") from None
    if len(raw) < 16:
        raise ValueError(f"{path}: the secret must be at least 16 bytes (32 hex digits)")
    return raw


def private_heldout_pages(
    files: Sequence[str], data: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> np.ndarray:
    """Pages (int32 [n, data.seq_len]) of the documents in `files` (globs of .txt, .json,
    .jsonl or .parquet files; text in `data.text_field`), every one held out.

    `DataError` when a glob matches nothing or the files give no page.
    """
    cfg = data.model_copy(
        update={"source": "files", "files": list(files), "max_documents": None,
                "max_pages": None, "streaming": False}
    )  # fmt: skip
    documents = load_documents(cfg)
    # A held-out fraction of 1 sends every document to the held-out side (`is_heldout`).
    _, pages, _, _ = build_pages(iter_texts(documents), tokenizer, data.seq_len, 1.0)
    if pages.shape[0] < 1:
        raise DataError(
            f"validation.heldout_files {list(files)} give no page of {data.seq_len} tokens"
        )
    return pages


def _subkey(secret: bytes, *parts: str | int) -> bytes:
    msg = b"\0".join(str(p).encode() for p in parts)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def generic_pages(secret: bytes, window: int, n_train_pages: int, count: int) -> np.ndarray:
    """`count` train pages of `window` drawn with the secret, the same for every miner: the
    baseline of the held-out-rival check (pages no miner was meant to see beyond chance:
    an assignment covers `pages_per_window` of `n_train_pages`)."""
    return heldout_sample(_subkey(secret, "generic"), window, n_train_pages, count)


def own_data_pages(
    secret: bytes,
    hotkey: str,
    window: int,
    seed: int,
    n_train_pages: int,
    pages_per_window: int,
    pairs: int,
    *,
    batch_size: int | None = None,
    steps: Sequence[int] | None = None,
    affinity: Affinity | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(assigned, control) train-page indices, `pairs` of each (fewer if fewer candidates).

    Assigned pages are distinct, drawn with the secret from the miner's assignment (with
    its shard's `affinity`), only from the pages of inner `steps` (each step consumes
    `batch_size` pages in assignment order) when given; each control page lies outside
    the assignment. A control is a neighbour of its page in the corpus's stream, so
    mostly of the same document and topic: with expert affinity the pair still compares
    two pages of one topic, of which only the first was trained on.
    """
    if pairs <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    assignment = assigned_pages(hotkey, window, seed, n_train_pages, pages_per_window, affinity)
    taken = set(assignment.tolist())
    pool = assignment
    if steps is not None:
        if batch_size is None:
            raise ValueError("steps need batch_size")
        pool = np.concatenate(
            [assignment[s * batch_size : (s + 1) * batch_size] for s in steps]
            or [np.zeros(0, dtype=np.int64)]
        )
    unique = np.unique(pool)
    if unique.size == 0:
        raise ValueError("no assigned pages to check")
    count = min(pairs, unique.size)
    picks = heldout_sample(_subkey(secret, "own", hotkey), window, unique.size, count)
    # Sort the chosen positions first so the pairing does not depend on draw order.
    chosen = unique[np.sort(picks)]
    fallback: list[int] = []
    if n_train_pages > len(taken):
        fallback = unassigned_pages(
            hotkey, window, seed, n_train_pages, count,
            _subkey(secret, "control", hotkey, window), assigned_count=pages_per_window,
            affinity=affinity,
        ).tolist()  # fmt: skip
    controls: list[int] = []
    for page in chosen.tolist():
        side = _subkey(secret, "side", hotkey, window, page)[0] & 1
        candidates = (page + 1, page - 1) if side else (page - 1, page + 1)
        control = next((c for c in candidates if 0 <= c < n_train_pages and c not in taken), None)
        if control is None:
            if not fallback:
                raise ValueError(f"every train page is assigned to {hotkey} in window {window}")
            control = fallback.pop()
        controls.append(control)
    return chosen.astype(np.int64), np.asarray(controls, dtype=np.int64)


@torch.no_grad()
def page_losses(
    model: nn.Module, ids: torch.Tensor, *, batch: int = 8, device: torch.device | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of every page (row of `ids`), fp64 on the CPU.

    The same loss `train.inner.mean_loss` averages, kept per page so that one forward pass
    serves the held-out loss and the own-data pairs at once.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out = torch.empty(ids.shape[0], dtype=torch.float64)
    try:
        for start in range(0, ids.shape[0], batch):
            chunk = ids[start : start + batch].to(device, dtype=torch.long)
            logits = model(input_ids=chunk).logits[:, :-1]
            targets = chunk[:, 1:]
            per_token = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
            )
            out[start : start + chunk.shape[0]] = (
                per_token.view(chunk.shape[0], -1).mean(dim=1).double().cpu()
            )
    finally:
        model.train(was_training)
    return out


@contextmanager
def patched_shard(
    model: nn.Module,
    names: Sequence[str],
    theta: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    lr: float,
) -> Iterator[None]:
    """Inside the block the shard holds `θ − lr·Δ`; afterwards exactly `θ` again.

    In place, so no second model is ever allocated; the restore copies `theta` back
    rather than adding lr·Δ again, so no rounding error accumulates over contributions.
    """
    params = dict(model.named_parameters())
    try:
        with torch.no_grad():
            for name in names:
                param = params[name]
                update = delta[name].to(param.device, torch.float32)
                param.copy_(theta[name].to(torch.float32).sub(update, alpha=lr))
        yield
    finally:
        with torch.no_grad():
            for name in names:
                params[name].copy_(theta[name])
