"""The perception ladder: does the default recipe give a policy that reads its question and image?

Each probe is a task setting plus an SFT recipe. For each, the script writes ``--n-train`` train
and ``--n-val`` val problems (``dfgen synth``; val is disjoint by construction), builds a fresh
tiny policy (``dfgen tiny``), runs ``dftrain sft`` (defaults unless ``--sft`` overrides them) and
prints one JSON line:

* ``accuracy``, ``steps_right`` (every line right), ``first_error`` kinds, ``failed_with_prefix``
  (greedy, held-out: ``dftrain.evaluate.greedy_profile``), ``majority`` (the accuracy of always
  answering the val split's most common answer: the bar a blind policy clears);
* ``curve``: the same held-out profile every ``--eval-every`` steps (where the jump happens);
* ``dependence``: ``dftrain.perception.read_dependence`` (does the read position depend on the
  question and on the image?) and ``features``: ``dftrain.perception.feature_probe`` (can a linear
  probe still read each colour's count from the vision features the LM receives?), before and
  after SFT.

The ladder (``--probes``, default all three) is the acceptance of the issue "The embedded policy
must see": ``presence`` (1 read, at most one cell per colour), ``count`` (1 read, default board),
``default`` (the default task, 2-3 reads). ``--task`` adds a custom probe (GridTask JSON).

Resumable: each finished probe is a line in ``OUT/probes.jsonl``; a rerun skips it (``--force``
reruns). One heavy job at a time on 2 cores.

Run: ``python -m studies.perception_probe --out runs/probe``
     ``python -m studies.perception_probe --out runs/probe_lr3 --probes count --sft '{"lr": 3e-3}'``
"""
from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

LADDER = {
    "presence": {"min_reads": 1, "max_reads": 1, "max_count": 1},
    "count": {"min_reads": 1, "max_reads": 1},
    "default": {},
}


def _json_arg(s: str) -> dict:
    try:
        v = json.loads(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return v


def majority(val_dir: Path) -> float:
    from dfgen.records import load_prompts

    recs, _ = load_prompts(val_dir)
    return Counter(r["answer"] for r in recs).most_common(1)[0][1] / len(recs)


def run_probe(name: str, task_kw: dict, args) -> dict:
    from dfgen.policy import load_policy
    from dfgen.tiny import build_tiny
    from dfgen.synth.grid import GridTask, write_synth
    from dftrain.perception import feature_probe, read_dependence
    from dftrain.sft import SFTConfig, run_sft

    d = args.out / name
    task = GridTask(**task_kw)
    for split, n in (("train", args.n_train), ("val", args.n_val)):
        if not (d / split / "config.json").exists():
            shutil.rmtree(d / split, ignore_errors=True)
            write_synth(d / split, n, seed=args.seed, split=split, task=task)
    build_tiny(d / "tiny", seed=args.seed, **args.model)
    m0, p0 = load_policy(d / "tiny")
    before = {"dependence": read_dependence(m0, p0, task), "features": feature_probe(m0, p0, task)}
    t = time.time()
    cfg = SFTConfig(data=d / "train", model=d / "tiny", out=d / "sft", seed=args.seed, eval_data=d / "val",
                    eval_n=args.n_val, eval_every=args.eval_every, **args.sft)
    res = run_sft(cfg)
    wall = time.time() - t
    m, p = load_policy(d / "sft")
    after = {"dependence": read_dependence(m, p, task), "features": feature_probe(m, p, task)}
    h = res["heldout"]
    return {"probe": name, "task": task_kw, "model": args.model, "sft": {k: v for k, v in vars(cfg).items()
                                                                        if k not in ("data", "model", "out", "eval_data")},
            "n_train": args.n_train, "n_val": args.n_val, "accuracy": h["accuracy"], "steps_right": h["steps_right"],
            "majority": round(majority(d / "val"), 4), "first_error": h["first_error"],
            "failed_with_prefix": h["failed_with_prefix"], "read_acc": h["read_acc"], "final_loss": res["final_loss"],
            "train_seconds": res["train_seconds"], "wall_seconds": round(wall, 1),
            "curve": [{k: c[k] for k in ("step", "accuracy", "steps_right", "read_acc", "failed_with_prefix",
                                         "first_error")} for c in res["curve"]],
            "before": before, "after": after}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--probes", default="presence,count,default", help="comma list of " + ", ".join(LADDER))
    ap.add_argument("--task", type=_json_arg, default=None, help="extra probe: GridTask knobs as JSON")
    ap.add_argument("--name", default="custom", help="name of the --task probe")
    ap.add_argument("--sft", type=_json_arg, default={}, help="SFTConfig overrides as JSON, e.g. '{\"lr\": 3e-3}'")
    ap.add_argument("--model", type=_json_arg, default={}, help="build_tiny overrides, e.g. '{\"hidden\": 256}'")
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="rerun probes already in probes.jsonl")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.probes.split(",") if s.strip()]
    if args.task is not None and args.probes == ap.get_default("probes"):
        names = []  # --task alone runs only that probe
    for p in names:
        if p not in LADDER:
            ap.error(f"unknown probe {p!r}; choose from {', '.join(LADDER)}")
    probes = {p: LADDER[p] for p in names}
    if args.task is not None:
        probes[args.name] = args.task
    if args.n_train <= 0 or args.n_val <= 0 or args.eval_every < 0:
        ap.error("--n-train and --n-val must be positive, --eval-every >= 0")
    from dftrain.sft import SFTConfig

    fields = set(SFTConfig.__dataclass_fields__) - {"data", "model", "out", "eval_data", "eval_n", "eval_every", "seed"}
    bad = set(args.sft) - fields
    if bad:
        ap.error(f"unknown --sft keys {sorted(bad)}; choose from {sorted(fields)}")
    from dfgen.tiny import build_tiny

    bad = set(args.model) - (set(inspect.signature(build_tiny).parameters) - {"out", "seed"})
    if bad:
        ap.error(f"unknown --model keys {sorted(bad)}; build_tiny takes hidden, layers, heads, vision_depth")
    from dfgen.synth.grid import GridTask

    for name, kw in probes.items():
        try:
            GridTask(**kw).validate()
        except (TypeError, ValueError) as e:
            ap.error(f"probe {name}: bad task {kw}: {e}")

    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "probes.jsonl"
    done = {json.loads(line)["probe"] for line in log.read_text().splitlines()} if log.exists() and not args.force else set()
    for name, kw in probes.items():
        if name in done:
            print(f"# {name}: already in {log}", file=sys.stderr)
            continue
        rec = run_probe(name, kw, args)
        line = json.dumps(rec)
        with log.open("a") as fh:
            fh.write(line + "\n")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
