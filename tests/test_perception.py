"""The regression guard of "the embedded policy must see": after a short SFT with the default
recipe, the first read's logits depend on the question (which colour is asked) and on the image
(how many cells of it there are). The old recipe (lr 3e-3, vision tower trained) fails it: the
second test runs that recipe and checks that the guard catches it, so the guard can fail."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SHORT = dict(steps=400, batch_size=16, seed=0)
ONE_READ = {"min_reads": 1, "max_reads": 1}
# Thresholds of the guard (the untrained policy: question_tv ~0.01, image_tv ~0.01).
MIN_QUESTION_TV, MIN_IMAGE_TV = 0.5, 0.05


@pytest.fixture(scope="module")
def one_read(tmp_path_factory, tiny_model):
    from dfgen.synth.grid import GridTask, write_synth

    d = tmp_path_factory.mktemp("perception")
    write_synth(d / "train", 2000, seed=0, split="train", task=GridTask(**ONE_READ))
    return d, GridTask(**ONE_READ)


def _short_sft(d, tiny_model, name, **kw):
    from dfgen.policy import load_policy
    from dftrain.sft import SFTConfig, run_sft

    torch.set_num_threads(2)
    run_sft(SFTConfig(data=d / "train", model=tiny_model, out=d / name, **{**SHORT, **kw}))
    return load_policy(d / name)


def test_default_recipe_reads_question_and_image(one_read, tiny_model):
    from dfgen.policy import load_policy
    from dftrain.perception import read_dependence

    d, task = one_read
    before = read_dependence(*load_policy(tiny_model), task)
    after = read_dependence(*_short_sft(d, tiny_model, "default"), task)
    assert before["question_tv"] < MIN_QUESTION_TV and before["image_tv"] < MIN_IMAGE_TV, before
    assert after["question_tv"] > MIN_QUESTION_TV and after["colour_acc"] > 0.9, after
    assert after["image_tv"] > MIN_IMAGE_TV, after


def test_guard_catches_the_old_recipe(one_read, tiny_model):
    from dftrain.perception import read_dependence

    d, task = one_read
    old = read_dependence(*_short_sft(d, tiny_model, "old", lr=3e-3, vision_lr_scale=1.0), task)
    assert old["question_tv"] < MIN_QUESTION_TV or old["image_tv"] < MIN_IMAGE_TV, old


def test_default_sft_freezes_the_vision_tower_and_a_scale_trains_it(one_read, tiny_model):
    from dfgen.policy import load_policy

    d, _ = one_read
    m0, _ = load_policy(tiny_model)
    ref = {k: v.clone() for k, v in m0.model.visual.state_dict().items()}
    lm = {k: v.clone() for k, v in m0.model.language_model.state_dict().items()}
    frozen, _ = _short_sft(d, tiny_model, "frozen", steps=3)
    assert all(torch.equal(v, ref[k]) for k, v in frozen.model.visual.state_dict().items())
    assert not all(torch.equal(v, lm[k]) for k, v in frozen.model.language_model.state_dict().items())
    trained, _ = _short_sft(d, tiny_model, "scaled", steps=3, vision_lr_scale=0.1)
    assert not all(torch.equal(v, ref[k]) for k, v in trained.model.visual.state_dict().items())


def test_save_every_keeps_loadable_intermediate_policies_inside_the_output(one_read, tiny_model):
    import json

    from dfgen.policy import load_policy

    d, _ = one_read
    _short_sft(d, tiny_model, "saved", steps=4, save_every=2)
    mid = d / "saved" / "steps" / "step_000002"
    assert sorted(p.name for p in (d / "saved" / "steps").iterdir()) == ["step_000002"]
    assert json.loads((mid / "sft_metrics.json").read_text())["step"] == 2
    m_mid, _ = load_policy(mid)
    m_end, _ = load_policy(d / "saved")
    assert not all(torch.equal(a, b) for a, b in zip(m_mid.parameters(), m_end.parameters()))
    assert not (d / "saved.steps").exists() and not (d / "saved.tmp").exists()


def test_schedule_steps_stops_early_on_the_longer_schedule(one_read, tiny_model):
    """4 steps of an 8-step schedule are the 8-step run's step-4 policy (how the shipped start is
    rebuilt: 500 steps of a 3,000-step schedule); 4 steps of a 4-step schedule are not."""
    from dfgen.policy import load_policy

    d, _ = one_read
    _short_sft(d, tiny_model, "long", steps=8, save_every=4, warmup=1)  # past the warm-up, which no schedule changes
    _short_sft(d, tiny_model, "early", steps=4, schedule_steps=8, warmup=1)
    _short_sft(d, tiny_model, "short", steps=4, warmup=1)
    ref, _ = load_policy(d / "long" / "steps" / "step_000004")
    early, _ = load_policy(d / "early")
    short, _ = load_policy(d / "short")
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), early.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(ref.parameters(), short.parameters()))


def test_the_shipped_start_is_in_the_research_regime(tmp_path):
    """``data/policies/regime_start`` (the demo's and the study's start) has the properties the
    issue "The embedded policy must see" asked for, on 300 fresh val problems of its task: accuracy
    0.30-0.70, reads right >= 85%, >= 50% of failures with a correct first step, and no kind of
    first error above 80% of failures (image misreads among them)."""
    from dfgen.policy import load_policy
    from dfgen.synth.grid import GridTask, write_synth
    from dftrain.demo import START, TASK
    from dftrain.evaluate import greedy_profile

    write_synth(tmp_path / "val", 300, seed=1, split="val", task=GridTask(**TASK))
    torch.set_num_threads(2)
    p = greedy_profile(*load_policy(START), tmp_path / "val", limit=300)
    failed = sum(p["first_error"].values())
    assert 0.30 <= p["accuracy"] <= 0.70 and p["read_acc"] >= 0.85 and p["failed_with_prefix"] >= 0.5, p
    assert max(p["first_error"].values()) <= 0.8 * failed and p["first_error"].get("count", 0) >= 0.05 * failed, p


def test_feature_probe_reads_counts_from_the_untrained_tower(tiny_model, one_read):
    from dfgen.policy import load_policy
    from dftrain.perception import feature_probe

    _, task = one_read
    res = feature_probe(*load_policy(tiny_model), task)  # 2000 boards: 600 overfit the 1152 features
    assert res["min"] > 0.9, res


@pytest.mark.parametrize("args,needle", [
    (["--probes", "nope"], "unknown probe 'nope'"),
    (["--sft", "[1]"], "expected a JSON object"),
    (["--sft", '{"lrr": 1}'], "unknown --sft keys ['lrr']"),
    (["--task", '{"grid": 9}'], "bad task"),
    (["--model", '{"width": 9}'], "unknown --model keys ['width']"),
    (["--n-train", "0"], "--n-train and --n-val must be positive"),
])
def test_probe_script_refuses_bad_arguments(tmp_path, args, needle):
    p = subprocess.run([sys.executable, "-m", "studies.perception_probe", "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "probes.jsonl").exists()


@pytest.mark.parametrize("args,code,needle", [
    (["/nonexistent-policy"], 1, "error: model folder not found"),
    (["/tmp", '{"grid": 9}'], 2, "bad task"),
    (["/tmp", "not json"], 2, "bad task"),
])
def test_perception_command_refuses_bad_input(args, code, needle):
    p = subprocess.run([sys.executable, "-m", "dftrain.perception", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == code and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stdout == ""


def test_sft_cli_defaults_are_the_config_defaults():
    from dftrain.sft import SFTConfig

    p = subprocess.run([sys.executable, "-m", "dftrain.cli", "sft", "--help"], capture_output=True, text=True,
                       env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    text = " ".join(p.stdout.split())
    for flag, value in (("--steps", SFTConfig.steps), ("--lr", SFTConfig.lr),
                        ("--vision-lr-scale", SFTConfig.vision_lr_scale), ("--batch-size", SFTConfig.batch_size)):
        assert flag in text and f"[default: {value}]" in text.split(flag, 1)[1][:300], (flag, value)


def test_encoded_batches_equal_the_processor_batches(train_prompts, tiny_model):
    from dfgen.images import decode_image
    from dfgen.policy import load_policy, prompt_inputs
    from dfgen.records import load_prompts
    from dftrain.sft import collate_prompts, encode_examples, sft_loss, target_text

    recs, _ = load_prompts(train_prompts, limit=40)
    recs[3] = {**recs[3], "question": recs[3]["question"] + " Think step by step, please."}  # a longer prompt
    images = [decode_image(r["image"]) for r in recs]
    images[5] = None  # a text-only record among image records
    model, proc = load_policy(tiny_model)
    enc = encode_examples(proc, recs, images, chunk=16)  # chunks of different padding
    for idx in ([0, 1, 2], [3, 5, 7, 30], list(range(40))):
        want = prompt_inputs(proc, [recs[i]["question"] for i in idx], [images[i] for i in idx])
        got = collate_prompts([enc[i] for i in idx], proc.tokenizer.pad_token_id)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert proc.tokenizer.decode(enc[0]["target"][:-1]) == target_text(recs[0])
    loss, n = sft_loss(model, proc, recs[:4], images[:4])
    assert loss.item() > 0 and n == sum(len(e["target"]) for e in enc[:4])
