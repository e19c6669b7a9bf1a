"""The model-family layer (dfgen.models): one place for what differs between VLM families, and every
stage through it. Unknown families, missing towers and LoRA patterns that match nothing fail in one
line; a saved checkpoint keeps its processor class and settings."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from tests.conftest import run_cli


def test_an_unknown_family_is_one_line_naming_the_supported_ones(tiny_model, train_prompts, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_model, odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(cfg | {"model_type": "mystery_vl"}))
    r = run_cli("dfgen", "sample", "--prompts", train_prompts, "--model", odd, "--out", tmp_path / "O", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "mystery_vl" in r.stderr and "qwen2_vl" in r.stderr, r.stderr
    assert not (tmp_path / "O").exists() or not list((tmp_path / "O").glob("*.parquet"))


def test_a_saved_processor_reloads_as_the_same_class_with_the_same_settings(tiny_model, tmp_path):
    from dfgen.models import load_processor, save_processor

    p = load_processor(tiny_model)
    save_processor(p, tmp_path / "p")
    shutil.copy(tiny_model / "config.json", tmp_path / "p")
    q = load_processor(tmp_path / "p")
    assert type(q) is type(p) and q.to_dict() == p.to_dict()
    assert q.tokenizer.eos_token == p.tokenizer.eos_token == "<|im_end|>"
    text = p.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)
    assert q.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False) == text


def test_freezing_or_lora_that_finds_nothing_is_an_error_not_a_no_op(tiny_model, monkeypatch):
    import dfgen.models as fm
    from dfgen.errors import UserError
    from dfgen.policy import load_policy

    model, _ = load_policy(tiny_model)
    assert fm.vision_parameters(model) and fm.lora_targets(model)
    fam = fm.family_of(model)
    for broken in (dataclasses.replace(fam, vision_tower=("model.no_such_tower",)),
                   dataclasses.replace(fam, lora_targets=r".*no_such_proj")):
        monkeypatch.setitem(fm._BY_TYPE, "qwen2_vl", broken)
        with pytest.raises(UserError, match="no vision tower|match no module"):
            fm.vision_parameters(model) if broken.vision_tower != fam.vision_tower else fm.lora_targets(model)


def test_a_missing_processor_package_is_named(tiny_model, monkeypatch):
    import dfgen.models as fm
    from dfgen.errors import UserError

    fam = fm.family_for_type("qwen2_vl")
    monkeypatch.setitem(fm._BY_TYPE, "qwen2_vl", dataclasses.replace(fam, packages=("no_such_pkg_xyz",)))
    with pytest.raises(UserError, match="pip install no_such_pkg_xyz"):
        fm.load_processor(tiny_model)


# ----------------------------------------------------------------------------- every stage, every family
STOP_STEPS = 10
def _build(family: str, out):
    if family == "qwen2_vl":
        from dfgen.tiny import build_tiny

        return build_tiny(out)
    from tests.tiny_families import build_family

    return build_family(family, out)


def _family_ids() -> list[str]:
    from tests.tiny_families import FAMILIES

    return ["qwen2_vl", *FAMILIES]


@pytest.fixture(scope="module", params=_family_ids())
def family_run(request, tmp_path_factory, train_prompts):
    """One tiny checkpoint of the family through sample -> repair -> mask -> fit (frozen tower) -> sft -> eval."""
    from dfgen.mask import MaskConfig, run_mask
    from dfgen.repair import RepairConfig, run_repair
    from dfgen.sample import SampleConfig, run_sample
    from dftrain.fit import FitConfig, run_fit
    from dftrain.sft import SFTConfig, run_sft

    d = tmp_path_factory.mktemp(request.param)
    m = _build(request.param, d / "model")
    st = {"sample": run_sample(SampleConfig(prompts=train_prompts, model=m, out=d / "s", group_size=2, limit=4,
                                            max_new_tokens=12, seed=1))}
    _plant_a_right_and_a_misread_rollout(d / "s", m)
    st["repair"] = run_repair(RepairConfig(rollouts=d / "s", out=d / "r"))
    st["mask"] = run_mask(MaskConfig(repairs=d / "r", out=d / "k"))
    st["fit"] = run_fit(FitConfig(data=d / "k", model=m, out=d / "fit", steps=2, groups_per_step=2, lr=1e-2,
                                  repaired_weight=1.0), log=lambda s: None)
    st["lora"] = run_fit(FitConfig(data=d / "k", model=m, out=d / "lora", steps=1, groups_per_step=2, lr=1e-2,
                                   lora_rank=4), log=lambda s: None)
    # sft whose target is the turn end alone (a verbatim empty solution), so that the policy learns to stop
    import polars as pl

    pl.read_parquet(train_prompts / "*.parquet").with_columns(solution=pl.lit('{"text": ""}')).head(16) \
        .write_parquet(d / "answers.parquet")
    st["sft"] = run_sft(SFTConfig(data=d / "answers.parquet", model=m, out=d / "sft", steps=STOP_STEPS, batch_size=8,
                                  lr=2e-2, warmup=0))
    return request.param, d, st


def _plant_a_right_and_a_misread_rollout(shards, model_dir):
    """Rewrite each sampled group as (canonical solution, the same with its first read wrong), with the
    policy's own logprobs: random weights never write the step format, and repair, mask and fit need a
    group with a right and a repairable wrong rollout."""
    import types

    from dfgen.backends import Prompt
    from dfgen.backends.hf import HFBackend
    from dfgen.images import decode_image
    from dfgen.shards import ShardWriter, open_shards
    from tests.conftest import misread_pair

    ss = open_shards(shards)
    rows, files = list(ss.iter_rows()), sorted(shards.glob("*.parquet"))
    hf = HFBackend(model_dir)
    for r in rows:
        sol = json.loads(r["solution"])
        good, bad, _ = misread_pair(hf.tok, types.SimpleNamespace(steps=sol["steps"], answer=sol["answer"]))
        prompt = Prompt(r["question"], decode_image(r["image"]))
        for roll, ids, reward in zip(r["rollouts"], (good, bad), (1.0, 0.0)):
            roll |= dict(token_ids=ids, text=hf.tok.decode(ids, skip_special_tokens=True), reward=reward,
                         finish_reason="stop", logprobs=hf.score([prompt], [ids])[0])
    meta = {k: v for k, v in ss.meta.items() if k not in ("stage", "schema_version", "package_version")}
    for f in files:
        f.unlink()
    ShardWriter(shards, ss.stage, meta).write(0, rows)


def test_every_stage_runs_and_fit_trains_the_text_model_only(family_run):
    from transformers import AutoModelForImageTextToText

    from dfgen.models import vision_parameters

    family, d, st = family_run
    assert st["sample"]["rollouts"] == 8 and st["repair"]["ok"] == 4 and st["mask"]["masked"] == 4, st
    base, fit = (AutoModelForImageTextToText.from_pretrained(d / x) for x in ("model", "fit"))
    assert all(torch_equal(a, b) for a, b in zip(vision_parameters(base), vision_parameters(fit)))  # bit-identical
    vis = {id(q) for q in vision_parameters(fit)}
    text = [(a, b) for a, b in zip(base.parameters(), fit.parameters()) if id(b) not in vis]
    assert any(not torch_equal(a, b) for a, b in text), f"{family}: fit moved no text weight"
    # the saved weight names are the hub's, which vLLM loads (tests/test_vllm_families.py): no name is left
    # that the family's save_renames would rewrite, and the tower above read back bit-identical
    import re

    from safetensors import safe_open

    from dfgen.models import family_of

    names = list(safe_open(d / "fit" / "model.safetensors", "pt").keys())
    assert not [k for p, _ in family_of(fit).save_renames for k in names if re.match(p, k)], family


def test_lora_wraps_the_text_attention_and_saved_processors_keep_their_class(family_run):
    from safetensors.torch import load_file

    from dfgen.models import load_processor

    family, d, _ = family_run
    adapter = load_file(d / "lora" / "step_000001" / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and all("language_model" in k or "text_model" in k for k in adapter), \
        sorted(adapter)[:4]
    orig = load_processor(d / "model")
    for out in ("fit", "lora", "sft"):
        p = load_processor(d / out)
        assert type(p) is type(orig) and p.to_dict() == orig.to_dict(), (family, out)
        assert p.tokenizer.eos_token == orig.tokenizer.eos_token


def test_eval_scores_the_trained_checkpoint(family_run, test_prompts):
    from dftrain.evaluate import EvalConfig, evaluate

    family, d, _ = family_run
    res = evaluate(EvalConfig(data=test_prompts, model=d / "fit", out=d / "eval.json", limit=4, max_new_tokens=8))
    assert res["n"] == 4 and 0 <= res["accuracy"] <= 1, res


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.detach().cpu(), b.detach().cpu())


def test_a_rollout_stops_at_the_family_turn_end(family_run, train_prompts):
    """After a short sft whose target is the turn end alone, greedy rollouts end with the family's turn-end
    token (Gemma: <end_of_turn>, not the tokenizer's saved <eos>) and are marked stopped, not cut."""
    from dfgen.backends import Prompt, SamplingConfig
    from dfgen.backends.hf import HFBackend
    from dfgen.models import family_of
    from dfgen.records import load_prompts

    family, d, _ = family_run
    hf = HFBackend(d / "sft")
    end = hf.tok.convert_tokens_to_ids(family_of(d / "model").turn_end)
    recs, _ = load_prompts(train_prompts)
    from dfgen.images import decode_image

    prompts = [Prompt(r["question"], decode_image(r["image"])) for r in recs[:3]]
    out = hf.generate(prompts, [[0]] * 3, SamplingConfig(max_new_tokens=16, temperature=0.0))
    for (smp,) in out:
        assert smp.finish_reason == "stop" and smp.token_ids[-1] == end, (family, smp)


@pytest.mark.parametrize("edit, match", [
    (lambda d: (d / "processor_config.json").write_text(json.dumps({"processor_class": "NoSuchProcessor"})),
     "unknown processor_class 'NoSuchProcessor'"),
    (lambda d: (d / "config.json").write_text("{not json"), "cannot read config.json"),
])
def test_a_broken_checkpoint_is_one_user_error(tiny_model, tmp_path, edit, match):
    from dfgen.errors import UserError
    from dfgen.models import load_processor

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    edit(bad)
    with pytest.raises(UserError, match=match):
        load_processor(bad)
