import json
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from dfgen.answers import score
from tests.conftest import run_cli


def _flat(path):
    return pl.read_parquet(str(path / "*.parquet")).explode("rollouts").unnest("rollouts")


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, sft_model, train_prompts):
    out = tmp_path_factory.mktemp("s") / "S"
    run_cli("dfgen", "sample", "--prompts", train_prompts, "--model", sft_model, "--out", out,
            "--group-size", 4, "--limit", 16, "--chunk-size", 4, "--seed", 7)
    return out


def test_sample_writes_group_rows_polars_can_flatten(sampled):
    g = pl.read_parquet(str(sampled / "*.parquet"))
    assert g.height == 16 and g["id"].n_unique() == 16
    assert g["rollouts"].list.len().to_list() == [4] * 16
    f = _flat(sampled)
    assert f.height == 64
    assert (f["token_ids"].list.len() == f["logprobs"].list.len()).all()
    assert set(f["finish_reason"].unique().to_list()) <= {"stop", "length"}
    meta = json.loads((sampled / "_manifest.w000.json").read_text())["meta"]
    assert meta["sampling"]["group_size"] == 4 and meta["tokenizer_fingerprint"]


def test_stored_rewards_agree_with_the_checker_on_the_stored_text(sampled):
    g = pl.read_parquet(str(sampled / "*.parquet"))
    for row in g.iter_rows(named=True):
        for r in row["rollouts"]:
            pred, reward = score(row, r["text"])
            assert reward == r["reward"] and pred == r["pred"]


def test_behaviour_logprobs_equal_teacher_forced_logprobs(sampled, sft_model):
    from dfgen.backends import Prompt
    from dfgen.backends.hf import HFBackend
    from dfgen.images import decode_image

    b = HFBackend(sft_model)
    g = pl.read_parquet(str(sampled / "*.parquet")).head(6)
    prompts, comps, stored = [], [], []
    for row in g.iter_rows(named=True):
        for r in row["rollouts"]:
            prompts.append(Prompt(row["question"], decode_image(row["image"])))
            comps.append(r["token_ids"])
            stored.append(r["logprobs"])
    tf = b.score(prompts, comps)
    diff = max(abs(a - c) for s, t in zip(stored, tf) for a, c in zip(s, t))
    assert diff < 1e-4
    # and the prompt ids stored are what the processor renders
    assert b.prompt_ids(prompts[:1])[0] == g["prompt_ids"][0].to_list()


def test_same_seed_gives_the_same_shards_and_workers_partition_the_set(sampled, sft_model, train_prompts, tmp_path):
    base = _flat(sampled).sort(["id", "seed"])
    for w in (0, 1):
        run_cli("dfgen", "sample", "--prompts", train_prompts, "--model", sft_model, "--out", tmp_path / "W",
                "--group-size", 4, "--limit", 16, "--chunk-size", 4, "--seed", 7, "--batch-size", 5,
                "--num-workers", 2, "--worker-index", w)
    two = _flat(tmp_path / "W").sort(["id", "seed"])
    assert two["id"].to_list() == base["id"].to_list()
    same = sum(a == b for a, b in zip(two["token_ids"].to_list(), base["token_ids"].to_list()))
    assert same >= 0.95 * base.height  # per-sample seeds: batch composition does not matter (float noise aside)


def test_killed_sampler_resumes_to_exactly_the_expected_groups(sft_model, train_prompts, tmp_path):
    """A sampler SIGKILLed mid-run (by itself, at its third chunk: no timing involved) leaves whole
    shards only, and the rerun keeps them and samples exactly the missing groups."""
    out = tmp_path / "K"
    args = ["--prompts", train_prompts, "--model", sft_model, "--out", out, "--group-size", 2, "--limit", 24,
            "--chunk-size", 2, "--seed", 3, "--batch-size", 4]
    code = ("import os, signal\n"
            "from dfgen.sample import SampleConfig, run_sample\n"
            "chunks = []\n"
            "def progress(n_roll, n_tok, total=None):\n"
            "    chunks.append(total is None)\n"
            "    if sum(chunks) == 3:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"run_sample(SampleConfig(prompts={str(train_prompts)!r}, model={str(sft_model)!r}, out={str(out)!r}, "
            "group_size=2, limit=24, chunk_size=2, seed=3, batch_size=4), progress=progress)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    n_before = len(list(out.glob("*.parquet")))
    assert 2 <= n_before <= 3, n_before  # the chunks done before the kill; 12 in all
    r = run_cli("dfgen", "sample", *args)
    assert "kept from an earlier run" in r.stdout
    g = pl.read_parquet(str(out / "*.parquet"))
    assert sorted(g["id"].to_list()) == sorted(set(g["id"].to_list())) and g.height == 24
    assert (g["rollouts"].list.len() == 2).all()
    assert not list(out.glob(".*.tmp"))


def test_output_folder_of_other_settings_is_refused_without_overwriting(sampled, sft_model, train_prompts):
    before = {p.name: p.stat().st_mtime_ns for p in sampled.glob("*.parquet")}
    r = run_cli("dfgen", "sample", "--prompts", train_prompts, "--model", sft_model, "--out", sampled,
                "--group-size", 4, "--limit", 16, "--chunk-size", 4, "--seed", 7, "--temperature", 0.5, check=False)
    assert r.returncode != 0 and "different sampling" in r.stderr and "Traceback" not in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in sampled.glob("*.parquet")} == before


@pytest.mark.parametrize("case", ["missing_columns", "not_a_dataset", "group_size_0", "all_images_bad",
                                  "missing_model"])
def test_bad_sample_input_gives_one_line_error_and_no_output(case, tmp_path, sft_model, train_prompts):
    prompts, model, extra = train_prompts, sft_model, []
    if case == "missing_columns":
        prompts = tmp_path / "p.jsonl"
        prompts.write_text(json.dumps({"id": "a", "question": "q"}) + "\n")
    elif case == "not_a_dataset":
        prompts = tmp_path / "p.jsonl"
        prompts.write_bytes(b"\x00\x01binary garbage\n")
    elif case == "group_size_0":
        extra = ["--group-size", 0]
    elif case == "all_images_bad":
        prompts = tmp_path / "p.jsonl"
        prompts.write_text("".join(json.dumps({"id": str(i), "question": "q", "answer": "1",
                                               "image_path": "../../etc/passwd"}) + "\n" for i in range(3)))
    elif case == "missing_model":
        model = tmp_path / "nope"
    r = run_cli("dfgen", "sample", "--prompts", prompts, "--model", model, "--out", tmp_path / "O", *extra,
                check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.glob("O/*.parquet"))


def test_some_bad_images_are_skipped_and_counted(tmp_path, sft_model):
    import base64  # noqa: F401
    from dfgen.synth.grid import make_problems

    p = next(make_problems(1, seed=0))
    (tmp_path / "ok.png").write_bytes(p.render())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [{"id": "good", "question": p.question(), "answer": str(p.answer), "image_path": "ok.png"},
            {"id": "bad", "question": "q", "answer": "1", "image_path": "bad.png"},
            {"id": "escape", "question": "q", "answer": "1", "image_path": "/etc/passwd"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("dfgen", "sample", "--prompts", tmp_path / "p.jsonl", "--model", sft_model, "--out",
                tmp_path / "O", "--group-size", 2)
    assert "skipped 2 bad prompt(s)" in r.stdout
    assert pl.read_parquet(str(tmp_path / "O" / "*.parquet"))["id"].to_list() == ["good"]


def test_seeded_sampler_never_draws_a_zero_probability_token(monkeypatch):
    """u == 0 (torch.rand can return exactly 0) must not select a suppressed id at index 0."""
    import math

    import torch

    from dfgen.backends import SamplingConfig
    from dfgen.backends.hf import _SeededSampler

    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(*a))
    sampler = _SeededSampler([1, 2], SamplingConfig(1.0, 1.0, 8), suppress=[0, 1])
    out = sampler(None, torch.randn(2, 10))
    tok = out.argmax(-1)
    assert (tok >= 2).all(), tok
    assert all(math.isfinite(v) for v in sampler.logprobs[0].tolist())


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_fast_decode_gives_the_same_samples_as_generate(sft_model, train_prompts, temperature, top_p):
    """The lean decode loop (default) and transformers' generate (fast_decode=False) must draw
    the same tokens with the same logprobs from the same seeds: left-padded batch, EOS mid-batch."""
    from dfgen.backends import Prompt, SamplingConfig
    from dfgen.backends import fast_decode
    from dfgen.backends.hf import HFBackend
    from dfgen.images import decode_image
    from dfgen.policy import load_policy

    model, proc = load_policy(sft_model)
    fast = HFBackend(None, model=model, processor=proc)
    slow = HFBackend(None, model=model, processor=proc, fast_decode=False)
    rows = pl.read_parquet(str(train_prompts / "*.parquet")).head(6)
    prompts = [Prompt(r["question"], decode_image(r["image"])) for r in rows.iter_rows(named=True)]
    assert len({len(ids) for ids in fast.prompt_ids(prompts)}) > 1  # left padding is exercised
    assert fast_decode.supported(model, fast._inputs(prompts))  # the fast path is what runs
    cfg = SamplingConfig(temperature, top_p, 48)
    seeds = [[11 * i, 11 * i + 1] for i in range(len(prompts))]
    a, b = fast.generate(prompts, seeds, cfg), slow.generate(prompts, seeds, cfg)
    flat_a = [s for g in a for s in g]
    flat_b = [s for g in b for s in g]
    assert [s.token_ids for s in flat_a] == [s.token_ids for s in flat_b]
    assert [s.finish_reason for s in flat_a] == [s.finish_reason for s in flat_b]
    assert "stop" in {s.finish_reason for s in flat_a}  # rows finish at different steps
    diff = max(abs(x - y) for sa, sb in zip(flat_a, flat_b) for x, y in zip(sa.logprobs, sb.logprobs))
    assert diff < 1e-5



def test_fast_decode_runs_without_autograd(sft_model, train_prompts):
    """The decode loop runs under inference mode (no autograd bookkeeping per step: a lost decorator
    measured 5-10% slower in bench_sample), whatever the caller's grad mode."""
    import torch

    from dfgen.backends import Prompt
    from dfgen.backends import fast_decode
    from dfgen.backends.hf import HFBackend
    from dfgen.images import decode_image
    from dfgen.policy import load_policy

    model, proc = load_policy(sft_model)
    rows = pl.read_parquet(str(train_prompts / "*.parquet")).head(2)
    inputs = HFBackend(None, model=model, processor=proc)._inputs(
        [Prompt(r["question"], decode_image(r["image"])) for r in rows.iter_rows(named=True)])
    modes = []

    def step(logits):
        modes.append(torch.is_inference_mode_enabled())
        return logits.argmax(-1)

    with torch.enable_grad():
        fast_decode.decode(model, inputs, 4, eos_id=-1, step=step)
    assert modes and all(modes), modes

HOLD = """
import sys, time
from pathlib import Path
from dfgen.shards import WriterLock
with WriterLock(Path(sys.argv[1]), [int(sys.argv[2])]):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(folder, worker=0):
    """Another process holding the writer lock of worker ``worker`` of ``folder``."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(worker)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_refused_run_removes_only_its_own_lock_files(tmp_path):
    """A run refused inside its lock, in a folder it made, removes its own lock files and leaves the
    folder to a process writing another worker there. Seen in CI: that cleanup took every
    ``_lock.w*`` file, another process's included, and the racing test below failed ('not found:
    _lock.w000.holder')."""
    from dfgen.errors import UserError
    from dfgen.shards import WriterLock

    out = tmp_path / "S"
    with pytest.raises(UserError, match="refused"):
        with WriterLock(out, [0]):
            other = _hold(out, worker=1)
            raise UserError("refused after taking the lock (another run's settings)")
    try:
        assert sorted(p.name for p in out.iterdir()) == ["_lock.w001", "_lock.w001.holder"]
    finally:
        other.kill()
        other.wait()
    with pytest.raises(UserError, match="refused"):
        with WriterLock(tmp_path / "T", [0]):
            raise UserError("refused")
    assert not (tmp_path / "T").exists()  # alone in its folder, a refused run still leaves none behind


def test_a_second_writer_of_a_folder_is_refused_naming_the_holder_and_a_killed_one_is_taken_over(
        sampled, sft_model, train_prompts, tmp_path):
    args = ["--prompts", train_prompts, "--model", sft_model, "--group-size", 2, "--limit", 4, "--chunk-size", 2]
    stages = {"sample": ["sample", *args, "--out", tmp_path / "S"],
              "repair": ["repair", "--rollouts", sampled, "--out", tmp_path / "R"],
              "mask": ["mask", "--repairs", tmp_path / "R", "--out", tmp_path / "M"]}
    for stage, cmd in stages.items():
        out = cmd[cmd.index("--out") + 1]
        holder = _hold(out)
        r = run_cli("dfgen", *cmd, check=False)
        assert r.returncode != 0 and "being written by another process" in r.stderr, (stage, r.stderr)
        assert f"pid {holder.pid}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not list(out.glob("*.parquet"))
        holder.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock: the next run takes over
        holder.wait()
        run_cli("dfgen", *cmd)
        assert list(out.glob("*.parquet")), stage


def test_two_samplers_racing_for_one_folder_leave_exactly_one_runs_shards(sft_model, train_prompts, tmp_path):
    out = tmp_path / "S"
    base = [sys.executable, "-m", "dfgen.cli", "sample", "--prompts", str(train_prompts), "--model", str(sft_model),
            "--out", str(out), "--group-size", 2, "--limit", 16, "--chunk-size", 2]
    procs = {seed: subprocess.Popen([*map(str, base), "--seed", str(seed)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for seed in (1, 2)}
    done = {seed: (p.wait(timeout=300), p.stderr.read()) for seed, p in procs.items()}
    winners = [seed for seed, (rc, _) in done.items() if rc == 0]
    assert len(winners) == 1, done
    (loser_rc, loser_err), = [v for seed, v in done.items() if seed not in winners]
    assert "being written by another process" in loser_err or "holds shards with a different" in loser_err, loser_err
    assert len(loser_err.strip().splitlines()) == 1
    from dfgen.shards import open_shards

    ss = open_shards(out)
    assert ss.meta["seed"] == winners[0] and json.loads((out / "config.json").read_text())["seed"] == winners[0]
    g = pl.read_parquet(str(out / "*.parquet"))
    assert g.height == 16 and g["id"].n_unique() == 16
    from dfgen.seeds import sample_seed

    for row in g.iter_rows(named=True):  # every rollout in the folder is the winner's
        assert [x["seed"] for x in row["rollouts"]] == [sample_seed(winners[0], row["id"], k) for k in range(2)]
