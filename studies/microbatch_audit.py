"""Was the committed DF study trained on the objective it reports? (issue "The trainer's batch")

Before ``dftrain.batch.Batch``, ``dftrain fit`` scaled each micro-batch by its own share of the
step's denominator. For token-mean (the study's aggregation) that is exact for every micro-batch
holding at least one counted token, and wrong for a micro-batch of repaired rows only (not in the
denominator): its share was 0, so its term vanished. At the study's ``--micro-batch 64`` with
8 groups x 8 rollouts per step, that happens on a step whose rows past the 64th are all repaired.
Only arms with repaired samples (``--repaired-weight > 0``) can be affected; the GRPO arms and the
mask-alone DF arm have no repaired rows.

This reruns the study's default DF arm (``rep+allfail``: the committed
``docs/study19/times34/options/runs/rep+allfail/lr3e-05/s*/loop.json`` settings, from
``data/policies/regime_start``) with the fixed trainer, then, for every fit step of every round,
rebuilds the step's rows exactly as fit ordered them (same shards, stream seed and buffer) and
counts the steps whose tail micro-batch held only repaired rows. The rerun's trajectory equals the
original's up to the first such step (the two trainers agree everywhere else), so a count of 0 in
the rerun means the original had none either; its accuracies are compared with the committed ones.

Run (resumable; about 3 min per seed on 2 cores):
    python studies/microbatch_audit.py --out runs/audit --json docs/study19/microbatch_audit.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARM = ROOT / "docs/study19/times34/options/runs/rep+allfail/lr3e-05"
START = ROOT / "data/policies/regime_start"


def tails(fit_dir: Path, micro_batch: int) -> dict:
    """Steps of one round's fit whose rows past the first micro-batches form a repaired-only micro-batch."""
    from dfgen.shards import open_shards
    from dftrain.batch import build_rows
    from dftrain.data import GroupStream
    from dftrain.fit import FitConfig

    conf = json.loads((fit_dir / "fit_config.json").read_text())
    cfg = FitConfig(**{k: v for k, v in conf.items() if k in FitConfig.__dataclass_fields__})
    stream = GroupStream(open_shards(Path(conf["data"])), seed=cfg.seed, buffer_size=cfg.buffer_size)
    bad, repaired, rows_n = 0, [], []
    for _ in range(cfg.steps):
        groups = stream.take(cfg.groups_per_step)
        for g in groups:
            g["_image"] = None
        rows = build_rows(groups, cfg)
        micro = [rows[k: k + micro_batch] for k in range(0, len(rows), micro_batch)]
        bad += any(all(r.repaired for r in mb) for mb in micro)
        repaired.append(sum(r.repaired for r in rows))
        rows_n.append(len(rows))
    return {"steps": cfg.steps, "repaired_only_micro_batch": bad, "repaired_rows": repaired, "rows": rows_n}


def run_seed(seed: int, out: Path, sets: dict, threads: int) -> Path:
    import torch

    from dftrain.loop import LoopConfig, run_loop

    conf = json.loads((ARM / f"s{seed}" / "loop.json").read_text())["config"]
    conf |= {"model": str(START), "out": str(out / f"s{seed}"), "eval": [str(sets["val"]), str(sets["test"])]}
    torch.set_num_threads(threads)
    with open(out / f"s{seed}.log", "a") as logf:
        run_loop(LoopConfig(**conf), log=lambda m: (logf.write(m + "\n"), logf.flush()))
    return out / f"s{seed}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    ap.add_argument("--micro-batch", type=int, default=64, help="the study's (fit's default then)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dfgen.synth.grid import GridTask, write_synth

    args.out.mkdir(parents=True, exist_ok=True)
    conf0 = json.loads((ARM / "s0" / "loop.json").read_text())["config"]
    sets = {"val": args.out / "val", "test": args.out / "test"}  # as studies/experiment.py made them
    if not sets["val"].exists():
        write_synth(sets["test"], 1000, seed=0, split="test", task=GridTask(**conf0["task"]))
        write_synth(sets["val"], 500, seed=0, split="val", task=GridTask(**conf0["task"]))
    report = json.loads(args.json.read_text()) if args.json.exists() else {"seeds": {}}
    report["what"] = __doc__.split("\n\n")[1].replace("\n", " ")
    for seed in [int(s) for s in args.seeds.split(",")]:
        if str(seed) in report["seeds"]:
            continue
        t0 = time.time()
        run_dir = run_seed(seed, args.out, sets, args.threads)
        committed = json.loads((ARM / f"s{seed}" / "loop.json").read_text())["rounds"]
        rerun = json.loads((run_dir / "loop.json").read_text())["rounds"]
        report["seeds"][str(seed)] = {
            "rounds": [tails(run_dir / f"round_{r:03d}" / "fit", args.micro_batch) for r in range(len(rerun))],
            "accuracy_committed": [c.get("accuracy", {}) for c in committed],
            "accuracy_rerun": [c.get("accuracy", {}) for c in rerun],
            "seconds": round(time.time() - t0, 1)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        s = report["seeds"][str(seed)]
        print(f"seed {seed}: {sum(r['repaired_only_micro_batch'] for r in s['rounds'])} steps with a repaired-only "
              f"micro-batch; min repaired rows per step {min(x for r in s['rounds'] for x in r['repaired_rows'])}; "
              f"final test committed {s['accuracy_committed'][-1].get('test')} rerun {s['accuracy_rerun'][-1].get('test')}",
              flush=True)
    steps = [r for s in report["seeds"].values() for r in s["rounds"]]
    report["total"] = {"fit_steps": sum(r["steps"] for r in steps),
                       "steps_with_repaired_only_micro_batch": sum(r["repaired_only_micro_batch"] for r in steps)}
    args.json.write_text(json.dumps(report, indent=1))
    print(report["total"])


if __name__ == "__main__":
    main()
