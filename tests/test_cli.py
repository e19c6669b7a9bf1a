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


# The miniature demo (the whole pipeline) runs in tests/test_security.py, with networking disabled.
