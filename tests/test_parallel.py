"""Data parallelism (dftrain/parallel.py): 2 CPU processes (torchrun, gloo) train the same step as
one process on the same groups, under DDP and FSDP2; FSDP2 checkpoints resume exactly, and a rank
killed mid-run leaves the last checkpoint whole."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

STEPS = 3
# token-mean over a step with repaired rows (df-grpo's defaults) and the seq-mean variant whose
# denominator needs the step's longest completion over both ranks
COMMON = ["--steps", STEPS, "--lr", "1e-4", "--micro-batch", 3]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROOT = Path(__file__).resolve().parent.parent


def _torchrun(args, port, wait=True, module=("dftrain.cli", "fit")):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None, "torchrun ships with torch; it should sit beside this interpreter"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", *module, *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                                start_new_session=True, cwd=ROOT)
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _records(out: Path) -> list:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list:
    return [r["loss"] for r in _records(out)]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(df_shards, sft_model, tmp_path_factory):
    """One process on 4 groups per step, and 2 ranks x 2 groups under DDP and FSDP2 (the same groups)."""
    d = tmp_path_factory.mktemp("parallel")
    data = ["--data", df_shards / "m", "--model", sft_model]
    run_cli("dftrain", "fit", *data, "--out", d / "one", "--groups-per-step", 4, *COMMON, env=ENV)
    _torchrun([*data, "--out", d / "ddp", "--groups-per-step", 2, *COMMON], 29541)
    _torchrun([*data, "--out", d / "fsdp", "--groups-per-step", 2, "--fsdp", "--save-every", 1, *COMMON], 29542)
    return d, data


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_exactly_the_step_one_process_trains_on_the_same_groups(runs, mode):
    d, _ = runs
    one, two = _losses(d / "one"), _losses(d / mode)
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    assert _max_diff(_weights(d / "one"), _weights(d / mode)) < 1e-5
    assert _max_diff(_weights(d / "one"), _weights(d / "one" / f"step_{STEPS:06d}")) == 0
    rec1, rec2 = (_records(d / m) for m in ("one", mode))  # the logged step is the whole step's, not rank 0's
    for key in ("reward", "adv_abs_mean", "mask_density", "repaired_samples", "repair_rate", "repair_gen_tokens"):
        assert all(a[key] == pytest.approx(b[key], abs=1e-6) for a, b in zip(rec1, rec2)), key
    assert any(r["mask_density"] for r in rec1) and any(r["repaired_samples"] for r in rec1)


def test_batch_scaled_advantages_take_the_reward_std_over_every_ranks_groups(runs):
    d, data = runs
    batch = ["--adv-scale", "batch", "--steps", 2, "--lr", "1e-4", "--micro-batch", 3]
    run_cli("dftrain", "fit", *data, "--out", d / "one-batch", "--groups-per-step", 4, *batch, env=ENV)
    _torchrun([*data, "--out", d / "ddp-batch", "--groups-per-step", 2, *batch], 29548)
    one, two = _losses(d / "one-batch"), _losses(d / "ddp-batch")
    assert one != _losses(d / "one")[:2]  # the scale changed the step (else this tests nothing)
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    assert _max_diff(_weights(d / "one-batch"), _weights(d / "ddp-batch")) < 1e-5


def test_fsdp_checkpoints_are_sharded_and_the_final_folder_is_a_plain_hf_model(runs):
    from transformers import AutoModelForImageTextToText

    d, _ = runs
    step = d / "fsdp" / "step_000001"
    assert (step / "dcp" / ".metadata").is_file() and len(list((step / "dcp").glob("*.distcp"))) == 2  # one per rank
    assert (step / "rng.pt").is_file() and not (step / "optimizer.pt").exists()
    m = AutoModelForImageTextToText.from_pretrained(d / "fsdp")  # the final model loads as any HF model
    sd = _weights(d / "fsdp")
    assert all(torch.equal(p.detach(), sd[k]) for k, p in m.state_dict().items() if k in sd)
    assert not list(d.glob("fsdp/.*tmp"))


def test_fsdp_ranks_but_0_never_read_the_checkpoint_yet_hold_its_exact_weights_in_every_family(sft_model, tmp_path):
    from tests.tiny_families import FAMILIES, build_family

    folders = [sft_model, *(build_family(f, tmp_path / f) for f in FAMILIES)]
    _torchrun([tmp_path / "meta.json", *folders], 29547, module=("tests.fsdp_meta_worker",))
    res = json.loads((tmp_path / "meta.json").read_text())
    assert len(res) == len(folders) + 1  # and the first in bfloat16 with a module kept in float32
    for name, (rank0, rank1) in res.items():
        assert rank0["read_before_wrap"] and rank1["meta_before_wrap"], name  # rank 1 built it without weights
        assert rank0["dtypes_as_loaded"] and rank1["dtypes_as_loaded"], name
        assert rank0["float32_kept"] == name.endswith("+bf16"), name
        assert rank0["weights"] == 0 and rank0["buffers"] == rank1["buffers"] == 0, (name, rank0, rank1)
        assert rank0["logits"] < 1e-5 and rank1["logits"] < 1e-5, (name, rank0, rank1)


def test_fsdp_refuses_a_shard_unit_whose_trainable_parameters_mix_dtypes_in_one_line(sft_model):
    from dfgen.errors import UserError
    from dfgen.policy import load_policy
    from dftrain.parallel import shard

    model, _ = load_policy(sft_model, dtype=torch.bfloat16)
    model.model.visual.merger.float()  # as from_pretrained does for a module a model keeps in float32
    with pytest.raises(UserError, match=r"mix torch.bfloat16 and torch.float32 \(model.visual.merger.ln_q.weight"):
        shard(model, world=2)  # refused before any process group is needed (frozen, as fit's default
        # --freeze-vision leaves it, the same merger shards and trains: the every-family test's "+bf16" case)


def test_fsdp_resume_continues_exactly(runs, tmp_path):
    d, data = runs
    part = tmp_path / "part"
    shutil.copytree(d / "fsdp" / "step_000001", part / "step_000001")  # a run stopped after step 1
    conf = json.loads((d / "fsdp" / "fit_config.json").read_text())
    (part / "fit_config.json").write_text(json.dumps({**conf, "out": str(part)}))
    (part / "metrics.jsonl").write_text((d / "fsdp" / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    _torchrun([*data, "--out", part, "--groups-per-step", 2, "--fsdp", "--save-every", 1, *COMMON, "--resume"], 29543)
    assert _losses(part) == _losses(d / "fsdp")
    assert _max_diff(_weights(part), _weights(d / "fsdp")) == 0


def _rank_pids(torchrun_pid: int) -> dict:
    """{LOCAL_RANK: pid} of the fit processes torchrun started (its children)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != torchrun_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (stat.parent / "environ").read_bytes().decode(errors="ignore")
                       .split("\0") if "=" in kv)
            found[int(env["LOCAL_RANK"])] = int(stat.parent.name)
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return found


def test_a_rank_killed_mid_run_leaves_the_last_checkpoint_whole_and_resumable(runs, tmp_path):
    d, data = runs
    out = tmp_path / "killed"
    args = [*data, "--out", out, "--groups-per-step", 2, "--fsdp", "--save-every", 1, *COMMON]
    p = _torchrun(args, 29544, wait=False)
    deadline = time.time() + 300
    while not (out / "step_000001").is_dir() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.kill(_rank_pids(p.pid)[1], signal.SIGKILL)  # rank 1, during step 2 (or its save)
    assert p.wait(timeout=300) != 0
    steps = sorted(out.glob("step_*"))
    assert steps and steps[-1].name < f"step_{STEPS:06d}", "the kill came too late to test anything"
    for s in steps:  # each listed checkpoint is whole: shards, model, state
        assert (s / "dcp" / ".metadata").is_file() and (s / "trainer_state.json").is_file()
        assert _max_diff(_weights(s), _weights(d / "fsdp" / s.name)) == 0
    _torchrun([*args, "--resume"], 29545)
    assert _losses(out) == _losses(d / "fsdp")
    assert _max_diff(_weights(out), _weights(d / "fsdp")) == 0


def test_fsdp_refuses_what_it_cannot_do_in_one_line(df_shards, sft_model, tmp_path):
    for extra, msg in ((["--fsdp"], "launch with torchrun"),
                       (["--fsdp", "--lora-rank", 4], "--fsdp with --lora-rank is not supported"),
                       (["--fsdp-mixed-precision", "bfloat16"], "--fsdp-mixed-precision needs --fsdp")):
        r = run_cli("dftrain", "fit", "--data", df_shards / "m", "--model", sft_model, "--out", tmp_path / "o",
                    *extra, check=False)
        assert r.returncode != 0 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fsdp_mixed_precision_and_activation_checkpointing_train_close_to_float32(runs, tmp_path):
    d, data = runs
    out = tmp_path / "bf16"
    p = _torchrun([*data, "--out", out, "--groups-per-step", 2, "--fsdp", "--fsdp-mixed-precision", "bfloat16",
                   "--gradient-checkpointing", *COMMON], 29546)
    assert p.stdout.count("trained 3 steps") == 1  # rank 0 speaks for the run
    bf16, fp32 = _losses(out), _losses(d / "fsdp")
    assert bf16 != fp32  # parameters were gathered in bf16: the numbers moved
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) < 5e-3, (bf16, fp32)
