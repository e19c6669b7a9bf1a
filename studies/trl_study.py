"""Stock TRL ``GRPOTrainer`` against ``DFGRPOTrainer`` (DF's default variant), paired seeds.

The question: does DF through TRL move accuracy the way ``dftrain loop`` does on the same start
and task? Both arms are TRL 1.16 with one ``GRPOConfig``; they differ only in the trainer class
(``DFGRPOTrainer(df=DFConfig(), repairer=...)``). The setting mirrors the issue-34 studies
(``docs/issue34/sibres8/run.sh``): the shipped research-regime start (``data/policies/regime_start``),
the ``times`` task (3-4 reads, ops ``+-*``), lr 3e-5 (chosen on val for both objectives there, not
re-tuned here), 64 generation batches of 8 prompts x 8 completions with 2 updates each
(``num_iterations=2``, so 128 TRL steps: ``dftrain loop``'s 8 rounds x 8 fit steps with
``--updates-per-batch 2``), a
token-mean loss (TRL ``dapo`` = fit's default), constant lr, the vision tower frozen in both arms.
Training prompts per seed are those ``dftrain loop`` draws for that seed (``dfgen synth`` seeds
``seed * 1000 + round``), the same for both arms; the sampler's shuffle uses the seed.

Scored greedily on the studies' 1,000-problem test split (``dfgen synth --split test --seed 0``)
after TRL steps 96 and 128 (rounds 6 and 8 of the loop), averaged (the studies' ``--avg-last 2``). Reported in ``OUT/results.json``:
per-seed accuracy, every-step-right and lucky rates, and the paired DF - GRPO differences with 95%
t-intervals. Each run writes ``OUT/runs/ARM/seedS/result.json`` when done; a rerun skips finished
runs (resumable). One run at a time (2 cores).

    python -m studies.trl_study --out runs/trl_study --seeds 8    (docs/trl_study/run.sh)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = {"ops": "+-*", "min_reads": 3, "max_reads": 4}
ARMS = ("grpo", "df-grpo")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/trl_study"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--start", type=Path, default=ROOT / "data" / "policies" / "regime_start")
    ap.add_argument("--steps", type=int, default=128, help="TRL steps (optimizer updates; 2 per generation batch)")
    ap.add_argument("--eval-at", default="96,128", help="steps whose checkpoints are scored and averaged")
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--repairer", default="oracle", choices=("oracle", "sibling", "resample"),
                    help="DFGRPOTrainer's built-in repairers")
    ap.add_argument("--max-completion-length", type=int, default=96)
    args = ap.parse_args(argv)
    from dfgen.errors import UserError
    from dfgen.policy import check_policy_dir

    try:
        check_policy_dir(args.start)
    except UserError as e:
        ap.error(f"--start {args.start} is not a policy folder ({e})")
    if min(args.seeds, args.steps, args.eval_n) <= 0:
        ap.error("--seeds, --steps and --eval-n must be positive")
    at = [int(x) for x in args.eval_at.split(",") if x.strip().isdigit()]
    if not at or any(not 0 < s <= args.steps for s in at) or len(at) != len(args.eval_at.split(",")):
        ap.error(f"--eval-at must list steps in 1..{args.steps}, e.g. 96,128")
    return args


def prompts_dataset(out: Path, seed: int, rounds: int):
    """The seed's training prompts (``dftrain loop``'s draws, 64 per round) as TRL rows."""
    from datasets import Dataset

    from dfgen.images import decode_image
    from dfgen.records import load_prompts
    from dfgen.synth.grid import GridTask, write_synth

    rows = []
    for r in range(rounds):
        d = out / "prompts" / f"seed{seed}" / f"round{r}"
        if not (d / "config.json").exists():
            write_synth(d, 64, seed=seed * 1000 + r, split="train", task=GridTask(**TASK))
        recs, _ = load_prompts(d)
        rows += [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": x["question"]}]}],
                  "image": decode_image(x["image"]), "answer": x["answer"], "answer_type": x["answer_type"],
                  "source": x["source"], "solution": x["solution"]} for x in recs]
    return Dataset.from_list(rows)


def train(args, arm: str, seed: int, run: Path, eval_at: list[int]) -> dict:
    """One TRL run; saves the policy at each ``eval_at`` step; returns the logged history."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dfgen.models import save_processor, vision_parameters
    from dfgen.policy import load_policy, suppress_ids
    from dftrain.integrations import answer_reward
    from dftrain.integrations.trl import DFConfig, DFGRPOTrainer

    torch.manual_seed(seed)
    model, processor = load_policy(args.start)
    for p in vision_parameters(model):
        p.requires_grad_(False)
    cfg = GRPOConfig(output_dir=str(run / "trl"), per_device_train_batch_size=64, num_generations=8,
                     max_completion_length=args.max_completion_length, max_steps=args.steps, num_iterations=2,
                     learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, loss_type="dapo", beta=0.0,
                     temperature=1.0, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
                     save_strategy="no", seed=seed, dataloader_num_workers=0,
                     generation_kwargs={"suppress_tokens": suppress_ids(processor.tokenizer)})
    data = prompts_dataset(args.out, seed, rounds=max(1, args.steps // 2 * 8 // 64))  # 8 prompts per batch

    class Save(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step in eval_at:
                d = run / f"step_{state.global_step:04d}"
                model.save_pretrained(d, safe_serialization=True)
                save_processor(processor, d)

    kw = dict(model=model, reward_funcs=answer_reward, args=cfg, train_dataset=data, processing_class=processor,
              callbacks=[Save()])
    trainer = (DFGRPOTrainer(**kw, df=DFConfig(), repairer=args.repairer) if arm == "df-grpo"
               else GRPOTrainer(**kw))
    trainer.train()
    return trainer.state.log_history


def score(args, run: Path, eval_at: list[int]) -> list[dict]:
    from dfgen.policy import load_policy
    from dftrain.evaluate import greedy_profile

    out = []
    for s in eval_at:
        m, p = load_policy(run / f"step_{s:04d}")
        prof = greedy_profile(m, p, args.out / "test", limit=args.eval_n)
        out.append({"step": s} | {k: prof[k] for k in ("accuracy", "steps_right", "lucky", "read_acc")})
    return out


def summarize(args, seeds: list[int]) -> dict:
    from studies.experiment import paired

    res = {a: {s: json.loads((args.out / "runs" / a / f"seed{s}" / "result.json").read_text()) for s in seeds}
           for a in ARMS}
    mean = lambda evals, k: sum(e[k] for e in evals) / len(evals)  # noqa: E731
    per_seed = {a: {s: {k: mean(res[a][s]["evals"], k) for k in ("accuracy", "steps_right", "lucky")}
                    for s in seeds} for a in ARMS}
    diff = {k: paired([100 * (per_seed["df-grpo"][s][k] - per_seed["grpo"][s][k]) for s in seeds])
            for k in ("accuracy", "steps_right", "lucky")}
    df_metrics = {s: {k: sum(h[k] for h in res["df-grpo"][s]["history"] if k in h)
                      / max(1, sum(1 for h in res["df-grpo"][s]["history"] if k in h))
                      for k in ("df/repaired_frac", "df/verified_frac", "df/mask_density", "df/repaired_samples",
                                "df/all_fail_blamed")} for s in seeds}
    secs = {a: [res[a][s]["seconds"] for s in seeds] for a in ARMS}
    return {"config": {k: str(v) for k, v in vars(args).items()}, "per_seed": per_seed,
            "paired_df_minus_grpo_points": diff, "df_metrics_mean_per_batch": df_metrics, "train_seconds": secs}


def main(argv=None):
    import time

    from dfgen.synth.grid import GridTask, write_synth

    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "test" / "config.json").exists():
        write_synth(args.out / "test", args.eval_n, seed=0, split="test", task=GridTask(**TASK))
    eval_at = [int(x) for x in args.eval_at.split(",")]
    seeds = list(range(args.seeds))
    for s in seeds:
        for arm in ARMS:
            run = args.out / "runs" / arm / f"seed{s}"
            if (run / "result.json").exists():
                continue
            run.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            hist = train(args, arm, s, run, eval_at)
            secs = time.time() - t0
            evals = score(args, run, eval_at)
            (run / "result.json").write_text(json.dumps({"arm": arm, "seed": s, "seconds": secs, "evals": evals,
                                                          "history": hist}, indent=1))
            print(json.dumps({"arm": arm, "seed": s, "seconds": round(secs), "evals": evals}), flush=True)
    results = summarize(args, seeds)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["paired_df_minus_grpo_points"], indent=1))


if __name__ == "__main__":
    main()
