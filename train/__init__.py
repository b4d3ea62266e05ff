"""The miner: the model and its shards, data pages, the inner loop, the miner process."""
