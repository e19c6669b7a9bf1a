"""``dftrain eval``: end to end through the CLI (synth, MathVista, TabMWP with the tiny policies),
``--predictions`` scoring (MMStar official number), bad input counted and reported, one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import DATA, run_cli

ITEM_KEYS = {"id", "status", "category", "answer", "response", "extraction", "prediction", "correct", "error",
             "samples", "n_correct"}
SUMMARY_KEYS = {"bench", "mode", "n", "n_correct", "accuracy", "n_errored", "accuracy_scored", "n_skipped",
                "skipped", "per_category", "pass_at", "sample_accuracy", "details", "config", "items", "elapsed_s"}


def _read_outputs(out: Path):
    summary = json.loads(out.read_text())
    items_file = out.with_name(out.stem + ".items.jsonl")
    assert items_file.is_file() and summary["items"] == str(items_file)
    items = [json.loads(line) for line in items_file.read_text().splitlines()]
    assert SUMMARY_KEYS <= set(summary)
    for it in items:
        assert ITEM_KEYS <= set(it), it
        assert isinstance(it["correct"], bool)
    evaluated = [it for it in items if it["status"] != "skipped"]
    assert len(evaluated) == summary["n"]
    assert sum(it["status"] == "skipped" for it in items) == summary["n_skipped"]
    assert sum(it["correct"] for it in evaluated) == summary["n_correct"]
    assert sum(b["n"] for b in summary["per_category"].values()) == summary["n"]
    return summary, items


def test_eval_synth_end_to_end(sft_model, test_prompts, tmp_path):
    out = tmp_path / "synth.json"
    p = run_cli("dftrain", "eval", "--model", sft_model, "--bench", "synth", "--data", test_prompts,
                "--limit", 8, "--out", out)
    assert "overall" in p.stdout and "skipped at load" in p.stdout
    summary, items = _read_outputs(out)
    assert summary["bench"] == "synth" and summary["mode"] == "generate" and summary["n"] == 8
    assert summary["pass_at"] == 1 and summary["config"]["temperature"] == 0.0
    assert summary["config"]["max_new_tokens"] == 64
    assert summary["accuracy"] == sum(it["correct"] for it in items) / len(items)  # the summary is its items'
    assert all(isinstance(it["response"], str) and it["samples"] == 1 for it in items)


@pytest.mark.parametrize("bench,path", [
    ("mathvista", DATA / "mathvista" / "testmini_with_images.jsonl"),
    ("tabmwp", DATA / "tabmwp" / "tabmwp_test100.jsonl"),
])
def test_eval_benchmarks_end_to_end(tiny_model, tmp_path, bench, path):
    out = tmp_path / "res" / f"{bench}.json"
    run_cli("dftrain", "eval", "--model", tiny_model, "--bench", bench, "--data", path, "--limit", 4,
            "--max-new-tokens", 8, "--out", out)
    summary, items = _read_outputs(out)
    assert summary["bench"] == bench and summary["n"] == 4 and summary["n_errored"] == 0
    assert summary["details"]["benchmark"] == bench and summary["details"]["n_total"] == 4
    assert summary["accuracy"] == summary["details"]["accuracy"]
    assert all(it["status"] == "scored" and it["category"] for it in items)


def test_eval_predictions_reproduce_mmstar_official_score(tmp_path):
    path = DATA / "mmstar" / "mmstar_1500_text_with_llava_next_34b_pred.jsonl"
    out = tmp_path / "mmstar.json"
    p = run_cli("dftrain", "eval", "--bench", "mmstar", "--data", path, "--predictions", path,
                "--prediction-field", "prediction_llava_next_yi_34b", "--out", out)
    assert "52.07" in p.stdout
    summary, _ = _read_outputs(out)
    assert summary["mode"] == "predictions" and summary["n"] == 1500 and summary["n_skipped"] == 0
    assert round(summary["accuracy"], 5) == 0.52067
    expected = {"coarse perception": 0.656, "fine-grained perception": 0.520, "instance reasoning": 0.624,
                "logical reasoning": 0.460, "math": 0.532, "science & technology": 0.332}
    assert {c: round(b["accuracy"], 3) for c, b in summary["per_category"].items()} == expected
    assert summary["predictions"]["n_matched"] == 1500 and summary["predictions"]["n_unknown_ids"] == 0
    # without --prediction-field no row has a response/prediction field: a refusal naming the candidate,
    # never "1500 errored, accuracy 0.0"
    bad = run_cli("dftrain", "eval", "--bench", "mmstar", "--data", path, "--predictions", path,
                  "--out", tmp_path / "none.json", check=False)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode != 0 and len(lines) == 1 and "--prediction-field" in lines[0], bad.stderr
    assert "prediction_llava_next_yi_34b" in lines[0] and not (tmp_path / "none.json").exists()


def _png(path: Path):
    from PIL import Image

    Image.new("RGB", (28, 28), (200, 30, 30)).save(path)


def _mathvista_row(pid: str, **kw) -> dict:
    row = {"pid": pid, "question": "How many red squares are there?", "image": f"images/{pid}.png",
           "choices": None, "unit": None, "precision": None, "answer": "1", "question_type": "free_form",
           "answer_type": "integer", "metadata": {"task": "figure question answering", "skills": ["counting"]}}
    row.update(kw)
    return row


def test_eval_bad_records_are_counted_not_fatal(tiny_model, tmp_path):
    """Missing fields, an undecodable image, a missing image and an unknown answer type: skipped,
    reported per item with a reason, never correct; the run finishes with exit 0."""
    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "1.png")
    _png(tmp_path / "images" / "2.png")
    (tmp_path / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = [_mathvista_row("1"),
            {k: v for k, v in _mathvista_row("9").items() if k != "answer"},  # missing field
            _mathvista_row("3"),  # undecodable image
            _mathvista_row("4"),  # image file missing
            _mathvista_row("2", answer_type="complex"),  # unknown answer type
            _mathvista_row("5", image="images/1.png", answer="2")]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    out = tmp_path / "bad.json"
    p = run_cli("dftrain", "eval", "--model", tiny_model, "--bench", "mathvista", "--data", data,
                "--max-new-tokens", 4, "--out", out)
    assert p.returncode == 0
    assert "skipped 9: missing field 'answer'" in p.stderr
    summary, items = _read_outputs(out)
    assert summary["n"] == 2 and summary["n_skipped"] == 5
    reasons = {it["id"]: it["error"] for it in items if it["status"] == "skipped"}
    assert set(reasons) == {"9", "3", "4", "2", "line 7"}
    assert "missing field 'answer'" in reasons["9"]
    assert "undecodable image" in reasons["3"]
    assert "missing image" in reasons["4"]
    assert "unknown answer type" in reasons["2"]
    assert "invalid JSON" in reasons["line 7"]
    assert not any(it["correct"] for it in items if it["status"] == "skipped")
    assert [s[0] for s in summary["skipped"]] == ["9", "3", "4", "2", "line 7"]


def _synth_jsonl(path: Path, n: int = 4) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1),
                                        "answer_type": "integer", "category": "add" if i % 2 else "sum"}) + "\n"
                            for i in range(n)))
    return path


def test_eval_predictions_bad_lines_unknown_and_missing_ids(tmp_path):
    data = _synth_jsonl(tmp_path / "prompts.jsonl", 5)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join([
        json.dumps({"id": "q0", "response": "Answer: 1"}),  # correct
        json.dumps({"id": "q1", "response": "Answer: 7"}),  # wrong
        json.dumps({"id": "q1", "response": "Answer: 2"}),  # duplicate: the first one is kept
        json.dumps({"id": "q2", "prediction": None}),  # null prediction: errored
        json.dumps({"id": "q3", "other": "3"}),  # no response field: errored
        json.dumps({"id": "nope", "response": "Answer: 1"}),  # unknown id
        json.dumps({"response": "Answer: 1"}),  # no id
        "{broken",
    ]) + "\n")
    out = tmp_path / "p.json"
    p = run_cli("dftrain", "eval", "--bench", "synth", "--data", data, "--predictions", preds, "--out", out)
    assert "1 prediction(s) with an id not in the data" in p.stderr
    summary, items = _read_outputs(out)
    rep = summary["predictions"]
    assert (rep["n_lines"], rep["n_unknown_ids"], rep["n_duplicate_ids"], rep["n_bad_lines"]) == (8, 1, 1, 2)
    assert rep["unknown_ids"] == ["nope"] and rep["missing_ids"] == ["q4"]
    by_id = {it["id"]: it for it in items}
    assert by_id["q0"]["correct"] and by_id["q0"]["status"] == "scored"
    assert not by_id["q1"]["correct"] and by_id["q1"]["response"] == "Answer: 7"
    for rid in ("q2", "q3", "q4"):
        assert by_id[rid]["status"] == "errored" and not by_id[rid]["correct"] and by_id[rid]["error"]
    assert summary["n"] == 5 and summary["n_correct"] == 1 and summary["n_errored"] == 3
    assert summary["accuracy"] == pytest.approx(0.2) and summary["accuracy_scored"] == pytest.approx(0.5)


def test_run_eval_isolates_failing_records():
    """Generation-time failures (undecodable image bytes, a backend error on one record) become
    errored results, never correct, and do not stop the batch."""
    from dfgen.backends import Sample
    from dftrain.evaluate import run_eval, summarize_bench

    class FakeBackend:
        def generate(self, prompts, seeds, cfg):
            if any("boom" in p.question for p in prompts):
                raise RuntimeError("kaboom")
            return [[Sample([], [], f"Answer: {p.question.split()[2]}", "stop") for _ in ss]
                    for p, ss in zip(prompts, seeds)]

    recs = [{"id": "a", "question": "What is 3 ?", "answer": "3", "answer_type": "integer", "image": None},
            {"id": "b", "question": "What is 4 ?", "answer": "4", "answer_type": "integer", "image": b"garbage"},
            {"id": "c", "question": "What is boom ?", "answer": "5", "answer_type": "integer", "image": None},
            {"id": "d", "question": "What is 6 ?", "answer": "7", "answer_type": "integer", "image": None}]
    res = run_eval(FakeBackend(), recs, "synth", max_new_tokens=4)
    assert [r["id"] for r in res] == ["a", "b", "c", "d"]
    assert [r["status"] for r in res] == ["scored", "errored", "errored", "scored"]
    assert [r["correct"] for r in res] == [True, False, False, False]
    assert "bad input" in res[1]["error"] and "kaboom" in res[2]["error"]
    s = summarize_bench("synth", res)
    assert (s["n"], s["n_correct"], s["n_errored"]) == (4, 1, 2)


def test_eval_errors_are_one_line(tmp_path):
    data = _synth_jsonl(tmp_path / "prompts.jsonl")
    cases = [
        (["--bench", "mathvista", "--data", tmp_path / "nope.jsonl", "--model", tmp_path], "data not found"),
        (["--bench", "mmstar", "--predictions", data], "--data is required"),
        (["--bench", "synth", "--data", data], "--model is required"),
        (["--bench", "synth", "--data", data, "--predictions", data, "--model", tmp_path], "not both"),
        (["--bench", "synth", "--data", data, "--predictions", tmp_path / "missing.jsonl"], "predictions not found"),
        (["--bench", "synth", "--data", data, "--model", tmp_path, "--samples", 4, "--temperature", 0],
         "--temperature > 0"),
    ]
    for args, msg in cases:
        p = run_cli("dftrain", "eval", *args, "--out", tmp_path / "r.json", check=False)
        assert p.returncode != 0, args
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (args, p.stderr)
        assert "Traceback" not in p.stderr
    assert not (tmp_path / "r.json").exists()


def test_prompt_beyond_the_context_is_errored_not_decoded(sft_model, test_prompts):
    """The hf backend refuses a prompt that would run past the model's positions; eval isolates
    that record as errored (never correct) and scores the others."""
    from dfgen.backends.hf import HFBackend
    from dfgen.policy import load_policy
    from dfgen.records import load_prompts
    from dftrain.evaluate import run_eval

    recs, _ = load_prompts(test_prompts, limit=3)
    recs[1] = dict(recs[1], question=recs[1]["question"] + " red" * 1200)
    model, proc = load_policy(sft_model)
    res = run_eval(HFBackend(None, model=model, processor=proc), recs, "synth", max_new_tokens=16)
    assert [r["status"] for r in res] == ["scored", "errored", "scored"]
    assert "prompt too long" in res[1]["error"] and "1024-token context" in res[1]["error"]
    assert not res[1]["correct"]
