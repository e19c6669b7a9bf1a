import json

import pyarrow.parquet as pq
import pytest

from dfgen.errors import UserError
from dfgen.shards import META_KEY, SCHEMA_VERSION, ShardWriter, open_shards


def _row(i):
    return {"id": f"p{i}", "question": "q", "answer": "1", "image": b"x"}


def test_writer_is_atomic_and_records_provenance(tmp_path):
    w = ShardWriter(tmp_path / "o", "prompts", {"seed": 3})
    w.write(0, [_row(0), _row(1)])
    w.write(1, [_row(2)])
    s = open_shards(tmp_path / "o", stage="prompts")
    assert s.num_rows() == 3 and s.meta["seed"] == 3 and s.meta["schema_version"] == SCHEMA_VERSION
    assert [r["id"] for r in s.iter_rows()] == ["p0", "p1", "p2"]
    man = json.loads((tmp_path / "o" / "_manifest.w000.json").read_text())
    assert set(man["shards"]) == {"part-w000-00000.parquet", "part-w000-00001.parquet"}
    assert not list((tmp_path / "o").glob(".*tmp"))


def test_a_failed_write_leaves_no_partial_shard(tmp_path):
    w = ShardWriter(tmp_path / "o", "prompts", {})
    with pytest.raises(Exception):
        w.write(0, [{"id": None, "question": "q", "answer": "1"}])  # id is not nullable
    assert not list((tmp_path / "o").glob("*.parquet")) and not list((tmp_path / "o").glob(".*"))


def test_newer_schema_version_is_refused(tmp_path):
    w = ShardWriter(tmp_path / "o", "prompts", {})
    f = w.write(0, [_row(0)])
    t = pq.read_table(f)
    meta = json.loads(t.schema.metadata[META_KEY])
    meta["schema_version"] = SCHEMA_VERSION + 1
    pq.write_table(t.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), f)
    with pytest.raises(UserError, match="newer than this dfkit"):
        open_shards(tmp_path / "o")


def test_corrupt_or_truncated_shards_and_wrong_stage_are_refused(tmp_path):
    w = ShardWriter(tmp_path / "o", "prompts", {})
    f = w.write(0, [_row(0)])
    with pytest.raises(UserError, match="needs sample"):
        open_shards(tmp_path / "o", stage="sample")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable parquet"):
        open_shards(tmp_path / "o")
    with pytest.raises(UserError, match="no parquet shards"):
        open_shards(tmp_path / "empty_dir_missing") if False else open_shards((tmp_path / "e").mkdir() or tmp_path / "e")


def test_mixed_provenance_and_foreign_tokenizer_are_refused(tmp_path):
    ShardWriter(tmp_path / "o", "sample", {"tokenizer_fingerprint": "aaa"}, worker=0).write(0, [])
    ShardWriter(tmp_path / "o", "sample", {"tokenizer_fingerprint": "bbb"}, worker=1).write(0, [])
    with pytest.raises(UserError, match="mixes shards"):
        open_shards(tmp_path / "o")
    ShardWriter(tmp_path / "p", "sample", {"tokenizer_fingerprint": "aaa"}).write(0, [])
    with pytest.raises(UserError, match="another tokenizer"):
        open_shards(tmp_path / "p", tokenizer_fp="zzz")
    assert open_shards(tmp_path / "p", tokenizer_fp="aaa").num_rows() == 0


def _group(i):
    return {**_row(i), "prompt_ids": [1, 2], "rollouts": [{"text": "a", "token_ids": [3], "reward": 0.0}]}


def test_readers_read_the_shards_the_manifests_list(tmp_path):
    """Measured before: a copy of a shard under another name was trained on, its groups twice."""
    import shutil

    w = ShardWriter(tmp_path / "o", "sample", {})
    f0 = w.write(0, [_group(0), _group(1)])
    w.write(1, [_group(2)])
    assert open_shards(tmp_path / "o", stage="sample").num_rows() == 3
    copy = tmp_path / "o" / "part-w000-00099.parquet"
    shutil.copy(f0, copy)
    with pytest.raises(UserError, match="part-w000-00099.parquet, which no manifest of the set lists"):
        open_shards(tmp_path / "o", stage="sample")
    # a stage resuming its own output (a kill between a shard and its manifest line) reads every file
    assert open_shards(tmp_path / "o", stage="sample", strict=False).num_rows() == 5
    copy.unlink()
    f0.unlink()  # listed but gone
    with pytest.raises(UserError, match="part-w000-00000.parquet is listed in a manifest but missing"):
        open_shards(tmp_path / "o")


def test_a_group_id_met_twice_is_refused(tmp_path):
    """Without manifests (a hand-assembled folder) every parquet file is read, and a group id that
    occurs twice is refused in one line, not counted twice."""
    import shutil

    f0 = ShardWriter(tmp_path / "w", "sample", {}).write(0, [_group(0), _group(1)])
    (tmp_path / "o").mkdir()
    shutil.copy(f0, tmp_path / "o" / "a.parquet")
    shutil.copy(f0, tmp_path / "o" / "b.parquet")
    with pytest.raises(UserError, match="group id 'p0' occurs twice \\(a.parquet and b.parquet\\)"):
        open_shards(tmp_path / "o")
    (tmp_path / "o" / "b.parquet").unlink()
    assert open_shards(tmp_path / "o").num_rows() == 2


def test_reading_a_shard_set_stays_off_pandas_and_torch(tmp_path):
    """Opening, checking (the duplicate-id scan included) and streaming a set import neither pandas
    nor torch. Measured: the id scan's pq.read_table imported pandas, 48 of the loader's 138 MiB
    peak (bench/bench_trainer.py loader_rss)."""
    import subprocess
    import sys

    groups = [{**_group(i), "rollouts": [{"text": "a", "token_ids": [3], "logprobs": [-0.5], "reward": 0.0}]}
              for i in range(2)]
    ShardWriter(tmp_path / "o", "sample", {}).write(0, groups)
    code = ("import sys; from pathlib import Path; from dfgen.shards import open_shards; "
            "from dftrain.data import GroupStream; "
            f"GroupStream(open_shards(Path({str(tmp_path / 'o')!r})), seed=0).take(2); "
            "print(sorted(m for m in ('pandas', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
