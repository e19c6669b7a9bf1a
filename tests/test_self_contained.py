"""The repository carries its own fixtures: no test, example, notebook, bench or study script or package
module names a path outside the checkout (a stray team folder beside a clone must not be what
makes a test pass), and every file the tests read from ``data/`` is there."""
from __future__ import annotations

import re

from tests.conftest import DATA, ROOT

SCANNED = ["tests", "examples", "notebooks", "bench", "studies", "dfgen", "dftrain", "scripts", "Makefile", ".ci"]
# A relative path that climbs out of the repository, or the team's fixture folder by name.
TEAM = "sha" + "red"  # the team's fixture folder, spelled so that this file does not name it
ESCAPE = re.compile(r"""(?:["'\s=(]|^)\.\./|parents\[\d+\]\.parent|ROOT\.parent|\b""" + TEAM + r"""/(?:data|golden)\b""")
# Hostile inputs that the bad-input tests feed on purpose, to prove they are refused.
HOSTILE = ["../../etc/passwd", "images/../../outside/secret.png"]


def _files():
    for name in SCANNED:
        p = ROOT / name
        if p.is_file():
            yield p
        elif p.is_dir():
            yield from (f for f in p.rglob("*") if f.is_file() and f.suffix in {".py", ".ipynb", ".sh", ".md", ""}
                        and "__pycache__" not in f.parts)


def test_no_code_reads_outside_the_repository():
    this = __file__
    hits = []
    for f in _files():
        if str(f) == this:
            continue
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if ESCAPE.search(line) and not any(h in line for h in HOSTILE):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def test_the_scan_would_catch_an_escape():
    for bad in [f'DATA = Path("../{TEAM}/data")', f"x = ROOT.parent / '{TEAM}'", "open('../other/x.json')",
                f"p = Path(__file__).resolve().parents[1].parent / '{TEAM}'", f"see {TEAM}/golden/x.json"]:
        assert ESCAPE.search(bad), bad
    for ok in ['DATA = ROOT / "data"', "x = 1 / 2", "runs/a/fit", "see .../fit"]:
        assert not ESCAPE.search(ok), ok


def test_fixtures_are_in_data():
    expected = ["golden/grpo_peer_numbers.json", "golden/trl_policy_losses.json", "mathvista/testmini_with_images.jsonl",
                "mathvista/testmini_text_all.jsonl", "mathvista/official_outputs_golden.jsonl",
                "mmstar/mmstar_1500_text_with_llava_next_34b_pred.jsonl", "tabmwp/tabmwp_test100.jsonl", "README.md"]
    missing = [e for e in expected if not (DATA / e).is_file()]
    assert not missing, f"missing fixtures under data/: {missing}"
    assert len(list((DATA / "mathvista" / "images").glob("*.png"))) == 29
    assert len(list((DATA / "tabmwp" / "images").glob("*.png"))) == 100
    readme = (DATA / "README.md").read_text()
    for e in expected[:-1]:
        assert e in readme, f"data/README.md does not describe {e}"
