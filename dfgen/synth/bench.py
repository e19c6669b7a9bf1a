"""The synthetic task as a benchmark: the same interface as the adapters in ``dfgen.benchmarks``
(``load``, ``score``, ``summarize``, ``ID_KEY``), so ``dftrain eval --bench synth`` goes through
the one registry (``dfgen.benchmarks.BENCHMARKS``).

Records are prompt sets written by ``dfgen synth`` (parquet or jsonl); answers are exact
(``dfgen.answers``: the last ``Answer:`` line).
"""
from __future__ import annotations

from pathlib import Path

NAME = "synth"
ID_KEY = "id"


def load(path: Path, limit: int | None = None, require_image: bool = True) -> tuple[list[dict], list[tuple[str, str]]]:
    """(records, skipped) of a prompt set; its images are always loaded (``require_image`` is for
    the public benchmarks, whose predictions can be scored without them)."""
    from dfgen.records import load_prompts

    del require_image
    return load_prompts(path, limit=limit)


def score(record: dict, response: str) -> dict:
    from dfgen.answers import extract, score as exact

    pred, r = exact(record, response)
    return {"extraction": extract(response), "prediction": pred, "correct": bool(r)}


def summarize(results: list[dict], skipped: list | None = None) -> dict:
    """Overall and per-category accuracy; ``by_category`` in the benchmarks' shape (an errored
    result is never correct)."""
    n = len(results)
    cats: dict = {}
    for r in results:
        a = cats.setdefault(r.get("category") or "all", [0, 0, 0])
        a[0] += bool(r["correct"])
        a[1] += 1
        a[2] += r.get("correct") is True and r.get("status") != "errored"
    return {"n": n, "accuracy": (sum(bool(r["correct"]) for r in results) / n) if n else 0.0,
            "per_category": {c: {"n": v[1], "accuracy": v[0] / v[1]} for c, v in sorted(cats.items())},
            "by_category": {c: {"n_total": v[1], "n_correct": v[2], "accuracy": v[2] / v[1]}
                            for c, v in sorted(cats.items())},
            "skipped": len(skipped or []),
            "skipped_reasons": [list(s) for s in (skipped or [])[:20]]}
