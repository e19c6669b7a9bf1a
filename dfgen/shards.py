"""Shard I/O: the one definition of the on-disk schema, atomic writes, validating reads.

Every stage writes a folder of zstd parquet shards plus manifests::

    OUT/part-w000-00000.parquet     one row per prompt *group* (or per prompt, for prompt sets)
    OUT/_manifest.w000.json         the shards this worker finished, with row counts
    OUT/config.json                 the resolved command config
    OUT/_done.w000.json             written last, when this worker's part of the stage is complete
                                    (its statistics); ``done_info`` reads it, absent = not finished

* **Rows are groups.** Prompt fields (``id``, ``question``, ``answer``, ...), ``prompt_ids``,
  ``image`` (bytes, stored once) and ``rollouts``: a list of structs. Fields of later stages
  exist from the start and stay null until the stage that fills them runs, so one schema
  serves every stage and ``explode("rollouts").unnest("rollouts")`` always works.
* **One writer.** A stage holds ``OUT/_lock.wNNN`` (a kernel file lock, ``filelock``) for each
  worker index it writes, from before it looks at the folder until it is done; a second writer of
  the same (folder, worker) gets a one-line error naming the holder (``_lock.wNNN.holder``, removed
  when the holder is done). The kernel drops the lock when the holder dies, SIGKILL included, so a
  retry takes it over. A run that fails before writing anything leaves no folder behind (of a
  folder it made, it removes only its own lock files: another worker's writer may be there).
* **Atomic.** A shard is written to ``.name.tmp`` and renamed into place after fsync; a killed
  writer leaves no half shard, only a temp file that the next run deletes. Manifests are
  replaced the same way.
* **Provenance.** The parquet file metadata key ``dfkit`` holds JSON: ``schema_version``,
  ``stage``, model and tokenizer fingerprints, sampling parameters, seed, backend, package
  version. Readers refuse newer schema versions, mixed provenance within one folder, and
  (when asked) a tokenizer fingerprint other than the model's.

Polars view of a rollout set::

    pl.read_parquet("S/*.parquet").explode("rollouts").unnest("rollouts")
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dfgen.errors import UserError, one_line

SCHEMA_VERSION = 1
META_KEY = b"dfkit"
STAGES = ("prompts", "sample", "repair", "mask")

u8 = pa.list_(pa.uint8())
i32 = pa.list_(pa.int32())
f32 = pa.list_(pa.float32())

PROMPT_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("question", pa.string(), nullable=False),
    pa.field("image", pa.binary()),
    pa.field("image_path", pa.string()),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("answer_type", pa.string()),
    pa.field("choices", pa.list_(pa.string())),
    pa.field("precision", pa.int32()),
    pa.field("unit", pa.string()),
    pa.field("source", pa.string()),
    pa.field("category", pa.string()),
    pa.field("solution", pa.string()),  # JSON: synthetic tasks' step-by-step solution
    pa.field("meta", pa.string()),  # JSON: adapter-specific extras
]
PROMPT_SCHEMA = pa.schema(PROMPT_FIELDS)
ANSWER_TYPES = ("integer", "float", "text", "choice", "list")  # the values answer_type may take

ROLLOUT = pa.struct([
    # sample
    ("text", pa.string()), ("token_ids", i32), ("logprobs", f32), ("reward", pa.float32()),
    ("pred", pa.string()), ("finish_reason", pa.string()), ("seed", pa.int64()),
    # repair
    ("repair_status", pa.string()), ("repairer", pa.string()), ("repaired_text", pa.string()),
    ("repaired_ids", i32), ("repaired_logprobs", f32), ("edit_ratio", pa.float32()),
    # repair cost (repairers that generate: resample, model): probes, continuations, generated tokens
    ("repair_probes", pa.int32()), ("repair_samples", pa.int32()), ("repair_gen_tokens", pa.int32()),
    # mask
    ("mask_bad", u8), ("mask_repaired", u8), ("root_bad", u8), ("root_repaired", u8),
    ("step_mask_bad", u8), ("step_mask_repaired", u8),
])
# rollout fields added after schema version 1 shipped: shards written before them read as null
ADDED_LATER = frozenset({"repair_probes", "repair_samples", "repair_gen_tokens"})
GROUP_SCHEMA = pa.schema(PROMPT_FIELDS + [pa.field("prompt_ids", i32), pa.field("rollouts", pa.list_(ROLLOUT))])


def schema_for(stage: str) -> pa.Schema:
    return PROMPT_SCHEMA if stage == "prompts" else GROUP_SCHEMA


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dfkit")
    except PackageNotFoundError:
        return "0+unknown"


# ----------------------------------------------------------------------------- writing
def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def _named(e: OSError, path: Path) -> OSError:
    """The same error, naming the file the user asked for (not our temp file)."""
    if not e.errno:
        return e
    return type(e)(e.errno, os.strerror(e.errno), str(path))


def config_json(cfg) -> dict:
    """A config dataclass as plain JSON values (paths as strings): what every stage saves."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg), default=str))


def write_json_atomic(path: Path, obj) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def _done_path(out: Path, worker: int | None) -> Path:
    return Path(out) / ("_done.json" if worker is None else f"_done.w{worker:03d}.json")


def mark_done(out: Path, info: dict | None = None, worker: int | None = None) -> None:
    """A stage's last write: ``OUT/_done.wNNN.json`` (shard stages, per worker) or ``OUT/_done.json``
    (fit, sft), holding the stage's statistics. Present means finished; ``clear_done`` first when a
    stage starts writing into a folder."""
    write_json_atomic(_done_path(out, worker), {"done": True, **(info or {})})


def clear_done(out: Path, worker: int | None = None) -> None:
    _done_path(out, worker).unlink(missing_ok=True)


def done_info(out: Path, worker: int | None = None) -> dict | None:
    """The statistics a finished stage left in ``out`` (``mark_done``), or None if it has not finished."""
    f = _done_path(out, worker)
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # written atomically, so only a hand-edited file gets here
        raise UserError(f"{f} is not valid JSON; delete it and rerun the stage") from None


def write_jsonl_atomic(path: Path, rows) -> None:
    """One JSON object per line, all or nothing (as ``write_json_atomic``)."""
    _write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def _write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        _fsync_replace(tmp, path)
    except OSError as e:  # disk full, read-only: no temp file stays behind
        tmp.unlink(missing_ok=True)
        raise _named(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class ShardWriter:
    """Writes shards of one stage into ``out``; ``meta`` goes into every file's metadata."""

    out: Path
    stage: str
    meta: dict
    worker: int = 0
    done: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if not os.access(self.out, os.W_OK):
            raise UserError(f"output folder is not writable: {self.out}")
        for tmp in [*self.out.glob(f".part-w{self.worker:03d}-*.tmp"), self.out / f".{self.manifest_path.name}.tmp"]:
            tmp.unlink(missing_ok=True)  # leftovers of a killed run of this worker
        m = self.manifest_path
        if m.is_file():
            self.done = json.loads(m.read_text()).get("shards", {})

    @property
    def manifest_path(self) -> Path:
        return self.out / f"_manifest.w{self.worker:03d}.json"

    def shard_name(self, chunk: int) -> str:
        return f"part-w{self.worker:03d}-{chunk:05d}.parquet"

    def is_done(self, chunk: int) -> bool:
        name = self.shard_name(chunk)
        return name in self.done and (self.out / name).is_file()

    def write(self, chunk: int, rows: list[dict]) -> Path:
        schema = schema_for(self.stage)
        meta = {"schema_version": SCHEMA_VERSION, "stage": self.stage, "package_version": package_version(),
                **self.meta}
        table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
            {META_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})
        name = self.shard_name(chunk)
        tmp = self.out / f".{name}.tmp"
        try:
            pq.write_table(table, tmp, compression="zstd", row_group_size=1024)
            _fsync_replace(tmp, self.out / name)
        except OSError as e:  # disk full, read-only disk: the error names the shard, no temp file stays
            tmp.unlink(missing_ok=True)
            raise _named(e, self.out / name) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.done[name] = {"rows": len(rows)}
        write_json_atomic(self.manifest_path, {"schema_version": SCHEMA_VERSION, "stage": self.stage,
                                               "meta": meta, "shards": self.done})
        return self.out / name


class WriterLock:
    """The one-writer lock of worker indices ``workers`` of the shard folder ``out`` (module
    docstring). A context manager; creates ``out`` if needed."""

    def __init__(self, out: Path, workers):
        self.out, self.workers, self.locks, self.created = Path(out), sorted(set(workers)), [], False

    def __enter__(self) -> "WriterLock":
        import socket
        import sys
        import time

        from filelock import FileLock, Timeout

        try:  # one process makes the folder; two racing runs must not both think it theirs
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.mkdir()
            self.created = True
        except FileExistsError as e:
            if not self.out.is_dir():
                raise _named(e, self.out) from None
            self.created = False
        except OSError as e:
            raise _named(e, self.out) from None
        for w in self.workers:
            path = self.out / f"_lock.w{w:03d}"
            lock = FileLock(path, timeout=0)
            try:
                lock.acquire()
            except Timeout:
                self.__exit__(UserError)
                raise UserError(f"{self.out} (worker {w}) is being written by another process: "
                                f"{_holder(path)}; wait for it to finish or use another output folder") from None
            except OSError as e:
                self.__exit__(UserError)
                raise _named(e, path) from None
            self.locks.append(lock)
            write_json_atomic(path.with_name(path.name + ".holder"),
                              {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%FT%T"),
                               "command": " ".join(sys.argv)[:300]})
        return self

    def __exit__(self, exc_type=None, *exc) -> None:
        # A run refused in a folder it made leaves no folder behind, only its error. It removes only
        # its own files: another process may hold another worker's lock there by now.
        drop = exc_type is not None and self.created
        for lock in self.locks:
            Path(lock.lock_file + ".holder").unlink(missing_ok=True)  # before the release: never a new holder's
            if drop:
                Path(lock.lock_file).unlink(missing_ok=True)  # while held: a later opener makes its own
            lock.release()
        self.locks = []
        if drop:
            try:
                self.out.rmdir()
            except OSError:
                pass  # not empty: another process writes there; it is theirs now


def shard_position(f: Path) -> tuple[int, int]:
    """(worker index, chunk) of a shard named ``part-wXXX-NNNNN.parquet``."""
    name = Path(f).name
    try:
        return int(name[6:9]), int(name[10:15])
    except ValueError:
        raise UserError(f"unexpected shard name {name}; shards must come from a dfgen stage") from None


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.with_name(path.name + ".holder").read_text())
        return f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']})"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


# ----------------------------------------------------------------------------- reading
def _read_schema(f: Path) -> tuple[pa.Schema, dict]:
    try:
        schema = pq.read_schema(f)
    except Exception as e:
        raise UserError(f"{f} is not a readable parquet file ({one_line(e)})") from None
    md = schema.metadata or {}
    if META_KEY not in md:
        return schema, {}
    try:
        meta = json.loads(md[META_KEY])
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{f} has unreadable dfkit metadata; it was not written by dfkit")
    return schema, meta


def check_columns(f: Path, schema: pa.Schema, stage: str) -> None:
    """Refuse a file lacking columns (or rollout fields) of the one shard schema of its stage."""
    want = ["id", "question", "answer"] if stage == "prompts" else schema_for(stage).names
    missing = [n for n in want if n not in schema.names]
    if not missing and stage != "prompts":
        have = schema.field("rollouts").type
        inner = have.value_type if pa.types.is_list(have) or pa.types.is_large_list(have) else None
        if inner is None or not pa.types.is_struct(inner):
            raise UserError(f"{f.name}: column rollouts is not a list of structs; not a dfkit {stage} shard")
        names = {inner.field(i).name for i in range(inner.num_fields)}
        missing = [f"rollouts.{x.name}" for x in ROLLOUT if x.name not in names and x.name not in ADDED_LATER]
    if missing:
        raise UserError(f"{f.name} lacks column(s) {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} "
                        f"of the {stage} shard schema; not a dfkit {stage} shard")


@dataclass
class ShardSet:
    """A validated folder (or file) of shards."""

    files: list
    meta: dict

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "prompts")

    def iter_batches(self, batch_size: int = 256, columns: list[str] | None = None):
        """Stream record batches (never the whole set in memory)."""
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"{f} is corrupt or truncated ({one_line(e)})") from None

    def iter_rows(self, batch_size: int = 256, columns: list[str] | None = None):
        for b in self.iter_batches(batch_size, columns):
            yield from b.to_pylist()

    def num_rows(self) -> int:
        n = 0
        for f in self.files:
            try:
                n += pq.ParquetFile(f).metadata.num_rows
            except Exception as e:
                raise UserError(f"{f} is corrupt or truncated ({one_line(e)})") from None
        return n


# provenance keys that must agree across the files of one set
CONSISTENT_KEYS = ("stage", "tokenizer_fingerprint", "model_fingerprint", "sampling")


def open_shards(path: Path, stage: str | tuple | None = None, tokenizer_fp: str | None = None,
                strict: bool = True) -> ShardSet:
    """Open and validate a shard folder (or a single parquet file). ``strict=False`` is for a stage
    looking at its own, possibly half-written output folder (a kill between a shard and its manifest
    line leaves a shard the resume rewrites): every parquet file, no manifest or duplicate checks."""
    path = Path(path)
    if path.is_dir():
        files = _listed_files(path, strict)
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"not found: {path}")
    if not files:
        raise UserError(f"no parquet shards in {path}")
    meta: dict = {}
    for f in files:
        schema, m = _read_schema(f)
        v = m.get("schema_version", SCHEMA_VERSION)
        if not isinstance(v, int) or v > SCHEMA_VERSION:
            raise UserError(f"{f.name} has schema version {v}, newer than this dfkit supports "
                            f"({SCHEMA_VERSION}); upgrade dfkit")
        if m.get("stage", "prompts") in STAGES:
            check_columns(f, schema, m.get("stage", "prompts"))
        if not meta:
            meta = m
            continue
        for k in CONSISTENT_KEYS:
            if m.get(k) != meta.get(k):
                raise UserError(f"{path} mixes shards with different {k} ({f.name}); use one folder per run")
    if stage is not None:
        want = (stage,) if isinstance(stage, str) else tuple(stage)
        have = meta.get("stage", "prompts")
        if have not in want:
            raise UserError(f"{path} holds '{have}' shards; this command needs {' or '.join(want)} shards")
    if tokenizer_fp is not None and meta.get("tokenizer_fingerprint") not in (None, tokenizer_fp):
        raise UserError(f"{path} was tokenized by another tokenizer ({meta.get('tokenizer_fingerprint')}) "
                        f"than the model's ({tokenizer_fp}); resample with this model")
    if strict and meta.get("stage", "prompts") != "prompts":  # prompt sets count their duplicate ids at load
        _refuse_duplicate_groups(path, files)
    return ShardSet(files=files, meta=meta)


def _listed_files(folder: Path, strict: bool = True) -> list[Path]:
    """The shards of a folder: those its worker manifests list, when it has manifests (every dfkit
    stage writes them); any ``*.parquet`` otherwise (a hand-made prompt set) or when not ``strict``.
    A parquet file no manifest lists (a copy, another run's shard) is refused, never read, and a
    listed one that is missing is refused too."""
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))
    manifests = sorted(folder.glob("_manifest.w*.json"))
    if not manifests or not strict:
        return files
    listed: set = set()
    for m in manifests:
        try:
            listed |= set(json.loads(m.read_text()).get("shards", {}))
        except (ValueError, AttributeError, OSError) as e:
            raise UserError(f"{m} is not a readable shard manifest ({one_line(e)})") from None
    extra = [f.name for f in files if f.name not in listed]
    if extra:
        raise UserError(f"{folder} holds {extra[0]}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}, which "
                        f"no manifest of the set lists (a copy or another run's shard?); move it out")
    missing = sorted(listed - {f.name for f in files})
    if missing:
        raise UserError(f"{folder}: {missing[0]} is listed in a manifest but missing; rerun the stage to rewrite it")
    return files


def _refuse_duplicate_groups(path: Path, files: list[Path]) -> None:
    """One row per prompt group: a group id met twice would be trained on twice."""
    seen: dict = {}
    for f in files:
        try:
            ids = pq.ParquetFile(f).read(columns=["id"]).column("id").to_pylist()  # not read_table: it imports pandas
        except Exception as e:
            raise UserError(f"{f} is corrupt or truncated ({one_line(e)})") from None
        for gid in ids:
            if gid in seen:
                raise UserError(f"{path}: group id {gid!r} occurs twice ({seen[gid]} and {f.name}); "
                                f"one row per group, so this set would count it twice")
            seen[gid] = f.name
