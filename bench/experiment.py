"""GRPO vs DF-GRPO from the same SFT checkpoint, paired by seed, on the embedded default.

For each seed and arm: ``--rounds`` rounds of the decoupled pipeline (fresh training prompts per
round, identical across arms for a seed; sample -> [repair -> mask] -> fit), greedy accuracy on
``--eval-n`` held-out problems after every round. Arms differ only in the objective (and the
DF arm's repair/mask stages, whose compute is reported). Matched compute (a): the same sampled
rollouts and gradient steps. Results: per-seed accuracies (mean of the last ``--avg-last``
evaluations), the paired difference with a 95% t-interval, mechanism statistics (mask density,
share of failed rollouts whose first error is not in the first step, negative-gradient mass DF
keeps), and a JSON + PNG under ``--out``.

Run (CPU, ~20 min): ``python bench/experiment.py --seeds 5 --rounds 4 --out runs/exp``
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def mechanism(df_dir: Path, kappa: float) -> dict:
    import polars as pl

    f = pl.read_parquet(str(df_dir / "*.parquet")).explode("rollouts").unnest("rollouts")
    ok = f.filter((pl.col("reward") < 1) & (pl.col("repair_status") == "ok"))
    if ok.height == 0:
        return {}
    m = ok.select(pl.col("mask_bad").list.sum().alias("k"), pl.col("mask_bad").list.len().alias("n"),
                  pl.col("mask_bad").list.eval(pl.element().arg_max()).list.first().alias("first"),
                  pl.col("token_ids").alias("ids"))
    tokens, marked = int(m["n"].sum()), int(m["k"].sum())
    return {"failed_repaired": ok.height, "mask_density": marked / tokens,
            "neg_mass_kept": (marked + kappa * (tokens - marked)) / tokens,
            # a first edit beyond the first ~6 tokens ("Step 1: red = N") means step 1 was right
            "first_error_after_step1": float((m["first"] > 6).mean())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/exp"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompts-per-round", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--fit-steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kappa", type=float, default=0.1)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--avg-last", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=600)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    from dfgen.mask import MaskConfig, run_mask
    from dfgen.policy import build_tiny, load_policy
    from dfgen.repair import RepairConfig, run_repair
    from dfgen.sample import SampleConfig, run_sample
    from dfgen.synth.grid import write_synth
    from dftrain.evaluate import greedy_accuracy
    from dftrain.fit import FitConfig, run_fit
    from dftrain.sft import SFTConfig, run_sft

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "test").exists():
        write_synth(out / "test", args.eval_n, seed=0, split="test")
        write_synth(out / "train", 4000, seed=0, split="train")
        build_tiny(out / "tiny")
        run_sft(SFTConfig(data=out / "train", model=out / "tiny", out=out / "sft", steps=args.sft_steps))
    m, p = load_policy(out / "sft")
    sft_acc = greedy_accuracy(m, p, out / "test", limit=args.eval_n)
    print(f"SFT start: {sft_acc:.4f}", flush=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    results.setdefault("config", vars(args) | {"out": str(out)})
    results["sft_accuracy"] = sft_acc
    runs = results.setdefault("runs", {})
    for seed in range(args.seeds):
        for arm in ("grpo", "df-grpo"):
            key = f"{arm}/s{seed}"
            if key in runs:
                continue
            policy, evals, mech, t0, gen_tokens = out / "sft", [], [], time.time(), 0
            for r in range(args.rounds):
                rd = out / key / f"round{r}"
                prompts = out / f"prompts/s{seed}r{r}"
                if not prompts.exists():
                    write_synth(prompts, args.prompts_per_round, seed=10_000 + 100 * seed + r, split="train")
                st = run_sample(SampleConfig(prompts=prompts, model=policy, out=rd / "sample",
                                             group_size=args.group_size, seed=1000 * seed + r, chunk_size=32))
                gen_tokens += st["tokens"]
                data = rd / "sample"
                if arm == "df-grpo":
                    run_repair(RepairConfig(rollouts=rd / "sample", out=rd / "repair"))
                    run_mask(MaskConfig(repairs=rd / "repair", out=rd / "df"))
                    data = rd / "df"
                    mech.append(mechanism(rd / "df", args.kappa))
                run_fit(FitConfig(data=data, model=policy, out=rd / "fit", objective=arm, steps=args.fit_steps,
                                  groups_per_step=8, updates_per_batch=2, lr=args.lr, kappa=args.kappa,
                                  seed=seed), log=lambda msg: None)
                policy = rd / "fit"
                m, p = load_policy(policy)
                evals.append(greedy_accuracy(m, p, out / "test", limit=args.eval_n))
            runs[key] = {"evals": evals, "final": sum(evals[-args.avg_last:]) / args.avg_last,
                         "seconds": round(time.time() - t0, 1), "generated_tokens": gen_tokens, "mechanism": mech}
            print(f"{key}: evals {[round(e, 3) for e in evals]} ({runs[key]['seconds']}s)", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    seeds = [s for s in range(args.seeds) if f"grpo/s{s}" in runs and f"df-grpo/s{s}" in runs]
    diffs = [runs[f"df-grpo/s{s}"]["final"] - runs[f"grpo/s{s}"]["final"] for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else float("nan")
    results["summary"] = {"seeds": n, "grpo_mean": sum(runs[f"grpo/s{s}"]["final"] for s in seeds) / n,
                          "df_mean": sum(runs[f"df-grpo/s{s}"]["final"] for s in seeds) / n,
                          "paired_diff_mean": mean, "paired_diff_ci95": [mean - half, mean + half],
                          "diffs": diffs}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        rollouts_per_round = args.prompts_per_round * args.group_size
        for arm, color in (("grpo", "tab:blue"), ("df-grpo", "tab:red")):
            for s in seeds:
                ev = runs[f"{arm}/s{s}"]["evals"]
                xs = [rollouts_per_round * (k + 1) for k in range(len(ev))]
                ax.plot([0] + xs, [sft_acc] + ev, color=color, alpha=0.35)
            mean_curve = [sum(runs[f"{arm}/s{s}"]["evals"][k] for s in seeds) / n for k in range(args.rounds)]
            ax.plot([0] + [rollouts_per_round * (k + 1) for k in range(args.rounds)], [sft_acc] + mean_curve,
                    color=color, lw=2.5, label=f"{arm} (mean of {n} seeds)")
        ax.set_xlabel("sampled rollouts")
        ax.set_ylabel(f"greedy accuracy ({args.eval_n} held-out)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
