"""Benchmark adapters: MathVista, MMStar and TabMWP.

Every benchmark module exposes the same interface:

* ``load(path, limit=None) -> (records, skipped)`` reads the on-disk formats users have
  (official json / jsonl with an image folder next to the file, a parquet export, a
  Hugging Face ``save_to_disk`` folder of arrow files) and returns prompt records (plain
  dicts, see :data:`RECORD_KEYS`) plus ``(record id, one-line reason)`` for every record it
  had to skip (missing fields, unknown answer type, missing / undecodable / oversized
  image, an image path that is absolute or escapes the dataset folder, symlinks
  included).  One bad record never stops the loading; ``limit`` stops after that many
  loaded records.  Images are verified with Pillow and returned as the file's bytes.
  ``load(..., require_image=False)`` gives text-only records (image None).
* ``build_prompt(raw) -> str``: the full text prompt for one raw dataset record.
* ``score(record, response) -> dict`` with ``extraction`` (what the offline rule-based
  extractor pulled out of the free-form response), ``prediction`` (the normalised answer)
  and ``correct`` (bool); ``id`` and ``category`` are copied from the record so that a
  list of score dicts can be passed straight to ``summarize``.
* ``normalize_answer(...)``: normalises an already-extracted answer (benchmark-specific
  signature, mirroring the official code).
* ``summarize(results, skipped=None) -> dict``: overall and per-category accuracy.  Results
  carrying an ``error`` (or ``skipped``) flag, or whose ``correct`` is not a bool, are
  counted as ``n_errored``: never correct, still in the ``accuracy`` denominator (as the
  official scripts count an unanswered problem as wrong); ``accuracy_scored`` leaves them
  out.  Records skipped at load time (``skipped``) are only counted (``n_skipped``).

This ``__init__`` also holds the small helpers the three modules share (reading rows,
resolving and verifying images safely) and the registry :data:`BENCHMARKS`.
"""

from __future__ import annotations

import base64
import binascii
import csv
import importlib
import json
import math
import re
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator

from dfgen.errors import shorten
from dfgen.records import is_inside

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_NAMES",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "RECORD_KEYS",
    "SkipRecord",
    "get_benchmark",
]

# Keys of one prompt record (the contract shared by every adapter).
RECORD_KEYS = (
    "id",
    "question",
    "image",
    "image_path",
    "answer",
    "answer_type",
    "choices",
    "precision",
    "unit",
    "source",
    "category",
    "solution",
    "meta",
)

# the image guard's limits (dfgen.images, shared with every stage); the adapters' image-path checks use them
from dfgen.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


class SkipRecord(Exception):
    """Raised while converting one raw record: the record is skipped with this reason."""


# --------------------------------------------------------------------------------------
# small value helpers


def is_missing(value: Any) -> bool:
    """None, NaN, or an empty / whitespace-only string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return False


def as_str_or_none(value: Any) -> str | None:
    if is_missing(value):
        return None
    return str(value)


def parse_mapping(value: Any) -> dict:
    """A dict field that may arrive as a dict, a JSON string, or be missing."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def parse_str_list(value: Any) -> list[str] | None:
    """A list-of-strings field (choices) that may be a list, a numpy/arrow array, a JSON
    string or missing.  Never evaluates Python literals."""
    if is_missing(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise SkipRecord(f"choices is not a list: {shorten(value, 80)}") from exc
        if value is None:
            return None
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise SkipRecord(f"choices is not a list: {type(value).__name__}")
    out = [str(v) for v in value]
    return out or None


def json_meta(fields: dict) -> str | None:
    clean = {k: v for k, v in fields.items() if v is not None}
    if not clean:
        return None
    return json.dumps(clean, ensure_ascii=False, sort_keys=True, default=str)


def load_meta(record: dict) -> dict:
    return parse_mapping(record.get("meta"))


# --------------------------------------------------------------------------------------
# reading rows from the on-disk formats


def _json_rows(path: Path, id_key: str) -> Iterator[tuple[str, Any]]:
    with path.open("r", encoding="utf-8") as fh:
        data = json.load(fh)
    if isinstance(data, dict):
        # official MathVista / TabMWP files: {pid: problem}
        for key, value in data.items():
            if isinstance(value, dict) and id_key not in value:
                value = {**value, id_key: key}
            yield str(key), value
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield f"#{i}", value
    else:
        raise ValueError(f"{path}: expected a JSON list or object, got {type(data).__name__}")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except ValueError as exc:
                yield f"line {lineno}", SkipRecord(f"invalid JSON: {shorten(exc, 120)}")


def _tsv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """VLMEvalKit-style TSV (base64 images in an ``image`` column)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        rows = list(reader)
    # VLMEvalKit stores a duplicated image once; other rows hold the index of that row.
    by_index = {str(r.get("index")): r.get("image") for r in rows}
    for i, row in enumerate(rows):
        img = row.get("image")
        if isinstance(img, str) and 0 < len(img) <= 64 and img in by_index:
            row = {**row, "image": by_index[img]}
        yield f"#{i}", row


def _arrow_table_rows(batches: Iterable[Any]) -> Iterator[dict]:
    for batch in batches:
        yield from batch.to_pylist()


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # lazy: only parquet users pay for it

    pf = pq.ParquetFile(str(path))
    for i, row in enumerate(_arrow_table_rows(pf.iter_batches(batch_size=64))):
        yield f"#{i}", row


def _arrow_file_rows(path: Path) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path), "r") as source:
        try:
            reader = ipc.open_stream(source)  # datasets writes the streaming format
        except pa.ArrowInvalid:
            source.seek(0)
            reader = ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            yield from _arrow_table_rows(batches)
            return
        yield from _arrow_table_rows(reader)


def _dir_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(
            f"{path} is a DatasetDict folder; point to one split folder: {', '.join(splits)}"
        )
    arrow_files: list[Path] = []
    state = path / "state.json"
    if state.is_file():
        try:
            info = json.loads(state.read_text(encoding="utf-8"))
            arrow_files = [path / f["filename"] for f in info.get("_data_files", [])]
        except (ValueError, KeyError, TypeError):
            arrow_files = []
    if not arrow_files:
        arrow_files = sorted(path.glob("*.arrow"))
    if arrow_files:
        i = 0
        for f in arrow_files:
            if f.resolve().parent != path.resolve():
                raise ValueError(f"{path}: arrow file outside the dataset folder: {f}")
            for row in _arrow_file_rows(f):
                yield f"#{i}", row
                i += 1
        return
    files = sorted(path.glob("*.parquet")) or sorted(path.glob("*.jsonl")) or sorted(path.glob("*.json"))
    if not files:
        raise ValueError(f"{path}: no .arrow, .parquet, .jsonl or .json files found")
    i = 0
    for f in files:
        for _, row in iter_raw_rows(f):
            yield f"#{i}", row
            i += 1


def iter_raw_rows(path: Path, id_key: str = "pid") -> Iterator[tuple[str, Any]]:
    """Yield ``(fallback id, raw row)``; a row may be a :class:`SkipRecord` (bad line)."""
    path = Path(path)
    if path.is_dir():
        yield from _dir_rows(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path, id_key)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".arrow":
        for i, row in enumerate(_arrow_file_rows(path)):
            yield f"#{i}", row
    elif suffix == ".tsv":
        yield from _tsv_rows(path)
    else:
        raise ValueError(f"unsupported dataset file {path} (json, jsonl, parquet, arrow, tsv or a folder)")


def dataset_root(path: Path) -> Path:
    """The folder image paths are resolved in (and must stay inside)."""
    path = Path(path)
    return (path if path.is_dir() else path.parent).resolve()


def run_loader(path: Path, limit: int | None, convert, id_key: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """Shared ``load`` loop: convert every raw row, collect skips, stop at ``limit`` records."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    root = dataset_root(path)
    records: list[dict] = []
    skipped: list[tuple[str, str]] = []
    if limit is not None and limit <= 0:
        return records, skipped
    for fallback_id, raw in iter_raw_rows(path, id_key=id_key):
        if isinstance(raw, SkipRecord):
            skipped.append((fallback_id, str(raw)))
            continue
        rid = fallback_id
        if isinstance(raw, dict) and not is_missing(raw.get(id_key)):
            rid = str(raw.get(id_key))
        try:
            if not isinstance(raw, dict):
                raise SkipRecord(f"record is not an object ({type(raw).__name__})")
            records.append(convert(raw, root))
        except SkipRecord as exc:
            skipped.append((rid, shorten(exc)))
        except Exception as exc:  # noqa: BLE001 - one bad record must never stop the load
            skipped.append((rid, shorten(f"error: {type(exc).__name__}: {exc}")))
        if limit is not None and len(records) >= limit:
            break
    return records, skipped


# --------------------------------------------------------------------------------------
# images


def verify_image_bytes(data: bytes) -> tuple[int, int]:
    """Check that ``data`` is a decodable image of sane size (``dfgen.images``, the one guard);
    returns (width, height), or raises SkipRecord with the guard's reason."""
    from dfgen.images import BadImage, check_image

    try:
        return check_image(data)
    except BadImage as exc:
        raise SkipRecord(str(exc)) from None


class _NotFound(Exception):
    pass


def safe_image_path(rel: str, root: Path) -> Path:
    """Resolve ``rel`` inside ``root``; refuse absolute paths, ``..`` escapes and symlinks
    pointing out of the folder.  Falls back to the same stem with another image extension
    (still inside the folder).  Raises :class:`SkipRecord` or ``_NotFound``."""
    rel = rel.strip()
    if not rel:
        raise _NotFound("empty image path")
    if "\x00" in rel:
        raise SkipRecord("image path contains a NUL byte")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise SkipRecord(f"absolute image path refused: {shorten(rel, 100)}")
    candidate = root / rel
    if not is_inside(candidate, root):
        raise SkipRecord(f"image path escapes the dataset folder: {shorten(rel, 100)}")
    if candidate.is_file():
        return candidate.resolve()
    if candidate.exists():
        raise SkipRecord(f"image path is not a file: {shorten(rel, 100)}")
    # same stem, another extension (MathVista ships images/44.jpg in the json, while
    # some copies hold images/44.png)
    parent = candidate.parent
    if parent.is_dir() and is_inside(parent, root):
        for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
            alt = parent / (candidate.stem + ext)
            if alt != candidate and alt.is_file():
                if not is_inside(alt, root):
                    raise SkipRecord(f"image path escapes the dataset folder: {alt.name}")
                return alt.resolve()
    raise _NotFound(f"image file not found: {shorten(rel, 100)}")


_B64_RE = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def _base64_image(value: str) -> bytes | None:
    """Decoded bytes when ``value`` is a base64-encoded image (VLMEvalKit TSV), else None.
    File paths never qualify: they contain a ``.`` which base64 never does."""
    if len(value) < 64 or not _B64_RE.match(value):
        return None
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith(_IMAGE_MAGIC) else b""


def _image_from_value(value: Any, root: Path) -> tuple[bytes, str | None]:
    if isinstance(value, dict):  # HF Image feature: {"bytes": ..., "path": ...}
        data = value.get("bytes")
        if data is not None and len(data) > 0:
            return _image_from_value(bytes(data), root)
        path = value.get("path")
        if isinstance(path, str) and path.strip():
            return _image_from_value(path, root)
        raise _NotFound("image struct has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        verify_image_bytes(data)
        return data, None
    if isinstance(value, str):
        data = _base64_image(value)
        if data == b"" and len(value) <= 255:
            data = None  # short, extension-less text: rather a file name than base64
        if data is not None:  # VLMEvalKit TSV: base64-encoded image
            if not data:
                raise SkipRecord("undecodable image: base64 text that is not an image")
            verify_image_bytes(data)
            return data, None
        path = safe_image_path(value, root)
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise SkipRecord(f"image file too large ({size} bytes)")
        data = path.read_bytes()
        verify_image_bytes(data)
        return data, str(path)
    raise SkipRecord(f"unsupported image value of type {type(value).__name__}")


def resolve_image(raw: dict, keys: Iterable[str], root: Path, extra_paths: Iterable[str] = ()) -> tuple[bytes, str | None]:
    """Find the image of ``raw`` from the first usable key (then ``extra_paths``).

    A missing file lets the next key be tried; a refused path (escape, absolute, symlink
    out of the folder) or an undecodable image skips the record at once."""
    not_found: list[str] = []
    candidates = [(k, raw.get(k)) for k in keys if not is_missing(raw.get(k))]
    candidates += [("default", p) for p in extra_paths]
    for key, value in candidates:
        try:
            return _image_from_value(value, root)
        except _NotFound as exc:
            not_found.append(f"{key}: {exc}")
    if not_found:
        raise SkipRecord("missing image (" + "; ".join(not_found) + ")")
    raise SkipRecord("missing image (no " + "/".join(keys) + " field)")


# --------------------------------------------------------------------------------------
# summaries


def _is_errored(result: dict) -> bool:
    if result.get("error") or result.get("skipped"):
        return True
    return not isinstance(result.get("correct"), bool)


def _bucket() -> dict:
    return {"n_total": 0, "n_correct": 0, "n_errored": 0}


def _finish(b: dict) -> dict:
    n, c, e = b["n_total"], b["n_correct"], b["n_errored"]
    b["accuracy"] = c / n if n else None
    b["accuracy_scored"] = c / (n - e) if n - e else None
    return b


def accuracy_summary(
    results: list[dict],
    group_fns: dict[str, Any] | None = None,
    fixed_groups: dict[str, Iterable[str]] | None = None,
    skipped: list | None = None,
) -> dict:
    """Overall accuracy plus ``by_<name>`` breakdowns.

    ``group_fns[name](result)`` returns the group label(s) of a result (a str, a list of
    str for multi-label groupings such as MathVista skills, or None).  ``fixed_groups``
    lists labels that always appear (count 0, accuracy None when absent)."""
    group_fns = group_fns or {}
    fixed_groups = fixed_groups or {}
    overall = _bucket()
    groups: dict[str, dict[str, dict]] = {
        name: {label: _bucket() for label in fixed_groups.get(name, ())} for name in group_fns
    }
    for result in results:
        errored = _is_errored(result)
        correct = (not errored) and result.get("correct") is True
        labels_by_group = {}
        for name, fn in group_fns.items():
            try:
                labels = fn(result)
            except Exception:  # noqa: BLE001
                labels = None
            if labels is None:
                labels = []
            elif isinstance(labels, str):
                labels = [labels]
            labels_by_group[name] = labels
        for bucket in [overall] + [
            groups[name].setdefault(str(label), _bucket())
            for name, labels in labels_by_group.items()
            for label in labels
        ]:
            bucket["n_total"] += 1
            bucket["n_errored"] += int(errored)
            bucket["n_correct"] += int(correct)
    out = _finish(overall)
    for name, buckets in groups.items():
        out[f"by_{name}"] = {label: _finish(b) for label, b in buckets.items()}
    out["n_skipped"] = len(skipped) if skipped else 0
    return out


# --------------------------------------------------------------------------------------
# registry

# The one benchmark registry: name -> module with load / score / summarize / ID_KEY (the id column of raw
# records, which a predictions file may use instead of ``id``). ``synth`` is the synthetic task
# (dfgen.synth.bench); the others are the public benchmarks' adapters. ``dftrain eval --bench`` takes its keys.
_MODULES = {"synth": "dfgen.synth.bench", "mathvista": f"{__name__}.mathvista", "mmstar": f"{__name__}.mmstar",
            "tabmwp": f"{__name__}.tabmwp"}
BENCHMARKS: dict = {name: importlib.import_module(path) for name, path in _MODULES.items()}
BENCHMARK_NAMES = tuple(n for n in BENCHMARKS if n != "synth")  # the public benchmarks' adapters


def get_benchmark(name: str):
    """The benchmark module registered under ``name`` (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[key]


def reward(record: dict, text: str) -> tuple[str | None, float]:
    """(extracted prediction, reward in {0, 1}) of a response to a prompt record: the scorer of the
    benchmark its ``source`` names (official extraction rules), else the exact answer match of
    ``dfgen.answers.score`` (synthetic and users' own records). A scorer's own error surfaces."""
    from dfgen.answers import score

    key = str(record.get("source") or "").strip().lower()
    if key in BENCHMARKS and key != "synth":
        res = BENCHMARKS[key].score(record, text)
        return res.get("prediction"), float(bool(res.get("correct")))
    return score(record, text)
