"""Offline and safe by construction: no network, no eval/exec, no remote code, no pickled weights."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dfgen.errors import UserError
from tests.conftest import ROOT

SOURCES = sorted(p for pkg in ("dfgen", "dftrain") for p in (ROOT / pkg).rglob("*.py"))

# Runs the demo's main() with every outgoing network connection refused (and logged).
NO_NETWORK = r"""
import os, socket, sys
log = open(os.environ["DF_NET_LOG"], "a")
def refuse(what, addr):
    log.write(f"{what} {addr!r}\n"); log.flush()
    raise OSError(101, f"network disabled by the test ({what} {addr!r})")
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
def connect(self, addr):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        refuse("connect", addr)
    return _connect(self, addr)
def connect_ex(self, addr):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        refuse("connect_ex", addr)
    return _connect_ex(self, addr)
socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.create_connection = lambda addr, *a, **k: refuse("create_connection", addr)
socket.getaddrinfo = lambda host, *a, **k: refuse("getaddrinfo", host)
from dftrain.demo import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("start", ["shipped", "from-scratch"])
def test_the_miniature_pipeline_runs_with_networking_unusable(tmp_path, start):
    """``python -m dftrain.demo --quick``: synth, [tiny policy, SFT,] every arm's sample, repair, mask,
    fit, eval, report; with HF offline, proxies pointing at a dead port and every socket connect refused."""
    log = tmp_path / "network_attempts.log"
    log.touch()
    proxy = "http://127.0.0.1:9"  # the discard port: nothing answers
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy,
           "http_proxy": proxy, "https_proxy": proxy, "all_proxy": proxy, "DF_NET_LOG": str(log),
           "OMP_NUM_THREADS": "1"}
    extra = ["--from-scratch"] if start == "from-scratch" else []
    p = subprocess.run([sys.executable, "-c", NO_NETWORK, "--quick", "--out", str(tmp_path / "demo"), *extra],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert log.read_text() == "", f"network was attempted:\n{log.read_text()}"
    demo = tmp_path / "demo"
    res = json.loads((demo / "demo_result.json").read_text())
    assert set(res["arms"]) == {"grpo", "df-grpo", "df-no-oracle"}
    for a in res["arms"].values():
        assert 0.0 <= a["steps_right"] <= a["accuracy"] <= 1.0 and a["tokens"] > 0
    for sub in ("grpo/round_000/sample", "grpo/round_000/fit", "df-grpo/round_000/sample", "df-grpo/round_000/repair",
                "df-grpo/round_000/df", "df-grpo/round_000/fit", "df-no-oracle/round_000/repair"):
        assert any((demo / sub).iterdir())
    # the oracle-free arm's repairs read no solution: they come from siblings and resampling, never the oracle
    import polars as pl

    flat = pl.read_parquet(str(demo / "df-no-oracle/round_000/repair/*.parquet")).explode("rollouts").unnest("rollouts")
    assert set(flat["repairer"].drop_nulls()) <= {"sibling", "resample"} and flat["repairer"].drop_nulls().len() > 0
    assert not (demo / "grpo" / "round_000" / "df").exists()  # GRPO trains on the samples, no repairs
    # the two arms saw the same prompts
    assert (demo / "grpo/round_000/prompts").exists() and \
        sorted(f.read_bytes() for f in (demo / "grpo/round_000/prompts").glob("*.parquet")) == \
        sorted(f.read_bytes() for f in (demo / "df-grpo/round_000/prompts").glob("*.parquet"))
    assert (demo / "report.html").stat().st_size > 1000
    assert "grpo" in p.stdout and "df-grpo" in p.stdout and "docs/RESULTS.md" in p.stdout
    assert (demo / "start" / "config.json").exists() == (start == "from-scratch")


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield node, (f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")


def _kw(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_sources_never_eval_exec_or_trust_remote_code_and_load_models_as_safetensors():
    assert len(SOURCES) > 20
    problems, pickle_loads = [], []
    for f in SOURCES:
        rel = f.relative_to(ROOT).as_posix()
        tree = ast.parse(f.read_text(), filename=rel)
        for node, name in _calls(tree):
            where = f"{rel}:{node.lineno}"
            if isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{where}: {name}()")
            trc = _kw(node, "trust_remote_code")
            if isinstance(trc, ast.Constant) and trc.value is not False:
                problems.append(f"{where}: trust_remote_code={trc.value!r}")
            if name == "from_pretrained" and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if "Model" in owner:  # weights: safetensors only, never a pickle
                    st = _kw(node, "use_safetensors")
                    if not (isinstance(st, ast.Constant) and st.value is True):
                        problems.append(f"{where}: {owner}.from_pretrained without use_safetensors=True")
            if name == "load" and ast.unparse(node.func).startswith(("torch.", "pickle.")):
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    pickle_loads.append((rel, ast.unparse(node)[:100]))
        for node in ast.walk(tree):  # every default of a trust_remote_code parameter or field is False
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                pos = a.posonlyargs + a.args
                pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults)) + \
                    [(x, d) for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
                for arg, d in pairs:
                    if arg.arg == "trust_remote_code" and not (isinstance(d, ast.Constant) and d.value is False):
                        problems.append(f"{rel}:{node.lineno}: {node.name}(trust_remote_code={ast.unparse(d)})")
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    node.target.id == "trust_remote_code" and not (isinstance(node.value, ast.Constant)
                                                                   and node.value.value is False):
                problems.append(f"{rel}:{node.lineno}: trust_remote_code field default is not False")
    assert not problems, "\n".join(problems)
    # The only pickle loads: the trainer's own optimizer.pt (AdamW state and RNG), read from a
    # --resume/--optimizer-from folder the user points at. Model weights never go through pickle.
    assert not pickle_loads, pickle_loads


@pytest.fixture()
def pickle_only_model(tiny_model, tmp_path):
    """The tiny policy with its weights converted to a torch.save'd pytorch_model.bin only."""
    import shutil

    import torch
    from safetensors.torch import load_file

    d = tmp_path / "bin_only"
    shutil.copytree(tiny_model, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def test_a_checkpoint_with_only_pickled_weights_is_refused(pickle_only_model, tmp_path):
    from dfgen.policy import load_policy
    from tests.conftest import run_cli

    with pytest.raises(UserError, match="has no .safetensors weights"):
        load_policy(pickle_only_model)
    r = run_cli("dfgen", "sample", "--prompts", tmp_path / "p.jsonl", "--model", pickle_only_model,
                "--out", tmp_path / "o", check=False)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"error: {pickle_only_model} has no .safetensors weights (only safetensors checkpoints are loaded)"]


class _Trap:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_beside_the_safetensors_is_never_unpickled(tiny_model, tmp_path):
    import pickle
    import shutil

    from dfgen.policy import load_policy

    d = tmp_path / "both"
    shutil.copytree(tiny_model, d)
    marker = tmp_path / "unpickled"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    model, _ = load_policy(d)
    assert not marker.exists()
    assert sum(p.numel() for p in model.parameters()) > 0
