"""The ledger of one subnet: identities, registration, stake, weights, Yuma, emission.

It behaves like Bittensor's subtensor for a single subnet and stores everything in one
SQLite file, so miners and validators in separate processes share it. This package never
imports torch.
"""
