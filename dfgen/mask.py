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


def _mask_rollout(r: dict, texts, level: str) -> None:
    """Align one rollout's bad and repaired ids and write its masks (in place)."""
    from dfgen.align import align, step_ids, step_mask

    bad, rep = list(r["token_ids"]), list(r["repaired_ids"])
    a = align(bad, rep)
    steps_b, steps_r = step_ids(texts(bad)), step_ids(texts(rep))
    sb, sr = step_mask(a.mask_bad, steps_b), step_mask(a.mask_repaired, steps_r)
    r["step_mask_bad"], r["step_mask_repaired"] = sb, sr
    if level == "step":
        r["mask_bad"], r["mask_repaired"] = sb, sr
        r["root_bad"], r["root_repaired"] = step_mask(a.root_bad, steps_b), step_mask(a.root_repaired, steps_r)
    else:
        r["mask_bad"], r["mask_repaired"] = a.mask_bad, a.mask_repaired
        r["root_bad"], r["root_repaired"] = a.root_bad, a.root_repaired


def run_mask(cfg: MaskConfig, progress=None) -> dict:
    from dfgen.models import load_tokenizer

    from dfgen.policy import tokenizer_fingerprint
    from dfgen.shards import open_shards
    from dfgen.stage import rewrite_plan, run_stage

    if cfg.level not in ("token", "step"):
        raise UserError(f"--level must be token or step, got {cfg.level!r}")
    ss = open_shards(cfg.repairs, stage="repair")
    tdir = Path(cfg.tokenizer or ss.meta.get("model", ""))
    if not (tdir / "tokenizer_config.json").is_file() and not (tdir / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer in {tdir}; pass --tokenizer with the sampling policy's folder")
    tok = load_tokenizer(tdir)
    fp = tokenizer_fingerprint(tok)
    if ss.meta.get("tokenizer_fingerprint") not in (None, fp):
        raise UserError(f"{cfg.repairs} was tokenized by another tokenizer than {tdir}'s; pass the policy "
                        f"that sampled these shards")
    meta, units = rewrite_plan(ss, Path(cfg.out), cfg.repairs, "--repairs",
                               {"mask": {"level": cfg.level, "root_level": cfg.level, "tokenizer": str(tdir)}})

    def differs(have: dict) -> str | None:
        hm = have.get("mask", {})  # root_level: absent before root masks followed --level (they were token-level)
        same = have.get("stage") == "mask" and hm.get("level") == cfg.level and \
            hm.get("root_level", "token") == cfg.level and have.get("repair") == meta.get("repair")
        return None if same else "holds shards of another run"

    piece: dict = {}

    def texts(ids):
        for i in ids:
            if i not in piece:
                piece[i] = tok.decode([i])
        return [piece[i] for i in ids]

    def mask_shard(rows):
        for r in (r for row in rows for r in row["rollouts"] if r.get("repair_status") == "ok"):
            _mask_rollout(r, texts, cfg.level)
            st["masked"] += 1
            st["tokens"] += len(r["token_ids"])
            st["marked"] += sum(r["mask_bad"])
        if progress:
            progress(len(rows))
        return rows

    def summarize(st: dict) -> None:
        st["mask_density"] = st["marked"] / st["tokens"] if st["tokens"] else 0.0

    st = {"masked": 0, "tokens": 0, "marked": 0}
    return run_stage(Path(cfg.out), "mask", meta, units, mask_shard, differs=differs, config=cfg, stats=st, summarize=summarize)
