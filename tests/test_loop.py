"""``dftrain loop``: rounds chain checkpoints and AdamW state, keep every round, resume, refuse drift."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli

LOOP = ["--rounds", 2, "--prompts-per-round", 4, "--group-size", 4, "--fit-steps", 1, "--groups-per-step", 4,
        "--eval-n", 8, "--lr", 1e-4, "--report-to", "tensorboard"]


def test_loop_chains_rounds_resumes_and_refuses_other_settings(tmp_path, sft_model, test_prompts):
    out = tmp_path / "loop"
    p = run_cli("dftrain", "loop", "--model", sft_model, "--out", out, "--eval", test_prompts, *LOOP)
    assert "2 rounds" in p.stdout
    state = json.loads((out / "loop.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [0, 1]
    for r in state["rounds"]:
        assert r["rollouts"] == 16
        assert r["repair"]["failed"] >= r["repair"]["ok"]
        # every evaluation keeps its per-problem rows, and they reproduce the recorded numbers
        rows = [json.loads(x) for x in (out / f"round_{r['round']:03d}" / "eval" / "test.jsonl").read_text().splitlines()]
        assert len(rows) == 8 and len({x["id"] for x in rows}) == 8
        assert sum(x["correct"] for x in rows) / 8 == r["accuracy"]["test"]
        prof = r["profile"]["test"]
        assert prof["steps_right"] == sum(x["steps_right"] for x in rows) / 8
        assert abs(prof["lucky"] - (r["accuracy"]["test"] - prof["steps_right"])) < 1e-12
        assert all(x["steps_right"] <= x["correct"] and 0 <= x["prefix"] <= x["steps"] for x in rows)
    # every stage of a round wrote its done marker last, holding its statistics
    from dfgen.shards import done_info

    for stage in ("sample", "repair", "df"):
        assert done_info(out / "round_000" / stage, 0)["done"]
    assert done_info(out / "round_000" / "repair", 0)["failed"] == state["rounds"][0]["repair"]["failed"]
    assert done_info(out / "round_000" / "fit")["steps"] == LOOP[LOOP.index("--fit-steps") + 1]
    # round 1 sampled from round 0's checkpoint and continued its optimizer
    r1 = json.loads((out / "round_001" / "sample" / "config.json").read_text())
    assert r1["model"] == str(out / "round_000" / "fit")
    fit1 = json.loads((out / "round_001" / "fit" / "fit_config.json").read_text())
    assert fit1["optimizer_from"] == str(out / "round_000" / "fit")
    # every round's shards are kept; round prompts differ (fresh problems every round)
    from dfgen.records import load_prompts

    recs = [load_prompts(out / f"round_{r:03d}" / "prompts")[0] for r in (0, 1)]
    assert len(recs[0]) == 4 and [x["question"] for x in recs[0]] != [x["question"] for x in recs[1]]
    # resume: one more round reuses the two finished ones untouched
    mtime = (out / "round_000" / "round.json").stat().st_mtime_ns
    args = [a if a != 2 else 3 for a in LOOP]
    run_cli("dftrain", "loop", "--model", sft_model, "--out", out, "--eval", test_prompts, *args)
    assert (out / "round_000" / "round.json").stat().st_mtime_ns == mtime
    assert len(json.loads((out / "loop.json").read_text())["rounds"]) == 3
    # --report-to tensorboard: one scalar per round (round 2 written after the resume), fits' steps beside
    from test_tracking import _events

    ev, rounds = _events(out / "tb"), json.loads((out / "loop.json").read_text())["rounds"]
    assert ev["round/sample_reward"] == [(r["round"] + 1, pytest.approx(r["sample_reward"])) for r in rounds]
    assert [v for _, v in ev["round/accuracy/test"]] == pytest.approx([r["accuracy"]["test"] for r in rounds])
    assert all(_events(out / f"round_{r:03d}" / "fit" / "tb")["train/loss"] for r in range(3))
    # other settings in the same folder: a one-line refusal naming the difference
    bad = run_cli("dftrain", "loop", "--model", sft_model, "--out", out, "--eval", test_prompts, *args,
                  "--kappa", 0.5, check=False)
    assert bad.returncode != 0 and "kappa" in bad.stderr and "Traceback" not in bad.stderr
    # a loop.json from before a setting existed ran without it (fail_advantage 0, loop.BEFORE_FIELD):
    # resumed as such, and refused under the newer default
    state = json.loads((out / "loop.json").read_text())
    del state["config"]["fail_advantage"]
    (out / "loop.json").write_text(json.dumps(state))
    bad = run_cli("dftrain", "loop", "--model", sft_model, "--out", out, "--eval", test_prompts, *args, check=False)
    assert bad.returncode != 0 and "fail_advantage" in bad.stderr and "Traceback" not in bad.stderr
    run_cli("dftrain", "loop", "--model", sft_model, "--out", out, "--eval", test_prompts, *args, "--fail-advantage", 0)


def test_optimizer_from_continues_adam_moments(tmp_path, sft_model, train_prompts):
    """A fit started from a previous run's AdamW state takes a different first step than a fresh one."""
    import torch

    from dfgen.sample import SampleConfig, run_sample
    from dftrain.fit import FitConfig, run_fit

    run_sample(SampleConfig(prompts=train_prompts, model=sft_model, out=tmp_path / "s", group_size=4, limit=8, seed=3))
    common = dict(data=tmp_path / "s", objective="grpo", steps=1, groups_per_step=8, lr=1e-3, seed=0)
    run_fit(FitConfig(model=sft_model, out=tmp_path / "a", **common), log=lambda m: None)
    run_fit(FitConfig(model=tmp_path / "a", out=tmp_path / "fresh", **common), log=lambda m: None)
    run_fit(FitConfig(model=tmp_path / "a", out=tmp_path / "cont", optimizer_from=tmp_path / "a", **common),
            log=lambda m: None)
    st = torch.load(tmp_path / "cont" / "step_000001" / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    assert all(int(v["step"]) == 2 for v in st.values())  # one step carried + one taken
    from safetensors.torch import load_file

    fresh = load_file(tmp_path / "fresh" / "model.safetensors")
    cont = load_file(tmp_path / "cont" / "model.safetensors")
    assert any(not torch.equal(fresh[k], cont[k]) for k in fresh)
    # a folder without optimizer state: one clear line, no checkpoint written
    p = run_cli("dftrain", "fit", "--data", tmp_path / "s", "--model", sft_model, "--out", tmp_path / "x",
                "--objective", "grpo", "--optimizer-from", sft_model, check=False)
    assert p.returncode != 0 and "no optimizer.pt" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "x").glob("step_*"))


@pytest.mark.parametrize("bad", [["--rounds", 0], ["--group-size", 1], ["--objective", "ppo"], ["--task", "{grid: 3"],
                                 ["--task", '{"grid": 9}'], ["--task", '{"colours": 3}'], ["--task", "[3]"],
                                 ["--marked", "first"], ["--kappa", 2], ["--mass", "spread"], ["--lr", 0],
                                 ["--policy-loss", "trpo"], ["--policy-loss", "cispo", "--dual-clip", 3]])
def test_loop_rejects_bad_settings(tmp_path, sft_model, bad):
    p = run_cli("dftrain", "loop", "--model", sft_model, "--out", tmp_path / "l", *bad, check=False)
    assert p.returncode != 0 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    assert not (tmp_path / "l" / "round_000").exists()  # refused before round 0 sampled anything
