"""The paired DF - GRPO difference by where the SFT start's first error falls (the hypothesis curve).

Reads ``studies/experiment.py`` results (``summary.a_df_minus_grpo_by_sft_prefix``: test problems
bucketed by the share f of canonical lines the start got right before its first error) for one or
more settings and draws mean and 95% interval per bucket, one line per setting.

Run: ``python -m studies.plot_by_prefix --out docs/study19/by_prefix.png
A=docs/study19/times34/results.json B=docs/study19/times23/results.json``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["right", "f<0.5", "0.5-0.75", "0.75-1", "f=1"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("settings", nargs="+", help="NAME=results.json")
    args = ap.parse_args()
    loaded = []
    for spec in args.settings:  # bad arguments: one line (argparse's error, exit 2), before any drawing
        name, _, path = spec.partition("=")
        try:
            s = json.loads(Path(path).read_text())["summary"]
            s["a_df_minus_grpo_by_sft_prefix"], s["bucket_sizes"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"{spec!r}: not NAME=results.json of studies/experiment.py with per-prefix results ({e!r})")
        loaded.append((name, s))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (name, s) in enumerate(loaded):
        by, sizes = s["a_df_minus_grpo_by_sft_prefix"], s["bucket_sizes"]
        xs = [i + 0.08 * (k - (len(loaded) - 1) / 2) for i in range(len(ORDER))]
        ys = [100 * by[b]["mean"] for b in ORDER]
        err = [[100 * (by[b]["mean"] - by[b]["ci95"][0]) for b in ORDER],
               [100 * (by[b]["ci95"][1] - by[b]["mean"]) for b in ORDER]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3,
                    label=f"{name} (n per bucket: {', '.join(str(sizes[b]) for b in ORDER)})")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(ORDER)), ["start right", "f < 0.5", "0.5-0.75", "0.75-1", "f = 1"])
    ax.set_xlabel("where the SFT start's first error falls (share f of the chain right before it)")
    ax.set_ylabel("DF-GRPO - GRPO accuracy (points, 95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
