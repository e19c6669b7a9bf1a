"""Faults: nothing is lost when a stage is killed, the disk fills up or the output is read-only.

Seeded random-kill suite: each of ``dfgen sample``, ``dfgen repair``, ``dfgen mask`` and
``dftrain fit`` (``--save-every 1 --resume``) runs once uninterrupted (the reference, which also
measures when its shards or checkpoints appear), then for each kill point a fresh run of the
real CLI is SIGKILLed at a time drawn from a seeded RNG (stratified over the measured writing
phase, from the creation of its output folder to the last writes; see ``kill_offsets``), inspected as a
reader would see it (every listed shard and checkpoint complete), and rerun with the same
arguments to completion. The result must equal the reference: every prompt group exactly once
with the same content, every parquet file readable, the manifest matching the files, no temp
file left, and for fit the same loss at every step (a step the kill interrupted is recomputed;
both records must match) and the same final weights (1e-6).

``DF_FAULT_KILLS`` sets the kill points per stage (default 2: 8 in ``make test``;
``make test-faults`` runs 6 per stage, 24); ``DF_FAULT_SEED`` picks other kill points;
``DF_FAULT_MODEL`` runs the suite against another policy folder instead of the test SFT model.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

KILLS = int(os.environ.get("DF_FAULT_KILLS", "2"))
SEED = int(os.environ.get("DF_FAULT_SEED", "0"))
STAGES = ("sample", "repair", "mask", "fit")
# one thread per process: the CI machine has 2 cores and other work on them
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _cmd(prog: str, *args) -> list[str]:
    return [sys.executable, "-m", f"{prog}.cli", *map(str, args)]


def _stage_cmd(stage: str, src: dict, out: Path) -> list[str]:
    """The same arguments for the reference, the killed run and the rerun."""
    if stage == "sample":
        return _cmd("dfgen", "sample", "--prompts", src["prompts"], "--model", src["model"], "--out", out,
                    "--group-size", 2, "--limit", 10, "--chunk-size", 2, "--batch-size", 4, "--seed", 3,
                    "--max-new-tokens", 48)
    if stage == "repair":
        return _cmd("dfgen", "repair", "--rollouts", src["sample"], "--out", out, "--repairer", "oracle")
    if stage == "mask":
        return _cmd("dfgen", "mask", "--repairs", src["repair"], "--out", out)
    return _cmd("dftrain", "fit", "--data", src["mask"], "--model", src["model"], "--out", out, "--steps", 5,
                "--groups-per-step", 2, "--save-every", 1, "--resume", "--lr", 1e-3, "--seed", 0)


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}"
    return p


def _outputs(out: Path) -> set[str]:
    """The finished units of work a reader can see: shards, or fit's checkpoints."""
    return {p.name for p in [*out.glob("part-*.parquet"), *out.glob("step_*")]}


def _timed_run(cmd: list[str], out: Path, timeout: float = 600) -> dict:
    """Run to completion, watching ``out``: when it was created, when its first and last outputs
    appeared, how many there are, when the run ended (seconds from the start)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    born = first = last = None
    n = 0
    while p.poll() is None and time.time() - t0 < timeout:
        if born is None and out.is_dir():
            born = time.time() - t0
        k = len(_outputs(out)) if born is not None else 0
        if k > n:
            n, last = k, time.time() - t0
            first = last if first is None else first
        time.sleep(0.005)
    total = time.time() - t0
    err = p.communicate(timeout=max(1.0, timeout - total))[1]
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}"
    n_final = len(_outputs(out))
    assert first is not None and n_final > 1, f"{' '.join(cmd)}: outputs not seen while running"
    return {"born": born, "first": first, "last": last, "n": n_final, "total": total}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request, train_prompts):
    """Uninterrupted runs of the four stages, each feeding the next, with their timelines."""
    model = os.environ.get("DF_FAULT_MODEL") or request.getfixturevalue("sft_model")
    d = tmp_path_factory.mktemp("faults_ref")
    src, timing = {"prompts": train_prompts, "model": model}, {}
    for stage in STAGES:
        timing[stage] = _timed_run(_stage_cmd(stage, src, d / stage), d / stage)
        src[stage] = d / stage
    return src, timing


def kill_offsets(stage: str, t: dict, n: int = KILLS) -> list[float]:
    """n seeded kill points, in seconds after the run creates its output folder (the work phase
    starts there: start-up, i.e. importing torch and loading the model, is over). With g the
    reference run's time per output, they are one uniform draw in each of n equal slices of
    [0, last output + g/2]: the work on the first unit before anything is finished, every
    shard/checkpoint write, the final manifest/config/model writes. Anchoring on the run's own
    progress keeps kill points where they were drawn when start-up takes a second more or less."""
    rng = random.Random(f"dfkit-faults|{SEED}|{stage}")
    g = (t["last"] - t["first"]) / max(t["n"] - 1, 1)
    hi = t["last"] - t["born"] + 0.5 * g
    return [hi * (k + rng.random()) / n for k in range(n)]


def _kill_at(cmd: list[str], out: Path, offset: float, timeout: float = 600) -> tuple[bool, float]:
    """Start the CLI and SIGKILL it ``offset`` s after it creates ``out``. Returns (killed, seconds
    from the start to the kill, or to the end if the run finished first)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    born = None
    while p.poll() is None:
        el = time.time() - t0
        if born is None and out.is_dir():
            born = el
        if (born is not None and el >= born + offset) or el > timeout:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True, el
        time.sleep(0.002)
    return False, time.time() - t0


# ----------------------------------------------------------------------------- what readers see
def _temp_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name)


def _readable_shards(out: Path, where: str) -> list[dict]:
    """Every shard a reader lists must read completely; returns all rows."""
    rows = []
    for f in sorted(p for p in out.glob("*.parquet") if not p.name.startswith(".")):
        try:
            rows += pq.read_table(f).to_pylist()
        except Exception as e:  # noqa: BLE001 - the assertion names it
            raise AssertionError(f"{where}: {f.name} is not readable ({type(e).__name__}: {e})") from None
    return rows


def _check_manifest(out: Path, where: str) -> None:
    files = {p.name: pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet") if not p.name.startswith(".")}
    listed = json.loads((out / "_manifest.w000.json").read_text())["shards"]
    assert {k: v["rows"] for k, v in listed.items()} == files, f"{where}: manifest {listed} vs files {files}"


def _canon(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=lambda b: b.hex() if isinstance(b, bytes) else str(b))


def _steps(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("step_*") if p.is_dir())


def _check_checkpoints(out: Path, where: str) -> None:
    from safetensors.torch import load_file

    for s in _steps(out):
        st = json.loads((s / "trainer_state.json").read_text())
        assert st["step"] == int(s.name[5:]), f"{where}: {s.name} holds step {st['step']}"
        load_file(s / "model.safetensors")  # raises on a partial file


def _metrics(out: Path, where: str) -> dict[int, list[float]]:
    by_step: dict[int, list[float]] = {}
    for n, line in enumerate((out / "metrics.jsonl").read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{where}: metrics.jsonl line {n} is not JSON: {line[:120]!r}") from None
        by_step.setdefault(rec["step"], []).append(rec["loss"])
    return by_step


# ----------------------------------------------------------------------------- the kill suite
@pytest.mark.parametrize("stage,k", [(s, k) for s in STAGES for k in range(KILLS)])
def test_killed_stage_resumes_to_the_uninterrupted_result(stage, k, reference, tmp_path):
    src, timing = reference
    t = timing[stage]
    offset = kill_offsets(stage, t)[k]
    out = tmp_path / stage
    cmd = _stage_cmd(stage, src, out)
    killed, at = _kill_at(cmd, out, offset)
    where = (f"{stage} kill point {k + 1}/{KILLS} (seed {SEED}): SIGKILL {offset:.2f}s after the output folder "
             f"appeared, {at:.2f}s after the start (reference run: folder at {t['born']:.2f}s, {t['n']} outputs "
             f"from {t['first']:.2f}s to {t['last']:.2f}s, exit at {t['total']:.2f}s)"
             f"{'' if killed else ' [the run had already finished]'}")

    # what a reader sees right after the kill: only complete files
    if out.exists():
        if stage == "fit":
            _check_checkpoints(out, where + ", after the kill")
            state = f"{len(_steps(out))} checkpoint(s)"
        else:
            state = f"{len(_readable_shards(out, where + ', after the kill'))} group(s) in finished shards"
    else:
        state = "no output yet"
    where += f"; left {state}"
    print(where)

    _run(cmd)  # the same arguments, to completion
    assert not _temp_files(out), f"{where}: temp files left after the rerun: {_temp_files(out)}"
    if stage != "fit":
        got, ref = _readable_shards(out, where), _readable_shards(src[stage], "reference")
        counts = Counter(row["id"] for row in got)
        assert sorted(counts) == sorted(row["id"] for row in ref), f"{where}: groups {sorted(counts)} differ"
        assert max(counts.values()) == 1, f"{where}: groups written twice: {[i for i, c in counts.items() if c > 1]}"
        _check_manifest(out, where)
        canon = {row["id"]: _canon(row) for row in ref}
        changed = [row["id"] for row in got if _canon(row) != canon[row["id"]]]
        assert not changed, f"{where}: groups differ from the uninterrupted run: {changed}"
        return

    _check_checkpoints(out, where)
    got, ref = _metrics(out, where), _metrics(src["fit"], "reference")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5], f"{where}: steps logged {sorted(got)}"
    assert all(len(v) == 1 for v in got.values()), f"{where}: a step logged twice: {got}"
    for step, losses in got.items():
        diff = max(abs(x - ref[step][0]) for x in losses)
        assert diff < 1e-6 and all(math.isfinite(x) for x in losses), \
            f"{where}: step {step} losses {losses} vs uninterrupted {ref[step]}"
    from safetensors.torch import load_file

    wa, wb = load_file(out / "model.safetensors"), load_file(src["fit"] / "model.safetensors")
    assert wa.keys() == wb.keys(), where
    diff = max((wa[n] - wb[n]).abs().max().item() for n in wa)
    assert diff < 1e-6, f"{where}: final weights differ from the uninterrupted run by {diff:.3g}"


def test_kill_points_are_seeded_and_spread_over_the_run():
    t = {"born": 5.0, "first": 6.0, "last": 8.0, "n": 5, "total": 10.0}  # g = 0.5 s: [0, 3.25]
    a, b = kill_offsets("sample", t, 6), kill_offsets("sample", t, 6)
    assert a == b and a == sorted(a) and 0 <= a[0] < 3.25 / 6 and 3.25 - 3.25 / 6 <= a[-1] <= 3.25
    assert kill_offsets("fit", t, 6) != a


# ----------------------------------------------------------------------------- disk full, read-only
# The child process makes the 3rd parquet write fail the way a full disk does under pyarrow
# (a partial file, then OSError errno 28 with pyarrow's wording), then runs the real CLI.
ENOSPC_AFTER = r"""
import errno, sys
import pyarrow.parquet as pq
_orig, _n, _ok = pq.write_table, [0], int(sys.argv[1])
def write_table(table, where, *a, **k):
    _n[0] += 1
    if _n[0] > _ok:
        with open(where, "wb") as fh:
            fh.write(b"PAR1" + bytes(100))
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    return _orig(table, where, *a, **k)
pq.write_table = write_table
sys.argv = [sys.argv[2]] + sys.argv[3:]
from importlib import import_module
import_module(sys.argv[0] + ".cli").main()
"""


def test_disk_full_mid_run_is_one_line_keeps_finished_shards_and_resumes(reference, tmp_path):
    src, _ = reference
    out = tmp_path / "mask"
    args = ["mask", "--repairs", src["repair"], "--out", out]
    p = subprocess.run([sys.executable, "-c", ENOSPC_AFTER, "2", "dfgen", *map(str, args)], capture_output=True,
                       text=True, env=ENV, timeout=600)
    err = p.stderr.strip()  # (the progress bar's last state may precede the error line)
    assert p.returncode != 0 and "Traceback" not in err and [x for x in err.splitlines() if "error" in x] == [
        err.splitlines()[-1]], err
    assert err.splitlines()[-1].startswith(f"error: cannot write {out / 'part-w000-00002.parquet'}: "
                                           f"No space left on device"), err
    assert not _temp_files(out), _temp_files(out)
    kept = sorted(f.name for f in out.glob("*.parquet"))
    assert kept == ["part-w000-00000.parquet", "part-w000-00001.parquet"], kept
    _check_manifest(out, "after ENOSPC")
    ref = {f.name: _canon_file(f) for f in src["mask"].glob("*.parquet")}
    assert all(_canon_file(out / n) == ref[n] for n in kept), "finished shards changed"
    _run(_cmd("dfgen", *args))  # space is back: the same command finishes the set
    assert {f.name: _canon_file(f) for f in out.glob("*.parquet")} == ref
    assert not _temp_files(out)


def _canon_file(f: Path) -> list[str]:
    return [_canon(r) for r in pq.read_table(f).to_pylist()]


def _read_only_dir(tmp_path: Path, how: str) -> Path:
    if how == "chmod-0555":
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            (ro / "probe").mkdir()
        except OSError:
            return ro
        ro.chmod(0o755)
        pytest.skip("chmod 0555 does not stop writes here (running as root); the read-only-location case covers it")
    ro = Path("/sys")  # sysfs: nobody, root included, may create folders there
    try:
        (ro / "dfkit-probe").mkdir()
    except OSError:
        return ro
    (ro / "dfkit-probe").rmdir()
    pytest.skip("/sys accepts new folders on this machine")


@pytest.mark.parametrize("how,sub", [("chmod-0555", True), ("chmod-0555", False), ("read-only-location", True)],
                         ids=["chmod-0555-new-subfolder", "chmod-0555-folder-itself", "read-only-location"])
def test_read_only_output_is_one_line_and_writes_nothing(how, sub, reference, tmp_path):
    src, _ = reference
    ro = _read_only_dir(tmp_path, how)
    out = ro / "dfkit-out" if sub else ro
    before = sorted(os.listdir(ro))
    p = subprocess.run(_cmd("dfgen", "mask", "--repairs", src["repair"], "--out", out), capture_output=True,
                       text=True, env=ENV, timeout=600)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.count("error") == 1, p.stderr
    assert err.startswith(("error: permission denied: ", "error: cannot write ", "error: output folder is not "
                                                                                  "writable")), err
    assert str(out) in err, err
    assert sorted(os.listdir(ro)) == before
