"""``make demo``: the whole method on the embedded default, offline, on a CPU, in minutes.

1. ``dfgen synth``: train and held-out test prompts (disjoint by construction);
2. ``dfgen tiny`` + ``dftrain sft``: build the tiny Qwen2-VL and warm-start it;
3. greedy held-out accuracy *before* RL;
4. ``--rounds`` rounds of the decoupled pipeline, each round's checkpoint sampling the next
   round's shards: ``dfgen sample`` -> ``dfgen repair --repairer oracle`` -> ``dfgen mask`` ->
   ``dftrain fit --objective df-grpo``;
5. greedy held-out accuracy *after*, the HTML report of the last round, and where everything is.

Everything lands in ``runs/demo/`` (``--out``). The run is resumable at stage granularity: a
stage whose output already exists is skipped (delete ``runs/demo`` to start over).

Run: ``python -m dftrain.demo`` (or ``make demo``); ``--quick`` for a seconds-long miniature.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--quick", action="store_true", help="a miniature run (tests use it)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    from rich.console import Console

    from dfgen.mask import MaskConfig, run_mask
    from dfgen.policy import build_tiny, load_policy
    from dfgen.repair import RepairConfig, run_repair
    from dfgen.report import write_report
    from dfgen.sample import SampleConfig, run_sample
    from dfgen.stats import compute_stats
    from dfgen.synth.grid import write_synth
    from dftrain.evaluate import greedy_accuracy
    from dftrain.fit import FitConfig, run_fit
    from dftrain.sft import SFTConfig, run_sft

    con = Console()
    q = args.quick
    n_train, n_test = (256, 32) if q else (4000, 500)
    sft_steps, sft_bs = (30, 16) if q else (600, 16)
    prompts_per_round, G, fit_steps = (8, 4, 2) if q else (96, 8, 12)
    rounds = 1 if q else args.rounds
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def stage(name):
        con.print(f"[bold]== {name}[/bold] ({time.time() - t0:.0f}s)")

    if not (out / "train").exists():
        stage("synthesize prompts")
        write_synth(out / "train", n_train, seed=args.seed, split="train")
        write_synth(out / "test", n_test, seed=args.seed, split="test")
    if not (out / "tiny" / "config.json").exists():
        stage("build the tiny Qwen2-VL policy")
        build_tiny(out / "tiny", seed=args.seed)
    if not (out / "sft" / "config.json").exists():
        stage(f"SFT warm start ({sft_steps} steps)")
        run_sft(SFTConfig(data=out / "train", model=out / "tiny", out=out / "sft", steps=sft_steps,
                                batch_size=sft_bs, seed=args.seed),
                      progress=lambda r: con.print(f"  step {r['step']}/{sft_steps} | loss {r['loss']:.4f}"))
    stage("held-out accuracy before RL")
    m, p = load_policy(out / "sft")
    before = greedy_accuracy(m, p, out / "test", limit=n_test)
    con.print(f"  greedy accuracy on {n_test} held-out problems: {before:.3f}")
    policy = out / "sft"
    for r in range(rounds):
        rd = out / f"round{r}"
        stage(f"round {r}: sample -> repair -> mask -> fit")
        if not (rd / "fit" / "config.json").exists():
            if not (rd / "prompts").exists():  # fresh training prompts each round (never test ones)
                write_synth(rd / "prompts", prompts_per_round, seed=args.seed + 1000 + r, split="train")
            st = run_sample(SampleConfig(prompts=rd / "prompts", model=policy, out=rd / "sample", group_size=G,
                                         seed=args.seed + 1000 * r, chunk_size=16))
            run_repair(RepairConfig(rollouts=rd / "sample", out=rd / "repair", repairer="oracle"))
            run_mask(MaskConfig(repairs=rd / "repair", out=rd / "df"))
            s = compute_stats(rd / "df")
            con.print(f"  sampled {st['rollouts']} rollouts: reward {s['mean_reward']:.3f}, mixed groups "
                      f"{s['mixed_groups']:.2f}, repaired {s.get('repair_success_rate', 0):.2f} of failures, "
                      f"mask density {s.get('mask_density', 0):.3f}")
            run_fit(FitConfig(data=rd / "df", model=policy, out=rd / "fit", objective="df-grpo", steps=fit_steps,
                              groups_per_step=8, updates_per_batch=2, lr=2e-5, seed=args.seed + r),
                    log=lambda msg: con.print("  " + msg))
        policy = rd / "fit"
    stage("held-out accuracy after RL")
    m, p = load_policy(policy)
    after = greedy_accuracy(m, p, out / "test", limit=n_test)
    last = out / f"round{rounds - 1}"
    write_report(last / "df", out / "report.html", groups=20)
    result = {"before": before, "after": after, "n_test": n_test, "rounds": rounds,
              "seconds": round(time.time() - t0, 1), "final_model": str(policy)}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    con.print(f"\n[bold]held-out greedy accuracy: before RL {before:.3f} -> after {rounds} DF-GRPO round(s) "
              f"{after:.3f}[/bold] ({n_test} problems; a single eval swings a few points)")
    con.print(f"shards: {out}/round*/{{sample,repair,df}}   checkpoints: {out}/round*/fit   "
              f"report: {out}/report.html   learning curves: {out}/round*/fit/metrics.jsonl")
    con.print(f"total time {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
