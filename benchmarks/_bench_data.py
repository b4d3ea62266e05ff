"""The data the training benchmarks share: a run's pages and a fixed held-out sample.

Imported by the `bench_*.py` scripts next to it (run as `python benchmarks/bench_X.py`,
so this folder is on `sys.path`).
"""

from __future__ import annotations

import torch

from tensormine.config import RunConfig
from train.data import Pages, load_pages
from train.pages import heldout_sample
from train.tokenizer import load_tokenizer


def pages_and_heldout(
    cfg: RunConfig, cache: str, key: bytes, eval_pages: int
) -> tuple[Pages, torch.Tensor]:
    """The run's pages (built or read from `cache`) and `eval_pages` held-out pages drawn
    with `key` for window 0 (fewer if the split is smaller), as one token tensor."""
    tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size, cache)
    pages = load_pages(cfg.data, tokenizer, cache)
    n_heldout = pages.heldout.shape[0]
    sample = heldout_sample(key, 0, n_heldout, min(eval_pages, n_heldout))
    return pages, torch.from_numpy(pages.heldout[sample])
