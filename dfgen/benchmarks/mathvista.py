"""MathVista (testmini / test) adapter.

Follows the official evaluation code of lupantech/MathVista:

* prompt: ``evaluation/build_query.py`` ``create_one_query`` with zero shots and no
  caption/OCR, i.e. the ``query`` field of ``data/query.json`` / HF ``AI4Math/MathVista``:
  ``hint`` (by question_type / answer_type / precision) + ``Question: ...`` (+ `` (Unit: u)``)
  + ``Choices:`` lines ``(A) ...``, joined by newlines;
* normalisation and comparison: ``evaluation/calculate_score.py``
  ``normalize_extracted_answer`` (choice letter -> choice, otherwise the nearest choice by
  Levenshtein distance; ``int(float(x))`` for integers; ``round(float(x), precision)`` for
  floats; ``str(x)`` for lists) and ``safe_equal`` (plain ``==`` on strings);
* extraction: the deterministic front part of ``evaluation/extract_answer.py``
  (empty response, response equal to a choice, response that parses as an integer/float,
  the quick-extract pattern ``The answer is "..."``).

Departures (documented):

* The official pipeline then asks GPT-4 to extract the answer from the response.  We run
  OFFLINE, so a rule-based extractor replaces it.  It looks at the last ``\\boxed{...}``,
  else the last ``answer is ...`` / ``Answer: ...`` span, else the whole response, and takes:
  multi-choice: a leading option letter, an exact option text, the last ``(X)`` /
  ``option X``, else the option text mentioned last; integer/float: the first number of the
  span (after its last ``=``), else the first number of a short one-line reply or the last
  number of a longer one (thousands separators dropped, ``a/b`` and ``\\frac{a}{b}`` become
  decimals, spelled-out numbers up to ninety count); list: the last ``[...]``.  When nothing
  is found for a multi-choice question, the response itself is the extraction and the
  official nearest-choice rule picks an option (``strict=True`` instead gives no
  prediction).  On the 2000 official GPT-4/LLaVA-13B responses this agrees with the GPT
  extraction on ~75% of the predictions and scores 523 vs 553 correct (most of the gap: GPT
  answered "N/A", which the edit-distance rule maps to the choice "No").
* ``normalize_answer`` handles ``free_form`` + ``text`` (absent from testmini; the official
  function has no branch for it) by returning the stripped extraction; it never raises.
* A float question whose precision is neither 1 nor 2 (no official hint string) gets an
  analogous hint "... with N decimal places ...".
* Records: multi-choice questions get ``answer_type="choice"``; the official
  question_type/answer_type, metadata and precision are kept in ``meta``; ``category`` is
  ``metadata.task`` (the five MathVista tasks: FQA, GPS, MWP, TQA, VQA).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from dfgen.benchmarks import (
    SkipRecord,
    accuracy_summary,
    as_str_or_none,
    is_missing,
    json_meta,
    load_meta,
    parse_mapping,
    parse_str_list,
    resolve_image,
    run_loader,
)

NAME = "mathvista"
ID_KEY = "pid"  # the id column of raw records (a predictions file may use it instead of ``id``)
SOURCE = "mathvista"
QUESTION_TYPES = ("multi_choice", "free_form")
OFFICIAL_ANSWER_TYPES = ("integer", "float", "text", "list")
TASKS = (
    "figure question answering",
    "geometry problem solving",
    "math word problem",
    "textbook question answering",
    "visual question answering",
)

HINT_CHOICE = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
HINT_INTEGER = (
    "Hint: Please answer the question requiring an integer answer and provide the final value, "
    "e.g., 1, 2, 3, at the end."
)
HINT_FLOAT_1 = (
    "Hint: Please answer the question requiring a floating-point number with one decimal place "
    "and provide the final value, e.g., 1.2, 1.3, 1.4, at the end."
)
HINT_FLOAT_2 = (
    "Hint: Please answer the question requiring a floating-point number with two decimal places "
    "and provide the final value, e.g., 1.23, 1.34, 1.45, at the end."
)
HINT_LIST = (
    "Hint: Please answer the question requiring a Python list as an answer and provide the final "
    "list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end."
)


# --------------------------------------------------------------------------------------
# small helpers


def _precision(value: Any) -> int | None:
    if is_missing(value):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(f) or math.isinf(f):
        return None
    return int(f)


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit costs, code points), as ``Levenshtein.distance``."""
    try:
        from rapidfuzz.distance import Levenshtein as _lev  # fast path when installed
    except ImportError:  # pragma: no cover - exercised only without rapidfuzz
        _lev = None
    if _lev is not None:
        return int(_lev.distance(a, b))
    return _levenshtein_py(a, b)


def _levenshtein_py(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def get_most_similar(prediction: str, choices: list[str]) -> str:
    """The choice with the smallest edit distance (first one on ties), as the official."""
    distances = [levenshtein(prediction, str(c)) for c in choices]
    return choices[distances.index(min(distances))]


# --------------------------------------------------------------------------------------
# prompt


def _hint(question_type: str, answer_type: str, precision: int | None) -> str:
    if question_type == "multi_choice":
        return HINT_CHOICE
    if answer_type == "integer":
        return HINT_INTEGER
    if answer_type == "float":
        if precision == 1:
            return HINT_FLOAT_1
        if precision == 2:
            return HINT_FLOAT_2
        n = precision if precision is not None else 2
        return (
            f"Hint: Please answer the question requiring a floating-point number with {n} decimal "
            "places and provide the final value at the end."
        )
    if answer_type == "list":
        return HINT_LIST
    return "Hint: Please answer the question and provide the final answer at the end."


def build_prompt(raw: dict) -> str:
    """The official zero-shot MathVista query (equals the dataset's ``query`` field)."""
    question_type = str(raw.get("question_type") or "")
    answer_type = str(raw.get("answer_type") or "")
    precision = _precision(raw.get("precision"))
    hint = _hint(question_type, answer_type, precision)
    question_text = f"Question: {raw.get('question', '')}"
    unit = raw.get("unit")
    if not is_missing(unit):
        question_text += f" (Unit: {unit})"
    choices = parse_str_list(raw.get("choices"))
    choices_text = ""
    if choices:
        choices_text = "\n".join(
            ["Choices:"] + [f"({letter}) {c}" for letter, c in zip(_letters(len(choices)), choices)]
        )
    # the official code strips the whole query (trailing spaces / "\r\n" in questions go)
    return "\n".join(e for e in (hint, question_text, choices_text) if e).strip()


# --------------------------------------------------------------------------------------
# loading


def _convert(raw: dict, root: Path, require_image: bool = True) -> dict:
    pid = raw.get("pid")
    if is_missing(pid):
        raise SkipRecord("missing field 'pid'")
    for key in ("question", "answer", "question_type", "answer_type"):
        if is_missing(raw.get(key)):
            raise SkipRecord(f"missing field {key!r}")
    question_type = str(raw["question_type"])
    answer_type = str(raw["answer_type"])
    if question_type not in QUESTION_TYPES:
        raise SkipRecord(f"unknown question type {question_type!r}")
    if answer_type not in OFFICIAL_ANSWER_TYPES:
        raise SkipRecord(f"unknown answer type {answer_type!r}")
    choices = parse_str_list(raw.get("choices"))
    precision = _precision(raw.get("precision"))
    if question_type == "multi_choice" and not choices:
        raise SkipRecord("multi_choice question without choices")
    if answer_type == "float" and precision is None:
        raise SkipRecord("float answer without precision")
    image, image_path = None, None
    if require_image:
        image, image_path = resolve_image(raw, ("decoded_image", "image_file", "image"), root)
    metadata = parse_mapping(raw.get("metadata"))
    meta = json_meta(
        {
            "pid": str(pid),
            "question_type": question_type,
            "answer_type": answer_type,
            "metadata": metadata or None,
        }
    )
    return {
        "id": str(pid),
        "question": build_prompt(raw),
        "image": image,
        "image_path": image_path,
        "answer": str(raw["answer"]),
        "answer_type": "choice" if question_type == "multi_choice" else answer_type,
        "choices": choices,
        "precision": precision,
        "unit": as_str_or_none(raw.get("unit")),
        "source": SOURCE,
        "category": as_str_or_none(metadata.get("task")),
        "solution": None,
        "meta": meta,
    }


def load(path: Path, limit: int | None = None, require_image: bool = True) -> tuple[list[dict], list[tuple[str, str]]]:
    """Load MathVista records from the official json (``{pid: problem}``), jsonl, a parquet
    export (``decoded_image`` struct) or a ``save_to_disk`` folder.  Images are resolved
    inside the file's folder (``image_file`` first, then ``image``; another extension with
    the same stem is accepted).  ``require_image=False`` loads text-only records."""
    return run_loader(Path(path), limit, lambda raw, root: _convert(raw, root, require_image), ID_KEY)


# --------------------------------------------------------------------------------------
# extraction (offline replacement of the GPT extractor)

_NUM = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|(?<![\w.])-?\.\d+"
_NUM_RE = re.compile(_NUM)
_FRAC_RE = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)(?![\w.])")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_ANSWER_SPAN_RE = re.compile(
    r"(?:final\s+answer|correct\s+answer|correct\s+option|correct\s+choice|\banswer)\s*"
    r"(?:is|would\s+be|should\s+be|will\s+be|=|:)\s*:?\s*(.+)",
    re.IGNORECASE,
)
_QUICK_RE = re.compile(r'The answer is "(.*)"\.')


def _boxed_contents(text: str) -> list[str]:
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def _clean_math(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\u2013", "-")
    text = _LATEX_FRAC_RE.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    text = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\%", "%").replace("\\$", "$").replace("\\,", "").replace("\\!", "")
    return text


def answer_span(response: str) -> str | None:
    """The part of the response that states the final answer, or None."""
    boxed = _boxed_contents(response)
    if boxed:
        return boxed[-1].strip()
    spans = [m.group(1) for m in _ANSWER_SPAN_RE.finditer(response)]
    if spans:
        return spans[-1].strip()
    return None


_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90})
_NUMBER_WORD_RE = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)
_PRONOUN_ONE_RE = re.compile(r"\b(?:the|this|that|which|each|any|every|no)\s+$", re.IGNORECASE)
SHORT_RESPONSE_CHARS = 200


def numeric_tokens(text: str) -> list[str]:
    """Numbers of ``text`` in reading order: decimals (thousands separators dropped),
    fractions ``a/b`` / ``\\frac{a}{b}`` as their decimal value, and spelled-out numbers
    ("three"; "one" not after "the"/"this"/...)."""
    text = _clean_math(text)
    tokens: list[tuple[int, str]] = []
    spans: list[tuple[int, int]] = []
    for m in _FRAC_RE.finditer(text):
        a, b = float(m.group(1)), float(m.group(2))
        if b != 0:
            tokens.append((m.start(), repr(a / b)))
            spans.append((m.start(), m.end()))
    for m in _NUM_RE.finditer(text):
        if not any(s <= m.start() < e for s, e in spans):
            tokens.append((m.start(), m.group(0).replace(",", "")))
    for m in _NUMBER_WORD_RE.finditer(text):
        word = m.group(1).lower()
        if word == "one" and _PRONOUN_ONE_RE.search(text[: m.start()]):
            continue
        tokens.append((m.start(), str(_NUMBER_WORDS[word])))
    return [value for _, value in sorted(tokens)]


def _span_number(span: str) -> str | None:
    """The number stated in an answer span: the first one after the last ``=``."""
    span = _clean_math(span)
    if "=" in span:
        span = span.rsplit("=", 1)[1]
    tokens = numeric_tokens(span)
    return tokens[0] if tokens else None


def _response_number(text: str) -> str | None:
    """No explicit answer span: a short one-line reply states its answer first ("There are
    2 items sold less than 5 units"); a longer reasoning ends with it."""
    tokens = numeric_tokens(text)
    if not tokens:
        return None
    short = "\n" not in text.strip() and len(text.strip()) <= SHORT_RESPONSE_CHARS
    return tokens[0] if short else tokens[-1]


def _choice_letter(text: str, choices: list[str], whole_response: bool) -> str | None:
    letters = _letters(len(choices))
    s = text.strip()
    if not s:
        return None
    # a bare letter: "B", "(B)", "B.", "B:", "B) ..." ("B ..." too inside an answer span)
    tail = r"(?:[.:)\]\n]|$)" if whole_response else r"(?:[.:)\]\s,]|$)"
    m = re.match(r"^[\(\[]?([A-Z])[\)\]]?" + tail, s)
    if m and m.group(1) in letters:
        return m.group(1)
    m = re.match(r"^\(([a-z])\)", s)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    # exact option text
    stripped = s.strip(" .。*\"'`$")
    for letter, choice in zip(letters, choices):
        if stripped.lower() == str(choice).strip().lower():
            return letter
    # "(B)" / "option B" / "choice B": the last one
    found = [(m.end(), m.group(1).upper()) for m in re.finditer(r"\(([A-Za-z])\)", s)]
    found += [(m.end(), m.group(1)) for m in re.finditer(r"\b(?i:option|choice)\s+\(?([A-Z])\b", s)]
    found = [f for f in found if f[1] in letters]
    if found:
        return max(found)[1]
    # the option text mentioned last (longest on ties)
    best = None
    for letter, choice in zip(letters, choices):
        c = str(choice).strip()
        if not c:
            continue
        pattern = (r"(?<!\w)" if c[0].isalnum() else "") + re.escape(c) + (r"(?!\w)" if c[-1].isalnum() else "")
        for m in re.finditer(pattern, s, re.IGNORECASE):
            key = (m.end(), len(c))
            if best is None or key > best[0]:
                best = (key, letter)
    return best[1] if best else None


def _format_list(text: str) -> str | None:
    found = re.findall(r"\[([^\[\]]*)\]", text)
    if not found:
        return None
    items = [x.strip().strip("'\"") for x in found[-1].split(",") if x.strip()]
    return "[" + ", ".join(items) + "]"


def _rule_extract(response: str, question_type: str, answer_type: str, choices: list[str] | None) -> str | None:
    text = response.strip()
    span = answer_span(text)
    if question_type == "multi_choice" and choices:
        if span is not None:
            letter = _choice_letter(span, choices, whole_response=False)
            if letter:
                return letter
        return _choice_letter(text, choices, whole_response=True)
    if answer_type in ("integer", "float"):
        if span is not None:
            num = _span_number(span)
            if num is not None:
                return num
        return _response_number(text)
    if answer_type == "list":
        if span is not None:
            lst = _format_list(span)
            if lst is not None:
                return lst
        return _format_list(text)
    # free-form text
    if span is not None:
        return span.strip().rstrip(".").strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip().rstrip(".").strip() if lines else None


def extract_answer(
    response: str,
    question_type: str,
    answer_type: str,
    choices: list[str] | None = None,
    strict: bool = False,
) -> str:
    """Rule-based extraction of the final answer from a free-form ``response``.

    The official deterministic shortcuts come first; our offline rules replace the GPT
    extractor.  When nothing is recognised: ``""`` if ``strict``, else (multi-choice) the
    stripped response -- which the official normaliser maps to the nearest option -- and
    ``""`` for the other types."""
    if response is None:
        return ""
    response = str(response)
    if response.strip() == "":
        return ""
    stripped = response.strip()
    if question_type == "multi_choice" and choices and stripped in choices:
        return stripped
    if answer_type == "integer" and re.fullmatch(r"[-+]?\d+", stripped):
        return str(int(stripped))
    if answer_type == "float" and re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", stripped):
        return str(float(stripped))
    quick = _QUICK_RE.search(response)
    if quick:
        return quick.group(1)
    found = _rule_extract(response, question_type, answer_type, choices)
    if found is not None:
        return found
    if strict:
        return ""
    return stripped if question_type == "multi_choice" else ""


# --------------------------------------------------------------------------------------
# normalisation and scoring (official)


def normalize_answer(
    extraction: Any,
    choices: list[str] | None,
    question_type: str,
    answer_type: str,
    precision: Any,
    ignore_empty_extractions: bool = False,
) -> str | None:
    """Official ``normalize_extracted_answer``: the prediction compared with the answer."""
    if question_type == "multi_choice":
        if isinstance(extraction, str):
            extraction = extraction.strip()
        else:
            try:
                extraction = str(extraction)
            except Exception:  # noqa: BLE001
                extraction = ""
        if ignore_empty_extractions and not extraction:
            return None
        if not choices:
            return None
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = _letters(len(choices))
        if extraction in letters:
            return choices[letters.index(extraction)]
        return get_most_similar(extraction, choices)
    if answer_type == "integer":
        try:
            return str(int(float(extraction)))
        except Exception:  # noqa: BLE001 - official: any failure -> None
            return None
    if answer_type == "float":
        try:
            return str(round(float(extraction), int(precision)))
        except Exception:  # noqa: BLE001
            return None
    if answer_type == "list":
        try:
            return str(extraction)
        except Exception:  # noqa: BLE001
            return None
    # free_form text: no official branch (departure, see module docstring)
    if extraction is None:
        return None
    return str(extraction).strip()


# the official name
normalize_extracted_answer = normalize_answer


def safe_equal(prediction: Any, answer: Any) -> bool:
    """Official ``safe_equal``: plain equality that never raises."""
    try:
        return bool(prediction == answer)
    except Exception:  # noqa: BLE001
        return False


def _official_types(record: dict) -> tuple[str, str]:
    meta = load_meta(record)
    question_type = meta.get("question_type")
    answer_type = meta.get("answer_type")
    if not question_type:
        question_type = "multi_choice" if record.get("answer_type") == "choice" else "free_form"
    if not answer_type:
        answer_type = "text" if record.get("answer_type") == "choice" else str(record.get("answer_type"))
    return question_type, answer_type


def score(record: dict, response: str, strict: bool = False) -> dict:
    """Extract, normalise (official) and compare (official ``safe_equal``)."""
    question_type, answer_type = _official_types(record)
    choices = record.get("choices")
    extraction = extract_answer(response, question_type, answer_type, choices, strict=strict)
    prediction = normalize_answer(
        extraction, choices, question_type, answer_type, record.get("precision"),
        ignore_empty_extractions=strict,
    )
    meta = load_meta(record)
    skills = (meta.get("metadata") or {}).get("skills")
    return {
        "id": record.get("id"),
        "category": record.get("category"),
        "skills": list(skills) if isinstance(skills, list) else None,
        "extraction": extraction,
        "prediction": prediction,
        "correct": safe_equal(prediction, record.get("answer")),
    }


def _skills(result: dict):
    skills = result.get("skills")
    if skills is None:
        skills = (load_meta(result).get("metadata") or {}).get("skills")
    return skills


def summarize(results: list[dict], skipped: list | None = None) -> dict:
    """Overall accuracy, per task (``by_category``) and per skill (``by_skill``)."""
    summary = accuracy_summary(
        results,
        group_fns={"category": lambda r: r.get("category"), "skill": _skills},
        fixed_groups={"category": TASKS},
        skipped=skipped,
    )
    summary["benchmark"] = NAME
    return summary
