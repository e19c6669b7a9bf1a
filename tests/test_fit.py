import json
import math
import os
import shutil
import subprocess
import sys

import polars as pl
import pytest
import torch

from dfgen.errors import UserError
from tests.conftest import misread_pair, run_cli


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fit_trains_and_writes_a_checkpoint_transformers_and_the_sampler_load(df_shards, sft_model, tmp_path):
    from transformers import AutoModelForImageTextToText

    from dfgen.backends import Prompt, SamplingConfig
    from dfgen.backends.hf import HFBackend

    r = run_cli("dftrain", "fit", "--data", df_shards / "m", "--model", sft_model, "--out", tmp_path / "o",
                "--steps", 3, "--groups-per-step", 4, "--repaired-weight", 1.0, "--lr", 1e-3)
    assert "model saved" in r.stdout
    m = AutoModelForImageTextToText.from_pretrained(tmp_path / "o")
    base = AutoModelForImageTextToText.from_pretrained(sft_model)
    moved = sum((a - b).abs().sum().item() for a, b in zip(m.parameters(), base.parameters()))
    assert moved > 0
    out = HFBackend(tmp_path / "o").generate([Prompt("How many red plus blue?", None)], [[1]],
                                             SamplingConfig(max_new_tokens=4))
    assert len(out[0][0].token_ids) >= 1
    recs = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(math.isfinite(x["loss"]) for x in recs)
    assert any(x["repaired_samples"] > 0 for x in recs)
    assert (tmp_path / "o" / "step_000003" / "trainer_state.json").is_file()


def test_resume_continues_exactly(df_shards, sft_model, tmp_path):
    from dftrain.fit import FitConfig, run_fit

    kw = dict(data=df_shards / "m", model=sft_model, groups_per_step=2, lr=1e-3, updates_per_batch=2)
    run_fit(FitConfig(out=tmp_path / "a", steps=4, **kw), log=lambda m: None)
    run_fit(FitConfig(out=tmp_path / "b", steps=2, save_every=1, **kw), log=lambda m: None)
    with pytest.raises(UserError, match="other settings .marked: 'root' there"):  # not silently another objective
        run_fit(FitConfig(out=tmp_path / "b", steps=4, resume=True, marked="edit", **kw), log=lambda m: None)
    run_fit(FitConfig(out=tmp_path / "b", steps=4, resume=True, **kw), log=lambda m: None)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_plain_grpo_and_df_give_the_same_loss_when_kappa_is_one(df_shards, sft_model, tmp_path):
    from dftrain.fit import FitConfig, run_fit

    kw = dict(data=df_shards / "m", model=sft_model, groups_per_step=16, steps=1)
    run_fit(FitConfig(out=tmp_path / "g", objective="grpo", **kw), log=lambda m: None)
    run_fit(FitConfig(out=tmp_path / "d", objective="df-grpo", kappa=1.0, repaired_weight=0.0, fail_advantage=0.0, **kw),
            log=lambda m: None)  # the token weights alone: no repaired samples, no all-fail term
    run_fit(FitConfig(out=tmp_path / "k", objective="df-grpo", kappa=0.0, **kw), log=lambda m: None)
    g, d, k = _losses(tmp_path / "g"), _losses(tmp_path / "d"), _losses(tmp_path / "k")
    assert g[0] != 0.0, "fixture should hold mixed-reward groups"
    assert abs(g[0] - d[0]) < 1e-6
    assert abs(g[0] - k[0]) > 1e-6  # the mask changes the objective


@pytest.mark.parametrize("policy_loss,extra", [("gspo", {"dual_clip": 3.0}), ("sapo", {}), ("cispo", {"clip_high": 4.0})])
def test_every_policy_loss_trains_and_equals_grpo_at_kappa_one(policy_loss, extra, df_shards, sft_model, tmp_path):
    from dftrain.fit import FitConfig, run_fit

    kw = dict(data=df_shards / "m", model=sft_model, groups_per_step=16, steps=1, policy_loss=policy_loss, **extra)
    run_fit(FitConfig(out=tmp_path / "g", objective="grpo", **kw), log=lambda m: None)
    run_fit(FitConfig(out=tmp_path / "d", objective="df-grpo", kappa=1.0, repaired_weight=0.0, fail_advantage=0.0, **kw),
            log=lambda m: None)
    run_fit(FitConfig(out=tmp_path / "k", objective="df-grpo", kappa=0.0, **kw), log=lambda m: None)
    g, d, k = _losses(tmp_path / "g"), _losses(tmp_path / "d"), _losses(tmp_path / "k")
    assert g[0] != 0.0 and math.isfinite(g[0])
    assert abs(g[0] - d[0]) < 1e-6 and abs(g[0] - k[0]) > 1e-6
    assert json.loads((tmp_path / "k" / "fit_config.json").read_text())["policy_loss"] == policy_loss


@pytest.mark.parametrize("bad,match", [(["--policy-loss", "trpo"], "'trpo' is not one of 'ppo', 'gspo', 'sapo', 'cispo'"),
                                       (["--policy-loss", "sapo", "--dual-clip", 3], "sapo has none"),
                                       (["--dual-clip", 1.1], "--dual-clip=1.1 must exceed 1 + --clip-high")])
def test_fit_refuses_surrogate_settings_that_do_not_go_together(bad, match, df_shards, sft_model, tmp_path):
    r = run_cli("dftrain", "fit", "--data", df_shards / "m", "--model", sft_model, "--out", tmp_path / "o", *bad,
                check=False)
    assert r.returncode != 0 and match in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_micro_batching_does_not_change_the_update(df_shards, sft_model, tmp_path):
    from dftrain.fit import FitConfig, run_fit

    kw = dict(data=df_shards / "m", model=sft_model, groups_per_step=4, steps=1, lr=1e-3)
    run_fit(FitConfig(out=tmp_path / "one", micro_batch=64, **kw), log=lambda m: None)
    run_fit(FitConfig(out=tmp_path / "many", micro_batch=3, **kw), log=lambda m: None)
    assert abs(_losses(tmp_path / "one")[0] - _losses(tmp_path / "many")[0]) < 1e-5
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "many" / "model.safetensors")
    # Adam normalises the step, so float noise in near-zero gradients shows up at ~1e-5 of lr 1e-3
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 2e-4


def test_a_df_step_lowers_the_wrong_token_more_than_the_others_and_grpo_spreads_it(sft_model):
    """One group: a correct rollout and the same rollout with one wrong read. One SGD step."""
    from dfgen.align import align
    from dfgen.backends import Prompt
    from dfgen.backends.hf import HFBackend
    from dfgen.images import decode_image
    from dfgen.policy import load_policy
    from dfgen.synth.grid import make_problems, solution_text
    from dftrain.batch import Batch, build_rows
    from dftrain.fit import FitConfig, micro_loss

    p = next(make_problems(1, seed=21))
    good = solution_text(p.steps, p.answer)
    v = p.steps[0]["value"]
    bad = good.replace(f"= {v}\n", f"= {(v + 1) % 10}\n", 1)
    results = {}
    for objective in ("grpo", "df-grpo"):
        model, proc = load_policy(sft_model)
        tok = proc.tokenizer
        ids_good = tok(good, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids_bad = tok(bad, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        img = decode_image(p.render())
        be = HFBackend(None, model=model, processor=proc)
        lp_good, lp_bad = be.score([Prompt(p.question(), img)] * 2, [ids_good, ids_bad])
        a = align(ids_bad, ids_good)
        wrong = a.root_bad.index(1)
        group = {"id": "g", "question": p.question(), "_image": img, "rollouts": [
            {"token_ids": ids_good, "logprobs": lp_good, "reward": 1.0, "repair_status": None},
            {"token_ids": ids_bad, "logprobs": lp_bad, "reward": 0.0, "repair_status": "ok",
             "mask_bad": a.root_bad, "root_bad": a.root_bad, "repaired_ids": ids_good,
             "repaired_logprobs": lp_good, "mask_repaired": a.root_repaired}]}
        cfg = FitConfig(data=".", model=".", out=".", objective=objective, kappa=0.0, repaired_weight=0.0)
        rows = build_rows([group], cfg)
        model.train()
        loss, _ = micro_loss(model, Batch.from_rows(rows, cfg), cfg, proc, [], 1.0)
        loss.backward()
        with torch.no_grad():
            for prm in model.parameters():
                if prm.grad is not None:
                    prm -= 0.5 * prm.grad
        after = be.score([Prompt(p.question(), img)], [ids_bad])[0]
        delta = [x - y for x, y in zip(after, lp_bad)]
        others = [abs(d) for k, d in enumerate(delta) if k != wrong]
        results[objective] = (delta[wrong], sum(others) / len(others))
    d_wrong, d_others = results["df-grpo"]
    g_wrong, g_others = results["grpo"]
    assert d_wrong < 0  # DF lowers the wrong token's probability
    assert -d_wrong > 3 * d_others  # ... much more than it moves the other tokens
    assert (-d_wrong / d_others) > (-g_wrong / max(g_others, 1e-12))  # GRPO spreads the change


def test_fail_advantage_puts_a_negative_advantage_on_the_root_token_of_all_fail_groups_only(sft_model):
    """--fail-advantage A: a group whose rollouts all failed (GRPO advantage 0) gives its repaired
    rollouts advantage -A on the root-cause token alone; mixed groups and A = 0 are untouched."""
    from dfgen.backends import Prompt
    from dfgen.backends.hf import HFBackend
    from dfgen.images import decode_image
    from dfgen.policy import load_policy
    from dfgen.synth.grid import make_problems
    from dftrain.batch import Batch, build_rows
    from dftrain.fit import FitConfig, micro_loss
    from dftrain.loss import batch_token_weights

    model, proc = load_policy(sft_model)
    tok = proc.tokenizer
    be = HFBackend(None, model=model, processor=proc)
    groups = []
    for n, p in enumerate(make_problems(2, seed=5)):
        ids_good, ids_bad, a = misread_pair(tok, p)
        img = decode_image(p.render())
        lp_good, lp_bad = be.score([Prompt(p.question(), img)] * 2, [ids_good, ids_bad])  # on-policy: ratio 1
        repaired = {"token_ids": ids_bad, "logprobs": lp_bad, "reward": 0.0, "repair_status": "ok",
                    "mask_bad": a.mask_bad, "root_bad": a.root_bad, "repaired_ids": ids_good,
                    "repaired_logprobs": lp_good, "mask_repaired": a.mask_repaired}
        other = {"token_ids": ids_good if n else ids_bad, "logprobs": lp_good if n else lp_bad,
                 "reward": float(n), "repair_status": None if n else "failed"}
        groups.append({"id": f"g{n}", "question": p.question(), "_image": img,
                       "rollouts": [repaired, other]})  # g0: all failed; g1: one right, one repaired
    preps = {}
    for A in (0.0, 0.7):
        cfg = FitConfig(data=".", model=".", out=".", kappa=0.1, fail_advantage=A, repaired_weight=0.0)
        batch = Batch.from_rows(build_rows(groups, cfg), cfg)
        preps[A] = (batch.advantages, batch_token_weights(batch, cfg))
    (adv0, w0), (adv, w) = preps[0.0], preps[0.7]
    root = torch.zeros_like(w[0])
    root[: len(groups[0]["rollouts"][0]["root_bad"])] = torch.tensor(groups[0]["rollouts"][0]["root_bad"], dtype=torch.float32)
    assert adv0[0] == 0 and adv[0] == pytest.approx(-0.7)  # the all-fail group's repaired rollout
    assert torch.equal(w[0], root) and root.sum() == 1  # its root-cause token alone
    assert adv[1] == 0 and torch.equal(w[1], w0[1])  # an unrepaired failure of that group: as GRPO
    assert torch.equal(adv[2:], adv0[2:]) and torch.equal(w[2:], w0[2:])  # the mixed group: unchanged
    cfg = FitConfig(data=".", model=".", out=".", kappa=0.1, fail_advantage=0.7, repaired_weight=0.0)
    model.train()
    only_fail = Batch.from_rows(build_rows(groups[:1], cfg), cfg)
    loss, _ = micro_loss(model, only_fail, cfg, proc, [], 1.0)
    loss.backward()  # GRPO gets no gradient from an all-fail group; this option does
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("case", ["no_masks", "nan_logprobs", "no_root", "other_tokenizer", "empty", "before_weights"])
def test_fit_refuses_bad_data_clearly(case, df_shards, sft_model, tmp_path):
    from dfgen.shards import ShardWriter, open_shards

    data, model = df_shards / "m", sft_model
    if case == "no_masks":
        data, match = df_shards / "s", "no masks"
    elif case in ("nan_logprobs", "no_root"):  # one shard edited: a NaN logprob, or root masks dropped
        rows = pl.read_parquet(str(df_shards / "m" / "*.parquet")).to_dicts()
        for row in rows:
            if case == "nan_logprobs":
                row["rollouts"][0]["logprobs"][0] = float("nan")
            for r in row["rollouts"] if case == "no_root" else ():
                r["root_bad"] = None
        meta = open_shards(df_shards / "m").meta
        ShardWriter(tmp_path / "n", "mask", {k: v for k, v in meta.items() if k not in ("stage",)}).write(0, rows)
        data, match = tmp_path / "n", ("NaN or inf" if case == "nan_logprobs" else "needs the root_bad mask")
    elif case == "before_weights":  # shards are refused before the weights load: these would not load
        model = tmp_path / "corrupt"
        shutil.copytree(sft_model, model)
        (model / "model.safetensors").write_bytes(b"not a safetensors file")
        data, match = df_shards / "s", "no masks"
    elif case == "other_tokenizer":
        from dfgen.tiny import build_tiny

        model, match = build_tiny(tmp_path / "other", seed=9), "another tokenizer"
    else:
        meta = open_shards(df_shards / "m").meta
        ShardWriter(tmp_path / "e", "mask", {k: v for k, v in meta.items() if k not in ("stage",)}).write(0, [])
        data, match = tmp_path / "e", "no groups"
    r = run_cli("dftrain", "fit", "--data", data, "--model", model, "--out", tmp_path / "o", "--steps", 1,
                check=False)
    assert r.returncode != 0 and match in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_ddp_with_two_cpu_processes_trains_disjoint_data_and_keeps_replicas_identical(df_shards, sft_model, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None, "torchrun ships with torch; it should sit beside this interpreter"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "dftrain.cli", "fit",
                        "--data", str(df_shards / "m"), "--model", str(sft_model), "--out", str(tmp_path / "o"),
                        "--steps", "2", "--groups-per-step", "2"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    st = json.loads((tmp_path / "o" / "ddp_check.json").read_text())
    assert st["world"] == 2 and st["replicas_identical"] and st["disjoint_data"]


def test_reference_kl_is_finite_and_zero_until_the_policy_moves(df_shards, sft_model, tmp_path):
    """beta > 0 loads the frozen reference (its log-probs computed once per batch, reused by the
    second update). Padding is a suppressed token (logprob -inf under both models): it must not
    turn the KL into NaN. KL is 0 while the policy equals the reference and > 0 once it moved."""
    from dftrain.fit import FitConfig, run_fit

    run_fit(FitConfig(data=df_shards / "m", model=sft_model, out=tmp_path / "kl", groups_per_step=2, steps=3,
                      lr=1e-3, beta=0.04, updates_per_batch=2), log=lambda m: None)
    recs = [json.loads(x) for x in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) and r["kl"] >= 0 for r in recs)
    moved = [r["adv_abs_mean"] > 0 for r in recs]
    first = moved.index(True)  # steps before the first non-zero advantage leave the policy at the reference
    assert all(r["kl"] == 0 for r in recs[:first]) and max(r["kl"] for r in recs[first:]) > 0


def test_fit_keeps_the_vision_tower_fixed_unless_asked(df_shards, sft_model, tmp_path):
    from transformers import AutoModelForImageTextToText

    from dftrain.fit import FitConfig, run_fit

    base = AutoModelForImageTextToText.from_pretrained(sft_model)
    kw = dict(data=df_shards / "m", model=sft_model, steps=2, groups_per_step=4, lr=1e-3)
    run_fit(FitConfig(out=tmp_path / "frozen", **kw), log=lambda m: None)
    run_fit(FitConfig(out=tmp_path / "trained", freeze_vision=False, **kw), log=lambda m: None)

    def moved(out, part):
        m = AutoModelForImageTextToText.from_pretrained(out)
        a, b = getattr(m.model, part).state_dict(), getattr(base.model, part).state_dict()
        return sum((a[k] - b[k]).abs().sum().item() for k in a)

    assert moved(tmp_path / "frozen", "visual") == 0 and moved(tmp_path / "frozen", "language_model") > 0
    assert moved(tmp_path / "trained", "visual") > 0


def test_shards_round_trip_into_per_token_advantages_an_external_trainer_reads(df_shards, sft_model, tmp_path):
    """dftrain.integrations.shard_advantages: one row per rollout, weights equal to what fit trains on."""
    from datasets import Dataset

    from dfgen.shards import open_shards
    from dftrain.batch import Batch, build_rows
    from dftrain.fit import FitConfig
    from dftrain.integrations import shard_advantages
    from dftrain.loss import batch_token_weights

    ds = shard_advantages(df_shards / "m", kappa=0.1, marked="root")
    ds.to_parquet(tmp_path / "adv.parquet")
    back = Dataset.from_parquet(str(tmp_path / "adv.parquet"))
    assert back.to_list() == ds.to_list()
    groups = list(open_shards(df_shards / "m").iter_rows())
    assert len(ds) == sum(len(g["rollouts"]) for g in groups)
    cfg = FitConfig(data=df_shards / "m", model=sft_model, out=tmp_path / "x", kappa=0.1, marked="root",
                    repaired_weight=0.0, fail_advantage=0.0)  # the integrations carry the token weights only
    for g in groups:
        g["_image"] = None  # weights and advantages need no image
    rows = build_rows(groups, cfg)
    batch = Batch.from_rows(rows, cfg)
    w, adv = batch_token_weights(batch, cfg), batch.advantages
    for i, r in enumerate(ds):
        n = len(r["completion_ids"])
        assert r["completion_ids"] == rows[i].token_ids
        assert abs(r["advantage"] - float(adv[i])) < 1e-6
        assert torch.allclose(torch.tensor(r["token_weights"]), w[i, :n].float(), atol=1e-6)
    assert any(min(r["token_weights"]) < 1 for r in ds)  # some rollouts carry DF weights
