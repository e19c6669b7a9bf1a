"""Shared fixtures: a tiny policy and small synthetic prompt sets, built once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # every fixture lives in the repository (data/README.md)


def run_cli(*args, check=True, env=None, timeout=600):
    """Run ``dfgen``/``dftrain`` as a user would (a subprocess of this interpreter)."""
    prog = args[0]
    cmd = [sys.executable, "-m", f"{prog}.cli", *map(str, args[1:])]
    e = {**os.environ, **(env or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    from dfgen.tiny import build_tiny

    torch.set_num_threads(2)
    return build_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def train_prompts(tmp_path_factory) -> Path:
    from dfgen.synth.grid import write_synth

    out = tmp_path_factory.mktemp("data") / "train"
    write_synth(out, 64, seed=1, split="train")
    return out


@pytest.fixture(scope="session")
def test_prompts(tmp_path_factory) -> Path:
    from dfgen.synth.grid import write_synth

    out = tmp_path_factory.mktemp("data") / "test"
    write_synth(out, 64, seed=2, split="test")
    return out


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory, tiny_model, train_prompts) -> Path:
    """A briefly warm-started policy (not accurate; enough to emit the step format sometimes)."""
    from dftrain.sft import SFTConfig, run_sft

    out = tmp_path_factory.mktemp("models") / "sft"
    # The fixture as it always was (vision tower trained): tests pin behaviour on this exact policy;
    # the default recipe's perception is tested in tests/test_perception.py.
    run_sft(SFTConfig(data=train_prompts, model=tiny_model, out=out, steps=150, batch_size=16, lr=3e-3,
                      vision_lr_scale=1.0))
    return out


def misread_pair(tok, problem):
    """A synthetic problem's canonical solution and the same solution with its first read wrong:
    (good ids, bad ids, their alignment), each ending with EOS; the bad one's root is the misread digit."""
    from dfgen.align import align
    from dfgen.synth.grid import solution_text

    good = solution_text(problem.steps, problem.answer)
    v = problem.steps[0]["value"]
    bad = good.replace(f"= {v}\n", f"= {(v + 1) % 10}\n", 1)
    ids_good, ids_bad = (tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in (good, bad))
    return ids_good, ids_bad, align(ids_bad, ids_good)


@pytest.fixture(scope="session")
def df_shards(tmp_path_factory, sft_model, train_prompts):
    """Sample -> repair -> mask shards of 16 groups x 4 rollouts (dftrain fit's input)."""
    from dfgen.mask import MaskConfig, run_mask
    from dfgen.repair import RepairConfig, run_repair
    from dfgen.sample import SampleConfig, run_sample

    d = tmp_path_factory.mktemp("fit")
    run_sample(SampleConfig(prompts=train_prompts, model=sft_model, out=d / "s", group_size=4, limit=16,
                            chunk_size=4, seed=5))
    run_repair(RepairConfig(rollouts=d / "s", out=d / "r"))
    run_mask(MaskConfig(repairs=d / "r", out=d / "m"))
    return d
