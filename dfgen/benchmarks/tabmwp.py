"""TabMWP adapter (vision setting: the table is given as its image).

Follows the official TabMWP / PromptPG code (lupantech/PromptPG ``run_gpt3/run_gpt3.py``
``normalize_answer`` and ``run_gpt3/utilities.py`` ``extract_prediction``):

* normalisation: strip a leading ``$`` and one trailing ``,`` ``.`` ``/``; a numeric string
  (digits, commas, ``.``, ``/``) becomes an int, or a float rounded to 3 decimals
  (fractions ``a/b`` are divided first), printed without trailing ``.0``; otherwise the
  unit is removed from the text; the comparison is case-insensitive string equality of the
  normalised prediction and answer;
* multi-choice: a letter (``(B)``, ``B``, ``The answer is B`` ...) selects the option,
  otherwise the option with the highest word-overlap similarity;
* free text: the official pre-cleaning (``\\frac{a}{b}`` -> ``a/b``, unicode minus, ...) and
  number patterns (``The answer is ...``, `` = 1.40``, ``is/are/was/were 1.40``, the last
  number).

The prompt keeps the official question text (``question (Unit: u)`` and
``Options: (A) x (B) y``) but NEVER the ``table`` / ``table_title`` text: in a vision
evaluation the table is the image's content.

Departures (documented):

* The prompt adds one instruction line (answer with ``The answer is X.``) instead of the
  few-shot ``Table:/Question:/Answer:`` text template.
* Extraction first takes the last ``\\boxed{...}`` or ``answer is ...`` span of a free-form
  response (VLM chain-of-thought rather than GPT-3's one-line answers).  Multi-choice:
  the official ``[Th]he answer is ([A-Z])`` pattern also fires on option TEXT starting with
  a capital ("The answer is Adam" -> "A"); we require the letter to stand alone, then match
  option text (the last one mentioned), then fall back to the official word-overlap
  similarity.  When several options tie, the official code's random pick is replaced by
  the first one (deterministic).
* Free text: when the normalised prediction is not numeric but contains a number (e.g.
  ``42 minutes`` with a unit different from the gold unit), the last number is used; numbers
  are compared after the official 3-decimal rounding, with a 1e-9 tolerance.
* An empty response is never correct (the official similarity fallback would still pick
  an option for it).
* ``category`` is the official ``ans_type`` (integer_number, decimal_number,
  extractive_text, boolean_text, other_text); ``answer_type`` maps to integer/float/choice/text.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from dfgen.benchmarks import (
    SkipRecord,
    accuracy_summary,
    as_str_or_none,
    is_missing,
    json_meta,
    load_meta,
    parse_str_list,
    resolve_image,
    run_loader,
)

NAME = "tabmwp"
ID_KEY = "pid"  # the id column of raw records (a predictions file may use it instead of ``id``)
SOURCE = "tabmwp"
OPTION_INDS = ("A", "B", "C", "D", "E", "F")
ANS_TYPES = ("integer_number", "decimal_number", "extractive_text", "boolean_text", "other_text")
QUES_TYPES = ("free_text", "multi_choice")


# --------------------------------------------------------------------------------------
# prompt


def get_question_text(raw: dict) -> str:
    """Official ``get_question_text``: question, unit and options (never the table)."""
    question = str(raw.get("question", ""))
    unit = raw.get("unit")
    if not is_missing(unit):
        question = f"{question} (Unit: {unit})"
    choices = parse_str_list(raw.get("choices"))
    if choices:
        options = " ".join(f"({OPTION_INDS[i]}) {c}" for i, c in enumerate(choices[: len(OPTION_INDS)]))
        question = f"{question}\nOptions: {options}"
    return question


def build_prompt(raw: dict) -> str:
    choices = parse_str_list(raw.get("choices"))
    instruction = (
        "Answer the question using the table in the image. "
        'Finish your response with "The answer is X." where X is '
        + ("the text of the correct option." if choices else "the final answer.")
    )
    return f"Question: {get_question_text(raw)}\n{instruction}"


# --------------------------------------------------------------------------------------
# loading


def _decimals(answer: str) -> int | None:
    m = re.fullmatch(r"\$?-?[\d,]*\.(\d+)", answer.strip())
    return len(m.group(1)) if m else None


def _convert(raw: dict, root: Path, require_image: bool = True) -> dict:
    pid = raw.get("pid")
    if is_missing(pid):
        raise SkipRecord("missing field 'pid'")
    for key in ("question", "answer", "ques_type", "ans_type"):
        if is_missing(raw.get(key)):
            raise SkipRecord(f"missing field {key!r}")
    ques_type, ans_type = str(raw["ques_type"]), str(raw["ans_type"])
    if ques_type not in QUES_TYPES:
        raise SkipRecord(f"unknown question type {ques_type!r}")
    if ans_type not in ANS_TYPES:
        raise SkipRecord(f"unknown answer type {ans_type!r}")
    choices = parse_str_list(raw.get("choices"))
    answer = str(raw["answer"])
    if ques_type == "multi_choice":
        if not choices:
            raise SkipRecord("multi_choice question without choices")
        if len(choices) > len(OPTION_INDS):
            raise SkipRecord(f"too many choices ({len(choices)})")
        answer_type = "choice"
    elif ans_type == "integer_number":
        answer_type = "integer"
    elif ans_type == "decimal_number":
        answer_type = "float"
    else:
        answer_type = "text"
    image, image_path = None, None
    if require_image:
        image, image_path = resolve_image(
            raw, ("image", "image_file", "image_path"), root, extra_paths=(f"tables/{pid}.png",)
        )
    return {
        "id": str(pid),
        "question": build_prompt(raw),
        "image": image,
        "image_path": image_path,
        "answer": answer,
        "answer_type": answer_type,
        "choices": choices,
        "precision": _decimals(answer) if answer_type == "float" else None,
        "unit": as_str_or_none(raw.get("unit")),
        "source": SOURCE,
        "category": ans_type,
        "solution": None,
        "meta": json_meta(
            {
                "ques_type": ques_type,
                "ans_type": ans_type,
                "grade": None if is_missing(raw.get("grade")) else str(raw["grade"]),
                "split": as_str_or_none(raw.get("split")),
            }
        ),
    }


def load(path: Path, limit: int | None = None, require_image: bool = True) -> tuple[list[dict], list[tuple[str, str]]]:
    """Load TabMWP from the official ``problems_*.json`` (``{pid: problem}``; images at
    ``tables/<pid>.png`` next to it), jsonl with ``image_file``, a parquet export or a
    ``save_to_disk`` folder.  ``require_image=False`` loads text-only records."""
    return run_loader(Path(path), limit, lambda raw, root: _convert(raw, root, require_image), ID_KEY)


# --------------------------------------------------------------------------------------
# extraction and normalisation


def _preclean(output: str) -> str:
    """Official pre-cleaning of ``extract_prediction``."""
    output = re.sub(r"\$?\\[dt]?frac\{([\d\.\,\-]+)\}\{([\d\.\,]+)\}\$?", r"\1/\2", output)
    output = re.sub(r"(?<![AP]\.M)\.$", "", output)
    output = re.sub(r"(?<=\d)[\=](?=[\-\$\d])", " = ", output)
    output = re.sub("\u2212", "-", output)
    return output


def score_string_similarity(str1: str, str2: str) -> float:
    """Official word-overlap similarity."""
    if str1 == str2:
        return 2.0
    if " " in str1 or " " in str2:
        s1, s2 = str1.split(" "), str2.split(" ")
        return len(set(s1) & set(s2)) / max(len(s1), len(s2))
    return 0.0


def _boxed(text: str) -> str | None:
    found = None
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end() : i - 1]
    return found


def _answer_span(text: str) -> str | None:
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    spans = re.findall(r"(?i:answer)\s*(?:is|:)\s*:?\s*(.+)", text)
    if spans:
        return spans[-1].strip()
    return None


def _option_from_text(text: str, options: list[str], whole_response: bool) -> str | None:
    s = text.strip()
    # a standalone letter: "(B)", "B", "B.", "B) ..." -- not "Brendan" (nor, for a whole
    # response, "A table ...")
    tail = r"(?:[.:)\n]|$)" if whole_response else r"(?:[.:)\s,]|$)"
    m = re.match(r"^\(?([A-Fa-f])\)?" + tail, s)
    if m and (s[:1] == "(" or m.group(1).isupper() or len(s) == 1):
        ind = OPTION_INDS.index(m.group(1).upper())
        if ind < len(options):
            return options[ind]
    stripped = s.strip(" .\"'*`").lower()
    for option in options:
        if stripped == option.strip().lower():
            return option
    best = None
    for option in options:
        o = option.strip()
        if not o:
            continue
        pattern = (r"(?<!\w)" if o[0].isalnum() else "") + re.escape(o) + (r"(?!\w)" if o[-1].isalnum() else "")
        for mm in re.finditer(pattern, s, re.IGNORECASE):
            key = (mm.end(), len(o))
            if best is None or key > best[0]:
                best = (key, option)
    if best:
        return best[1]
    m = re.search(r"\(([A-F])\)(?!.*\([A-F]\))", s, re.DOTALL)
    if m and OPTION_INDS.index(m.group(1)) < len(options):
        return options[OPTION_INDS.index(m.group(1))]
    return None


_FREE_PATTERNS = (
    r"[Th]he answer is ([\s\S]+)$",
    r"[Th]he table shows that ([\d\$\.\,\/\:]+) ",
    r" = ([\d\$\.\,\/\:]+)",
    r"(?<= be| is) ([\-\d\$\.\,\/\:]{0,}[\d]+)",
    r"(?<= are| was) ([\-\d\$\.\,\/\:]{0,}[\d]+)",
    r"(?<= were) ([\-\d\$\.\,\/\:]{0,}[\d]+)",
    r" ([\d\$\.\,\/\:]+ [AP]\.M\.)",
    r"([\-\d\$\.\,\/\:]{0,}[\d]+)",
)
_NUMBER_RE = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|[-+]?\$?\.\d+")


def _free_text(output: str) -> str:
    for p in _FREE_PATTERNS:
        res = re.findall(p, output)
        if res:
            prediction = res[-1].strip()
            if prediction.endswith(".") and ".M." not in prediction:
                prediction = prediction[:-1]
            return prediction
    return output


def extract_prediction(output: str, options: list[str] | None) -> str:
    """Rule-based extraction (official patterns, with the departures listed above)."""
    output = _preclean(str(output or "").strip())
    span = _answer_span(output)
    if options:
        candidates = ([(span, False)] if span is not None else []) + [(output, True)]
        for text, whole in candidates:
            found = _option_from_text(text, options, whole)
            if found is not None:
                return found
        scores = [score_string_similarity(x, output) for x in options]
        return options[scores.index(max(scores))]
    if span is not None:
        span = _preclean(span.strip())
        numbers = _NUMBER_RE.findall(span.split("=")[-1])
        if numbers:
            return numbers[0].rstrip(".,")
        return span
    return _free_text(output)


def normalize_answer(text: str, unit: str | None = None) -> str:
    """Official ``normalize_answer``."""
    text = re.sub(r"^[\$]", "", str(text))
    text = re.sub(r"[\,\.\,\/]$", "", text)
    if re.match(r"^[-+]?[\d,./]+$", text) is not None:
        text = text.replace(",", "")
        try:
            if re.match(r"[-+]?\d+$", text) is not None:
                number = int(text)
            elif "/" in text:
                nums = text.split("/")
                number = round(float(nums[0]) / float(nums[1]), 3)
            else:
                number = round(float(text), 3)
        except (ValueError, ZeroDivisionError, IndexError):
            return text  # e.g. "1.2.3" or "1/0": official would raise; keep the text
        return re.sub(r"\.[0]+$", "", str(number))
    if unit:
        text = text.replace(unit, "").strip()
    return text


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def score(record: dict, response: str) -> dict:
    choices = record.get("choices")
    unit = record.get("unit")
    extraction = extract_prediction(response, choices)
    prediction = normalize_answer(extraction, unit)
    answer = normalize_answer(str(record.get("answer", "")), unit)
    if not choices and _as_number(answer) is not None and _as_number(prediction) is None:
        numbers = _NUMBER_RE.findall(prediction)
        if numbers:
            prediction = normalize_answer(numbers[-1], unit)
    correct = prediction.lower() == answer.lower()
    if not correct and not choices:
        a, p = _as_number(answer), _as_number(prediction)
        correct = a is not None and p is not None and math.isclose(a, p, rel_tol=1e-9, abs_tol=1e-9)
    if not str(response or "").strip():
        correct = False  # an empty response is never correct (the similarity fallback would pick an option)
    return {
        "id": record.get("id"),
        "category": record.get("category"),
        "ques_type": load_meta(record).get("ques_type"),
        "extraction": extraction,
        "prediction": prediction,
        "correct": bool(correct),
    }


def summarize(results: list[dict], skipped: list | None = None) -> dict:
    """Overall accuracy, per answer type (``by_category``) and per question type."""
    summary = accuracy_summary(
        results,
        group_fns={
            "category": lambda r: r.get("category"),
            "question_type": lambda r: r.get("ques_type") or load_meta(r).get("ques_type"),
        },
        fixed_groups={"category": ANS_TYPES},
        skipped=skipped,
    )
    summary["benchmark"] = NAME
    return summary
