"""Seed derivation: one ``--seed``, per-sample seeds from (seed, prompt id, sample index).

A sample's seed depends only on these three values, so it does not change with batch size,
worker count, resumption or the order prompts are processed in.
"""
from __future__ import annotations

import hashlib


def sample_seed(seed: int, prompt_id: str, index: int) -> int:
    h = hashlib.blake2b(f"{seed}|{prompt_id}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
