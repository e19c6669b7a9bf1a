"""The per-shard stage runner under ``dfgen sample``, ``repair`` and ``mask``.

A stage maps units of work to output shards, one shard per unit: unit ``(worker, chunk)`` becomes
``OUT/part-wWWW-CCCCC.parquet``. ``run_stage`` owns everything around the stage's own per-row
transform, the same way for all three:

* the one-writer lock of every worker index it writes (``dfgen.shards.WriterLock``), held from
  before it looks at the folder until the done marker is written;
* refusing an output folder that holds another run's shards (``differs``: the stage's own test of
  the shards already there, returning the one-line reason or None); nothing is overwritten;
* resume: a unit whose shard its worker's manifest already lists is skipped, never recomputed
  (``stats["shards_skipped"]``; its input is never read);
* shard naming, atomic writes and manifests (``dfgen.shards.ShardWriter``);
* the end: ``config.json``, then the done marker of every worker it wrote (``mark_done``), last.
  The marker is cleared first, so a folder being written again never looks finished.

``rewrite_plan`` is what the stages that rewrite another stage's shards row by row (repair, mask)
share: the output folder checked against the input, the input's provenance carried on, and one unit
per input shard with its worker and chunk numbers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Unit:
    worker: int
    chunk: int
    load: Callable[[], list]  # the unit's input (read only when the unit is not already done)


def rewrite_plan(ss, out: Path, inp: Path, flag: str, stage_meta: dict, files=None) -> tuple[dict, list[Unit]]:
    """(metadata, units) of a stage that rewrites the shard set ``ss`` (read from ``inp``, the stage's
    ``flag`` option) into ``out``: ``out`` must differ from ``inp`` (inputs are never overwritten);
    the metadata is the input's provenance (model, tokenizer, sampling, earlier stages) plus
    ``stage_meta``; one unit per input shard of ``files`` (default: all), same worker and chunk."""
    from dfgen.errors import UserError
    from dfgen.shards import ShardSet, shard_position

    if Path(out).resolve() == Path(inp).resolve():
        raise UserError(f"--out must differ from {flag} (inputs are never overwritten)")
    meta = {k: v for k, v in ss.meta.items() if k not in ("stage", "schema_version", "package_version")} | stage_meta
    units = [Unit(*shard_position(f), lambda f=f: list(ShardSet([f], ss.meta).iter_rows()))
             for f in (ss.files if files is None else files)]
    return meta, units


def run_stage(out: Path, stage: str, meta: dict, units: list[Unit], transform: Callable[[list], list], *,
              differs: Callable[[dict], str | None], config, stats: dict, workers: list[int] | None = None,
              on_start: Callable[[], None] | None = None, on_skip: Callable[[Unit], None] | None = None,
              summarize: Callable[[dict], None] | None = None) -> dict:
    """Run ``transform(unit.load())`` for every unit not already done and write its rows as the unit's
    shard. ``workers``: the worker indices written (default: the units'; a worker may have none).
    ``on_start()`` runs once the folder is locked and checked (e.g. a progress bar, which must not
    print before a refusal), ``on_skip(unit)`` for each unit already done.
    ``stats`` (updated by the transform) gains ``shards_skipped`` and ``seconds``, then
    ``summarize(stats)`` adds what is computed from the totals; the done markers hold it. Returns
    ``stats``."""
    from dfgen.errors import UserError
    from dfgen.shards import ShardWriter, WriterLock, clear_done, config_json, mark_done, open_shards, write_json_atomic

    out = Path(out)
    workers = sorted(set(workers if workers is not None else (u.worker for u in units)))
    stats.setdefault("shards_skipped", 0)
    with WriterLock(out, workers):
        if out.exists() and any(out.glob("*.parquet")):
            reason = differs(open_shards(out, strict=False).meta)
            if reason:
                raise UserError(f"{out} {reason}; use a new output folder (nothing was overwritten)")
        for w in workers:
            clear_done(out, w)
        writers = {w: ShardWriter(out, stage, meta, worker=w) for w in workers}
        if on_start:
            on_start()
        t0 = time.time()
        for u in units:
            if writers[u.worker].is_done(u.chunk):
                stats["shards_skipped"] += 1
                if on_skip:
                    on_skip(u)
                continue
            writers[u.worker].write(u.chunk, transform(u.load()))
        stats["seconds"] = round(time.time() - t0, 2)
        if summarize:
            summarize(stats)
        write_json_atomic(out / "config.json", config_json(config))
        for w in workers:
            mark_done(out, stats, w)
    return stats
