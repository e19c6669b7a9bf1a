"""The resample repairer: verifier-guided prefix resampling, needing only the prompt, image and reward."""
import json

import polars as pl
import pytest

from dfgen.repairers.resample import Search
from tests.conftest import DATA, run_cli


def _search(K, salvageable, strategy="binary", max_probes=99):
    """Run a Search over K prefixes against a salvageability oracle ``salvageable(c) -> bool``."""
    s = Search(row={}, i=0, cuts=list(range(K)), strategy=strategy)
    while (c := s.next_c(max_probes, budget=10 ** 9)) is not None:
        s.probes += 1
        s.record(c, ["win"] if salvageable(c) else [])
    return s


@pytest.mark.parametrize("strategy", ["binary", "backward"])
def test_search_finds_the_longest_salvageable_prefix_when_salvageability_falls_with_length(strategy):
    for K in range(1, 12):
        for first_error in range(0, K + 1):  # prefixes 0..first_error-1 are salvageable... none if 0
            s = _search(K, lambda c: c < first_error, strategy)
            assert s.best == (first_error - 1 if first_error else None), (K, first_error)
            if strategy == "binary":
                assert s.probes <= (K - 1).bit_length() + 1  # ceil(log2 K) + 1


@pytest.mark.parametrize("strategy", ["binary", "backward"])
def test_the_kept_prefix_is_never_longer_than_the_longest_seen_salvageable(strategy):
    import random

    rng = random.Random(0)
    for _ in range(300):
        K = rng.randint(1, 10)
        truth = {c: rng.random() < 0.5 for c in range(K)}  # salvageability need not be monotone
        s = _search(K, truth.get, strategy, max_probes=rng.randint(1, 5))
        seen = [c for c in s.probed if truth[c]]
        assert s.best == (max(seen) if seen else None)
        assert s.best is None or (truth[s.best] and s.best in s.probed)


def test_prefix_prompts_continue_exactly_where_the_prefix_ends(sft_model, test_prompts):
    """Greedy generation from the prompt plus the first k tokens of a greedy answer is the rest of that
    answer: the prefix is placed right after the prompt (rows of different prefix lengths in one batch,
    left-padded), on the fast decode path and through transformers' generate."""
    from dfgen.backends import Prompt, SamplingConfig, get_backend
    from dfgen.images import decode_image
    from dfgen.records import load_prompts

    recs, _ = load_prompts(test_prompts, limit=4)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=24)
    for fast in (True, False):
        be = get_backend("hf", sft_model, fast_decode=fast)
        prompts = [Prompt(r["question"], decode_image(r["image"])) for r in recs]
        full = [o[0].token_ids for o in be.generate(prompts, [[0]] * len(prompts), cfg)]
        ks = [min(k, len(f) - 1) for k, f in zip((1, 5, 9, 13), full)]
        pre = [Prompt(p.question, p.image, tuple(f[:k])) for p, f, k in zip(prompts, full, ks)]
        cont = [o[0].token_ids for o in be.generate(pre, [[0]] * len(pre), cfg)]
        for f, k, c in zip(full, ks, cont):
            assert c[: len(f) - k] == f[k:], (fast, k)


@pytest.fixture(scope="module")
def no_solution(tmp_path_factory):
    """The start's own task exported as plain prompt records without ``solution``, sampled by the start."""
    from dfgen.records import load_prompts
    from dfgen.synth.grid import GridTask, write_synth
    from dftrain.demo import START, TASK

    d = tmp_path_factory.mktemp("nosol")
    write_synth(d / "synth", 24, seed=5, split="val", task=GridTask(**TASK))
    recs, _ = load_prompts(d / "synth")
    pl.DataFrame([{**r, "solution": None} for r in recs]).write_parquet(d / "prompts.parquet")
    run_cli("dfgen", "sample", "--prompts", d / "prompts.parquet", "--model", START, "--out", d / "s",
            "--group-size", "4", "--seed", "3")
    return d


def _flat(path):
    return pl.read_parquet(str(path / "*.parquet")).explode("rollouts").unnest("rollouts")


def test_prompts_without_a_solution_get_a_reasoning_budget(no_solution):
    from dfgen.sample import REASONING_BUDGET

    meta = json.loads((no_solution / "s" / "config.json").read_text())
    assert meta["max_new_tokens"] == REASONING_BUDGET  # not the synthetic solutions' ~85
    f = _flat(no_solution / "s")
    assert (f["finish_reason"] == "stop").mean() > 0.95  # the start finishes its answers


def test_sample_warns_in_one_line_when_rollouts_stop_at_the_limit(no_solution, tmp_path):
    from dftrain.demo import START

    p = run_cli("dfgen", "sample", "--prompts", no_solution / "prompts.parquet", "--model", START, "--out",
                tmp_path / "s", "--group-size", "2", "--limit", "4", "--max-new-tokens", "8")
    warn = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "8 of 8 rollouts (100%) stopped at the 8-token limit" in warn[0], p.stderr
    p = run_cli("dfgen", "sample", "--prompts", no_solution / "prompts.parquet", "--model", START, "--out",
                tmp_path / "s2", "--group-size", "2", "--limit", "4")
    assert "warning:" not in p.stderr


def test_resample_repairs_prompts_without_a_solution_and_counts_every_token(no_solution):
    from dfgen.benchmarks import reward

    d = no_solution
    p = run_cli("dfgen", "repair", "--rollouts", d / "s", "--out", d / "r", "--repairer", "resample",
                "--resample-n", "3", "--seed", "1")
    f = _flat(d / "r").filter(pl.col("reward") < 1)
    ok = f.filter(pl.col("repair_status") == "ok")
    assert f.height > 0 and ok.height > 0.3 * f.height, p.stdout
    assert set(f["repair_status"]) <= {"ok", "no salvageable prefix", "wrong answer after repair",
                                       "edit ratio above bound"}
    for r in ok.iter_rows(named=True):
        assert reward(r, r["repaired_text"])[1] == 1.0  # verified against the reward alone
        assert r["repair_probes"] >= 1 and r["repair_samples"] == 3 * r["repair_probes"]
        shared = next((k for k, (a, b) in enumerate(zip(r["token_ids"], r["repaired_ids"])) if a != b),
                      min(len(r["token_ids"]), len(r["repaired_ids"])))
        assert r["repair_gen_tokens"] >= len(r["repaired_ids"]) - shared  # its own suffix was generated
    from dfgen.repair import RepairConfig

    assert (f["repair_probes"] <= RepairConfig.max_probes).all() and f["repair_gen_tokens"].null_count() == 0
    st = json.loads(run_cli("dfgen", "stats", d / "r", "--json").stdout)
    assert st["repair_gen_tokens"] == int(f["repair_gen_tokens"].sum()) > 0
    assert st["repair_probes"] == int(f["repair_probes"].sum())
    # the kept prefix is the bad rollout's own lines: the repair starts with them verbatim
    for r in ok.iter_rows(named=True):
        kept = r["repaired_text"].split("\n")
        bad = r["text"].split("\n")
        n = next((k for k, (a, b) in enumerate(zip(kept, bad)) if a != b), min(len(kept), len(bad)))
        assert kept[:n] == bad[:n]


def test_the_token_budget_and_probe_limit_bound_the_search(no_solution, tmp_path):
    d = no_solution
    run_cli("dfgen", "repair", "--rollouts", d / "s", "--out", tmp_path / "r1", "--repairer", "resample",
            "--token-budget", "1")
    f = _flat(tmp_path / "r1").filter(pl.col("reward") < 1)
    assert (f["repair_probes"] == 1).all()  # no probe starts once the budget is reached
    run_cli("dfgen", "repair", "--rollouts", d / "s", "--out", tmp_path / "r2", "--repairer", "resample",
            "--max-probes", "2", "--search", "backward")
    f = _flat(tmp_path / "r2").filter(pl.col("reward") < 1)
    assert f["repair_probes"].max() <= 2 and (f["repairer"] == "resample").all()


def test_resample_runs_on_a_mathvista_format_prompt_set(tmp_path):
    """Real benchmark records (no solution, free-form answers): the tiny start cannot answer them, so
    every search ends without a salvageable prefix, each counted and charged, none dropped."""
    from dfgen.benchmarks import BENCHMARKS
    from dftrain.demo import START

    recs, _ = BENCHMARKS["mathvista"].load(DATA / "mathvista" / "testmini_with_images.jsonl", limit=3)
    assert recs and not any(r.get("solution") for r in recs)
    pl.DataFrame(recs).write_parquet(tmp_path / "mathvista.parquet")
    run_cli("dfgen", "sample", "--prompts", tmp_path / "mathvista.parquet", "--model", START,
            "--out", tmp_path / "s", "--group-size", "2", "--max-new-tokens", "32")
    p = run_cli("dfgen", "repair", "--rollouts", tmp_path / "s", "--out", tmp_path / "r", "--repairer", "resample",
                "--resample-n", "2", "--max-probes", "2")
    f = _flat(tmp_path / "r")
    failed = f.filter(pl.col("reward") < 1)
    assert f.height == 6 and failed.height > 0
    assert failed["repair_status"].null_count() == 0 and (failed["repair_gen_tokens"] > 0).all()
    assert "failed rollouts" in p.stdout


def test_resample_refuses_bad_settings_in_one_line(no_solution, tmp_path):
    for args in (["--repairer", "resample", "--resample-n", "0"], ["--repairer", "resample", "--temperature", "0"],
                 ["--repairer", "resample", "--search", "sideways"],
                 ["--repairer", "oracle", "--resample-n", "3"], ["--repairer", "sibling", "--repair-model", "."],
                 ["--repairer", "resample", "--max-new-tokens", "12"]):  # an option its repairer never reads
        p = run_cli("dfgen", "repair", "--rollouts", no_solution / "s", "--out", tmp_path / "x", *args, check=False)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "x").exists()
