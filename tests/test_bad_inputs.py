"""Bad input through the real CLIs: the documented matrix.

Each case builds one bad input, runs the command a user would run (a subprocess) and checks
what the user sees:

* ``error``: exit code != 0, exactly one line ``error: ...`` on stderr holding the expected
  text, no traceback, and no output folder left behind;
* ``skip``: a per-record problem among good records: exit code 0, the bad record skipped and
  counted in the summary line (with its reason), the output holding exactly the good groups;
* ``ok``: an odd but usable input (CMYK or 16-bit images) is converted and sampled.
"""
from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
SAMPLE = ["--group-size", 1, "--max-new-tokens", 4, "--chunk-size", 8, "--seed", 0]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model):
    """A small prompt set and its sample -> repair -> mask shards (tiny policy, in-process)."""
    from dfgen.mask import MaskConfig, run_mask
    from dfgen.repair import RepairConfig, run_repair
    from dfgen.sample import SampleConfig, run_sample
    from dfgen.synth.grid import make_problems, write_synth

    d = tmp_path_factory.mktemp("bad_inputs")
    write_synth(d / "prompts", 4, seed=3, split="train")
    run_sample(SampleConfig(prompts=d / "prompts", model=tiny_model, out=d / "s", group_size=2, limit=4,
                            chunk_size=2, max_new_tokens=8, seed=1))
    run_repair(RepairConfig(rollouts=d / "s", out=d / "r"))
    run_mask(MaskConfig(repairs=d / "r", out=d / "m"))
    p = next(make_problems(1, seed=0))
    return {"dir": d, "model": tiny_model, "problem": p, "png": p.render()}


# ----------------------------------------------------------------------------- builders
def _png(size=(56, 56), mode="RGB", fmt="PNG") -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new(mode, size).save(b, fmt)
    return b.getvalue()


def _png_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb costs nothing to make)."""
    d = bytearray(_png((4, 4)))
    d[16:24] = struct.pack(">II", w, h)
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])))
    return bytes(d)


def _png16() -> bytes:
    import numpy as np
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray((np.arange(56 * 56).reshape(56, 56) * 20).astype(np.uint16)).save(b, "PNG")
    return b.getvalue()


def _prompts_jsonl(t: Path, base, bad: dict | None, files: dict | None = None, bad_first: bool = False) -> Path:
    """A dataset folder: one good record with an image file, and one bad (or odd) record."""
    d = t / "data"
    (d / "img").mkdir(parents=True)
    (d / "img" / "ok.png").write_bytes(base["png"])
    for name, data in (files or {}).items():
        (d / "img" / name).write_bytes(data)
    p = base["problem"]
    rows = [{"id": "good", "question": p.question(), "answer": str(p.answer), "image_path": "img/ok.png"}]
    if bad is not None:
        rows.append({"id": "bad", "question": "How many red cells?", "answer": "1", **bad})
    rows = rows[::-1] if bad_first else rows
    (d / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "p.jsonl"


def _sample(prompts, base) -> list:
    return ["dfgen", "sample", "--prompts", prompts, "--model", base["model"], "--out", "{out}", *SAMPLE]


def _prompt_file(t: Path, name: str, data: bytes) -> Path:
    (t / "data").mkdir(exist_ok=True)
    (t / "data" / name).write_bytes(data)
    return t / "data" / name


def _prompt_parquet(base, corrupt: bool = False) -> bytes:
    f = sorted((base["dir"] / "prompts").glob("*.parquet"))[0]
    return _corrupt_pages(f, "image") if corrupt else f.read_bytes()


def _corrupt(data: bytes, start: int, stop: int) -> bytes:
    d, r = bytearray(data), random.Random(0)
    for i in range(start, stop):
        d[i] = r.randrange(256)
    return bytes(d)


def _corrupt_pages(f: Path, column: str) -> bytes:
    """The file with random bytes over one column's pages (the footer stays intact)."""
    md = pq.ParquetFile(f).metadata
    col = md.row_group(0).column(md.schema.names.index(column))
    start = col.dictionary_page_offset or col.data_page_offset
    return _corrupt(f.read_bytes(), start + 8, start + col.total_compressed_size)


def _shards_copy(t: Path, base, stage_dir: str, edit=None, meta_edit=None) -> Path:
    """A copy of the base shards of one stage, rows edited by ``edit(rows)`` (or metadata)."""
    from dfgen.shards import ShardWriter, open_shards

    ss = open_shards(base["dir"] / stage_dir)
    rows = list(ss.iter_rows())
    if edit:
        edit(rows)
    meta = {k: v for k, v in ss.meta.items() if k not in ("stage", "schema_version", "package_version")}
    w = ShardWriter(t / "shards", ss.stage, meta)
    f = w.write(0, rows)
    if meta_edit:  # rewrite the file metadata itself (e.g. a newer schema version)
        table = pq.read_table(f)
        md = json.loads(table.schema.metadata[b"dfkit"])
        meta_edit(md)
        pq.write_table(table.replace_schema_metadata({b"dfkit": json.dumps(md).encode()}), f)
    return t / "shards"


def _stray_copy(t: Path, base) -> Path:
    """The issue's measurement: a copy of a shard under another name beside the set's own shards."""
    import shutil

    d = _shards_copy(t, base, "m")
    shutil.copy(d / "part-w000-00000.parquet", d / "part-w000-00099.parquet")
    return d


def _duplicate_groups(t: Path, base) -> Path:
    """A hand-assembled folder (no manifest) holding the same groups twice."""
    import shutil

    d = _shards_copy(t, base, "m")
    for m in d.glob("_manifest*"):
        m.unlink()
    shutil.copy(d / "part-w000-00000.parquet", d / "copy.parquet")
    return d


def _fit(data, base) -> list:
    return ["dftrain", "fit", "--data", data, "--model", base["model"], "--out", "{out}", "--steps", 1,
            "--groups-per-step", 1]


def _set_rollout(**kw):
    def edit(rows):
        rows[-1]["rollouts"][-1].update(kw)  # the last group: read-time validation must reach it
    return edit


def _set_logprob(x):
    def edit(rows):
        rows[-1]["rollouts"][-1]["logprobs"][0] = x
    return edit


def _symlink_outside(t: Path, base) -> Path:
    p = _prompts_jsonl(t, base, {"image_path": "img/link.png"})
    (t / "outside.png").write_bytes(base["png"])
    os.symlink(t / "outside.png", p.parent / "img" / "link.png")
    return p


def _long_question(t: Path, base) -> Path:
    # ~5000 tokens (context 1024), first: the good row after it must keep its own prompt ids
    return _prompts_jsonl(t, base, {"question": "How many red cells? " * 500}, bad_first=True)


def _not_utf8(t: Path, base) -> Path:
    p = _prompts_jsonl(t, base, None)
    with open(p, "ab") as fh:  # a Latin-1 record: "Wie viele Kästchen?"
        fh.write(b'{"id": "latin1", "question": "Wie viele K\xe4stchen?", "answer": "1"}\n')
    return p


def _schema_v99(md):
    md["schema_version"] = 99


def _drop_rollouts(t: Path, base) -> Path:
    (t / "shards").mkdir()
    f = sorted((base["dir"] / "s").glob("*.parquet"))[0]
    table = pq.read_table(f)
    pq.write_table(table.drop_columns(["rollouts"]).replace_schema_metadata(table.schema.metadata),
                   t / "shards" / f.name)
    return t / "shards"


def _truncated_shards(t: Path, base) -> Path:
    (t / "shards").mkdir()
    f = sorted((base["dir"] / "s").glob("*.parquet"))[0]
    (t / "shards" / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return t / "shards"


def _corrupt_shards(t: Path, base) -> Path:
    (t / "shards").mkdir()
    f = sorted((base["dir"] / "s").glob("*.parquet"))[0]
    (t / "shards" / f.name).write_bytes(_corrupt_pages(f, "image"))
    return t / "shards"


def _bytes_as_shards(t: Path, data: bytes) -> Path:
    (t / "shards").mkdir()
    (t / "shards" / "part-w000-00000.parquet").write_bytes(data)
    return t / "shards"


def _parquet_without_answer(t: Path, base) -> Path:
    f = t / "data" / "p.parquet"
    f.parent.mkdir()
    pq.write_table(pa.table({"id": ["a"], "question": ["How many red cells?"]}), f)
    return f


RANDOM = random.Random(1).randbytes(4096)
PNG = _png()

# id: (kind, expected text, build(tmp, base) -> argv with "{out}" for the output folder)
CASES = {
    # ---- prompt files (dfgen sample)
    "prompts-truncated-parquet": ("error", "is not a readable parquet file (ArrowInvalid: Parquet magic bytes not found",
        lambda t, b: _sample(_prompt_file(t, "p.parquet", _prompt_parquet(b)[:3000]), b)),
    "prompts-corrupt-parquet": ("error", "p.parquet is not a readable parquet file (OSError: ",
        lambda t, b: _sample(_prompt_file(t, "p.parquet", _prompt_parquet(b, corrupt=True)), b)),
    "prompts-missing-columns": ("error", "lacks required column(s) answer (need id, question, answer)",
        lambda t, b: _sample(_parquet_without_answer(t, b), b)),
    "prompts-not-utf8-jsonl": ("error", "p.jsonl:2 is not UTF-8 text (byte 0xe4 at column 42)",
        lambda t, b: _sample(_not_utf8(t, b), b)),
    "prompts-png-named-jsonl": ("error", "p.jsonl:1 is not UTF-8 text (byte 0x89 at column 1)",
        lambda t, b: _sample(_prompt_file(t, "p.jsonl", PNG), b)),
    "prompts-random-bytes-named-jsonl": ("error", "p.jsonl:1 is not UTF-8 text",
        lambda t, b: _sample(_prompt_file(t, "p.jsonl", RANDOM), b)),
    "prompts-png-named-parquet": ("error", "p.parquet is not a readable parquet file",
        lambda t, b: _sample(_prompt_file(t, "p.parquet", PNG), b)),
    "prompts-random-bytes-named-parquet": ("error", "p.parquet is not a readable parquet file",
        lambda t, b: _sample(_prompt_file(t, "p.parquet", RANDOM), b)),
    "prompts-json-array-line": ("error", "p.jsonl:1 is a JSON list, not an object",
        lambda t, b: _sample(_prompt_file(t, "p.jsonl", b"[1, 2, 3]\n"), b)),
    # ---- one bad record among good ones (dfgen sample): skipped and counted
    "image-corrupt": ("skip", "undecodable image (UnidentifiedImageError)",
        lambda t, b: _sample(_prompts_jsonl(t, b, {"image_path": "img/x.png"}, {"x.png": b"\x89PNG\r\n\x1a\n" + RANDOM}), b)),
    "image-zero-bytes": ("skip", "empty image",
        lambda t, b: _sample(_prompts_jsonl(t, b, {"image_path": "img/x.png"}, {"x.png": b""}), b)),
    "image-zero-sized": ("skip", "undecodable image",
        lambda t, b: _sample(_prompts_jsonl(t, b, {"image_path": "img/x.png"}, {"x.png": _png_claiming(0, 56)}), b)),
    "image-decompression-bomb": ("skip", "image too large (a decompression bomb",
        lambda t, b: _sample(_prompts_jsonl(t, b, {"image_path": "img/x.png"}, {"x.png": _png_claiming(40000, 40000)}), b)),
    "image-cmyk-jpeg": ("ok", "",
        lambda t, b: _sample(_prompts_jsonl(t, b, {"image_path": "img/x.jpg"}, {"x.jpg": _png(mode="CMYK", fmt="JPEG")}), b)),
    "image-16-bit-png": ("ok", "",
        lambda t, b: _sample(_prompts_jsonl(t, b, {"image_path": "img/x.png"}, {"x.png": _png16()}), b)),
    "image-path-dotdot": ("skip", "image_path escapes the dataset folder: '../../etc/passwd'",
        lambda t, b: _sample(_prompts_jsonl(t, b, {"image_path": "../../etc/passwd"}), b)),
    "image-path-absolute": ("skip", "image_path must be relative to the dataset folder: '/etc/passwd'",
        lambda t, b: _sample(_prompts_jsonl(t, b, {"image_path": "/etc/passwd"}), b)),
    "image-path-symlink-outside": ("skip", "image_path escapes the dataset folder: 'img/link.png'",
        lambda t, b: _sample(_symlink_outside(t, b), b)),
    "prompt-beyond-context": ("skip", "prompt too long (",
        lambda t, b: _sample(_long_question(t, b), b)),
    # ---- shards (dfgen repair / mask, dftrain fit)
    "sample-unknown-device": ("error", "unknown device 'gpu' (auto, cpu, cuda, cuda:N)",
        lambda t, b: [*_sample(b["dir"] / "prompts", b), "--device", "gpu"]),
    "repair-unknown-device": ("error", "unknown device 'tpu' (auto, cpu, cuda, cuda:N)",
        lambda t, b: ["dfgen", "repair", "--rollouts", b["dir"] / "s", "--out", "{out}", "--device", "tpu"]),
    "shards-truncated": ("error", "is not a readable parquet file (ArrowInvalid: Parquet magic bytes not found",
        lambda t, b: ["dfgen", "repair", "--rollouts", _truncated_shards(t, b), "--out", "{out}"]),
    "shards-corrupt": ("error", "part-w000-00000.parquet is corrupt or truncated (OSError: ",
        lambda t, b: ["dfgen", "repair", "--rollouts", _corrupt_shards(t, b), "--out", "{out}"]),
    "shards-newer-schema-version": ("error", "has schema version 99, newer than this dfkit supports (1); upgrade dfkit",
        lambda t, b: ["dfgen", "repair", "--rollouts", _shards_copy(t, b, "s", meta_edit=_schema_v99), "--out", "{out}"]),
    "shards-missing-columns": ("error", "lacks column(s) rollouts of the sample shard schema",
        lambda t, b: ["dfgen", "repair", "--rollouts", _drop_rollouts(t, b), "--out", "{out}"]),
    "shards-random-bytes-named-parquet": ("error", "part-w000-00000.parquet is not a readable parquet file",
        lambda t, b: ["dfgen", "repair", "--rollouts", _bytes_as_shards(t, RANDOM), "--out", "{out}"]),
    "shards-png-named-parquet": ("error", "part-w000-00000.parquet is not a readable parquet file",
        lambda t, b: _fit(_bytes_as_shards(t, PNG), b)),
    "tokenizer-mismatch": ("error", "was tokenized by another tokenizer (0123456789abcdef)",
        lambda t, b: _fit(_shards_copy(t, b, "m", meta_edit=lambda md: md.update(tokenizer_fingerprint="0123456789abcdef")), b)),
    "empty-trajectory": ("error", "rollout 1: empty trajectory (no tokens)",
        lambda t, b: _fit(_shards_copy(t, b, "m", _set_rollout(token_ids=[], logprobs=[], text="")), b)),
    "nan-logprobs": ("error", "rollout 1: stored logprobs contain NaN or inf",
        lambda t, b: _fit(_shards_copy(t, b, "m", _set_logprob(float("nan"))), b)),
    "inf-logprobs": ("error", "rollout 1: stored logprobs contain NaN or inf",
        lambda t, b: _fit(_shards_copy(t, b, "m", _set_logprob(float("-inf"))), b)),
    "shard-copy-not-in-manifest": ("error", "part-w000-00099.parquet, which no manifest of the set lists",
        lambda t, b: _fit(_stray_copy(t, b), b)),
    "duplicate-group-ids": ("error", "occurs twice (copy.parquet and part-w000-00000.parquet)",
        lambda t, b: _fit(_duplicate_groups(t, b), b)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, base, tmp_path):
    kind, expected, build = CASES[case]
    out = tmp_path / "out"
    argv = [str(a).replace("{out}", str(out)) for a in build(tmp_path, base)]
    p = subprocess.run([sys.executable, "-m", f"{argv[0]}.cli", *argv[1:]], capture_output=True, text=True,
                       env=ENV, timeout=600)
    err = p.stderr.strip()
    what = f"[{case}] {' '.join(argv)}\nexit {p.returncode}\nstdout: {p.stdout}\nstderr: {err[-2000:]}"
    print(f"[{case}] exit {p.returncode}: {err if kind == 'error' else p.stdout.strip()}")  # shown by pytest -rP
    assert "Traceback" not in err, what
    if kind == "error":
        assert p.returncode != 0 and len(err.splitlines()) == 1 and err.startswith("error: "), what
        assert expected in err, what
        assert not out.exists(), f"{what}\npartial output left: {sorted(os.listdir(out))}"
        return
    import polars as pl

    assert p.returncode == 0, what
    rows = pl.read_parquet(str(out / "*.parquet"))
    ids = sorted(rows["id"].to_list())
    assert all(len(p) < 1024 for p in rows["prompt_ids"].to_list()), what  # each row keeps its own prompt ids
    if kind == "skip":
        assert f"skipped 1 bad prompt(s), e.g. bad: {expected}" in p.stdout, what
        assert ids == ["good"], what
    else:
        assert "skipped" not in p.stdout and ids == ["bad", "good"], what


def test_16_bit_images_keep_their_contrast():
    """16-bit greyscale is scaled to 8 bits (PIL's own conversion would clip it to white)."""
    import numpy as np

    from dfgen.images import decode_image

    a = np.asarray(decode_image(_png16()))
    assert a.shape == (56, 56, 3) and a.min() == 0 and a.max() == 62700 * 255 // 65535 and (a == 255).mean() == 0


ROOT_DIR = Path(__file__).resolve().parent.parent  # studies/ is run as a package from the checkout


@pytest.mark.parametrize("script,args,match", [
    ("experiment.py", ["--sft", "/nonexistent"], "not a policy folder"),
    ("experiment.py", ["--task", "{bad"], "--task"),
    ("experiment.py", ["--task", '{"grid": 9}'], "grid must be 2..4"),
    ("experiment.py", ["--seeds", "0"], "must be positive"),
    ("experiment.py", ["--marked", "first"], "invalid choice"),
    ("root_probe.py", ["--shards", "/nonexistent", "a=b"], "no parquet shards"),
    ("error_profile.py", ["/nonexistent", "--data", "x"], "not a policy folder"),
    ("trl_study.py", ["--start", "/nonexistent"], "not a policy folder"),
    ("trl_study.py", ["--eval-at", "200"], "--eval-at must list steps"),
])
def test_study_scripts_refuse_bad_arguments_in_one_line_before_any_work(script, args, match, tmp_path):
    cmd = [sys.executable, "-m", f"studies.{script[:-3]}", *(["--out", str(tmp_path / "o")] if script == "experiment.py" else []),
           *args]
    env = {**ENV, "PYTHONPATH": str(ROOT_DIR) + os.pathsep + ENV.get("PYTHONPATH", "")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and match in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith(f"{script}: error:")
    assert not (tmp_path / "o").exists()  # nothing written
