"""Speed of the token alignment that `dfgen mask` runs on every (bad, repaired) pair.

Random pairs of ~L-token id lists (length uniform in [0.9 L, 1.1 L]); the repair edits each token
with probability --edit-rate, a substitution, deletion or insertion with equal chance. Timed in one
run, in the same order on the same pairs:
  align     dfgen.align.align: the full result (masks, root masks, distance), what the pipeline pays
  rapidfuzz bare rapidfuzz Levenshtein.opcodes (the alignment alone, as the Opcodes object)
  difflib   difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes(), the baseline
The pairs are split into chunks and each chunk is timed for all methods back to back, so a load
spike on a shared machine hits every method alike; the whole pass is repeated --repeat times and
each method's fastest pass is reported (timeit's convention).

    python -m bench.bench_align --pairs 10000 --length 300 --edit-rate 0.1 --seed 0 --json docs/bench_align.json
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import random
import time
from pathlib import Path

import rapidfuzz
from rapidfuzz.distance import Levenshtein

from bench._env import versions

from dfgen.align import align


def make_pairs(n: int, length: int, edit_rate: float, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        bad = [rng.randrange(vocab) for _ in range(rng.randint(int(0.9 * length), int(1.1 * length)))]
        rep = []
        for tok in bad:
            if rng.random() >= edit_rate:
                rep.append(tok)
                continue
            kind = rng.randrange(3)
            if kind == 0:  # substitute
                rep.append(rng.randrange(vocab))
            elif kind == 2:  # insert after
                rep += [tok, rng.randrange(vocab)]
            # kind == 1: delete
        pairs.append((bad, rep))
    return pairs


METHODS = {
    "align": align,
    "rapidfuzz": Levenshtein.opcodes,
    "difflib": lambda a, b: difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n")[-1])
    ap.add_argument("--pairs", type=int, default=10000, help="number of (bad, repaired) pairs")
    ap.add_argument("--length", type=int, default=300, help="mean trajectory length in tokens")
    ap.add_argument("--edit-rate", type=float, default=0.1, help="probability that a token is edited")
    ap.add_argument("--vocab", type=int, default=1000, help="token id range (the tiny tokenizer has ~1k)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="passes over all pairs; the fastest is reported")
    ap.add_argument("--chunk", type=int, default=250, help="pairs per interleaved timing chunk")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    pairs = make_pairs(args.pairs, args.length, args.edit_rate, args.vocab, args.seed)
    best = {name: float("inf") for name in METHODS}
    for _ in range(args.repeat):
        total = dict.fromkeys(METHODS, 0.0)
        for lo in range(0, len(pairs), args.chunk):
            chunk = pairs[lo : lo + args.chunk]
            for name, fn in METHODS.items():
                t0 = time.perf_counter()
                for a, b in chunk:
                    fn(a, b)
                total[name] += time.perf_counter() - t0
        best = {name: min(best[name], total[name]) for name in METHODS}

    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "rapidfuzz": rapidfuzz.__version__,
    }
    mean_len = sum(len(a) for a, _ in pairs) / max(len(pairs), 1)
    mean_dist = sum(len(Levenshtein.editops(a, b)) for a, b in pairs[:1000]) / max(min(len(pairs), 1000), 1)
    results = {
        name: {"seconds": s, "pairs_per_s": len(pairs) / s, "us_per_pair": 1e6 * s / len(pairs)}
        for name, s in best.items()
    }
    speedup = {
        "align_vs_difflib": best["difflib"] / best["align"],
        "rapidfuzz_vs_difflib": best["difflib"] / best["rapidfuzz"],
        "align_overhead_vs_rapidfuzz": best["align"] / best["rapidfuzz"],
    }

    print(f"machine: {machine['processor']}, {machine['cpu_count']} CPUs, "
          f"python {machine['python']}, rapidfuzz {machine['rapidfuzz']}")
    print(f"{len(pairs)} pairs, mean length {mean_len:.0f}, mean edit distance {mean_dist:.1f}, "
          f"fastest of {args.repeat} passes")
    for name, r in results.items():
        print(f"  {name:10s} {r['pairs_per_s']:>10,.0f} pairs/s  {r['us_per_pair']:7.1f} us/pair  {r['seconds']:.3f} s")
    print(f"speed-up vs difflib: align {speedup['align_vs_difflib']:.1f}x, "
          f"bare rapidfuzz {speedup['rapidfuzz_vs_difflib']:.1f}x "
          f"(align costs {speedup['align_overhead_vs_rapidfuzz']:.2f}x bare rapidfuzz)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "machine": machine, "versions": versions(), "mean_length": mean_len, "mean_distance": mean_dist,
                   "results": results, "speedup": speedup}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
