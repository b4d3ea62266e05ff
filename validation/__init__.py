"""The validator: admission, loss-delta scoring, anti-cheat, weights and canonical checkpoints."""
