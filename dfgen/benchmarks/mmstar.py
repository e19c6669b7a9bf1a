"""MMStar adapter.

Follows the official MMStar evaluation (MMStar-Benchmark/MMStar ``eval/vlmeval/evaluate/
mmstar.py`` ``MMStar_eval``, the rule VLMEvalKit also uses for MMStar):

* the gold letter and the prediction are lower-cased, stripped and newlines become
  spaces; the prediction is correct when its FIRST character is the letter, or it starts
  with ``(`` and the second character is the letter, or it starts with ``option `` /
  ``the answer is `` and the next character is the letter (an empty prediction is wrong);
* scores: per category (six, 250 questions each), per l2 category, and the final score =
  correct / all questions (1500).

The prompt follows the MMStar/VLMEvalKit ``build_prompt`` for its TSV (options are already
embedded in ``question``): ``Question: {question}`` plus the short instruction
``Answer with the option's letter from the given choices directly.``.

Departures (documented):

* ``choices`` is a best-effort parse of the options embedded in the question
  (``Options: A: ..., B: ...`` or ``(A) ...`` lines); None when the parse is ambiguous.
  Scoring never uses it.
* ``score(..., lenient=True)`` (off by default) additionally accepts a final answer stated
  later in a free-form response (``\\boxed{B}``, ``the answer is (B)``, ...).  The default
  is the official rule, which only looks at the start of the response.
* ``load`` also reads a VLMEvalKit ``MMStar.tsv`` (base64 images) besides the HF parquet
  / ``save_to_disk`` export (image struct) and json/jsonl with image paths.
"""

from __future__ import annotations

import re
from pathlib import Path

from dfgen.benchmarks import (
    SkipRecord,
    accuracy_summary,
    is_missing,
    json_meta,
    load_meta,
    parse_mapping,
    resolve_image,
    run_loader,
)

NAME = "mmstar"
ID_KEY = "index"  # the id column of raw records (a predictions file may use it instead of ``id``)
SOURCE = "mmstar"
CATEGORIES = (
    "coarse perception",
    "fine-grained perception",
    "instance reasoning",
    "logical reasoning",
    "science & technology",
    "math",
)
L2_CATEGORIES = {
    "coarse perception": ("image scene and topic", "image style & quality", "image emotion"),
    "fine-grained perception": ("object counting", "recognition", "localization"),
    "instance reasoning": (
        "single-instance reasoning",
        "cross-instance attribute reasoning",
        "cross-instance relation reasoning",
    ),
    "logical reasoning": ("code & sequence reasoning", "diagram reasoning", "common reasoning"),
    "science & technology": (
        "biology & chemistry & physics",
        "electronics & energy & mechanical eng.",
        "geography & earth science & agriculture",
    ),
    "math": ("geometry", "numeric commonsense and calculation", "statistical reasoning"),
}
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def build_prompt(raw: dict) -> str:
    question = str(raw.get("question", "")).strip()
    return f"Question: {question}\n{INSTRUCTION}"


def parse_options(question: str) -> list[str] | None:
    """Option texts embedded in an MMStar question, or None if not cleanly parseable."""
    pieces = None
    i = question.rfind("Options:")
    if i >= 0:
        parts = re.split(r"(?:^|,)\s*([A-Z]):\s", question[i + len("Options:") :])
        if not parts[0].strip():
            pieces = parts
    if pieces is None:
        i = question.rfind("Choices:")
        body = question[i + len("Choices:") :] if i >= 0 else None
        if body is None:
            m = re.search(r"\n\(A\) ", question)
            body = question[m.start() :] if m else None
        if body is not None:
            parts = re.split(r"(?:^|\n)\s*\(([A-Z])\)\s", body)
            if not parts[0].strip():
                pieces = parts
    if pieces is None:
        return None
    letters, texts = pieces[1::2], [t.strip().rstrip(",").strip() for t in pieces[2::2]]
    if len(letters) < 2 or letters != [chr(ord("A") + k) for k in range(len(letters))]:
        return None
    return texts


def _convert(raw: dict, root: Path, require_image: bool = True) -> dict:
    rid = raw.get("index")
    if is_missing(rid):
        raise SkipRecord("missing field 'index'")
    for key in ("question", "answer", "category"):
        if is_missing(raw.get(key)):
            raise SkipRecord(f"missing field {key!r}")
    answer = str(raw["answer"]).strip()
    if not re.fullmatch(r"[A-Za-z]", answer):
        raise SkipRecord(f"unknown answer type: answer {answer!r} is not an option letter")
    answer = answer.upper()
    category = str(raw["category"]).strip()
    question = str(raw["question"])
    choices = parse_options(question)
    if choices is not None and ord(answer) - ord("A") >= len(choices):
        choices = None
    image, image_path = None, None
    if require_image:
        image, image_path = resolve_image(raw, ("image", "image_file", "image_path"), root)
    meta_info = parse_mapping(raw.get("meta_info"))
    return {
        "id": str(rid),
        "question": build_prompt(raw),
        "image": image,
        "image_path": image_path,
        "answer": answer,
        "answer_type": "choice",
        "choices": choices,
        "precision": None,
        "unit": None,
        "source": SOURCE,
        "category": category,
        "solution": None,
        "meta": json_meta(
            {
                "l2_category": None if is_missing(raw.get("l2_category")) else str(raw["l2_category"]),
                "bench": None if is_missing(raw.get("bench")) else str(raw["bench"]),
                "meta_info": meta_info or None,
            }
        ),
    }


def load(path: Path, limit: int | None = None, require_image: bool = True) -> tuple[list[dict], list[tuple[str, str]]]:
    """Load MMStar from the HF parquet / ``save_to_disk`` export (``image`` struct), a
    VLMEvalKit TSV (base64 ``image``) or json/jsonl with image paths inside the folder.
    ``require_image=False`` loads text-only records."""
    return run_loader(Path(path), limit, lambda raw, root: _convert(raw, root, require_image), ID_KEY)


# --------------------------------------------------------------------------------------
# official rule


def official_match(prediction: str, answer: str) -> bool:
    """``MMStar_eval``'s per-item rule, verbatim in behaviour."""
    answer = str(answer).lower().strip().replace("\n", " ")
    predict = str(prediction).lower().strip().replace("\n", " ")
    try:
        if answer == predict[0]:
            return True
        if predict[0] == "(" and answer == predict[1]:
            return True
        if predict[0:7] == "option " and answer == predict[7]:
            return True
        if predict[0:14] == "the answer is " and answer == predict[14]:
            return True
    except IndexError:
        pass
    return False


def normalize_answer(extraction: str) -> str:
    """The option letter the official rule reads from an (already extracted) answer:
    the character after ``the answer is `` / ``option `` / ``(``, else the first one;
    upper-cased; ``""`` when that is not a letter."""
    p = str(extraction or "").lower().strip().replace("\n", " ")
    if p.startswith("the answer is ") and len(p) > 14:
        ch = p[14]
    elif p.startswith("option ") and len(p) > 7:
        ch = p[7]
    elif p.startswith("(") and len(p) > 1:
        ch = p[1]
    elif p:
        ch = p[0]
    else:
        return ""
    return ch.upper() if "a" <= ch <= "z" else ""


_LENIENT_PATTERNS = (
    re.compile(r"\\boxed\s*\{\s*\(?([A-Z])\)?\s*\}"),
    re.compile(r"(?i:answer|option|choice)\s*(?i:is|:)?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])"),
    re.compile(r"\(([A-Z])\)"),
)


def _lenient_letter(response: str) -> str:
    for pattern in _LENIENT_PATTERNS:
        found = pattern.findall(response)
        if found:
            return found[-1]
    return ""


def score(record: dict, response: str, lenient: bool = False) -> dict:
    """Official MMStar rule (``lenient=True`` adds a fallback search for a stated letter)."""
    response = "" if response is None else str(response)
    answer = str(record.get("answer", ""))
    extraction = normalize_answer(response)
    correct = official_match(response, answer)
    if lenient and not correct:
        letter = _lenient_letter(response)
        if letter:
            extraction = letter
            correct = letter.lower() == answer.lower().strip()
    meta = load_meta(record)
    return {
        "id": record.get("id"),
        "category": record.get("category"),
        "l2_category": meta.get("l2_category"),
        "extraction": extraction,
        "prediction": extraction,
        "correct": bool(correct),
    }


def _l2(result: dict):
    l2 = result.get("l2_category") or load_meta(result).get("l2_category")
    cat = result.get("category")
    return f"{cat}({l2})" if l2 and cat else None


def summarize(results: list[dict], skipped: list | None = None) -> dict:
    """``accuracy`` is MMStar's final score (correct / all questions); ``by_category`` the six
    categories, ``by_l2_category`` keyed ``"category(l2)"`` as the official score file."""
    summary = accuracy_summary(
        results,
        group_fns={"category": lambda r: r.get("category"), "l2_category": _l2},
        fixed_groups={
            "category": CATEGORIES,
            "l2_category": [f"{c}({l2})" for c, l2s in L2_CATEGORIES.items() for l2 in l2s],
        },
        skipped=skipped,
    )
    summary["benchmark"] = NAME
    return summary
