"""SFT step time: the default recipe against the old one, measured side by side in one process.

Three variants of one SFT step (batch 16, the default task, the tiny policy), interleaved in rounds
so a load spike on a shared machine hits all alike; the median seconds per step of each:

* ``old``: the processor renders every batch, the vision tower trains (the recipe before the fix);
* ``frozen``: the processor renders every batch, the vision tower is frozen;
* ``default``: prompts encoded once (``dftrain.sft.encode_examples``), the tower frozen: what
  ``dftrain sft`` does now.

Run: ``python -m bench.bench_sft --json docs/bench_sft.json``
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._env import versions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.steps <= 0 or args.rounds <= 0:
        ap.error("--steps and --rounds must be positive")
    import torch

    from dfgen.images import decode_image
    from dfgen.policy import load_policy
    from dfgen.tiny import build_tiny
    from dfgen.records import load_prompts
    from dfgen.synth.grid import write_synth
    from dftrain.sft import _param_groups, encode_examples, encoded_loss, sft_loss

    torch.set_num_threads(args.threads)
    d = Path(tempfile.mkdtemp())
    write_synth(d / "train", 512, seed=0)
    build_tiny(d / "tiny")
    recs, _ = load_prompts(d / "train")
    images = [decode_image(r["image"]) for r in recs]
    t = time.time()
    encoded = encode_examples(load_policy(d / "tiny")[1], recs, images)
    encode_s = time.time() - t
    variants = {}
    for name, scale in (("old", 1.0), ("frozen", 0.0), ("default", 0.0)):
        m, p = load_policy(d / "tiny")
        m.train()
        variants[name] = (m, p, torch.optim.AdamW(_param_groups(m, scale), lr=1e-3))
    rng = random.Random(0)
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (m, p, opt) in variants.items():
            for _ in range(args.steps):
                idx = rng.sample(range(len(recs)), 16)
                t = time.perf_counter()
                if name == "default":
                    loss, _ = encoded_loss(m, p, [encoded[i] for i in idx])
                else:
                    loss, _ = sft_loss(m, p, [recs[i] for i in idx], [images[i] for i in idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"machine": f"{platform.machine()} {torch.get_num_threads()} torch threads", "versions": versions(), "steps": len(times["old"]),
           "median_s_per_step": {k: round(v, 4) for k, v in med.items()},
           "ratio_default_vs_old": round(med["default"] / med["old"], 3),
           "ratio_frozen_vs_old": round(med["frozen"] / med["old"], 3),
           "encode_s_per_1000_records": round(encode_s / len(recs) * 1000, 2)}
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
