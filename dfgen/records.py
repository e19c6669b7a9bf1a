"""Prompt records: the input contract of ``dfgen sample`` and ``dftrain eval``.

A prompt record is a dict with ``id``, ``question``, ``answer`` (required), ``image`` (encoded
bytes) or ``image_path`` (relative to the dataset folder, resolved *inside* it only: absolute
paths, ``..`` escapes and symlinks leading out are refused), ``answer_type``
(integer|float|text|choice|list), ``choices``, ``precision``, ``unit``, ``source``,
``category``, ``solution`` (JSON, synthetic tasks) and ``meta`` (JSON extras).

``load_prompts(path)`` reads a prompt shard folder written by ``dfgen synth``, any parquet
file/folder with these columns, or a JSONL file. Records with a bad image or path are skipped
and counted (``skipped``: list of (id, reason)); structural problems (missing columns, not a
dataset, empty) raise ``UserError``.
"""
from __future__ import annotations

import json
from pathlib import Path

from dfgen.errors import UserError, one_line
from dfgen.shards import ANSWER_TYPES, PROMPT_SCHEMA

REQUIRED = ("id", "question", "answer")


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` stays inside ``root`` once symlinks and ``..`` are resolved (the one
    path-escape guard: prompt records here, benchmark loaders in ``dfgen.benchmarks``)."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def resolve_inside(root: Path, rel: str) -> Path:
    """``root/rel`` if it stays inside ``root`` after resolving symlinks, else UserError."""
    if not rel or Path(rel).is_absolute():
        raise UserError(f"image_path must be relative to the dataset folder: {rel!r}")
    p = (root / rel).resolve()
    if not is_inside(p, root):
        raise UserError(f"image_path escapes the dataset folder: {rel!r}")
    if not p.is_file():
        raise UserError(f"image file not found: {rel!r}")
    return p


def normalize(rec: dict, root: Path) -> dict:
    """Fill defaults, load ``image_path`` into ``image`` bytes, check the image decodes."""
    from dfgen.images import decode_image

    out = {f.name: rec.get(f.name) for f in PROMPT_SCHEMA}
    for k in REQUIRED:
        if out[k] is None or (isinstance(out[k], str) and not out[k].strip() and k != "answer"):
            raise UserError(f"missing {k}")
    out["id"], out["answer"] = str(out["id"]), str(out["answer"])
    if out["answer_type"] is not None and out["answer_type"] not in ANSWER_TYPES:
        raise UserError(f"unknown answer_type {out['answer_type']!r}")
    if out["image"] is None and out["image_path"]:
        out["image"] = resolve_inside(root, out["image_path"]).read_bytes()
    if isinstance(out["image"], dict):  # HF datasets image struct {bytes, path}
        out["image"] = out["image"].get("bytes")
    if out["image"] is not None:
        decode_image(out["image"])
    for k in ("solution", "meta"):
        if out[k] is not None and not isinstance(out[k], str):
            out[k] = json.dumps(out[k])
    return out


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n} is not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                                f"expected a UTF-8 JSONL prompt file") from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not a JSON line; expected a JSONL prompt file") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n} is a JSON {type(row).__name__}, not an object; expected one prompt "
                                f"record per line")
            rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"no parquet files in {path}")
    rows = []
    for f in files:
        try:
            rows += pq.ParquetFile(f).read().to_pylist()
        except Exception as e:
            raise UserError(f"{f} is not a readable parquet file ({one_line(e)})") from None
    return rows


def load_prompts(path: Path, limit: int | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"prompts not found: {path}")
    if path.is_dir() or path.suffix == ".parquet":
        rows, root = _read_parquet(path), (path if path.is_dir() else path.parent)
    elif path.suffix in (".jsonl", ".json"):
        rows, root = _read_jsonl(path), path.parent
    else:
        raise UserError(f"{path}: expected a parquet folder/file or a .jsonl file of prompt records")
    if not rows:
        raise UserError(f"{path} holds no prompt records")
    missing = [k for k in REQUIRED if k not in rows[0]]
    if missing:
        raise UserError(f"{path} lacks required column(s) {', '.join(missing)} (need {', '.join(REQUIRED)})")
    records, skipped, seen = [], [], set()
    for i, r in enumerate(rows):
        rid = str(r.get("id", f"#{i}"))
        try:
            rec = normalize(r, root)
        except UserError as e:
            skipped.append((rid, str(e)))
            continue
        except (OSError, TypeError, ValueError, AttributeError) as e:  # a malformed field of one record
            skipped.append((rid, f"bad record ({one_line(e)})"))
            continue
        if rec["id"] in seen:
            skipped.append((rid, "duplicate id"))
            continue
        seen.add(rec["id"])
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        reason = skipped[0][1] if skipped else "no records"
        raise UserError(f"{path}: no usable prompt records ({len(skipped)} skipped, e.g. {reason})")
    return records, skipped
