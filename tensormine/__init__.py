"""tensormine: a decentralized training subnet you can run on one machine or many.

The packages beside this one do the work (`chain/` the ledger, `store/` checkpoints and
contributions, `train/` the miner, `averaging/` hivemind all-reduce, `validation/` the
validator); this package holds what they share: typed configuration and the `tensormine`
command line.
"""

__version__ = "0.1.0"
