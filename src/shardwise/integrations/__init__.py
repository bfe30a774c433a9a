"""Bridges from training frameworks to shardwise.

Each integration is its own module and imports its framework only when imported itself
(``import shardwise.integrations`` imports none of them):

- ``shardwise.integrations.hf``: the Hugging Face ``Trainer`` (``ShardwiseTrainer``).
- ``shardwise.integrations.lightning``: PyTorch Lightning.
"""
