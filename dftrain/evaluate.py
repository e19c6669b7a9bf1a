"""Scoring checkpoints (``dftrain eval``): greedy (or sampled pass@k) answers, per-item records,
overall and per-category accuracy.

Benchmarks: ``synth`` (prompt sets from ``dfgen synth``, exact answers) and the adapters in
``dfgen.benchmarks`` (MathVista, MMStar, TabMWP) with their official prompts and scoring.
Records that cannot be evaluated (missing fields, bad images, unknown answer types) are counted
as ``skipped`` and reported, never as correct; a record whose image fails to decode at
generation time, or whose generation / scoring raises, is ``errored``: it stays in the accuracy
denominator (as the official scripts count an unanswered problem as wrong) and is never correct.

Outputs of :func:`evaluate` (``dftrain eval --out results.json``):

* ``results.json``: the summary (:data:`SUMMARY_KEYS`, plus ``details``: the benchmark's own
  ``summarize`` output, e.g. MathVista per skill, MMStar per l2 category), written atomically;
* ``results.items.jsonl``: one line per record (:data:`ITEM_KEYS`), ``status`` ``scored``,
  ``errored`` or ``skipped`` (records refused at load time come last).

``--predictions FILE`` scores existing responses (JSONL, or the official ``{pid: {...}}`` JSON)
against the records of ``--data`` without a model: each line carries an id (``id``, or the
benchmark's own ``pid`` / ``index``) and a response (``response``, else ``prediction``, or
``--prediction-field``). Unknown ids, duplicate ids and unreadable lines are counted and
reported; a record with no prediction is errored (wrong), never dropped.

Run: ``dftrain eval --model runs/demo/sft --bench synth --data runs/demo/test --limit 500``
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dfgen.benchmarks import BENCHMARKS  # the one registry (the synthetic task is one of its benchmarks)

BENCH_NAMES = tuple(BENCHMARKS)
ITEM_KEYS = ("id", "status", "category", "answer", "response", "extraction", "prediction", "correct",
             "error", "samples", "n_correct")
SUMMARY_KEYS = ("bench", "mode", "n", "n_correct", "accuracy", "n_errored", "accuracy_scored", "n_skipped",
                "skipped", "per_category", "pass_at", "sample_accuracy", "details", "config", "items",
                "elapsed_s")
MAX_REPORTED = 20  # skipped / unknown ids listed in the summary (all are counted)


Bench = Enum("Bench", {k: k for k in BENCHMARKS}, type=str)  # the CLI option type, from the registry


def load_bench(bench: str, data: Path, limit: int | None = None, require_image: bool = True):
    """(records, skipped) for a benchmark name and path. ``require_image=False`` (benchmarks
    only) loads text-only records, enough to score existing predictions."""
    from dfgen.errors import UserError

    data = Path(data)
    if not data.exists():
        raise UserError(f"data not found: {data}")
    if bench not in BENCHMARKS:
        raise UserError(f"unknown benchmark {bench!r} ({', '.join(BENCH_NAMES)})")
    mod = BENCHMARKS[bench]
    try:
        return mod.load(data, limit=limit, require_image=require_image)
    except ValueError as e:  # unsupported format, DatasetDict folder, unreadable JSON file
        raise UserError(f"cannot read {data} as {bench}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def score_record(bench: str, rec: dict, text: str) -> dict:
    return BENCHMARKS[bench].score(rec, text)


def _one_line(e) -> str:
    from dfgen.errors import shorten

    return shorten(e) or type(e).__name__


def _item(rec: dict, status: str = "scored", **kw) -> dict:
    out = {"id": str(rec.get("id")), "status": status, "category": rec.get("category"), "answer": rec.get("answer"),
           "response": None, "extraction": None, "prediction": None, "correct": False, "error": None,
           "samples": 0, "n_correct": 0}
    out.update(kw)
    return out


def _errored(rec: dict, reason: str, **kw) -> dict:
    return _item(rec, "errored", error=reason, **kw)


def _scored(bench: str, rec: dict, texts: list[str]) -> dict:
    """Score every sample of one record (pass@k: the first correct one is kept)."""
    try:
        scored = [score_record(bench, rec, t) for t in texts]
    except Exception as e:  # noqa: BLE001 - one bad record never stops the run
        return _errored(rec, f"scoring failed: {type(e).__name__}: {_one_line(e)}",
                        response=texts[0] if texts else None, samples=len(texts))
    if not scored:
        return _errored(rec, "no response")
    best = next((i for i, s in enumerate(scored) if s.get("correct") is True), 0)
    extra = {k: v for k, v in scored[best].items() if k not in ("id", "category", "correct")}
    return _item(rec, **extra, response=texts[best], correct=scored[best].get("correct") is True,
                 samples=len(scored), n_correct=sum(s.get("correct") is True for s in scored))


def run_eval(backend, records: list[dict], bench: str = "synth", max_new_tokens: int = 64,
             temperature: float = 0.0, samples: int = 1, seed: int = 0, progress=None,
             batch_size: int = 64) -> list[dict]:
    """Generate and score; one result dict per record (pass@k over ``samples``), in order.

    A record whose image does not decode, or whose generation or scoring raises, becomes an
    ``errored`` result (never correct) instead of stopping the run; a failing batch is retried
    one record at a time so that one bad record does not take its batch down."""
    from dfgen.backends import Prompt, SamplingConfig
    from dfgen.images import decode_image
    from dfgen.seeds import sample_seed

    cfg = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    results = []
    for k in range(0, len(records), batch_size):
        chunk = records[k: k + batch_size]
        row: dict[int, dict] = {}
        ready = []
        for i, r in enumerate(chunk):
            try:
                img = decode_image(r["image"]) if r.get("image") is not None else None
                ready.append((i, r, Prompt(r["question"], img)))
            except Exception as e:  # noqa: BLE001 - UserError, KeyError, PIL errors
                row[i] = _errored(r, f"bad input: {_one_line(e)}")

        def gen(items):
            return backend.generate([p for _, _, p in items],
                                    [[sample_seed(seed, r["id"], j) for j in range(samples)] for _, r, _ in items], cfg)

        if ready:
            try:
                outs = list(zip(ready, gen(ready)))
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001
                if len(ready) == 1:
                    outs = []
                    row[ready[0][0]] = _errored(ready[0][1], f"generation failed: {type(e).__name__}: {_one_line(e)}")
                else:
                    outs = []
                    for it in ready:
                        try:
                            outs.append((it, gen([it])[0]))
                        except (KeyboardInterrupt, MemoryError):
                            raise
                        except Exception as e1:  # noqa: BLE001
                            row[it[0]] = _errored(it[1], f"generation failed: {type(e1).__name__}: {_one_line(e1)}")
            for (i, r, _), smps in outs:
                row[i] = _scored(bench, r, [s.text for s in smps])
        results += [row[i] for i in range(len(chunk))]
        if progress:
            progress(len(chunk))
    return results


def greedy_profile(model, processor, data: Path, limit: int | None = 200, max_new_tokens: int | None = None,
                   items: bool = False) -> dict:
    """Greedy accuracy plus ``steps_right``: the share whose every step matches the canonical
    solution (a right answer reached through wrong steps counts in ``accuracy`` only), the
    kinds of first errors (``dfgen.synth.grid.classify_response``), and ``failed_with_prefix``:
    the share of failures whose first step is right (DF can only spare steps that exist), and
    ``read_acc``: the share of all read steps that are right (``dfgen.synth.grid.reads_right``).
    ``lucky`` = accuracy - steps_right. ``items=True`` adds ``items``: one row per problem (``id``,
    ``correct``, ``steps_right``, ``prefix`` = leading canonical lines, ``steps`` = canonical lines).
    ``max_new_tokens`` None: long enough for every canonical solution (``token_budget``)."""
    import json as _json

    from dfgen.backends.hf import HFBackend
    from dfgen.records import load_prompts
    from dfgen.synth.grid import classify_response, correct_prefix, reads_right, token_budget

    recs, _ = load_prompts(data, limit=limit)
    max_new_tokens = max_new_tokens or token_budget(recs, processor.tokenizer)
    backend = HFBackend(None, model=model, processor=processor)
    res = run_eval(backend, recs, "synth", max_new_tokens=max_new_tokens)
    kinds: dict = {}
    right, prefixed, reads_ok, reads_n = 0, 0, 0, 0
    rows = []
    for r, rec in zip(res, recs):
        text, sol = r["response"] or "", _json.loads(rec["solution"]) if rec.get("solution") else None
        if sol:
            ok, n = reads_right(text, sol)
            reads_ok, reads_n = reads_ok + ok, reads_n + n
        kind, steps_ok = classify_response(text, sol) if sol else ("format", False)
        every = bool(r["correct"] and steps_ok and kind == "ok")
        prefix = correct_prefix(text, sol) if sol else 0
        right += every
        if not r["correct"]:
            kinds[kind] = kinds.get(kind, 0) + 1
            prefixed += prefix > 0
        rows.append({"id": rec["id"], "correct": bool(r["correct"]), "steps_right": every, "prefix": prefix,
                     "steps": len(sol["steps"]) if sol else 0})
    failed = sum(kinds.values())
    acc = sum(r["correct"] for r in res) / len(res)
    prof = {"n": len(res), "accuracy": acc, "steps_right": right / len(res), "lucky": acc - right / len(res),
            "first_error": kinds, "failed_with_prefix": prefixed / failed if failed else 0.0,
            "read_acc": reads_ok / reads_n if reads_n else 0.0}
    return prof | ({"items": rows} if items else {})


# ----------------------------------------------------------------------------- predictions
def _prediction_rows(path: Path):
    """Yield (where, row-or-error-string) from a JSONL file, a JSON list, or a ``{id: row}`` JSON."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            from dfgen.errors import UserError

            raise UserError(f"{path} is not a JSON file: {_one_line(e)}") from None
        if isinstance(data, dict):
            for key, row in data.items():
                yield f"key {key}", ({"id": key, **row} if isinstance(row, dict) and "id" not in row else row)
        elif isinstance(data, list):
            for i, row in enumerate(data):
                yield f"item {i}", row
        else:
            yield "file", f"expected a JSON list or object, got {type(data).__name__}"
        return
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                yield f"line {n}", f"invalid JSON: {_one_line(e)[:120]}"


def _pred_id(row: dict, bench: str):
    for key in ("id", BENCHMARKS[bench].ID_KEY):
        v = row.get(key)
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return str(v).strip()
    return None


def _note(rep: dict, kind: str, value) -> None:
    """Count one ``kind`` event of a predictions report, keeping the first few."""
    rep[f"n_{kind}"] += 1
    if len(rep[kind]) < MAX_REPORTED:
        rep[kind].append(value)


def score_predictions(bench: str, records: list[dict], path: Path, field: str | None = None,
                      known_skipped: set | None = None) -> tuple[list[dict], dict]:
    """Score existing responses against ``records``; (results in record order, report).

    The report counts the lines read, unknown ids, duplicate ids (the first one is kept),
    unreadable lines, lines for records skipped at load and records with no prediction
    (errored, i.e. wrong), with the first few of each."""
    from dfgen.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions not found: {path}")
    fields = (field,) if field else ("response", "prediction")
    rep = {"file": str(path), "field": field or "response|prediction", "n_lines": 0, "n_matched": 0,
           "n_unknown_ids": 0, "unknown_ids": [], "n_duplicate_ids": 0, "duplicate_ids": [],
           "n_bad_lines": 0, "bad_lines": [], "n_for_skipped_records": 0, "n_missing_ids": 0, "missing_ids": []}
    got = _read_predictions(bench, path, {r["id"] for r in records}, known_skipped or set(), fields, rep)
    results = [_score_one(bench, r, got, rep) for r in records]
    if rep["n_matched"] == 0 and records:
        raise UserError(f"no prediction in {path} matches a record of the data (e.g. id {records[0]['id']!r}; "
                        f"{rep['n_unknown_ids']} unknown id(s), {rep['n_bad_lines']} unreadable line(s))")
    return results, rep


def _read_predictions(bench: str, path: Path, ids: set, known_skipped: set, fields: tuple, rep: dict) -> dict:
    """id -> the prediction value (``_Missing`` where the row lacks every field) of each readable
    line for a known record; the rest is counted in ``rep``. Refuses a file with nothing to score."""
    from dfgen.errors import UserError

    id_key = BENCHMARKS[bench].ID_KEY
    got: dict[str, object] = {}
    keys: set = set()  # text fields of rows without the prediction field, named if nothing can be scored
    for where, row in _prediction_rows(path):
        rep["n_lines"] += 1
        if isinstance(row, str):
            _note(rep, "bad_lines", [where, row])
            continue
        if not isinstance(row, dict):
            _note(rep, "bad_lines", [where, f"not an object ({type(row).__name__})"])
            continue
        rid = _pred_id(row, bench)
        if rid is None:
            _note(rep, "bad_lines", [where, f"no id field (id or {id_key})"])
        elif rid not in ids:
            if rid in known_skipped:
                rep["n_for_skipped_records"] += 1
            else:
                _note(rep, "unknown_ids", rid)
        elif rid in got:
            _note(rep, "duplicate_ids", rid)
        else:
            present = [f for f in fields if f in row]
            got[rid] = row[present[0]] if present else _Missing(fields)
            if not present:
                keys.update(k for k, v in row.items() if isinstance(v, str) and k not in ("id", id_key))
    if rep["n_lines"] == 0:
        raise UserError(f"{path} holds no predictions")
    if got and all(isinstance(v, _Missing) for v in got.values()):  # nothing to score: refuse, never report 0.0
        likely = sorted(k for k in keys if any(w in k.lower() for w in ("pred", "resp", "output", "answer")))
        raise UserError(f"no row of {path} has a {' / '.join(fields)} field; pass --prediction-field, "
                        f"e.g. one of: {', '.join((likely or sorted(keys))[:8]) or '(no text fields)'}")
    return got


def _score_one(bench: str, r: dict, got: dict, rep: dict) -> dict:
    """The result of record ``r`` from its prediction in ``got`` (errored when it has none usable)."""
    if r["id"] not in got:
        _note(rep, "missing_ids", r["id"])
        return _errored(r, "no prediction for this id")
    rep["n_matched"] += 1
    v = got[r["id"]]
    if isinstance(v, _Missing):
        return _errored(r, f"prediction has no {' / '.join(v.fields)} field")
    if v is None:
        return _errored(r, "prediction is null")
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return _scored(bench, r, [str(v)])
    return _errored(r, f"prediction is not text ({type(v).__name__})")


@dataclass
class _Missing:
    fields: tuple


# ----------------------------------------------------------------------------- summary
def summarize_bench(bench: str, results: list[dict], skipped: list | None = None) -> dict:
    """Summary shared by all benchmarks (:data:`SUMMARY_KEYS` minus config/items/timing):
    ``details`` holds the benchmark's own summary (its official categories)."""
    skipped = list(skipped or [])
    n = len(results)
    n_correct = sum(r.get("correct") is True and r.get("status") != "errored" for r in results)
    n_err = sum(r.get("status") == "errored" for r in results)
    details = BENCHMARKS[bench].summarize(results, skipped)
    per = {c: {"n": b["n_total"], "n_correct": b["n_correct"], "accuracy": b["accuracy"]}
           for c, b in details.get("by_category", {}).items()}
    k = max((r.get("samples") or 0 for r in results), default=0)
    n_samples = sum(r.get("samples") or 0 for r in results)
    return {
        "bench": bench,
        "n": n,
        "n_correct": n_correct,
        "accuracy": n_correct / n if n else None,
        "n_errored": n_err,
        "accuracy_scored": n_correct / (n - n_err) if n - n_err else None,
        "n_skipped": len(skipped),
        "skipped": [list(s) for s in skipped[:MAX_REPORTED]],
        "per_category": per,
        "pass_at": k,
        "sample_accuracy": (sum(r.get("n_correct") or 0 for r in results) / n_samples) if n_samples else None,
        "details": details,
    }


def items_path(out: Path) -> Path:
    """Per-item JSONL next to the summary: ``results.json`` -> ``results.items.jsonl``."""
    out = Path(out)
    return out.with_name(out.stem + ".items.jsonl")


# ----------------------------------------------------------------------------- the command
@dataclass
class EvalConfig:
    bench: str = "synth"
    data: Path | None = None
    model: Path | None = None
    predictions: Path | None = None
    prediction_field: str | None = None
    backend: str = "hf"
    out: Path = Path("results.json")
    limit: int | None = None
    samples: int = 1
    temperature: float | None = None  # None: 0 (greedy) for 1 sample, 1.0 for pass@k
    max_new_tokens: int | None = None  # None: synth: fits every solution (>= 64); benchmarks: dfgen.sample.REASONING_BUDGET
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"

    def validate(self) -> "EvalConfig":
        from dfgen.errors import UserError

        if self.bench not in BENCH_NAMES:
            raise UserError(f"unknown benchmark {self.bench!r} ({', '.join(BENCH_NAMES)})")
        if self.data is None:
            raise UserError("--data is required (the benchmark records"
                            + (" the predictions are scored against)" if self.predictions else ")"))
        if self.predictions is not None and self.model is not None:
            raise UserError("give either --model (generate answers) or --predictions (score existing ones), not both")
        if self.predictions is None and self.model is None:
            raise UserError("--model is required (or --predictions FILE to score existing answers)")
        if self.prediction_field and self.predictions is None:
            raise UserError("--prediction-field only applies with --predictions")
        if self.limit is not None and self.limit <= 0:
            raise UserError("--limit must be positive")
        if self.samples <= 0:
            raise UserError("--samples must be positive")
        if self.temperature is None:
            self.temperature = 0.0 if self.samples == 1 else 1.0
        if self.temperature < 0:
            raise UserError("--temperature must be >= 0")
        if self.samples > 1 and self.temperature == 0:
            raise UserError("--samples > 1 needs --temperature > 0 (greedy samples are identical)")
        if self.max_new_tokens is None and self.bench != "synth":  # synth: fits its solutions (token_budget)
            from dfgen.sample import REASONING_BUDGET

            self.max_new_tokens = REASONING_BUDGET
        if (self.max_new_tokens is not None and self.max_new_tokens <= 0) or self.batch_size <= 0:
            raise UserError("--max-new-tokens and --batch-size must be positive")
        from dfgen.backends import BACKENDS

        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {self.backend!r} ({' or '.join(BACKENDS)})")
        from dfgen.policy import check_device

        check_device(self.device)
        out = Path(self.out)
        if out.is_dir():
            raise UserError(f"--out is a folder; give a file path such as {out / 'results.json'}")
        if out.suffix.lower() != ".json":
            raise UserError(f"--out must be a .json path (the items go next to it as <stem>.items.jsonl): {out}")
        return self


def evaluate(cfg: EvalConfig, progress=None, log=None) -> dict:
    """Load, generate (or read predictions), score, write the summary and items; return the summary.

    ``progress(total=None, advance=0)`` is called with ``total`` once the records are loaded,
    then with ``advance`` per finished batch; ``log(msg)`` gets one-line notes."""
    cfg.validate()
    log = log or (lambda m: None)
    t0 = time.time()
    mode = "predictions" if cfg.predictions is not None else "generate"
    records, skipped = _load_records(cfg, mode, log)
    if progress:
        progress(total=len(records))
    pred_report = None
    if mode == "predictions":
        results, pred_report = score_predictions(cfg.bench, records, cfg.predictions, cfg.prediction_field,
                                                 known_skipped={str(s[0]) for s in skipped})
        if progress:
            progress(advance=len(records))
        _log_prediction_report(pred_report, log)
    else:
        results = _generate(cfg, records, progress)
    summary = summarize_bench(cfg.bench, results, skipped)
    summary.update(_write_items(cfg, mode, results, skipped))
    summary["elapsed_s"] = round(time.time() - t0, 3)
    if pred_report is not None:
        summary["predictions"] = pred_report
    from dfgen.shards import write_json_atomic

    write_json_atomic(Path(cfg.out), summary)
    return summary


def _load_records(cfg: EvalConfig, mode: str, log) -> tuple[list[dict], list]:
    from dfgen.errors import UserError

    if mode == "predictions":
        records, skipped = load_bench(cfg.bench, cfg.data, None, require_image=False)
        if cfg.limit is not None:
            records = records[: cfg.limit]
    else:
        records, skipped = load_bench(cfg.bench, cfg.data, cfg.limit)
    if not records:
        eg = f", e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise UserError(f"{cfg.data}: no usable {cfg.bench} records ({len(skipped)} skipped{eg})")
    for rid, why in skipped[:3]:
        log(f"skipped {rid}: {why}")
    if len(skipped) > 3:
        log(f"... and {len(skipped) - 3} more skipped record(s) (all listed in {items_path(cfg.out).name})")
    return records, skipped


def _log_prediction_report(rep: dict, log) -> None:
    for kind, what in (("unknown_ids", "prediction(s) with an id not in the data (ignored)"),
                       ("duplicate_ids", "duplicate prediction(s) (the first one is kept)"),
                       ("missing_ids", "record(s) without a prediction (counted wrong)")):
        if rep[f"n_{kind}"]:
            log(f"{rep[f'n_{kind}']} {what}, e.g. id {rep[kind][0]}")
    if rep["n_bad_lines"]:
        log(f"{rep['n_bad_lines']} unreadable prediction line(s), e.g. {rep['bad_lines'][0][0]}: {rep['bad_lines'][0][1]}")


def _generate(cfg: EvalConfig, records: list[dict], progress) -> list[dict]:
    """Answers of ``cfg.model`` for every record, scored; refuses when generation failed for all."""
    from dfgen.backends import EngineOptions, get_backend
    from dfgen.errors import UserError

    backend = get_backend(cfg.backend, cfg.model, EngineOptions(batch_size=cfg.batch_size, device=cfg.device,
                                                                seed=cfg.seed))
    if cfg.max_new_tokens is None:
        from dfgen.synth.grid import token_budget

        cfg.max_new_tokens = token_budget(records, backend.tokenizer)
    results = run_eval(backend, records, cfg.bench, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, samples=cfg.samples, seed=cfg.seed, batch_size=cfg.batch_size,
                       progress=(lambda n: progress(advance=n)) if progress else None)
    gen_failed = [r for r in results if (r.get("error") or "").startswith("generation failed")]
    if gen_failed and len(gen_failed) == len(results):
        raise UserError(f"generation failed for every record, e.g. {gen_failed[0]['id']}: {gen_failed[0]['error']}")
    return results


def _write_items(cfg: EvalConfig, mode: str, results: list[dict], skipped: list) -> dict:
    """Write the per-item JSONL (skipped records included); the summary's mode, config and items path."""
    from dfgen.shards import config_json, write_jsonl_atomic

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ipath = items_path(out)
    items = results + [{"id": str(rid), "status": "skipped", "category": None, "answer": None, "response": None,
                        "extraction": None, "prediction": None, "correct": False, "error": str(why),
                        "samples": 0, "n_correct": 0} for rid, why in skipped]
    write_jsonl_atomic(ipath, items)
    conf = config_json(cfg)
    if mode == "predictions":  # generation settings play no part
        for k in ("model", "backend", "device", "batch_size", "samples", "temperature", "max_new_tokens", "seed"):
            conf.pop(k)
    return {"mode": mode, "config": conf, "items": str(ipath)}


def summary_table(summary: dict):
    """A rich table: per category (those with records), overall, errored and skipped counts."""
    from rich.table import Table

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    title = f"{summary['bench']} ({summary['mode']}"
    title += f", pass@{summary['pass_at']})" if summary.get("pass_at", 1) > 1 else ")"
    t = Table(title=title)
    t.add_column("category")
    t.add_column("n", justify="right")
    t.add_column("correct", justify="right")
    t.add_column("accuracy %", justify="right")
    for c, b in summary["per_category"].items():
        if b["n"]:
            t.add_row(str(c), str(b["n"]), str(b["n_correct"]), pct(b["accuracy"]))
    t.add_section()
    t.add_row("overall", str(summary["n"]), str(summary["n_correct"]), pct(summary["accuracy"]), style="bold")
    t.add_row("errored (counted wrong)", str(summary["n_errored"]), "", "")
    t.add_row("skipped at load (not counted)", str(summary["n_skipped"]), "", "")
    return t
