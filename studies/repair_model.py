"""A learned repairer for the study: the ``model`` repairer beside the oracle (issue 19, part 2).

No real user has an oracle. A real user has a stronger model that, shown the image, the question,
the reference answer and a wrong solution, writes a corrected one. On the embedded task that
model is built here, from data the oracle never sees at run time:

1. the study's SFT start samples ``--prompts`` fresh *train* problems (``--group-size`` rollouts,
   temperature 1; seed ``--seed``, not a seed any study loop draws its prompts from);
2. the oracle repairs the failures; each verified repair becomes one SFT record: the repair
   prompt (``dfgen/templates/repair_prompt.txt``, what ``--repairer model`` sends) with the image,
   and the repaired text as the target;
3. ``dftrain sft`` fine-tunes the SFT start on those records (vision tower frozen, as always),
   ``OUT/model``: a repair model of the policy's own size;
4. held-out check: on failures of ``--check-prompts`` other train problems, the verified-repair rate
   of ``dfgen repair --repairer model`` with that model against the oracle's, the share of the
   model's verified repairs equal to the oracle's, and the edit ratio of each (``OUT/check.json``).

The study then runs ``studies/options_screen.py --variants model --repair-model OUT/model``: the
same loop with this model repairing every round's failures and the verifier keeping only repairs
whose answer is right and whose edit ratio is under the bound (the oracle plays no part there).

Run: ``python -m studies.repair_model --setting runs/study19/times34 --out runs/study19/repairer``
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def repair_records(rep_dir: Path, template: str) -> list[dict]:
    """SFT records from oracle-repaired sample shards: the repair prompt in, the verified repair out."""
    from dfgen.shards import open_shards

    recs = []
    for row in open_shards(rep_dir).iter_rows():
        for i, r in enumerate(row["rollouts"]):
            if r.get("repair_status") != "ok":
                continue
            q = template.format(question=row["question"], reference_answer=row["answer"], solution=r["text"])
            recs.append({"id": f"{row['id']}-r{i}", "question": q, "image": row["image"], "image_path": None,
                         "answer": row["answer"], "answer_type": row.get("answer_type"), "choices": None,
                         "precision": None, "unit": None, "source": "repair", "category": None,
                         "solution": json.dumps({"text": r["repaired_text"]}), "meta": None})
    return recs


def summary(rep_dir: Path) -> dict:
    from dfgen.shards import open_shards

    st = {"failed": 0, "ok": 0, "edit_ratio_ok": [], "texts": {}}
    for row in open_shards(rep_dir).iter_rows():
        for i, r in enumerate(row["rollouts"]):
            if r["reward"] is None or r["reward"] >= 1:
                continue
            st["failed"] += 1
            if r.get("repair_status") == "ok":
                st["ok"] += 1
                st["edit_ratio_ok"].append(r["edit_ratio"])
                st["texts"][(row["id"], i)] = r["repaired_text"]
    return st


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", type=Path, required=True, help="a studies/experiment.py folder (its SFT start and task)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=1500)
    ap.add_argument("--check-prompts", type=int, default=200)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=777_000)
    args = ap.parse_args()
    res_f = args.setting / "results.json"
    if not res_f.is_file():
        ap.error(f"--setting {args.setting}: no results.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dfgen.repair import RepairConfig, run_repair
    from dfgen.sample import SampleConfig, run_sample
    from dfgen.shards import ShardWriter, write_json_atomic
    from dfgen.synth.grid import GridTask, write_synth
    from dftrain.sft import SFTConfig, run_sft

    conf = json.loads(res_f.read_text())["config"]
    task, sft = GridTask(**json.loads(conf["task"])), Path(conf["sft"])
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    template = (Path(__file__).resolve().parents[1] / "dfgen" / "templates" / "repair_prompt.txt").read_text()
    t0 = time.time()
    for name, n, seed in (("train", args.prompts, args.seed), ("check", args.check_prompts, args.seed + 1)):
        d = out / name
        if not (d / "prompts" / "config.json").exists():
            write_synth(d / "prompts", n, seed=seed, split="train", task=task)
        if not (d / "sample" / "config.json").exists():
            run_sample(SampleConfig(prompts=d / "prompts", model=sft, out=d / "sample", group_size=args.group_size,
                                    temperature=1.0, seed=seed, chunk_size=64))
        if not (d / "oracle" / "config.json").exists():
            run_repair(RepairConfig(rollouts=d / "sample", out=d / "oracle", repairer="oracle"))
    if not (out / "records" / "config.json").exists():
        recs = repair_records(out / "train" / "oracle", template)
        w = ShardWriter(out / "records", "prompts", {"source": "oracle repairs of the SFT start's samples"})
        w.write(0, recs)
        write_json_atomic(out / "records" / "config.json", {"n": len(recs)})
    if not (out / "model" / "config.json").exists():
        run_sft(SFTConfig(data=out / "records", model=sft, out=out / "model", steps=args.steps, lr=args.lr,
                          seed=args.seed))
    if not (out / "check" / "model" / "config.json").exists():
        run_repair(RepairConfig(rollouts=out / "check" / "sample", out=out / "check" / "model", repairer="model",
                                repair_model=out / "model"))
    o, m = summary(out / "check" / "oracle"), summary(out / "check" / "model")
    same = sum(m["texts"].get(k) == v for k, v in o["texts"].items() if k in m["texts"])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    check = {"records": json.loads((out / "records" / "config.json").read_text())["n"], "failed": o["failed"],
             "oracle_verified": o["ok"] / max(1, o["failed"]), "model_verified": m["ok"] / max(1, m["failed"]),
             "model_equal_to_oracle": same / max(1, m["ok"]),
             "edit_ratio_oracle": mean(o["edit_ratio_ok"]), "edit_ratio_model": mean(m["edit_ratio_ok"]),
             "seconds": round(time.time() - t0, 1), "settings": {k: str(v) for k, v in vars(args).items()}}
    write_json_atomic(out / "check.json", check)
    print(json.dumps(check, indent=2))


if __name__ == "__main__":
    main()
