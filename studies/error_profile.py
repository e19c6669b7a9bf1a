"""Where does a policy go wrong on the grid task? Greedy-decode and classify each failure.

For every problem, the policy's lines are compared with the canonical solution line by line and
the *first* wrong line is classified:

* ``colour``: a read step names the wrong colour (the question was misread: a text error);
* ``count``: right colour, wrong count (the image was misread: a perception error);
* ``arithmetic``: an operation line with right operands and a wrong result;
* ``carried``: an operation line whose operands differ from the canonical ones; as the *first*
  wrong line it means the policy mis-copied a value it had written right (an attention slip, as
  common as arithmetic slips on the ``+-*`` tasks);
* ``answer``: every step right, wrong final answer (or the answer does not match the last step);
* ``format``: missing/extra lines, no ``Answer:`` line.

Also reported: accuracy, ``read_acc`` (the share of read steps that are right), and ``lucky``: correct answers whose own steps are wrong (the reward
cannot tell them apart). DF's premise is that failed rollouts hold correct steps before the
error; this profile says how often that is true for a given checkpoint.

Run: ``python -m studies.error_profile runs/sft --data runs/val --n 500``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

def profile(model_dir, data, n: int) -> dict:
    from dfgen.policy import load_policy
    from dftrain.evaluate import greedy_profile

    model, processor = load_policy(model_dir)
    p = greedy_profile(model, processor, data, limit=n)
    failed = sum(p["first_error"].values())
    return {"model": str(model_dir), "n": p["n"], "accuracy": p["accuracy"], "steps_right": p["steps_right"],
            "lucky": p["accuracy"] - p["steps_right"], "read_acc": round(p["read_acc"], 4), "failed": failed,
            "failed_with_prefix": round(p["failed_with_prefix"], 3),
            "first_error": {k: round(v / max(failed, 1), 3) for k, v in sorted(p["first_error"].items(),
                                                                                 key=lambda kv: -kv[1])}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    for m in args.models:
        if not (Path(m) / "config.json").is_file():
            ap.error(f"{m} is not a policy folder (no config.json)")
    if args.n < 1:
        ap.error("--n must be positive")
    if not Path(args.data).exists():
        ap.error(f"--data {args.data} does not exist")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for m in args.models:
        print(json.dumps(profile(m, args.data, args.n)), flush=True)


if __name__ == "__main__":
    main()
