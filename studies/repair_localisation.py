"""Where does each oracle-free repairer put the blame? Judged against the oracle, on the start's failures.

On the synthetic task the oracle's repair is the minimal correct edit, so its root cause (the first
edited token, ``root_bad``) is ground truth. This study samples the start policy once on fresh
prompts of its task, repairs the same failed rollouts with the oracle and with every oracle-free
variant (``resample`` with the policy, by search strategy and samples per probe; ``resample`` with a
stronger teacher when ``--teacher`` is given; ``sibling``; ``model``), masks each with ``dfgen mask``,
and reports, over the failures the oracle repaired:

* ``verified``: the share the variant repaired (its repair passed verification);
* ``root_line``: the share whose root cause falls in the oracle's root line (step), ``root_token``:
  on the oracle's root token;
* ``false_blame_root``: the share whose root cause lies in a line the oracle keeps (no oracle edit:
  blame on a correct step); ``false_blame_any``: the share marking any token of such a line;
* ``root_line_of_repairs``: ``root_line / verified``, the same among the variant's own repairs;
* ``gen_tokens_per_repair``: tokens the repairer generated per verified repair (probes included);
  ``gen_tokens_per_failure`` the same per failure; the start's own sampled tokens per rollout
  are given for scale.

Shares are of all failures the oracle repaired, so a variant that repairs less scores less.
``sibling+X`` combinations are exact, not estimates: sibling where the group has a correct rollout,
the X repair (from the same X run) elsewhere; they are charged X's tokens only where X was used.

The prompts carry their solution (the oracle needs it), but no oracle-free variant reads it:
``resample`` and ``model`` see only the prompt, the image, the reward. Resumable per variant.

Run: ``python -m studies.repair_localisation --out runs/loc --json docs/issue34/localisation.json``
(``--teacher DIR``: e.g. the GRPO arm of ``make demo``, ``runs/demo/grpo/round_007/fit``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

START = Path(__file__).resolve().parents[1] / "data" / "policies" / "regime_start"
TASK = {"ops": "+-*", "min_reads": 3, "max_reads": 4}  # the start's task (dftrain.demo.TASK)
VARIANTS = {  # name -> RepairConfig fields
    "sibling": {"repairer": "sibling"},
    "model": {"repairer": "model"},
    "sibling-resample": {"repairer": "sibling-resample"},  # the default router: must equal sibling+resample-backward-n4
    "resample-binary-n4": {"repairer": "resample", "search": "binary", "resample_n": 4, "max_probes": 4},
    "resample-backward-n4": {"repairer": "resample", "search": "backward", "resample_n": 4, "max_probes": 8},
    "resample-binary-n4-min2": {"repairer": "resample", "search": "binary", "resample_n": 4, "min_wins": 2, "max_probes": 4},
    "resample-backward-n4-min2": {"repairer": "resample", "search": "backward", "resample_n": 4, "min_wins": 2,
                                  "max_probes": 8},
    "resample-binary-n2": {"repairer": "resample", "search": "binary", "resample_n": 2, "max_probes": 4},
    "resample-backward-n2": {"repairer": "resample", "search": "backward", "resample_n": 2, "max_probes": 8},
}


def lines_of(tok, ids: list[int]) -> list[int]:
    from dfgen.align import step_ids

    return step_ids([tok.decode([t]) for t in ids])


def judge(oracle: dict, other: dict | None, tok) -> dict:
    """One failure: the variant's repair (``other``, a masked rollout or None) against the oracle's."""
    steps = lines_of(tok, oracle["token_ids"])
    o_root = next(t for t, m in enumerate(oracle["root_bad"]) if m)
    o_edited = {steps[t] for t, m in enumerate(oracle["mask_bad"]) if m}
    res = {"verified": 0, "root_line": 0, "root_token": 0, "false_blame_root": 0, "false_blame_any": 0}
    if other is None or other.get("repair_status") != "ok" or not any(other["root_bad"] or []):
        return res
    root = next(t for t, m in enumerate(other["root_bad"]) if m)
    marked = {steps[t] for t, m in enumerate(other["mask_bad"]) if m}
    return {"verified": 1, "root_line": int(steps[root] == steps[o_root]), "root_token": int(root == o_root),
            "false_blame_root": int(steps[root] not in o_edited), "false_blame_any": int(bool(marked - o_edited))}


def rollouts_by_key(folder: Path) -> dict:
    import polars as pl

    out = {}
    for f in sorted(folder.glob("*.parquet")):
        for g in pl.read_parquet(f).to_dicts():
            for i, r in enumerate(g["rollouts"]):
                out[(g["id"], i)] = r
    return out


def run_variant(out: Path, name: str, fields: dict, sample: Path, model: Path) -> Path:
    from dataclasses import fields as dc_fields

    from dfgen.mask import MaskConfig, run_mask
    from dfgen.repair import RepairConfig, run_repair

    known = {f.name for f in dc_fields(RepairConfig)}
    cfg = RepairConfig(rollouts=sample, out=out / name / "repair", model=model,
                       **{k: v for k, v in fields.items() if k in known})
    if not (out / name / "mask" / "_done.w000.json").exists():
        run_repair(cfg)
        run_mask(MaskConfig(repairs=out / name / "repair", out=out / name / "mask"))
    return out / name / "mask"


def summarize(oracle: dict, variant: dict, tok) -> dict:
    """Mean of ``judge`` over the oracle's repaired failures, and the variant's generated tokens."""
    keys = [k for k, r in oracle.items() if r["reward"] < 1 and r.get("repair_status") == "ok"]
    rows = [judge(oracle[k], variant.get(k), tok) for k in keys]
    n = len(rows)
    out = {m: round(sum(r[m] for r in rows) / n, 4) for m in rows[0]} if n else {}
    gen = sum((variant.get(k) or {}).get("repair_gen_tokens") or 0 for k in keys)
    ok = sum(r["verified"] for r in rows)
    if ok:
        out["root_line_of_repairs"] = round(out["root_line"] / out["verified"], 4)  # precision among its repairs
    return {**out, "failures": n, "gen_tokens": gen, "gen_tokens_per_failure": round(gen / max(n, 1), 1),
            "gen_tokens_per_repair": round(gen / ok, 1) if ok else None}


def combine(sibling: dict, other: dict, mixed: set) -> dict:
    """sibling where the group has a correct rollout, ``other`` elsewhere (charged only there)."""
    return {k: (sibling.get(k) if k[0] in mixed else other.get(k)) for k in set(sibling) | set(other)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--start", type=Path, default=START)
    ap.add_argument("--teacher", type=Path, default=None, help="a stronger policy for resample --repair-model")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args(argv)

    from dfgen.policy import load_processor
    from dfgen.sample import SampleConfig, run_sample
    from dfgen.synth.grid import GridTask, write_synth

    a.out.mkdir(parents=True, exist_ok=True)
    if not (a.out / "prompts").exists():  # the val split: no RL run trains on it, and no test problem is used
        write_synth(a.out / "prompts", a.prompts, seed=1000 + a.seed, split="val", task=GridTask(**TASK))
    sample = a.out / "sample"
    if not (sample / "_done.w000.json").exists():
        run_sample(SampleConfig(prompts=a.out / "prompts", model=a.start, out=sample, group_size=a.group_size,
                                seed=a.seed))
    tok = load_processor(a.start).tokenizer
    variants = {k: VARIANTS[k] for k in a.variants.split(",") if k}
    if a.teacher:
        variants["resample-teacher-backward-n4"] = {"repairer": "resample", "search": "backward", "resample_n": 4,
                                                    "max_probes": 8, "repair_model": a.teacher}
    oracle = rollouts_by_key(run_variant(a.out, "oracle", {"repairer": "oracle"}, sample, a.start))
    groups = {}
    for (gid, _), r in oracle.items():
        groups.setdefault(gid, []).append(r["reward"])
    mixed = {g for g, rs in groups.items() if max(rs) >= 1 > min(rs)}
    sampled = sum(len(r["token_ids"]) for r in oracle.values())
    res = {"start": str(a.start), "task": TASK, "prompts": a.prompts, "group_size": a.group_size,
           "rollouts": len(oracle), "failures": sum(r["reward"] < 1 for r in oracle.values()),
           "oracle_repaired": sum(r["reward"] < 1 and r.get("repair_status") == "ok" for r in oracle.values()),
           "failures_in_mixed_groups": sum(r["reward"] < 1 and k[0] in mixed for k, r in oracle.items()),
           "sampled_tokens_per_rollout": round(sampled / len(oracle), 1), "variants": {}}
    got = {}
    for name, fields in variants.items():
        got[name] = rollouts_by_key(run_variant(a.out, name, fields, sample, a.start))
        res["variants"][name] = summarize(oracle, got[name], tok)
        print(name, res["variants"][name], flush=True)
    if "sibling" in got:
        for name in [n for n in got if n.startswith("resample")]:
            res["variants"][f"sibling+{name}"] = summarize(oracle, combine(got["sibling"], got[name], mixed), tok)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
