"""GRPO vs DF-GRPO from the same SFT checkpoint: lr chosen per objective on val, paired seeds on test.

Every run is a resumable ``dftrain loop`` (rounds of sample -> [oracle repair -> mask] -> fit,
AdamW state carried across rounds, fresh training prompts every round, identical across arms for
a seed). The grid is arms x ``--lrs`` x ``--seeds``; every run is scored on the *val* and *test*
splits (disjoint by content hash) every ``--eval-every`` rounds. Each arm's lr is the one with the
best mean val accuracy (mean of the last ``--avg-last`` evaluations); only that lr's *test*
numbers are reported, so test never influences a choice.

* (a) matched rollouts and gradient steps: ``grpo`` vs ``df-grpo``;
* (b) ``--token-matched``: ``grpo-tok`` gets extra prompts (and steps) per round so its sampled
  tokens equal the DF arm's sampled + repaired tokens (the ratio is measured by a probe round).

Setup: the tiny policy (``--hidden/--layers``: 128/2 = the 0.77M default, 256/4 = ~5M) and its SFT
start (``--sft-steps``, ``--sft-device``), or ``--sft DIR``. Reported in ``OUT/results.json`` and
``OUT/curves.png``: SFT accuracy, the lr x arm table (val and test), per-seed test results, paired
differences with a 95% t-interval, and mechanism statistics of the DF arm (mask density, share of
failures whose first error comes after the first step, negative-gradient mass DF keeps).
``--jobs K`` runs K loops side by side (``--threads`` torch threads each); runs cut short are
summarized over the evaluations all of them reached (``--summarize-only`` re-reads a folder).

Run (2-core CPU, hours): ``python bench/experiment.py --out runs/exp2``
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
            "rollouts": sum(r["rollouts"] for r in rounds)}


# settings every run in one --out must share (the rest, e.g. --seeds or --jobs, may change on a rerun)
SAME_SETTINGS = ("marked", "kappa", "mass", "repaired_weight", "repairer", "task", "rounds", "prompts_per_round",
                 "group_size", "fit_steps", "eval_every", "sft", "policy_loss", "clip_high", "dual_clip")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/exp2"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1")
    ap.add_argument("--lrs", default="3e-5,1e-4", help="comma-separated lr grid; chosen per arm on val")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prompts-per-round", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--fit-steps", type=int, default=8)
    ap.add_argument("--kappa", type=float, default=0.1)
    ap.add_argument("--marked", default="root", choices=["root", "root+prop", "edit"])
    ap.add_argument("--mass", default="keep", choices=["keep", "redistribute"])
    ap.add_argument("--repaired-weight", type=float, default=0.0)
    ap.add_argument("--policy-loss", default="ppo", help="the surrogate of both arms (dftrain.loss.POLICY_LOSSES)")
    ap.add_argument("--clip-high", type=float, default=0.2)
    ap.add_argument("--dual-clip", type=float, default=None)
    ap.add_argument("--repairer", default="oracle", choices=["oracle", "sibling"], help="oracle or sibling (a correct rollout of the same group)")
    ap.add_argument("--task", default="{}", help="GridTask knobs as JSON, e.g. '{\"min_reads\": 3}'")
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--val-n", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=2)
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
    args = ap.parse_args()
    # bad arguments: argparse's one-line error (exit 2) before any work, never a traceback
    if args.sft is not None and not (args.sft / "config.json").is_file():
        ap.error(f"--sft {args.sft} is not a policy folder (no config.json)")
    try:
        from dfgen.synth.grid import GridTask

        task_knobs = json.loads(args.task)
        GridTask(**task_knobs).validate()
    except (ValueError, TypeError) as e:
        ap.error(f"--task {args.task!r}: {e}")
    if min(args.seeds, args.rounds, args.eval_every, args.avg_last, args.jobs, args.eval_n, args.val_n) < 1:
        ap.error("--seeds, --rounds, --eval-every, --avg-last, --jobs, --eval-n and --val-n must be positive")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads if args.jobs == 1 else min(8, os.cpu_count() or 2))
    from dfgen.policy import build_tiny, load_policy
    from dfgen.synth.grid import GridTask, write_synth
    from dftrain.evaluate import greedy_accuracy
    from dftrain.sft import SFTConfig, run_sft

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    task = task_knobs
    t_all = time.time()
    sft = args.sft or out / "sft"
    if not (out / "val").exists():
        write_synth(out / "test", args.eval_n, seed=0, split="test", task=GridTask(**task))
        write_synth(out / "val", args.val_n, seed=0, split="val", task=GridTask(**task))
    if not (sft / "config.json").exists():
        write_synth(out / "train", 4000, seed=0, split="train", task=GridTask(**task))
        build_tiny(out / "tiny", hidden=args.hidden, layers=args.layers)
        run_sft(SFTConfig(data=out / "train", model=out / "tiny", out=sft, steps=args.sft_steps,
                          device=args.sft_device))
    results_f = out / "results.json"
    results = json.loads(results_f.read_text()) if results_f.exists() else {}
    if "config" in results:  # finished runs are reused: they must be runs of these settings
        have, want = results["config"], vars(args) | {"sft": str(sft)}
        older = {"marked": "edit", "repairer": "oracle", "policy_loss": "ppo", "clip_high": 0.2}  # before the key existed
        norm = lambda k, v: json.loads(v) if k == "task" else str(v) if k == "sft" else v  # noqa: E731
        diff = [k for k in SAME_SETTINGS if norm(k, have.get(k) or older.get(k, have.get(k))) != norm(k, want[k])]
        if diff:
            sys.exit(f"experiment.py: error: {out} holds runs with other settings "
                     f"({', '.join(f'--{k.replace(chr(95), chr(45))} {have.get(k)}' for k in diff)}); "
                     f"pass the same settings or use a new --out")
    results["config"] = vars(args) | {"out": str(out), "sft": str(sft)}
    if "sft_accuracy" not in results:
        m, p = load_policy(sft)
        results["sft_accuracy"] = {"test": greedy_accuracy(m, p, out / "test", limit=args.eval_n),
                                   "val": greedy_accuracy(m, p, out / "val", limit=args.val_n)}
        results_f.write_text(json.dumps(results, indent=2))
    print(f"SFT start: {results['sft_accuracy']}", flush=True)
    base = dict(model=str(sft), rounds=args.rounds, prompts_per_round=args.prompts_per_round,
                group_size=args.group_size, fit_steps=args.fit_steps, kappa=args.kappa, marked=args.marked,
                mass=args.mass, repaired_weight=args.repaired_weight, repairer=args.repairer, task=task, eval_every=args.eval_every,
                policy_loss=args.policy_loss, clip_high=args.clip_high, dual_clip=args.dual_clip,
                eval=[str(out / "val"), str(out / "test")], eval_n=args.eval_n, threads=args.threads)
    lrs = [float(x) for x in args.lrs.split(",")]
    arms = ["grpo", "df-grpo"] + (["grpo-tok"] if args.token_matched else [])
    # (b): GRPO gets extra prompts per round so its sampled tokens match DF's sampled + repaired
    # tokens; the ratio is a property of the task and SFT start, measured once up front.
    ratio = results.get("token_ratio", 1.0)
    if args.token_matched and "token_ratio" not in results:
        probe = run_job(base | dict(name="probe", out=str(out / "probe"), objective="df-grpo", lr=lrs[0], seed=999,
                                    rounds=1, eval=[]))
        r0 = probe["rounds"][0]
        ratio = results["token_ratio"] = (r0["generated_tokens"] + r0["repair"]["repaired_tokens"]) / r0["generated_tokens"]
        results_f.write_text(json.dumps(results, indent=2))
    specs = []
    for arm in arms:
        for lr in lrs:
            for s in range(args.first_seed, args.first_seed + args.seeds):
                name = f"{arm}/lr{lr:g}/s{s}"
                spec = base | dict(name=name, out=str(out / name), objective="grpo" if arm == "grpo-tok" else arm,
                                   lr=lr, seed=s)
                if arm == "grpo-tok":  # same groups per step, more prompts and steps per round
                    n = int(round(args.prompts_per_round * ratio / args.group_size)) * args.group_size
                    spec |= dict(prompts_per_round=n, fit_steps=max(1, n * args.fit_steps // args.prompts_per_round))
                specs.append(spec)
    pending = [s for s in specs if not (Path(s["out"]) / f"round_{args.rounds - 1:03d}" / "round.json").exists()]
    if pending and not args.summarize_only:
        print(f"{len(pending)} runs to do, {args.jobs} at a time", flush=True)
        import multiprocessing

        # spawn, not fork: the parent has run torch (the SFT accuracy), and a forked child of a process
        # whose OpenMP pool is up hangs on its first parallel op (seen: the first sampling call, in a futex)
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            for r in ex.map(run_job, [dict(s) for s in pending]):
                print(f"  {r['name']}: {r['seconds']}s", flush=True)
    results |= summarize_grid(out, specs, arms, lrs, args, results["sft_accuracy"])
    results["seconds"] = round(time.time() - t_all, 1)
    results_f.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))
    plot(out, results, arms, args)


def summarize_grid(out: Path, specs, arms, lrs, args, sft_acc) -> dict:
    """Choose each arm's lr on val; report its test accuracy; paired differences per seed.

    Runs cut short (a time limit) are summarized over the evaluations every run has, so all arms
    are compared at the same point."""
    runs = {}
    for s in specs:
        f = Path(s["out"]) / "loop.json"
        if f.exists():
            runs[s["name"]] = json.loads(f.read_text())["rounds"]
    n_evals = min((sum(1 for r in v if r.get("accuracy")) for v in runs.values()), default=0)

    def final(name, split):
        evals = [r["accuracy"][split] for r in runs[name] if r.get("accuracy")][:n_evals]
        k = min(args.avg_last, len(evals))
        return sum(evals[-k:]) / k if k else float("nan")

    seeds = [s for s in range(args.first_seed, args.first_seed + args.seeds) if all(f"{a}/lr{lr:g}/s{s}" in runs for a in arms for lr in lrs)]
    table, chosen = {}, {}
    for arm in arms:
        for lr in lrs:
            table.setdefault(arm, {})[f"{lr:g}"] = {
                split: sum(final(f"{arm}/lr{lr:g}/s{s}", split) for s in seeds) / max(1, len(seeds))
                for split in ("val", "test")}
        chosen[arm] = max(table[arm], key=lambda k: table[arm][k]["val"])
    test = {arm: [final(f"{arm}/lr{chosen[arm]}/s{s}", "test") for s in seeds] for arm in arms}
    summ = {"seeds": len(seeds), "evals_used": n_evals, "lr_chosen_on_val": chosen,
            "test_mean": {a: sum(v) / max(1, len(v)) for a, v in test.items()}, "sft": sft_acc}
    if len(seeds) > 1:
        summ["a_df_minus_grpo"] = paired([d - g for d, g in zip(test["df-grpo"], test["grpo"])])
        summ["grpo_minus_sft"] = paired([g - sft_acc["test"] for g in test["grpo"]])
        summ["df_minus_sft"] = paired([d - sft_acc["test"] for d in test["df-grpo"]])
        if "grpo-tok" in test:
            summ["b_df_minus_grpo_tok"] = paired([d - g for d, g in zip(test["df-grpo"], test["grpo-tok"])])
    mech = [mechanism(p, args.kappa, args.marked, args.mass) for p in sorted(out.glob(f"df-grpo/lr{chosen.get('df-grpo')}/s*/round_*/df"))]
    mech = [m for m in mech if m]
    if mech:
        summ["mechanism_mean"] = {k: sum(m[k] for m in mech) / len(mech)
                                  for k in ("mask_density", "root_density", "neg_mass_kept", "first_error_after_step1")}
    return {"grid": table, "test_per_seed": test, "summary": summ}


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
                    acc += r[key] + (r.get("repair", {}).get("repaired_tokens", 0) if key != "rollouts" else 0)
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
    axes[1].set_xlabel("generated tokens (DF: + repaired tokens)")
    for ax in axes:
        ax.set_ylabel(f"greedy accuracy ({args.eval_n} test)")
        ax.axhline(sft, color="gray", ls=":", label="SFT start")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


if __name__ == "__main__":
    main()
