"""Scale-out on Ray: ``dfgen sample --ray auto|ADDRESS`` and ``dfgen repair --ray auto|ADDRESS``.

Design: **one Ray task per worker index**, each running the unchanged single-process stage
(``run_sample`` with ``worker_index=i`` of ``num_workers``; ``run_repair`` restricted to the input
shards of worker ``i``) with its own backend (hf on CPU, or vLLM with ``tensor_parallel_size`` GPUs
per task). The driver only schedules, shows progress and collects each task's statistics.

Why plain tasks over worker indices, and not Ray Data's ``map_batches`` over the prompt set: our
shard contract already *is* a partition by worker index. Worker ``i`` owns the prompts
``records[i::N]``, its shards ``part-wIII-*`` and its manifest ``_manifest.wIII.json``, and a rerun of
worker ``i`` resumes from that manifest. A task per index therefore gives exactly the shards that
``--num-workers N --worker-index i`` run by hand gives (same rows, byte for byte), and a retried task is
just a rerun that resumes. Ray Data would own the partitioning and the writing (its own block sizes
and file names, no resume from our manifests), so exactly-once would have to be rebuilt on top of it,
and a retried batch would be regenerated rather than resumed.

Exactly once, with retries: a task whose process dies (killed, OOM, a lost node) is retried by Ray
(``max_retries``). The retry takes over the dead writer's lock (``dfgen.shards.WriterLock``: the
kernel released it with the process), keeps every shard the manifest lists and writes only the rest.
An error raised by the stage itself (bad input, a ``UserError``) is not retried: it is reported as
the same one line a single-process run prints.

Progress: the driver reads the workers' manifests (rows per finished shard) and shows one rich bar
over all workers; at the end it prints each worker's throughput.

Run: ``ray start --head`` on one node, ``ray start --address HEAD:6379`` on the others, then
``dfgen sample --prompts P --model M --out S --num-workers 16 --backend vllm --ray auto``.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import replace
from pathlib import Path

from dfgen.backends import BACKENDS, EngineOptions
from dfgen.errors import UserError, one_line

MAX_RETRIES = 3  # retries of a task whose process died; stage errors are never retried


def connect(address: str):
    """``ray`` after ``ray.init(address)``; one-line UserErrors for a missing extra or no cluster."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'dfkit[ray]'") from None
    if address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
        except (OSError, ValueError):
            raise UserError(f"no Ray cluster listens at {address} (start one with `ray start --head`, "
                            f"or pass --ray auto on a node of a running cluster)") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot join a Ray cluster at {address}: {one_line(e)}") from None
    return ray


def _sample_task(cfg):
    from dfgen.sample import run_sample

    t = time.time()
    st = run_sample(cfg)
    return {"worker": cfg.worker_index, "host": socket.gethostname(), "seconds": round(time.time() - t, 2), **st}


def _repair_task(cfg, worker: int):
    from dfgen.repair import run_repair

    t = time.time()
    st = run_repair(cfg, only_worker=worker)
    return {"worker": worker, "host": socket.gethostname(), "seconds": round(time.time() - t, 2), **st}


def _manifest_rows(out: Path) -> int:
    n = 0
    for m in out.glob("_manifest.w*.json"):
        try:
            n += sum(s.get("rows", 0) for s in json.loads(m.read_text()).get("shards", {}).values())
        except (OSError, ValueError):
            pass  # being replaced right now: counted at the next poll
    return n


def _run(ray, remote_fn, args_list: list, out: Path, total: int, progress, resources: dict) -> list[dict]:
    fn = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, **resources)(remote_fn)
    refs = [fn.remote(*a) for a in args_list]
    pending = list(refs)
    if progress:
        progress(0, total)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        if progress:
            progress(_manifest_rows(out), total)
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise UserError(f"a Ray worker failed: {one_line(cause or e)}") from None
    except ray.exceptions.WorkerCrashedError as e:
        raise UserError(f"a Ray worker died {MAX_RETRIES + 1} times: {one_line(e)}") from None


def sample_on_ray(cfg, address: str, progress=None) -> list[dict]:
    """``run_sample`` for every worker index of ``cfg.num_workers`` as Ray tasks; per-worker stats."""
    from dfgen.records import load_prompts

    cfg.validate()
    ray = connect(address)
    records, _ = load_prompts(cfg.prompts, limit=cfg.limit)
    gpus = BACKENDS[cfg.backend].gpus(cfg.engine_options())
    args = [(replace(cfg, worker_index=i),) for i in range(cfg.num_workers)]
    return _run(ray, _sample_task, args, Path(cfg.out), len(records), progress, {"num_cpus": 1, "num_gpus": gpus})


def repair_on_ray(cfg, address: str, progress=None) -> list[dict]:
    """``run_repair`` of each input worker's shards as one Ray task; per-worker stats."""
    from dfgen.repair import GENERATES
    from dfgen.shards import open_shards, shard_position

    cfg.validate()
    ray = connect(address)
    ss = open_shards(cfg.rollouts, stage="sample")
    workers = sorted({shard_position(f)[0] for f in ss.files})
    gpus = BACKENDS[cfg.backend].gpus(EngineOptions()) if cfg.repairer in GENERATES else 0
    return _run(ray, _repair_task, [(cfg, w) for w in workers], Path(cfg.out), ss.num_rows(), progress,
                {"num_cpus": 1, "num_gpus": gpus})


def throughput_lines(stats: list[dict], unit: str, key: str) -> list[str]:
    """One line per worker: what it did, how fast, where."""
    return [f"worker {s['worker']} on {s['host']}: {s[key]} {unit} in {s['seconds']:.1f}s "
            f"({s[key] / max(s['seconds'], 1e-9):.1f} {unit}/s)" for s in sorted(stats, key=lambda s: s["worker"])]
