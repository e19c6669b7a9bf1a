"""Answer extraction and exact checking: the reward of every rollout.

``extract(text)`` takes the value after the last ``Answer:`` (case-insensitive); without one,
nothing is extracted (the format is part of the task). ``score(record, text)`` returns
``(pred, reward)`` with reward 1.0 for an exact match and 0.0 otherwise:

* ``integer``: parsed as an integer (``"08"`` = 8; ``"8.0"`` is *not* accepted: the synthetic
  solution format prints integers);
* ``float``: rounded to the record's ``precision`` (2 by default) before comparing;
* ``choice``: the letter or the option text;
* ``text``/``list``: whitespace- and case-normalised string equality.

Model text is only ever parsed (regular expressions, ``int``/``float``), never evaluated.
Benchmark scorers (``dfgen.benchmarks``) extend this with their official rules; the stages
reward a rollout through ``dfgen.benchmarks.reward``, which picks the record's benchmark scorer
or this exact match.
"""
from __future__ import annotations

import re

ANSWER_RE = re.compile(r"answer\s*:\s*([^\n]*)", re.IGNORECASE)
INT_RE = re.compile(r"^[+-]?\d+$")
NUM_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def extract(text: str) -> str | None:
    m = ANSWER_RE.findall(text or "")
    if not m:
        return None
    return m[-1].strip().rstrip(".").strip() or None


def _norm(s: str) -> str:
    return " ".join(str(s).lower().split())


def equal(pred: str | None, record: dict) -> bool:
    if pred is None:
        return False
    kind = record.get("answer_type") or "text"
    gold = str(record["answer"]).strip()
    if kind == "integer":
        return bool(INT_RE.match(pred)) and INT_RE.match(gold) is not None and int(pred) == int(gold)
    if kind == "float":
        p = pred.replace(",", "")
        if not NUM_RE.match(p) or not NUM_RE.match(gold):
            return False
        prec = record.get("precision")
        prec = 2 if prec is None else int(prec)
        return round(float(p), prec) == round(float(gold), prec)
    if kind == "choice":
        choices = record.get("choices") or []
        letters = [chr(65 + i) for i in range(len(choices))]
        p = pred.strip().strip("()").strip()
        if p.upper() in letters and len(p) == 1:
            p = choices[letters.index(p.upper())]
        g = gold
        if g.upper() in letters and len(g) == 1:
            g = choices[letters.index(g.upper())]
        return _norm(p) == _norm(g)
    return _norm(pred) == _norm(gold)


def score(record: dict, text: str) -> tuple[str | None, float]:
    """(extracted prediction, reward in {0, 1}) by exact match of the last ``Answer:`` line."""
    pred = extract(text)
    return pred, float(equal(pred, record))
