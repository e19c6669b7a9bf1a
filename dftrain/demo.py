"""``make demo``: GRPO and DF-GRPO side by side on the embedded default, offline, on a CPU, in minutes.

1. the start: the research-regime policy shipped in ``data/policies/regime_start`` (the tiny
   Qwen2-VL after the sighted SFT recipe and 500 steps on the ``times`` grid task, 3-4 reads: it
   reads its images, and its failures are slips after correct steps; docs/RESULTS.md). With
   ``--from-scratch`` the demo rebuilds it instead (``dfgen tiny`` -> ``dftrain sft`` on the
   default task -> 500 steps on the times task; ~9 minutes more on 2 cores);
2. ``dfgen synth``: held-out test problems of that task;
3. greedy held-out accuracy and every-step-right of the start;
4. three ``dftrain loop`` runs from that start, identical except for their objective and repairer:
   the same fresh prompts every round, the same seeds, the same rounds of ``dfgen sample`` ->
   [``dfgen repair`` -> ``dfgen mask``] -> ``dftrain fit`` (the fit/loop defaults: DF's root mask, its
   repaired samples and its all-fail term, as the study chose them on val): ``grpo``; ``df-grpo`` with
   the oracle repairer (reads the task's step solution); ``df-no-oracle`` with ``sibling-resample``
   (what a user without step solutions gets: no solution read, every probe token counted);
5. every arm's held-out accuracy, every-step-right and lucky rate side by side, the tokens each
   generated, the HTML report of DF's last round, and where everything is.

One seed is noisy: the paired study with 8 seeds is the first section of docs/RESULTS.md.
Everything lands in ``runs/demo/`` (``--out``); each arm resumes at round granularity (delete
``runs/demo`` to start over).

Run: ``python -m dftrain.demo`` (or ``make demo``); ``--quick`` for a seconds-long miniature.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

START = Path(__file__).resolve().parents[1] / "data" / "policies" / "regime_start"
TASK = {"ops": "+-*", "min_reads": 3, "max_reads": 4}  # the task the start is in the regime on
STUDY = Path(__file__).resolve().parents[1] / "docs" / "study19" / "times34"  # the paired study from START
ARMS = (("grpo", "grpo", None), ("df-grpo", "df-grpo", "oracle"),  # (name, objective, repairer)
        ("df-no-oracle", "df-grpo", "sibling-resample"))  # what a user without step solutions runs
DEFAULT_VARIANT = "rep+allfail"  # the study's name for the fit/loop defaults (studies/options_screen.py)


def build_start(out: Path, quick: bool, seed: int, say) -> Path:
    """The shipped start's recipe: tiny policy, default-task SFT, then 500 steps on the times task."""
    from dfgen.tiny import build_tiny
    from dfgen.synth.grid import GridTask, write_synth
    from dftrain.sft import SFTConfig, run_sft

    n, (steps1, steps2) = (256, (30, 10)) if quick else (8000, (SFTConfig.steps, 500))
    if not (out / "sft_default" / "config.json").exists():
        say(f"build the tiny policy, SFT on the default task ({steps1} steps)")
        write_synth(out / "train_default", n, seed=seed, split="train")
        build_tiny(out / "tiny", seed=seed)
        run_sft(SFTConfig(data=out / "train_default", model=out / "tiny", out=out / "sft_default", steps=steps1,
                          seed=seed, log_every=1000))
    if not (out / "start" / "config.json").exists():
        say(f"SFT on the times task ({steps2} of a {steps2 * 6}-step schedule, as the shipped start)")
        write_synth(out / "train_times", n, seed=seed, split="train", task=GridTask(**TASK))
        run_sft(SFTConfig(data=out / "train_times", model=out / "sft_default", out=out / "start", steps=steps2,
                          schedule_steps=steps2 * 6, seed=seed, log_every=1000))
    return out / "start"


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--quick", action="store_true", help="a miniature run (tests use it)")
    ap.add_argument("--from-scratch", action="store_true", help="rebuild the start instead of the shipped one")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _quiet() -> None:
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def main(argv=None) -> dict:
    args = _parse(argv)
    _quiet()
    from rich.console import Console

    from dfgen.policy import load_policy
    from dfgen.report import write_report
    from dfgen.synth.grid import GridTask, write_synth
    from dftrain.evaluate import greedy_profile
    from dftrain.loop import LoopConfig, repair_tokens, run_loop

    con, q, out, t0 = Console(), args.quick, args.out, time.time()
    n_test = 32 if q else 500
    prompts_per_round, G, fit_steps = (8, 4, 2) if q else (LoopConfig.prompts_per_round, LoopConfig.group_size,
                                                           LoopConfig.fit_steps)
    rounds = 1 if q else args.rounds
    out.mkdir(parents=True, exist_ok=True)

    def stage(name):
        con.print(f"[bold]== {name}[/bold] ({time.time() - t0:.0f}s)")

    start = build_start(out, q, args.seed, stage) if args.from_scratch else START
    con.print(f"start: {start}")
    if not (out / "test").exists():
        stage("synthesize held-out test problems")
        write_synth(out / "test", n_test, seed=args.seed, split="test", task=GridTask(**TASK))

    def profile(policy):
        m, p = load_policy(policy)
        return greedy_profile(m, p, out / "test", limit=n_test)

    stage("held-out accuracy of the start")
    before = profile(start)
    con.print(f"  greedy accuracy on {n_test} held-out problems: {before['accuracy']:.3f} "
              f"(every step right {before['steps_right']:.3f})")
    arms = {}
    for name, objective, repairer in ARMS:
        stage(f"{name}: {rounds} round(s) of sample -> "
              + (f"repair ({repairer}) -> mask -> " if repairer else "") + "fit (dftrain loop)")
        res = run_loop(LoopConfig(model=start, out=out / name, rounds=rounds, objective=objective, task=TASK,
                                  prompts_per_round=prompts_per_round, group_size=G, fit_steps=fit_steps,
                                  groups_per_step=prompts_per_round // fit_steps, seed=args.seed,
                                  repairer=repairer or LoopConfig.repairer),
                       log=lambda msg: con.print("  " + msg))
        prof = profile(res["final_model"])
        tokens = sum(r["generated_tokens"] + repair_tokens(r) for r in res["rounds"])
        arms[name] = {"accuracy": prof["accuracy"], "steps_right": prof["steps_right"], "lucky": prof["lucky"],
                      "tokens": tokens, "final_model": res["final_model"], "repairer": repairer}
    write_report(out / "df-grpo" / f"round_{rounds - 1:03d}" / "df", out / "report.html", groups=20)
    result = {"start": {k: before[k] for k in ("accuracy", "steps_right", "lucky")}, "arms": arms, "n_test": n_test,
              "rounds": rounds, "seed": args.seed, "seconds": round(time.time() - t0, 1)}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    _print_results(con, out, result, before)
    return result


def _print_results(con, out: Path, result: dict, before: dict) -> None:
    """The DF rounds' shard statistics, the results table, and the committed study's numbers."""
    from dfgen.stats import compute_stats

    n_test, rounds, arms = result["n_test"], result["rounds"], result["arms"]
    for r in range(rounds):
        s = compute_stats(out / "df-grpo" / f"round_{r:03d}" / "df")
        con.print(f"  DF round {r}: reward {s['mean_reward']:.3f}, mixed groups {s['mixed_groups']:.2f}, repaired "
                  f"{s.get('repair_success_rate', 0):.2f} of failures, mask density {s.get('mask_density', 0):.3f}")
    con.print(f"\n[bold]held-out greedy results ({n_test} problems, {rounds} rounds, seed {result['seed']})[/bold]")
    con.print(f"  {'':12} {'accuracy':>9} {'every step right':>17} {'lucky':>6} {'tokens (DF: + repairs)':>23}")
    con.print(f"  {'start':12} {before['accuracy']:9.3f} {before['steps_right']:17.3f} {before['lucky']:6.3f}")
    for name, a in arms.items():
        con.print(f"  {name:12} {a['accuracy']:9.3f} {a['steps_right']:17.3f} {a['lucky']:6.3f} {a['tokens']:23,}")
    con.print("  df-no-oracle: repairs by sibling-resample (the nearest correct rollout of the group, else the "
              "policy resampling from the longest salvageable prefix); no step solution read. Its tokens include "
              "every probe.")
    con.print("One seed is noisy (a single evaluation swings a few points): the paired study over 8 seeds, with "
              "intervals and a token-matched GRPO arm, is the first section of docs/RESULTS.md.")
    opts, study = STUDY / "options" / "options.json", STUDY / "results.json"
    fmt = lambda p: f"{100 * p['mean']:+.1f} points (95% CI {100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f})"  # noqa: E731
    if opts.is_file() and study.is_file():  # the committed study's own numbers, read, not restated
        v, s = json.loads(opts.read_text())["variants"][DEFAULT_VARIANT], json.loads(study.read_text())["summary"]
        con.print(f"The study on this start ({len(v['seeds'])} paired seeds, 1000 test problems), DF-GRPO with these "
                  f"default options - GRPO: {fmt(v['test_minus_grpo'])} at the same rollouts and steps, "
                  f"{fmt(v['test_minus_grpo_tok'])} against GRPO given more tokens than DF generated and repaired; "
                  f"the mask alone (no repaired samples, no all-fail term): {fmt(s['a_df_minus_grpo'])} and "
                  f"{fmt(s['b_df_minus_grpo_tok'])}.")
    con.print(f"shards: {out}/{{{','.join(result['arms'])}}}/round_*/{{sample,repair,df}}   checkpoints: {out}/*/round_*/fit   "
              f"report: {out}/report.html   curves: {out}/*/loop.json")
    con.print(f"total time {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
