"""The vLLM backend against the hf backend (run with `make test-vllm`, in ./.venv-vllm).

One vLLM engine per session (start-up is 20-50 s on 2 cores), loaded from a checkpoint that
``dftrain sft`` wrote (a short SFT run from the tiny policy), so every check below is also a
check that such a checkpoint loads in vLLM. The hf reference loads the same folder.
"""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make setup-vllm)", exc_type=ImportError)

pytestmark = pytest.mark.vllm

G = 4
MAX_NEW = 16
TOL = 1e-4


@pytest.fixture(scope="session")
def sft_ckpt(tmp_path_factory, tiny_model, train_prompts):
    from dftrain.sft import SFTConfig, run_sft

    out = tmp_path_factory.mktemp("models") / "sft-for-vllm"
    run_sft(SFTConfig(data=train_prompts, model=tiny_model, out=out, steps=30, batch_size=16, lr=3e-3))
    return out


@pytest.fixture(scope="session")
def engine(sft_ckpt):
    from dfgen.backends import get_backend

    backend = get_backend("vllm", sft_ckpt, max_model_len=512, batch_size=64)  # dtype auto: float32 here
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def hf(sft_ckpt):
    from dfgen.backends.hf import HFBackend

    return HFBackend(sft_ckpt)


@pytest.fixture(scope="session")
def prompts():
    from dfgen.backends import Prompt
    from dfgen.images import decode_image
    from dfgen.synth.grid import make_problems

    probs = list(make_problems(3, seed=7, split="train"))
    out = [Prompt(p.question(), decode_image(p.render())) for p in probs]
    return out + [Prompt("How many red plus blue?", None)]  # one text-only prompt


def _seeds(prompts, base=0):
    from dfgen.seeds import sample_seed

    return [[sample_seed(base, f"p{i}", k) for k in range(G)] for i in range(len(prompts))]


@pytest.fixture(scope="session")
def group(engine, prompts):
    from dfgen.backends import SamplingConfig

    return engine.generate(prompts, _seeds(prompts), SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW))


def _flat(prompts, groups):
    ps = [p for p, g in zip(prompts, groups) for _ in g]
    return ps, [s for g in groups for s in g]


def test_sample_group_with_images(engine, prompts, group):
    assert engine.name == "vllm"
    assert len(group) == len(prompts) and all(len(g) == G for g in group)
    eos = engine.tok.eos_token_id
    banned = set(engine.suppress)
    for g in group:
        assert len({tuple(s.token_ids) for s in g}) > 1  # the group is not one rollout four times
        for s in g:
            assert 1 <= len(s.token_ids) <= MAX_NEW and len(s.logprobs) == len(s.token_ids)
            assert not banned & set(s.token_ids)
            assert all(math.isfinite(x) and x <= 0 for x in s.logprobs)
            assert s.finish_reason == ("stop" if s.token_ids[-1] == eos else "length")
            assert eos not in s.token_ids[:-1]
            assert s.text == engine.tok.decode(s.token_ids, skip_special_tokens=True)


def test_stored_logprobs_match_transformers_teacher_forcing(hf, prompts, group):
    ps, samples = _flat(prompts, group)
    ref = hf.score(ps, [s.token_ids for s in samples])
    err = max(abs(a - b) for s, r in zip(samples, ref) for a, b in zip(s.logprobs, r))
    assert err < TOL, err


def test_stored_logprobs_at_temperature_and_greedy(engine, hf, prompts):
    from dfgen.backends import SamplingConfig

    seeds = _seeds(prompts, base=1)
    hot = engine.generate(prompts, seeds, SamplingConfig(temperature=0.7, max_new_tokens=MAX_NEW))
    ps, samples = _flat(prompts, hot)
    ref = hf.score(ps, [s.token_ids for s in samples], temperature=0.7)
    assert max(abs(a - b) for s, r in zip(samples, ref) for a, b in zip(s.logprobs, r)) < TOL
    # greedy: same tokens as hf greedy, logprobs at T = 1 (both backends' convention)
    one = [[0] for _ in prompts]
    cold = engine.generate(prompts, one, SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW))
    cold_hf = hf.generate(prompts, one, SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW))
    for (v,), (h,) in zip(cold, cold_hf):
        assert v.token_ids == h.token_ids
        assert max(abs(a - b) for a, b in zip(v.logprobs, h.logprobs)) < TOL


def test_a_prefix_is_continued_as_hf_continues_it(engine, hf, prompts, group):
    """The resample repairer's probes: a prompt with a ``prefix`` (token ids the answer starts with)
    continues right after it. Greedy continuations equal hf's, and their logprobs are the teacher-forced
    logprobs of prefix + continuation under hf."""
    from dfgen.backends import Prompt, SamplingConfig

    heads = [tuple(g[0].token_ids[: k]) for g, k in zip(group, (1, 3, 5, 2))]
    pre = [Prompt(p.question, p.image, h) for p, h in zip(prompts, heads)]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW)
    one = [[0] for _ in pre]
    v, h = engine.generate(pre, one, cfg), hf.generate(pre, one, cfg)
    for (a,), (b,), head, p in zip(v, h, heads, prompts):
        assert a.token_ids == b.token_ids
        ref = hf.score([p], [list(head) + a.token_ids])[0][len(head):]
        assert max(abs(x - y) for x, y in zip(a.logprobs, ref)) < TOL


def test_same_seed_same_rollouts(engine, prompts, group):
    from dfgen.backends import SamplingConfig

    cfg = SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW)
    again = engine.generate(prompts, _seeds(prompts), cfg)
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in group]
    assert max(abs(a - b) for g1, g2 in zip(group, again) for s1, s2 in zip(g1, g2)
               for a, b in zip(s1.logprobs, s2.logprobs)) < 1e-6
    # a sample depends on its seed only, not on the batch it ran in
    seeds = _seeds(prompts)
    alone = engine.generate(prompts[1:2], [seeds[1][2:3]], cfg)
    assert alone[0][0].token_ids == group[1][2].token_ids
    # different seeds: different rollouts
    other = engine.generate(prompts, _seeds(prompts, base=99), cfg)
    same = sum(s1.token_ids == s2.token_ids for g1, g2 in zip(group, other) for s1, s2 in zip(g1, g2))
    assert same <= 1


def test_score_matches_hf(engine, hf, prompts, group):
    ps, samples = _flat(prompts, group)
    comps = [s.token_ids for s in samples]
    # plus arbitrary completions that were never sampled (no special tokens but EOS: hf cannot
    # score an image placeholder in a completion either)
    eos = engine.tok.eos_token_id
    free = [t for t in range(engine.vocab_size) if t not in set(engine.suppress) and t != eos]
    ps += prompts
    comps += [free[10:13] + [eos], free[40:52], [eos], free[100:124:3]]
    for t, budget in ((1.0, None), (0.7, 1)):  # budget 1: one request per scoring call
        if budget:
            engine.SCORE_BUDGET = budget
        try:
            got = engine.score(ps, comps, temperature=t)
        finally:
            vars(engine).pop("SCORE_BUDGET", None)
        ref = hf.score(ps, comps, temperature=t)
        assert [len(x) for x in got] == [len(c) for c in comps]
        assert max(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g, r)) < TOL
    assert engine.score([], []) == [] and engine.score(prompts[:1], [[]]) == [[]]


def test_prompt_ids_match_hf(engine, hf, prompts):
    from dfgen.policy import prompt_lengths

    ids = engine.prompt_ids(prompts)
    assert ids == hf.prompt_ids(prompts)
    # the engine-free count used to skip prompts beyond the context agrees with the engine
    assert prompt_lengths(engine.processor, prompts, batch_size=2) == [len(x) for x in ids]


def test_sft_checkpoint_weights_are_the_ones_used(engine, hf, tiny_model, prompts, group):
    """The engine serves the SFT weights, not the base model's: its logprobs match hf on the
    SFT folder (tested above) and differ clearly from hf on the tiny model it started from."""
    from dfgen.backends.hf import HFBackend

    ps, samples = _flat(prompts, group)
    base = HFBackend(tiny_model).score(ps, [s.token_ids for s in samples])
    diff = max(abs(a - b) for s, r in zip(samples, base) for a, b in zip(s.logprobs, r))
    assert diff > 0.1, diff


def test_dfgen_sample_with_the_vllm_backend_end_to_end(sft_ckpt, train_prompts, tmp_path):
    """The CLI through vLLM (own engine, subprocess); the trainer's reader streams its shards."""
    import os
    import subprocess
    import sys

    from dfgen.shards import open_shards
    from dftrain.data import GroupStream

    from dfgen.synth.grid import make_problems

    data = tmp_path / "data"  # 4 synthetic records and one question beyond --max-model-len 256
    data.mkdir()
    rows = []
    for k, pr in enumerate(make_problems(4, seed=3)):
        (data / f"{k}.png").write_bytes(pr.render())
        rows.append({"id": f"p{k}", "question": pr.question(), "answer": str(pr.answer), "image_path": f"{k}.png"})
    rows.insert(2, {"id": "long", "question": "How many red cells? " * 80, "answer": "1"})
    (data / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "S"
    p = subprocess.run([sys.executable, "-m", "dfgen.cli", "sample", "--prompts", str(data / "p.jsonl"), "--model",
                        str(sft_ckpt), "--out", str(out), "--backend", "vllm", "--group-size", "2",
                        "--max-new-tokens", "24", "--max-model-len", "256"],
                       capture_output=True, text=True, timeout=900, env={**os.environ})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "prompt too long" in p.stdout + p.stderr  # skipped and counted, not a failed batch
    ss = open_shards(out, stage="sample")
    assert ss.meta["backend"] == "vllm" and ss.num_rows() == 4
    groups = GroupStream(ss, seed=0).take(4)
    assert sorted(g["id"] for g in groups) == sorted({g["id"] for g in groups})
    for g in groups:
        assert len(g["rollouts"]) == 2
        for r in g["rollouts"]:
            assert len(r["token_ids"]) == len(r["logprobs"]) > 0
