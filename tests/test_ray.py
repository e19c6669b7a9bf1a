"""`dfgen sample/repair --ray`: workers as Ray tasks on a real local Ray instance (2 CPUs), checked against the same workers run by hand, with a worker SIGKILLed mid-run, and bad
addresses refused in one line."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what Ray gives a num_cpus=1 task: the same float arithmetic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance owned by this test process (2 CPUs); the CLIs join it by address, and
    ray.shutdown() stops only this instance (never a cluster of the user's)."""
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _rows(folder: Path) -> dict:
    return {f.name: pq.read_table(f).to_pylist() for f in sorted(folder.glob("*.parquet"))}


def _sample_args(train_prompts, sft_model, out):
    return ["sample", "--prompts", train_prompts, "--model", sft_model, "--out", out, "--group-size", 2,
            "--limit", 24, "--chunk-size", 2, "--batch-size", 4, "--num-workers", 2, "--seed", 4]


@pytest.fixture(scope="module")
def by_hand(tmp_path_factory, train_prompts, sft_model):
    d = tmp_path_factory.mktemp("hand")
    for i in (0, 1):
        run_cli("dfgen", *_sample_args(train_prompts, sft_model, d / "S"), "--worker-index", i, env=ONE_THREAD)
    run_cli("dfgen", "repair", "--rollouts", d / "S", "--out", d / "R", env=ONE_THREAD)
    run_cli("dfgen", "repair", "--rollouts", d / "S", "--out", d / "RS", *RESAMPLE, env=ONE_THREAD)
    return d


RESAMPLE = ("--repairer", "resample", "--resample-n", 2, "--max-probes", 2)  # a generating repairer, kept small


def test_ray_workers_write_the_rows_the_same_workers_write_by_hand(cluster, by_hand, train_prompts, sft_model,
                                                                   tmp_path):
    r = run_cli("dfgen", *_sample_args(train_prompts, sft_model, tmp_path / "S"), "--ray", cluster)
    assert "worker 0 on" in r.stdout and "worker 1 on" in r.stdout and "groups/s" in r.stdout
    hand = _rows(by_hand / "S")
    assert sorted(hand) == [f"part-w00{w}-0000{c}.parquet" for w in (0, 1) for c in range(6)]
    assert _rows(tmp_path / "S") == hand
    r = run_cli("dfgen", "repair", "--rollouts", tmp_path / "S", "--out", tmp_path / "R", "--ray", cluster)
    assert "failed rollouts" in r.stdout
    assert _rows(tmp_path / "R") == _rows(by_hand / "R")
    run_cli("dfgen", "repair", "--rollouts", tmp_path / "S", "--out", tmp_path / "RS", *RESAMPLE, "--ray", cluster)
    rs = _rows(tmp_path / "RS")
    assert rs == _rows(by_hand / "RS")  # the probes' seeds depend on the rollout, not on the worker
    assert any(r["repair_gen_tokens"] for rows in rs.values() for g in rows for r in g["rollouts"])


def test_a_worker_killed_mid_run_is_retried_and_every_group_is_written_once(cluster, by_hand, train_prompts,
                                                                              sft_model, tmp_path):
    out = tmp_path / "S"
    cmd = [sys.executable, "-m", "dfgen.cli", *map(str, _sample_args(train_prompts, sft_model, out)), "--ray", cluster]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holder, manifest = out / "_lock.w000.holder", out / "_manifest.w000.json"
    t0 = time.time()  # kill once worker 0's manifest lists a shard (written atomically): a kill between a
    # shard's file and its manifest line leaves a shard the retry rewrites, which the count below would miss
    while time.time() - t0 < 180 and not (holder.is_file() and manifest.is_file()
                                          and json.loads(manifest.read_text())["shards"]):
        time.sleep(0.05)
    victim = json.loads(holder.read_text())["pid"]
    os.kill(victim, signal.SIGKILL)  # the Ray worker process running worker 0's task
    assert p.wait(timeout=300) == 0, p.stderr.read()
    line = next(x for x in p.stdout.read().splitlines() if x.startswith("worker 0 on"))
    assert int(line.split(": ")[1].split()[0]) < 12, line  # the retry wrote only what the victim had not
    assert not holder.exists()  # released by the retry when it was done
    written = len(list(out.glob("part-w000-*.parquet")))
    assert 0 < written == 6
    rows = _rows(out)
    assert rows == _rows(by_hand / "S")  # every group once, the same rows as the uninterrupted run
    ids = [r["id"] for shard in rows.values() for r in shard]
    assert len(ids) == len(set(ids)) == 24


def test_an_address_nobody_listens_on_is_refused_in_one_line(train_prompts, sft_model, tmp_path):
    r = run_cli("dfgen", *_sample_args(train_prompts, sft_model, tmp_path / "S"), "--ray", f"127.0.0.1:{_free_port()}",
                check=False)
    assert r.returncode != 0 and "no Ray cluster listens at" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "S").exists()


def test_ray_without_the_extra_installed_is_refused_in_one_line(train_prompts, sft_model, tmp_path):
    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named ray')\n")  # as if ray were absent
    r = run_cli("dfgen", *_sample_args(train_prompts, sft_model, tmp_path / "S"), "--ray", "auto", check=False,
                env={"PYTHONPATH": str(shim.parent)})
    assert r.returncode != 0 and "pip install 'dfkit[ray]'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "S").exists()
