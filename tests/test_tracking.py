"""--report-to (dftrain/tracking.py): TensorBoard event files and an offline wandb run hold the
steps of metrics.jsonl; a resumed fit logs each step once; unknown sinks are refused in one line."""
import json
import os

import pytest

from tests.conftest import run_cli

ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def _events(tb_dir) -> dict:
    """{tag: [(step, value)]} read back from the event files with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _records(out) -> list:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reported(df_shards, sft_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "o"
    run_cli("dftrain", "fit", "--data", df_shards / "m", "--model", sft_model, "--out", out, "--steps", 3,
            "--groups-per-step", 2, "--save-every", 1, "--report-to", "jsonl,tensorboard,wandb", env=ENV)
    return out


def test_tensorboard_event_files_hold_every_step_of_metrics_jsonl(reported):
    recs, ev = _records(reported), _events(reported / "tb")
    assert [s for s, _ in ev["train/loss"]] == [1, 2, 3]
    for name in ("loss", "reward", "grad_norm", "mask_density", "repair_rate", "repair_gen_tokens", "pad_frac"):
        want = [(r["step"], r[name]) for r in recs if r[name] is not None]
        assert want, name  # the fixture's shards hold repairs: DF's scalars are there to log
        assert [s for s, _ in ev[f"train/{name}"]] == [s for s, _ in want]
        assert [v for _, v in ev[f"train/{name}"]] == pytest.approx([v for _, v in want], rel=1e-6), name


def test_wandb_writes_an_offline_run_with_the_config(reported):
    runs = list((reported / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    run_id = (reported / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)


def test_a_resumed_fit_logs_each_step_once(reported, df_shards, sft_model, tmp_path):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(reported, out)
    shutil.rmtree(out / "step_000002")
    shutil.rmtree(out / "step_000003")
    conf = json.loads((out / "fit_config.json").read_text())
    (out / "fit_config.json").write_text(json.dumps({**conf, "out": str(out)}))
    run_cli("dftrain", "fit", "--data", df_shards / "m", "--model", sft_model, "--out", out, "--steps", 3,
            "--groups-per-step", 2, "--save-every", 1, "--report-to", "tensorboard", "--resume", env=ENV)
    ev = _events(out / "tb")
    assert [s for s, _ in ev["train/loss"]] == [1, 2, 3]  # steps 2 and 3 purged, then logged again
    assert [v for _, v in ev["train/loss"]] == pytest.approx([r["loss"] for r in _records(out)], rel=1e-6)


@pytest.mark.parametrize("sink,msg", [("tensorbord", "unknown sink 'tensorbord'"),
                                      ("jsonl,mlflow", "unknown sink 'mlflow'")])
def test_an_unknown_sink_is_refused_in_one_line_before_anything_is_written(sink, msg, df_shards, sft_model, tmp_path):
    r = run_cli("dftrain", "fit", "--data", df_shards / "m", "--model", sft_model, "--out", tmp_path / "o",
                "--report-to", sink, check=False)
    assert r.returncode != 0 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_a_missing_package_is_named_with_its_extra(monkeypatch):
    import importlib.util

    from dfgen.errors import UserError
    from dftrain.tracking import parse

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(UserError, match=r"--report-to wandb needs the wandb package: pip install 'dfkit\[report\]'"):
        parse("jsonl,wandb")
    assert parse("jsonl,tensorboard") == ["jsonl", "tensorboard"]
    assert os.environ.get("WANDB_MODE") != "online"  # the suite never reaches the network


def test_sft_reports_its_logged_steps_and_held_out_scores(tiny_model, train_prompts, test_prompts, tmp_path):
    from dftrain.sft import SFTConfig, run_sft

    out = tmp_path / "sft"
    res = run_sft(SFTConfig(data=train_prompts, model=tiny_model, out=out, steps=6, log_every=2, eval_data=test_prompts,
                            eval_every=3, eval_n=4, report_to="tensorboard"))
    ev = _events(out / "tb")  # moved into OUT with the model: OUT still appears whole
    assert ev["train/loss"] == [(r["step"], pytest.approx(r["loss"], abs=1e-4)) for r in res["log"]]
    assert ev["train/heldout/accuracy"] == [(c["step"], pytest.approx(c["accuracy"])) for c in res["curve"]]
    assert not (tmp_path / "sft.report").exists()
