import pytest

from tests.conftest import run_cli

COMMANDS = {"dfgen": ["synth", "tiny", "sample", "repair", "mask", "stats", "show"],
            "dftrain": ["sft", "fit", "eval"]}


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


def test_demo_miniature_runs_the_whole_pipeline(tmp_path):
    from dftrain.demo import main

    res = main(["--quick", "--out", str(tmp_path / "demo")])
    assert 0.0 <= res["before"] <= 1.0 and 0.0 <= res["after"] <= 1.0
    for sub in ("round0/sample", "round0/repair", "round0/df", "round0/fit"):
        assert any((tmp_path / "demo" / sub).iterdir())
    assert (tmp_path / "demo" / "report.html").stat().st_size > 1000
