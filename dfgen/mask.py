"""``dfgen mask``: the differential masks from each (bad, repaired) token pair.

For every rollout with a verified repair (``repair_status == "ok"``), align the bad and the
repaired token ids (policy tokenizer; rapidfuzz Levenshtein opcodes on Python lists, see
``dfgen.align``) and write, as list<uint8> columns of exactly the trajectory lengths:

* ``mask_bad[t] = 1`` where the repair replaced or deleted bad token t (a pure insertion marks
  the bad token at the insertion point, so every differing pair blames something);
* ``mask_repaired[t] = 1`` where the repair inserted or replaced token t;
* ``root_bad`` / ``root_repaired``: only the first edit location (the root cause); the rest of
  the edits are consequences (recomputed downstream steps), which ``root+prop`` weighs apart;
* ``step_mask_bad`` / ``step_mask_repaired``: a step (a line, or a ``Step k:`` segment) is
  marked whole if any of its tokens is marked.

``--level step`` writes the step masks into ``mask_bad``/``mask_repaired`` and widens
``root_bad``/``root_repaired`` to the root cause's whole step (so a trainer gets step-level blame
under every ``--marked`` mode); the default ``token`` keeps them token-level.
Rollouts without a verified repair keep null masks. Deterministic; shards map one to one.

Run: ``dfgen mask --repairs runs/r0/repair --out runs/r0/df``
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfgen.errors import UserError


@dataclass
class MaskConfig:
    repairs: Path  # repair shards
    out: Path  # mask (DF) shards
    level: str = "token"  # token | step: granularity written to mask_bad / mask_repaired and root_*
    tokenizer: Path | None = None  # policy folder whose tokenizer the ids belong to (default: from shards)


def run_mask(cfg: MaskConfig, progress=None) -> dict:
    from transformers import AutoTokenizer

    from dfgen.align import align, step_ids, step_mask
    from dfgen.policy import tokenizer_fingerprint
    from dfgen.shards import ShardWriter, WriterLock, config_json, open_shards, shard_position, write_json_atomic

    if cfg.level not in ("token", "step"):
        raise UserError(f"--level must be token or step, got {cfg.level!r}")
    ss = open_shards(cfg.repairs, stage="repair")
    tdir = Path(cfg.tokenizer or ss.meta.get("model", ""))
    if not (tdir / "tokenizer_config.json").is_file() and not (tdir / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer in {tdir}; pass --tokenizer with the sampling policy's folder")
    tok = AutoTokenizer.from_pretrained(tdir)
    fp = tokenizer_fingerprint(tok)
    if ss.meta.get("tokenizer_fingerprint") not in (None, fp):
        raise UserError(f"{cfg.repairs} was tokenized by another tokenizer than {tdir}'s; pass the policy "
                        f"that sampled these shards")
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.repairs).resolve():
        raise UserError("--out must differ from --repairs (inputs are never overwritten)")
    meta = {**{k: v for k, v in ss.meta.items() if k not in ("stage", "schema_version", "package_version")},
            "mask": {"level": cfg.level, "root_level": cfg.level, "tokenizer": str(tdir)}}
    with WriterLock(out, {shard_position(f)[0] for f in ss.files}):  # held until the last shard is written
        if out.exists() and any(out.glob("*.parquet")):
            have = open_shards(out, strict=False).meta
            hm = have.get("mask", {})  # root_level: absent before root masks followed --level (they were token-level)
            if have.get("stage") != "mask" or hm.get("level") != cfg.level or hm.get("root_level", "token") != cfg.level or \
                    have.get("repair") != meta.get("repair"):
                raise UserError(f"{out} holds shards of another run; use a new output folder (nothing was overwritten)")
        piece: dict = {}

        def texts(ids):
            for i in ids:
                if i not in piece:
                    piece[i] = tok.decode([i])
            return [piece[i] for i in ids]

        writers: dict = {}
        st = {"masked": 0, "tokens": 0, "marked": 0, "shards_skipped": 0}
        for f in ss.files:
            w_idx, chunk = shard_position(f)
            if w_idx not in writers:
                writers[w_idx] = ShardWriter(out, "mask", meta, worker=w_idx)
            if writers[w_idx].is_done(chunk):
                st["shards_skipped"] += 1
                continue
            rows = list(open_shards(f).iter_rows())
            for row in rows:
                for r in row["rollouts"]:
                    if r.get("repair_status") != "ok":
                        continue
                    bad, rep = list(r["token_ids"]), list(r["repaired_ids"])
                    a = align(bad, rep)
                    steps_b, steps_r = step_ids(texts(bad)), step_ids(texts(rep))
                    sb, sr = step_mask(a.mask_bad, steps_b), step_mask(a.mask_repaired, steps_r)
                    r["step_mask_bad"], r["step_mask_repaired"] = sb, sr
                    if cfg.level == "step":
                        r["mask_bad"], r["mask_repaired"] = sb, sr
                        r["root_bad"], r["root_repaired"] = step_mask(a.root_bad, steps_b), step_mask(a.root_repaired, steps_r)
                    else:
                        r["mask_bad"], r["mask_repaired"] = a.mask_bad, a.mask_repaired
                        r["root_bad"], r["root_repaired"] = a.root_bad, a.root_repaired
                    st["masked"] += 1
                    st["tokens"] += len(bad)
                    st["marked"] += sum(r["mask_bad"])
            writers[w_idx].write(chunk, rows)
            if progress:
                progress(len(rows))
        st["mask_density"] = st["marked"] / st["tokens"] if st["tokens"] else 0.0
        write_json_atomic(out / "config.json", config_json(cfg))
        return st
