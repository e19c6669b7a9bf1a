import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

COMMANDS = {"dfgen": ["synth", "tiny", "sample", "repair", "mask", "stats", "show"],
            "dftrain": ["sft", "fit", "loop", "eval"]}


@pytest.mark.parametrize("prog,cmd", [(p, c) for p, cs in COMMANDS.items() for c in cs])
def test_every_command_has_help_with_an_example(prog, cmd):
    r = run_cli(prog, cmd, "--help")
    assert "Example:" in r.stdout and f"{prog} {cmd}" in r.stdout


def test_help_is_instant_because_heavy_imports_are_lazy():
    import subprocess
    import sys

    code = "import sys, dfgen.cli, dftrain.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    assert out == ["False", "False"]


# The miniature demo (the whole pipeline) runs in tests/test_security.py, with networking disabled.


def test_every_backend_name_is_a_cli_choice_and_a_missing_engine_is_one_line(tmp_path, tiny_model, test_prompts):
    """The backend registry is the one list of engines: each name is offered by every command that
    takes --backend; an engine that is not installed is refused in one line before any output."""
    import importlib.util

    from dfgen.backends import BACKENDS

    for prog, cmd in (("dfgen", "sample"), ("dfgen", "repair"), ("dftrain", "eval")):
        help_text = run_cli(prog, cmd, "--help").stdout
        assert f"--backend <{'|'.join(BACKENDS)}>" in help_text, (prog, cmd)
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: nothing is missing")  # e.g. run inside .venv-vllm
    p = run_cli("dfgen", "sample", "--prompts", test_prompts, "--model", tiny_model, "--out", tmp_path / "o",
                "--backend", "vllm", check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "make setup-vllm" in lines[0], p.stderr
    assert not (tmp_path / "o").exists()


def test_every_registry_name_is_accepted_and_documented():
    """Repairers, objectives, policy losses and benchmarks: every registered name is a choice (or a
    documented value) of the commands that take it, and the configs accept it."""
    from dfgen.benchmarks import BENCHMARK_NAMES
    from dfgen.repair import RepairConfig
    from dfgen.repairers import REPAIRERS
    from dftrain.fit import FitConfig
    from dftrain.loss import LOSSES, POLICY_LOSSES

    assert f"--repairer <{'|'.join(REPAIRERS)}>" in run_cli("dfgen", "repair", "--help").stdout
    assert f"--bench <{'|'.join(('synth', *BENCHMARK_NAMES))}>" in run_cli("dftrain", "eval", "--help").stdout
    for cmd in ("fit", "loop"):
        text = " ".join(run_cli("dftrain", cmd, "--help").stdout.split())
        for name in (*LOSSES, *POLICY_LOSSES):
            assert name in text, (cmd, name)
    for name in REPAIRERS:
        RepairConfig(rollouts=".", out=".", repairer=name).validate()
    extra = {"cispo": {"clip_high": 4.0}}
    for obj in LOSSES:
        for pl in POLICY_LOSSES:
            FitConfig(data=".", model=".", out=".", objective=obj, policy_loss=pl, **extra.get(pl, {})).validate()


def test_objective_backend_and_eval_registries_are_the_cli_choices():
    """The objectives (with the shard stage each needs), the advantage scales, the backends and every
    benchmark eval scores (the synthetic task included): each registry name is a documented choice of
    the commands that take it, and their configs accept it."""
    from dfgen.backends import BACKENDS
    from dfgen.benchmarks import BENCHMARKS as EVAL_BENCHMARKS
    from dftrain.evaluate import EvalConfig
    from dftrain.fit import FitConfig
    from dftrain.loop import LoopConfig
    from dftrain.loss import ADV_SCALES, LOSSES, OBJECTIVES

    assert set(OBJECTIVES) == set(LOSSES) and all(o.stages for o in OBJECTIVES.values())
    for cmd in ("fit", "loop"):
        text = " ".join(run_cli("dftrain", cmd, "--help").stdout.split())
        for name in OBJECTIVES:
            assert name in text, (cmd, name)
            LoopConfig(model=".", out=".", objective=name).validate()
    fit_help = " ".join(run_cli("dftrain", "fit", "--help").stdout.split())
    for scale in ADV_SCALES:
        assert scale in fit_help
        FitConfig(data=".", model=".", out=".", adv_scale=scale).validate()
    for cmd in ("sample", "repair"):
        assert f"--backend <{'|'.join(BACKENDS)}>" in run_cli("dfgen", cmd, "--help").stdout, cmd
    assert f"--bench <{'|'.join(EVAL_BENCHMARKS)}>" in run_cli("dftrain", "eval", "--help").stdout
    for name, mod in EVAL_BENCHMARKS.items():
        assert all(callable(getattr(mod, f)) for f in ("load", "score", "summarize")) and mod.ID_KEY, name
        EvalConfig(bench=name, data=".", predictions=Path(".")).validate()


def _default_sources() -> dict:
    """Each command's one source of defaults: {option name: (has a default, the default)}."""
    import dataclasses
    import inspect

    from dfgen.mask import MaskConfig
    from dfgen.repair import RepairConfig
    from dfgen.sample import SampleConfig
    from dfgen.synth.grid import GridTask, write_synth
    from dfgen.tiny import build_tiny
    from dftrain.evaluate import EvalConfig
    from dftrain.fit import FitConfig
    from dftrain.loop import LoopConfig
    from dftrain.sft import SFTConfig

    def of_class(cls):
        out = {}
        for f in dataclasses.fields(cls):
            missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            out[f.name] = (not missing, None if missing else
                           f.default if f.default is not dataclasses.MISSING else f.default_factory())
        return out

    def of_function(fn):
        return {n: (p.default is not inspect.Parameter.empty, None if p.default is inspect.Parameter.empty else p.default)
                for n, p in inspect.signature(fn).parameters.items()}

    return {"sample": of_class(SampleConfig), "repair": of_class(RepairConfig), "mask": of_class(MaskConfig),
            "fit": of_class(FitConfig), "loop": of_class(LoopConfig), "sft": of_class(SFTConfig),
            "eval": of_class(EvalConfig), "synth": of_class(GridTask) | of_function(write_synth),
            "tiny": of_function(build_tiny)}


@pytest.mark.parametrize("prog,cmd", [("dfgen", "sample"), ("dfgen", "repair"), ("dfgen", "mask"), ("dftrain", "fit"),
                                      ("dftrain", "loop"), ("dftrain", "sft"), ("dftrain", "eval"),
                                      ("dfgen", "synth"), ("dfgen", "tiny")])
def test_cli_defaults_are_the_config_dataclass_defaults(prog, cmd):
    """One source of defaults: every option named as a field of the stage's config dataclass (or
    parameter of the function it calls) has that default (a required one is a required option)."""
    import importlib

    import typer

    fields = _default_sources()[cmd]
    options = typer.main.get_command(importlib.import_module(f"{prog}.cli").app).commands[cmd].params
    checked = 0
    for p in options:
        if p.name not in fields:
            continue
        has_default, want = fields[p.name]
        if not has_default:
            assert p.required, (cmd, p.name)
            continue
        have = getattr(p.default, "value", p.default)
        if cmd == "loop" and p.name == "task":
            have = json.loads(have)  # a JSON option
        if isinstance(want, Path):
            have = Path(have)
        assert have == want or (want is None and have in (None, [], ())) or (want == [] and have in (None, ())), \
            (cmd, p.name, have, want)
        checked += 1
    assert checked >= 2  # (mask has two: --level, --tokenizer)


def test_loop_takes_the_stage_configs_defaults():
    """LoopConfig's stage settings default to the stage classes' own (updates_per_batch: the loop's 2)."""
    import dataclasses

    from dfgen.repair import RepairConfig
    from dfgen.sample import SampleConfig
    from dftrain.fit import FitConfig
    from dftrain.loop import LoopConfig

    loop = {f.name: f.default for f in dataclasses.fields(LoopConfig)}
    fit = {f.name: f.default for f in dataclasses.fields(FitConfig)}
    taken = [(SampleConfig, "group_size"), (SampleConfig, "temperature"), (SampleConfig, "max_new_tokens"),
             (RepairConfig, "repairer"), (RepairConfig, "repair_model")] + \
        [(FitConfig, k) for k in loop if k in fit and k not in ("model", "out", "updates_per_batch")]
    for cls, name in taken:
        assert loop[name] == getattr(cls, name), (cls.__name__, name)
    assert len(taken) >= 15 and loop["updates_per_batch"] == 2 != fit["updates_per_batch"]


def test_the_fit_defaults_are_the_study_variant_the_demo_cites():
    """dftrain fit's DF defaults are the options of the variant the study chose on val
    (studies/options_screen.py), and the committed study holds that variant's 8-seed result."""
    from dftrain.demo import DEFAULT_VARIANT, STUDY
    from dftrain.fit import FitConfig
    from studies import options_screen as mod
    for k, v in mod.VARIANTS[DEFAULT_VARIANT].items():
        assert getattr(FitConfig, k) == v, k
    for k in ("marked", "kappa", "mass"):  # the rest as the study's DF arm ran it
        assert getattr(FitConfig, k) == json.loads((STUDY / "results.json").read_text())["config"][k]
    res = json.loads((STUDY / "options" / "options.json").read_text())
    assert len(res["variants"][DEFAULT_VARIANT]["seeds"]) >= 8
    assert res["ranked_on_val"][0][0] == DEFAULT_VARIANT  # chosen on val, not on test


def test_df_settings_are_declared_once_and_reach_every_consumer():
    """TrainSettings (with DFWeights) is the one declaration: fit and loop inherit it (every field an
    option of both commands, with its default), the loop hands every field to its rounds' fit, and the
    TRL, verl and shard-export integrations default to DFWeights."""
    import dataclasses
    import importlib
    import inspect

    import typer

    from dftrain.fit import FitConfig
    from dftrain.integrations import shard_advantages
    from dftrain.loop import LoopConfig
    from dftrain.settings import DFWeights, TrainSettings

    names = [f.name for f in dataclasses.fields(TrainSettings)]
    assert issubclass(FitConfig, TrainSettings) and issubclass(LoopConfig, TrainSettings)
    cmds = typer.main.get_command(importlib.import_module("dftrain.cli").app).commands
    for cmd, cls in (("fit", FitConfig), ("loop", LoopConfig)):
        params = {p.name: p for p in cmds[cmd].params}
        for n in names:
            assert n in params and getattr(params[n].default, "value", params[n].default) == getattr(cls, n), (cmd, n)
    odd = LoopConfig(model=".", out=".", kappa=0.3, delta=0.2, kappa_rep=0.4, fail_advantage=0.5, clip_low=0.1,
                     agg="seq-mean-token-sum", beta=0.01, rep_in_denominator=True, dedup_repaired=False)
    handed = odd.train_settings()
    assert handed.keys() == set(names) and all(handed[n] == getattr(odd, n) for n in names)
    FitConfig(data=".", model=".", out=".", **handed).validate()
    for n, p in inspect.signature(shard_advantages).parameters.items():
        if n in [f.name for f in dataclasses.fields(DFWeights)]:
            assert p.default == getattr(DFWeights, n), n


def test_choice_enums_are_the_registries_keys():
    """The CLI's choice types (dftrain.settings, torch-free) name exactly what the registries hold."""
    from dfgen.repairers import REPAIRERS, RepairerName
    from dftrain.loss import OBJECTIVES, POLICY_LOSSES
    from dftrain.settings import ObjectiveName, PolicyLossName

    assert [e.value for e in ObjectiveName] == list(OBJECTIVES)
    assert [e.value for e in PolicyLossName] == list(POLICY_LOSSES)
    assert [e.value for e in RepairerName] == list(REPAIRERS)
    r = run_cli("dftrain", "loop", "--model", ".", "--out", ".", "--repairer", "nope", check=False)
    assert r.returncode != 0 and "nope" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,match", [
    (["dfgen", "sample", "--prompts", "x", "--model", "y", "--out", "z", "--backend", "foo"], "'foo' is not one of"),
    (["dfgen", "sample", "--prompts", "x"], "Missing option '--model'"),
    (["dfgen", "nope"], "No such command 'nope'"),
    (["dfgen", "synth", "--n", "abc", "--out", "q"], "Invalid value for '--n'"),
    (["dftrain", "loop", "--model", "x", "--out", "y", "--agg", "mean"], "'mean' is not one of"),
])
def test_a_bad_option_is_one_error_line_not_a_usage_block(args, match, tmp_path):
    r = run_cli(*args, check=False, env={"PWD": str(tmp_path)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
