"""The batched Moshi engine backend (issue 5): loader, tiny model, persona prefix cache, FP8, bench.

Importing this package does not import torch; its modules do.
"""
