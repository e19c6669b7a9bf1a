"""Streaming DF shards into the trainer: groups stay together, order is seeded and resumable.

``GroupStream(shards, seed, buffer_size, rank, world)`` yields prompt groups (dict rows of the
shard schema) forever, epoch after epoch:

* files are read as pyarrow record batches (``ShardSet.iter_batches``): memory holds at most
  ``buffer_size`` groups plus one record batch, never the whole set;
* each epoch visits the files in a seeded order and shuffles groups within a bounded buffer
  (seeded by (seed, epoch)): a good-enough shuffle that scales to any number of shards;
* rank r of ``world`` data-parallel processes takes every world-th group of the shared order,
  so replicas see disjoint data;
* ``position`` (groups yielded so far) is the resume state: a stream rebuilt with the same
  arguments and ``skip=position`` continues with exactly the same groups;
* ``decode=True``: each group handed out carries its decoded image under ``_image`` (a PIL image,
  or None), decoded as it leaves the buffer, so the buffer holds only the encoded bytes.

Rows are validated as they are read (before they enter the buffer): non-finite stored
logprobs or rewards, logprob/token length mismatches and empty trajectories raise a
``UserError`` naming the group.
"""
from __future__ import annotations

import math
import random

from dfgen.errors import UserError


def validate_group(g: dict) -> None:
    if not g.get("rollouts"):
        raise UserError(f"group {g.get('id')} has no rollouts")
    for k, r in enumerate(g["rollouts"]):
        ids, lps = r.get("token_ids"), r.get("logprobs")
        if ids is None or lps is None or len(ids) != len(lps):
            raise UserError(f"group {g['id']} rollout {k}: token_ids and logprobs differ in length")
        if not ids:
            raise UserError(f"group {g['id']} rollout {k}: empty trajectory (no tokens); a sampler always "
                            f"stores at least one token")
        if r.get("reward") is None or not math.isfinite(r["reward"]):
            raise UserError(f"group {g['id']} rollout {k}: reward is missing or not finite")
        if not all(math.isfinite(x) for x in lps):
            raise UserError(f"group {g['id']} rollout {k}: stored logprobs contain NaN or inf")
        if r.get("repair_status") == "ok":
            rl = r.get("repaired_logprobs")
            if rl is None or len(rl) != len(r.get("repaired_ids") or []) or not all(math.isfinite(x) for x in rl):
                raise UserError(f"group {g['id']} rollout {k}: repaired_logprobs missing, mis-sized or non-finite")


class GroupStream:
    def __init__(self, shards, seed: int = 0, buffer_size: int = 256, rank: int = 0, world: int = 1,
                 skip: int = 0, batch_rows: int = 64, decode: bool = False):
        self.shards, self.seed, self.buffer_size = shards, seed, max(1, buffer_size)
        self.rank, self.world, self.batch_rows, self.decode = rank, world, batch_rows, decode
        self.position = 0
        self._it = self._groups()
        for _ in range(skip):
            next(self._it)

    def _epoch(self, epoch: int):
        rng = random.Random(f"{self.seed}|{epoch}")
        files = list(self.shards.files)
        rng.shuffle(files)
        buf: list = []
        from dfgen.shards import ShardSet

        for f in files:
            for b in ShardSet([f], self.shards.meta).iter_batches(self.batch_rows):
                for row in b.to_pylist():
                    validate_group(row)  # as read: bad data is refused before it waits in the buffer
                    buf.append(row)
                    if len(buf) >= self.buffer_size:
                        yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def _groups(self):
        epoch, k = 0, 0
        while True:
            n_epoch = 0
            for g in self._epoch(epoch):
                n_epoch += 1
                if k % self.world == self.rank:
                    self.position += 1
                    yield g
                k += 1
            if n_epoch == 0:
                raise UserError("the shard set holds no groups")
            epoch += 1

    def take(self, n: int) -> list[dict]:
        groups = [next(self._it) for _ in range(n)]
        if self.decode:
            from dfgen.images import decode_image

            for g in groups:
                g["_image"] = decode_image(g["image"]) if g.get("image") is not None else None
        return groups
