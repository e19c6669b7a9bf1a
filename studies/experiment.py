"""GRPO vs DF-GRPO from the same SFT checkpoint: lr chosen per objective on val, paired seeds on test.

Every run is a resumable ``dftrain loop`` (rounds of sample -> [oracle repair -> mask] -> fit,
AdamW state carried across rounds, fresh training prompts every round, identical across arms for
a seed). The grid is arms x ``--lrs`` x ``--seeds``; every run is scored on the *val* and *test*
splits (disjoint by content hash) every ``--eval-every`` rounds. Each arm's lr is the one with the
best mean val accuracy (mean of the last ``--avg-last`` evaluations); only that lr's *test*
numbers are reported, so test never influences a choice. ``--screen-seeds K``: the lr grid runs
on the first K seeds only (the screen); the other seeds then run at each arm's chosen lr.

* (a) matched rollouts and gradient steps: ``grpo`` vs ``df-grpo``;
* (b) ``--token-matched``: ``grpo-tok`` gets extra prompts (and steps) per round so that its sampled
  tokens equal what the DF run *of the same seed* (at DF's chosen lr) generated: its sampled tokens
  plus every token its repairer was charged (probes included). The match is checked after the fact:
  ``summary.b_token_match`` holds each seed's GRPO-tok sampled / DF total (the target: within 5%).

Setup: the tiny policy (``--hidden/--layers``: 128/2 = the 0.77M default, 256/4 = ~5M) and its SFT
start (``--sft-steps``, ``--sft-device``), or ``--sft DIR``. Reported in ``OUT/results.json`` and
``OUT/curves.png``: SFT accuracy, the lr x arm table (val and test), per-seed test results, paired
differences with a 95% t-interval for accuracy, every-step-right and the lucky rate (right answers
through wrong steps), the paired difference by where the SFT start's first error falls on each test
problem (``by_sft_prefix``: problems the start fails after k right lines), and mechanism statistics
of the DF arm (mask density, share of failures whose first error comes after the first step,
negative-gradient mass DF keeps). Per-problem results come from each evaluated round's
``eval/test.jsonl`` (written by ``dftrain loop``; rescored from the round's checkpoint if absent).
``--jobs K`` runs K loops side by side (``--threads`` torch threads each); runs cut short are
summarized over the evaluations all of them reached (``--summarize-only`` re-reads a folder).

Run (2-core CPU, hours): ``python -m studies.experiment --out runs/exp2``
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dftrain.settings import MARKED_MODES, MASS_MODES, POLICY_LOSS_NAMES
from dftrain.loop import repair_tokens

T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13}


def paired(diffs: list[float]) -> dict:
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half], "diffs": diffs}


def mechanism(df_dir: Path, kappa: float, marked: str = "root", mass: str = "keep", delta: float = 0.5) -> dict:
    """Mask statistics of the failed rollouts with a verified repair in one round's DF shards. The
    negative-gradient mass DF keeps is the signed sum of the trainer's own token weights
    (``dftrain.loss.df_token_weights`` with the run's options) over the tokens (GRPO: 1)."""
    import pyarrow.parquet as pq
    import torch

    from dftrain.loss import df_token_weights

    tokens = edit = root = failed = late = 0
    kept = 0.0
    for f in sorted(df_dir.glob("*.parquet")):
        for g in pq.read_table(f, columns=["rollouts"]).column("rollouts").to_pylist():
            for r in g:
                if r["reward"] >= 1 or r.get("repair_status") != "ok" or not r.get("mask_bad"):
                    continue
                m = torch.tensor([r["mask_bad"]], dtype=torch.float32)
                rm = torch.tensor([r.get("root_bad") or [0] * m.shape[1]], dtype=torch.float32)
                w = df_token_weights(m, torch.ones_like(m), torch.tensor([True]), kappa=kappa, root_mask=rm,
                                     marked=marked, delta=delta, mass=mass)
                failed += 1
                tokens += m.shape[1]
                edit += int(m.sum())
                root += int(rm.sum())
                kept += float(w.sum())
                # step masks mark whole lines holding an edit: an unmarked first token means the
                # first line (step 1) is intact, so the rollout holds a correct step before its error
                late += not (r.get("step_mask_bad") or [1])[0]
    if not failed:
        return {}
    return {"failed_repaired": failed, "mask_density": edit / tokens, "root_density": root / tokens,
            "neg_mass_kept": kept / tokens, "first_error_after_step1": late / failed}


def run_job(job: dict) -> dict:
    """One ``dftrain loop`` in this process (a worker of the pool)."""
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(job.pop("threads"))
    from dftrain.loop import LoopConfig, run_loop

    name = job.pop("name")
    t0 = time.time()
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a") as logf:
        res = run_loop(LoopConfig(**job), log=lambda m: (logf.write(m + "\n"), logf.flush()))
    return {"name": name, "rounds": res["rounds"], "seconds": round(time.time() - t0, 1)}


def summarize(rounds: list[dict], split: str, avg_last: int) -> dict:
    evals = [(r["round"], r["accuracy"][split]) for r in rounds if split in r.get("accuracy", {})]
    return {"evals": evals, "final": sum(a for _, a in evals[-avg_last:]) / min(avg_last, len(evals)),
            "generated_tokens": sum(r["generated_tokens"] for r in rounds),
            "repaired_tokens": sum(r.get("repair", {}).get("repaired_tokens", 0) for r in rounds),
            "repair_charged_tokens": sum(repair_tokens(r) for r in rounds),
            "rollouts": sum(r["rollouts"] for r in rounds)}


def test_items(run_dir: Path, eval_dirs: dict, n: int, avg_last: int, n_evals: int) -> list[list[dict]]:
    """Per-problem test rows of the run's last ``avg_last`` of its first ``n_evals`` evaluations,
    rescored from the round's checkpoint where ``eval/test.jsonl`` is missing (runs made before the
    loop wrote it)."""
    rounds = [r for r in json.loads((run_dir / "loop.json").read_text())["rounds"] if r.get("accuracy")][:n_evals]
    out = []
    for r in rounds[-avg_last:]:
        rd = run_dir / f"round_{r['round']:03d}"
        f = rd / "eval" / "test.jsonl"
        if not f.exists():
            from dfgen.policy import load_policy
            from dfgen.shards import write_jsonl_atomic
            from dftrain.evaluate import greedy_profile

            m, p = load_policy(rd / "fit")
            prof = greedy_profile(m, p, eval_dirs["test"], limit=n, items=True)
            assert abs(prof["accuracy"] - r["accuracy"]["test"]) < 1e-9, (rd, prof["accuracy"], r["accuracy"])
            f.parent.mkdir(exist_ok=True)
            write_jsonl_atomic(f, prof["items"])
        out.append([json.loads(line) for line in f.read_text().splitlines()])
    return out


def item_stats(evals: list[list[dict]], buckets: dict) -> dict:
    """Mean over evaluations of accuracy, every-step-right, lucky, and accuracy per bucket of ids."""
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    st = {"accuracy": mean([mean([r["correct"] for r in e]) for e in evals]),
          "steps_right": mean([mean([r["steps_right"] for r in e]) for e in evals])}
    st["lucky"] = st["accuracy"] - st["steps_right"]
    for b, ids in buckets.items():
        st[f"bucket:{b}"] = mean([mean([r["correct"] for r in e if r["id"] in ids]) for e in evals])
    return st


def prefix_bucket(row: dict) -> str:
    """Where the SFT start's first error falls on a problem, as the share f of the canonical lines it
    gets right before it: ``right`` (no error), ``f<0.5``, ``0.5-0.75``, ``0.75-1`` or ``f=1`` (every
    step right, wrong answer line)."""
    if row["correct"]:
        return "right"
    f = row["prefix"] / max(1, row["steps"])
    return "f<0.5" if f < 0.5 else "0.5-0.75" if f < 0.75 else "0.75-1" if f < 1 else "f=1"


# The loop settings the study exposes: each an option of LoopConfig's type and default, except where the
# study's own default differs (STUDY_DEFAULTS: how the committed studies ran, the mask alone, 10 rounds,
# evaluated every 2 on 1,000 test problems). Every run in one --out must share them (bar eval_n).
LOOP_OPTIONS = ("rounds", "prompts_per_round", "group_size", "fit_steps", "kappa", "marked", "mass", "repaired_weight",
                "fail_advantage", "kappa_rep", "policy_loss", "clip_high", "dual_clip", "repairer", "eval_every",
                "eval_n")
STUDY_DEFAULTS = {"rounds": 10, "repaired_weight": 0.0, "fail_advantage": 0.0, "eval_every": 2, "eval_n": 1000}
CHOICES = {"marked": MARKED_MODES, "mass": MASS_MODES, "policy_loss": POLICY_LOSS_NAMES,
           "repairer": ("oracle", "sibling", "resample", "sibling-resample", "auto")}  # model needs a checkpoint
SAME_SETTINGS = tuple(k for k in LOOP_OPTIONS if k != "eval_n") + ("task", "sft")


def loop_base(conf: dict, sft, setting: Path, threads: int) -> dict:
    """The LoopConfig fields every run of a study shares, from its config (``results.json``'s, or the
    parsed options): the loop options, the start, the task and the val/test sets."""
    return {k: conf[k] for k in LOOP_OPTIONS} | dict(
        model=str(sft), task=json.loads(conf["task"]) if isinstance(conf["task"], str) else conf["task"],
        eval=[str(setting / "val"), str(setting / "test")], threads=threads)


def parse(argv=None) -> argparse.Namespace:
    """The study's options; bad ones are argparse's one-line error (exit 2), before any work."""
    from dataclasses import fields

    from dftrain.loop import LoopConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/exp2"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--screen-seeds", type=int, default=None,
                    help="run the lr grid on the first K seeds only, the rest at each arm's chosen lr (default: all)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1")
    ap.add_argument("--lrs", default="3e-5,1e-4", help="comma-separated lr grid; chosen per arm on val")
    defaults = {f.name: f.default for f in fields(LoopConfig)} | STUDY_DEFAULTS
    for k in LOOP_OPTIONS:  # LoopConfig's settings, with its types and defaults (the study's where it differs)
        d = defaults[k]
        ap.add_argument("--" + k.replace("_", "-"), type=float if d is None else type(d), default=d,
                        choices=CHOICES.get(k), help=f"dftrain loop --{k.replace('_', '-')} (default {d})")
    ap.add_argument("--task", default="{}", help="GridTask knobs as JSON, e.g. '{\"min_reads\": 3}'")
    ap.add_argument("--val-n", type=int, default=500)
    ap.add_argument("--avg-last", type=int, default=3)
    ap.add_argument("--sft", type=Path, default=None, help="start from this SFT checkpoint (default: train one)")
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--sft-device", default="cpu")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--token-matched", action="store_true", help="also run (b): grpo-tok")
    ap.add_argument("--summarize-only", action="store_true", help="summarize the runs already in --out")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.sft is not None and not (args.sft / "config.json").is_file():
        ap.error(f"--sft {args.sft} is not a policy folder (no config.json)")
    try:
        from dfgen.synth.grid import GridTask

        GridTask(**json.loads(args.task)).validate()
    except (ValueError, TypeError) as e:
        ap.error(f"--task {args.task!r}: {e}")
    if args.screen_seeds is not None and not 1 <= args.screen_seeds <= args.seeds:
        ap.error("--screen-seeds must be between 1 and --seeds")
    if min(args.seeds, args.rounds, args.eval_every, args.avg_last, args.jobs, args.eval_n, args.val_n) < 1:
        ap.error("--seeds, --rounds, --eval-every, --avg-last, --jobs, --eval-n and --val-n must be positive")
    return args


def setup(args) -> tuple[Path, dict]:
    """The val/test sets, the SFT start (trained unless --sft) and its accuracy; the study's
    results.json, refusing one made with other settings. Returns (sft folder, results)."""
    from dfgen.policy import load_policy
    from dfgen.shards import write_jsonl_atomic
    from dfgen.synth.grid import GridTask, write_synth
    from dfgen.tiny import build_tiny
    from dftrain.evaluate import greedy_profile
    from dftrain.loop import BEFORE_FIELD
    from dftrain.sft import SFTConfig, run_sft

    out, task = args.out, GridTask(**json.loads(args.task))
    out.mkdir(parents=True, exist_ok=True)
    sft = args.sft or out / "sft"
    if not (out / "val").exists():
        write_synth(out / "test", args.eval_n, seed=0, split="test", task=task)
        write_synth(out / "val", args.val_n, seed=0, split="val", task=task)
    if not (sft / "config.json").exists():
        write_synth(out / "train", 4000, seed=0, split="train", task=task)
        build_tiny(out / "tiny", hidden=args.hidden, layers=args.layers)
        run_sft(SFTConfig(data=out / "train", model=out / "tiny", out=sft, steps=args.sft_steps, device=args.sft_device))
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    if "config" in results:  # finished runs are reused: they must be runs of these settings
        have, want = BEFORE_FIELD | results["config"], vars(args) | {"sft": str(sft)}  # a missing key: its value then
        norm = lambda k, v: json.loads(v) if k == "task" else str(v) if k == "sft" else v  # noqa: E731
        diff = [k for k in SAME_SETTINGS if norm(k, have.get(k)) != norm(k, want[k])]
        if diff:
            sys.exit(f"experiment.py: error: {out} holds runs with other settings "
                     f"({', '.join(f'--{k.replace(chr(95), chr(45))} {have.get(k)}' for k in diff)}); "
                     f"pass the same settings or use a new --out")
    results["config"] = vars(args) | {"out": str(out), "sft": str(sft)}
    if "sft_accuracy" not in results or not (out / "sft_test_items.jsonl").exists():
        m, p = load_policy(sft)
        prof = greedy_profile(m, p, out / "test", limit=args.eval_n, items=True)
        write_jsonl_atomic(out / "sft_test_items.jsonl", prof.pop("items"))
        results["sft_accuracy"] = {"test": prof["accuracy"],
                                   "val": greedy_profile(m, p, out / "val", limit=args.val_n)["accuracy"]}
        results["sft_profile"] = {"test": prof}
        _save(out, results)
    print(f"SFT start: {results['sft_accuracy']}", flush=True)
    return sft, results


def _save(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


class Grid:
    """The study's runs: arms x lrs x seeds, each a LoopConfig (``spec``), run resumably (``run``)."""

    def __init__(self, args, sft: Path, results: dict):
        self.args, self.out, self.results = args, args.out, results
        self.base = loop_base(vars(args), sft, args.out, args.threads)
        self.lrs = [float(x) for x in args.lrs.split(",")]
        self.arms = ["grpo", "df-grpo"] + (["grpo-tok"] if args.token_matched else [])
        self.seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        self.screen = self.seeds[:args.screen_seeds or args.seeds]

    def spec(self, arm: str, lr: float, seed: int) -> dict:
        """One run's LoopConfig fields (+ its name and threads). (b): GRPO-tok gets extra prompts and steps per
        round, in whole groups of steps, so its sampled tokens match what DF's run of the same seed generated
        (``token_ratio``; that run must have finished)."""
        a, name = self.args, f"{arm}/lr{lr:g}/s{seed}"
        sp = self.base | dict(name=name, out=str(self.out / name), objective="grpo" if arm == "grpo-tok" else arm,
                              lr=lr, seed=seed)
        if arm == "grpo-tok":  # same groups per step, more prompts and steps per round
            per_step = a.prompts_per_round // a.fit_steps
            steps = max(1, round(a.fit_steps * self.token_ratio(seed)))
            sp |= dict(prompts_per_round=steps * per_step, fit_steps=steps)
        return sp

    def run(self, specs: list[dict]) -> None:
        """The unfinished runs of ``specs``, --jobs at a time (spawned processes)."""
        pending = [s for s in specs if not (Path(s["out"]) / f"round_{self.args.rounds - 1:03d}" / "round.json").exists()]
        if not pending or self.args.summarize_only:
            return
        print(f"{len(pending)} runs to do, {self.args.jobs} at a time", flush=True)
        import multiprocessing

        # spawn, not fork: the parent has run torch (the SFT accuracy), and a forked child of a process
        # whose OpenMP pool is up hangs on its first parallel op (seen: the first sampling call, in a futex)
        with ProcessPoolExecutor(max_workers=self.args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            for r in ex.map(run_job, [dict(s) for s in pending]):
                print(f"  {r['name']}: {r['seconds']}s", flush=True)

    def df_run(self, seed: int) -> Path:
        df_lr = choose_lr(self.out, ["df-grpo"], self.lrs, self.screen, self.args)["df-grpo"]
        return self.out / f"df-grpo/lr{df_lr}/s{seed}"

    def token_ratio(self, seed: int) -> float:
        """(sampled + repair-charged) / sampled tokens of DF's finished run of ``seed`` at its chosen lr,
        recorded in results.json (``token_ratio_per_seed``) the first time it is read."""
        per_seed = self.results.setdefault("token_ratio_per_seed", {})
        if str(seed) not in per_seed:
            f = self.df_run(seed) / "loop.json"
            if not f.exists():
                sys.exit(f"experiment.py: error: GRPO-tok's seed {seed} needs DF's finished run {f.parent} to match")
            rounds = json.loads(f.read_text())["rounds"]
            gen = sum(r["generated_tokens"] for r in rounds)
            per_seed[str(seed)] = (gen + sum(repair_tokens(r) for r in rounds)) / gen
            _save(self.out, self.results)
        return per_seed[str(seed)]


def run_grid(grid: Grid) -> None:
    """(1) the screen: every lr on the screen seeds (GRPO-tok after DF, whose tokens it matches);
    (2) the other seeds at each arm's val choice, seed-major so that a seed's runs finish together."""
    if grid.args.summarize_only:
        return
    tok = "grpo-tok" in grid.arms
    grid.run([grid.spec(a, lr, s) for a in grid.arms if a != "grpo-tok" for lr in grid.lrs for s in grid.screen])
    if tok:
        grid.run([grid.spec("grpo-tok", lr, s) for lr in grid.lrs for s in grid.screen])
    chosen = choose_lr(grid.out, grid.arms, grid.lrs, grid.screen, grid.args)
    for s in (s for s in grid.seeds if s not in grid.screen):
        grid.run([grid.spec(a, float(chosen[a]), s) for a in grid.arms if a != "grpo-tok"])
        if tok:  # after DF's run of this seed, whose tokens it matches
            grid.run([grid.spec("grpo-tok", float(chosen["grpo-tok"]), s)])


def main(argv=None):
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads if args.jobs == 1 else min(8, os.cpu_count() or 2))
    t_all = time.time()
    sft, results = setup(args)
    grid = Grid(args, sft, results)
    run_grid(grid)
    results |= summarize_grid(args.out, grid.arms, grid.lrs, grid.screen, grid.seeds, args, results["sft_accuracy"])
    results["seconds"] = round(time.time() - t_all, 1)
    _save(args.out, results)
    print(json.dumps(results["summary"], indent=2))
    plot(args.out, results, grid.arms, args)


def load_runs(out: Path, names) -> dict:
    return {n: json.loads((out / n / "loop.json").read_text())["rounds"] for n in names if (out / n / "loop.json").exists()}


def final_of(runs: dict, name: str, split: str, n_evals: int, avg_last: int) -> float:
    evals = [r["accuracy"][split] for r in runs[name] if r.get("accuracy")][:n_evals]
    k = min(avg_last, len(evals))
    return sum(evals[-k:]) / k if k else float("nan")


def screen_table(out: Path, arms, lrs, screen, args):
    """(lr x arm table of val/test means over the screen seeds that finished every cell, those seeds)."""
    names = [f"{a}/lr{lr:g}/s{s}" for a in arms for lr in lrs for s in screen]
    runs = load_runs(out, names)
    n_evals = min((sum(1 for r in v if r.get("accuracy")) for v in runs.values()), default=0)
    done = [s for s in screen if all(f"{a}/lr{lr:g}/s{s}" in runs for a in arms for lr in lrs)]
    table = {a: {f"{lr:g}": {sp: sum(final_of(runs, f"{a}/lr{lr:g}/s{s}", sp, n_evals, args.avg_last) for s in done)
                             / max(1, len(done)) for sp in ("val", "test")} for lr in lrs} for a in arms}
    return table, done


def choose_lr(out: Path, arms, lrs, screen, args) -> dict:
    """Each arm's lr: the best mean val accuracy over the screen (test plays no part)."""
    table, _ = screen_table(out, arms, lrs, screen, args)
    return {a: max(table[a], key=lambda k: table[a][k]["val"]) for a in arms}


def summarize_grid(out: Path, arms, lrs, screen, seeds, args, sft_acc) -> dict:
    """The screen's lr x arm table, each arm's lr chosen on val, its test results over every seed,
    and paired differences per seed (accuracy, every-step-right, lucky, by the SFT start's first
    error position).

    Runs cut short (a time limit) are summarized over the evaluations every run has, so all arms
    are compared at the same point."""
    table, screen_done = screen_table(out, arms, lrs, screen, args)
    chosen = {a: max(table[a], key=lambda k: table[a][k]["val"]) for a in arms}
    names = {a: {s: f"{a}/lr{chosen[a]}/s{s}" for s in seeds} for a in arms}
    runs = load_runs(out, [n for a in arms for n in names[a].values()])
    done = [s for s in seeds if all(names[a][s] in runs for a in arms)]
    whole = [s for s in done if all(len(runs[names[a][s]]) == args.rounds for a in arms)]
    done = whole or done  # a seed still running is left out once some seeds have finished every arm
    n_evals = min((sum(1 for r in runs[names[a][s]] if r.get("accuracy")) for a in arms for s in done), default=0)
    sft_rows = [json.loads(line) for line in (out / "sft_test_items.jsonl").read_text().splitlines()]
    buckets: dict = {}
    for r in sft_rows:
        buckets.setdefault(prefix_bucket(r), set()).add(r["id"])
    eval_dirs = {"test": out / "test"}
    stats = {a: [item_stats(test_items(out / names[a][s], eval_dirs, args.eval_n, args.avg_last, n_evals), buckets)
                 for s in done] for a in arms}
    test = {a: [st["accuracy"] for st in stats[a]] for a in arms}
    for a in arms:  # the per-problem files reproduce the recorded accuracies
        for s, acc in zip(done, test[a]):
            assert abs(acc - final_of(runs, names[a][s], "test", n_evals, args.avg_last)) < 1e-9, (a, s)
    summ = {"seeds": len(done), "screen_seeds": len(screen_done), "evals_used": n_evals, "lr_chosen_on_val": chosen,
            "test_mean": {a: sum(v) / max(1, len(v)) for a, v in test.items()}, "sft": sft_acc,
            "steps_right_mean": {a: sum(st["steps_right"] for st in v) / max(1, len(v)) for a, v in stats.items()},
            "lucky_mean": {a: sum(st["lucky"] for st in v) / max(1, len(v)) for a, v in stats.items()},
            "bucket_sizes": {b: len(ids) for b, ids in sorted(buckets.items())}}
    if len(done) > 1:
        for key, other in (("a_df_minus_grpo", "grpo"), ("b_df_minus_grpo_tok", "grpo-tok")):
            if other not in stats:
                continue
            pairs = list(zip(stats["df-grpo"], stats[other]))
            summ[key] = paired([d["accuracy"] - g["accuracy"] for d, g in pairs])
            summ[key + "_steps_right"] = paired([d["steps_right"] - g["steps_right"] for d, g in pairs])
            summ[key + "_lucky"] = paired([d["lucky"] - g["lucky"] for d, g in pairs])
            summ[key + "_by_sft_prefix"] = {b: paired([d[f"bucket:{b}"] - g[f"bucket:{b}"] for d, g in pairs])
                                            for b in sorted(buckets)}
        if "grpo-tok" in stats:  # (b) is fair only if GRPO-tok generated what DF did, seed by seed
            total = {a: {s: summarize(runs[names[a][s]], "test", args.avg_last) for s in done} for a in ("df-grpo", "grpo-tok")}
            summ["b_token_match"] = {str(s): total["grpo-tok"][s]["generated_tokens"]
                                     / (total["df-grpo"][s]["generated_tokens"] + total["df-grpo"][s]["repair_charged_tokens"])
                                     for s in done}
        summ["grpo_minus_sft"] = paired([g - sft_acc["test"] for g in test["grpo"]])
        summ["df_minus_sft"] = paired([d - sft_acc["test"] for d in test["df-grpo"]])
    mech = [mechanism(p, args.kappa, args.marked, args.mass) for s in done
            for p in sorted((out / names["df-grpo"][s]).glob("round_*/df"))]
    mech = [m for m in mech if m]
    if mech:
        summ["mechanism_mean"] = {k: sum(m[k] for m in mech) / len(mech)
                                  for k in ("mask_density", "root_density", "neg_mass_kept", "first_error_after_step1")}
    return {"grid": table, "test_per_seed": test, "stats_per_seed": {a: dict(zip(map(str, done), v)) for a, v in stats.items()},
            "summary": summ}


def plot(out: Path, results: dict, arms: list[str], args):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    colors = {"grpo": "tab:blue", "df-grpo": "tab:red", "grpo-tok": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sft = results["sft_accuracy"]["test"]
    for arm in arms:
        lr = results["summary"]["lr_chosen_on_val"][arm]
        per_seed = [json.loads(f.read_text())["rounds"] for f in sorted(out.glob(f"{arm}/lr{lr}/s*/loop.json"))]
        for ax, key in zip(axes, ("rollouts", "generated_tokens")):
            curves = []
            for rounds in per_seed:
                xs, ys, acc = [0], [sft], 0
                for r in rounds:
                    acc += r[key] + (repair_tokens(r) if key != "rollouts" else 0)
                    if "test" in r.get("accuracy", {}):
                        xs.append(acc)
                        ys.append(r["accuracy"]["test"])
                ax.plot(xs, ys, color=colors[arm], alpha=0.25)
                curves.append((xs, ys))
            if not curves:
                continue
            k = min(len(c[1]) for c in curves)
            ax.plot(curves[0][0][:k], [sum(c[1][i] for c in curves) / len(curves) for i in range(k)],
                    color=colors[arm], lw=2.5, label=f"{arm} (mean of {len(curves)})")
    axes[0].set_xlabel("sampled rollouts")
    axes[1].set_xlabel("generated tokens (DF: + what its repairs are charged)")
    for ax in axes:
        ax.set_ylabel(f"greedy accuracy ({args.eval_n} test)")
        ax.axhline(sft, color="gray", ls=":", label="SFT start")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


if __name__ == "__main__":
    main()
