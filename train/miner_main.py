"""The miner's command line: `python -m train.miner` and `accelerate launch -m train.miner`.

    accelerate launch -m train.miner --config configs/tiny.yaml --hotkey alice --windows 5

Exit codes: 0 done, 2 a configuration, ledger or store problem (named in the log),
3 out of memory, 130 interrupted (the last finished window's state is saved).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch
from accelerate import Accelerator

from common.errors import TensormineError
from tensormine.config import load_config
from train.behaviours import BEHAVIOURS, code_spelling
from train.miner import Miner
from train.startup import load_identity, resolve_mixed_precision

logger = logging.getLogger("train.miner")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.miner", description="train the assigned shard each window and publish it"
    )
    parser.add_argument("--config", "-c", help="run config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--hotkey", required=True, help="name of the miner's key")
    parser.add_argument("--keys-dir", help="key directory (default $TENSORMINE_HOME/keys)")
    parser.add_argument("--windows", type=int, help="stop after this many windows")
    parser.add_argument(
        "--behaviour",
        default="honest",
        type=code_spelling,
        choices=BEHAVIOURS,
        help="an adversarial miner for demos and tests (the validators must pay it nothing)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    miner: Miner | None = None
    try:
        cfg = load_config(args.config, args.overrides)
        identity = load_identity(cfg, args.hotkey, args.keys_dir)
        # Without a GPU, processes started by `accelerate launch --multi_gpu` form a gloo group.
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        )
        miner = Miner(cfg, identity, args.hotkey, accelerator, behaviour=args.behaviour)
        miner.run(args.windows)
    except (TensormineError, TimeoutError) as exc:
        logger.error("%s", exc if str(exc) else repr(exc), exc_info=not str(exc))
        return 2
    except torch.OutOfMemoryError as exc:
        logger.error(
            "out of memory (%s): lower train.batch_size (raise train.grad_accum to keep the "
            "batch), data.seq_len, or use a smaller model preset",
            exc,
        )
        return 3
    except KeyboardInterrupt:
        logger.info("interrupted; the last finished window's state is saved")
        return 130
    finally:
        if miner is not None:
            miner.close()
    return 0
