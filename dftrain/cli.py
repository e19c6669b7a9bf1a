"""``dftrain``: the learning stage (sft, fit, loop, eval).

Errors are one line on stderr with a non-zero exit; the resolved config is saved next to
every output; heavy imports stay inside command bodies so ``--help`` is instant.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from dfgen.console import quiet_hf
from dfgen.errors import UserError, cli_errors, run_app
from dfgen.repairers import RepairerName
from dftrain.fit import FitConfig as _Fit  # light modules: the configs are the one source of defaults
from dftrain.loop import LoopConfig as _Loop
from dftrain.settings import AdvScale, AggMode, DTypeName, MarkedMode, MassMode, ObjectiveName, PolicyLossName
from dftrain.sft import SFTConfig as _SFT

# options `fit` and `loop` share (dftrain.settings.TrainSettings): one help text each; defaults from the dataclasses
Objective = Annotated[ObjectiveName, typer.Option(help="df-grpo (masked) or grpo (plain baseline).")]
GroupsPerStep = Annotated[int, typer.Option(help="Prompt groups per optimizer step.")]
UpdatesPerBatch = Annotated[int, typer.Option(help="Optimizer updates on each batch (PPO epochs).")]
Lr = Annotated[float, typer.Option(help="Learning rate (AdamW, constant; carried across a loop's rounds); "
                                         "chosen on val, docs/RESULTS.md.")]
Kappa = Annotated[float, typer.Option(help="DF weight of unmarked tokens of a repaired failed rollout.")]
Marked = Annotated[MarkedMode, typer.Option(help="Which tokens DF marks: root (first edit), root+prop, edit (all edits).")]
Mass = Annotated[MassMode, typer.Option(help="keep or redistribute the failed rollout's blame.")]
Delta = Annotated[float, typer.Option(help="root+prop: weight of later edited tokens.")]
RepairedWeight = Annotated[float, typer.Option(help="Advantage of repaired samples (0 = off).")]
KappaRep = Annotated[float, typer.Option(help="Weight of unedited tokens of repaired samples.")]
FailAdvantage = Annotated[float, typer.Option(help=(
    "A > 0: in a group whose rollouts all failed (GRPO's advantage 0), advantage -A on the root-cause token "
    "of each rollout with a verified repair (0 = off)."))]
PolicyLoss = Annotated[PolicyLossName, typer.Option(help=(
    "The surrogate (dftrain.loss.POLICY_LOSSES); DF weights enter each as per-token advantages. "
    "ppo: PPO clipped ratio, as GRPO (TRL loss_type grpo/bnpo/dapo); "
    "gspo: sequence-level ratio, GSPO-token (Zheng et al. 2025, TRL importance_sampling_level=sequence); "
    "sapo: soft sigmoid gate instead of the clip (Gao et al. 2025, TRL loss_type sapo); "
    "cispo: clipped, detached IS weight times log-prob (MiniMax-M1 2025, TRL loss_type cispo)."))]
ClipLow = Annotated[float, typer.Option(help="Lower clip epsilon of the ratio.")]
ClipHigh = Annotated[float, typer.Option(help="Upper clip epsilon; > 0.2 is DAPO's clip-higher (0.28 there). "
                                              "cispo: the IS weight cap minus 1 (TRL's epsilon_high 5.0 = 4.0 here).")]
DualClip = Annotated[float, typer.Option(help="ppo/gspo dual clip C > 1 + clip-high: negative-advantage tokens "
                                              "stop pushing past ratio C (verl clip_ratio_c, TRL delta). "
                                              "Unset = off.")]
AdvScale_ = Annotated[AdvScale, typer.Option(help="group (GRPO), batch (std over the step's batch, TRL "
                                                  "scale_rewards=batch) or none (Dr. GRPO).")]
Agg = Annotated[AggMode, typer.Option(help="Loss aggregation (denominators count completion tokens, never weights).")]
Beta = Annotated[float, typer.Option(help="k3 KL coefficient to the initial policy (0 = no reference).")]
RepInDenominator = Annotated[bool, typer.Option(help="Repaired rows count in the aggregation's denominator.")]
DedupRepaired = Annotated[bool, typer.Option(help="One copy of each distinct repaired trajectory per group.")]


def _json_object(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} is not JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _config(cls, options: dict, **overrides):
    """A config dataclass from a command's options (Enum choices as their strings)."""
    return cls(**{k: getattr(v, "value", v) for k, v in options.items()} | overrides)


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Differential Feedback training: warm start, masked GRPO, evaluation.\n\n"
                       "Example: dftrain fit --data runs/df --model runs/sft --out runs/rl --steps 20")


@app.callback()
def _root():
    """Differential Feedback training: warm start, masked GRPO, evaluation."""


@app.command()
@cli_errors
def sft(
    data: Path = typer.Option(..., help="Prompt set with solutions (dfgen synth output)."),
    model: Path = typer.Option(..., help="Policy folder to start from (e.g. dfgen tiny output)."),
    out: Path = typer.Option(..., help="Output model folder."),
    steps: int = typer.Option(_SFT.steps, help="Optimizer steps (counting is learned late, in a jump; docs/RESULTS.md)."),
    schedule_steps: int = typer.Option(_SFT.schedule_steps, help="Length of the lr schedule when longer than "
                                       "--steps: stop early on it (0 = --steps)."),
    batch_size: int = typer.Option(_SFT.batch_size, help="Prompts per step."),
    lr: float = typer.Option(_SFT.lr, help="Peak learning rate (linear warm-up, cosine decay)."),
    vision_lr_scale: float = typer.Option(_SFT.vision_lr_scale, help="Vision tower lr as a multiple of --lr; "
                                          "0 freezes it (training it broke counting; docs/RESULTS.md)."),
    seed: int = typer.Option(_SFT.seed, help="Data order and init seed."),
    eval_data: Path = typer.Option(None, help="Held-out prompts: report greedy accuracy at the end."),
    eval_n: int = typer.Option(_SFT.eval_n, help="Held-out problems to score."),
    eval_every: int = typer.Option(_SFT.eval_every, help="Also score --eval-data every N steps (0 = only at the end)."),
    save_every: int = typer.Option(_SFT.save_every, help="Also keep the policy every N steps in OUT/steps/step_NNNNNN "
                                   "(0 = only the end)."),
    device: str = typer.Option(_SFT.device, help="cpu | cuda | cuda:N | auto."),
    report_to: str = typer.Option(_SFT.report_to, help="Where metrics go, comma-separated: jsonl (sft_metrics.json, "
                                  "always), tensorboard (OUT/tb), wandb (OUT/wandb, offline unless WANDB_MODE=online); "
                                  "pip install 'dfkit[report]'."),
):
    """Supervised warm start on the synthetic solutions (loss on the answer only).

    Example: dftrain sft --data runs/train --model runs/tiny --out runs/sft --eval-data runs/val
    """
    quiet_hf()
    from rich.console import Console

    from dftrain.sft import SFTConfig, run_sft

    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise UserError("--steps, --batch-size and --lr must be positive")
    if vision_lr_scale < 0 or eval_every < 0 or save_every < 0 or eval_n <= 0:
        raise UserError("--vision-lr-scale, --eval-every and --save-every must be >= 0, --eval-n positive")
    if schedule_steps and schedule_steps < steps:
        raise UserError(f"--schedule-steps {schedule_steps} is shorter than --steps {steps}")
    cfg = SFTConfig(data=data, model=model, out=out, steps=steps, schedule_steps=schedule_steps, batch_size=batch_size, lr=lr,
                    vision_lr_scale=vision_lr_scale, seed=seed, eval_data=eval_data, eval_n=eval_n,
                    eval_every=eval_every, save_every=save_every, device=device, report_to=report_to)
    con = Console(stderr=True)

    def show(r):
        held = f" | held-out accuracy {r['heldout']['accuracy']:.3f}" if "heldout" in r else ""
        con.print(f"step {r['step']}/{steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | {r['elapsed_s']:.1f}s{held}")

    res = run_sft(cfg, progress=show)
    msg = f"saved {out} ({res['steps_per_s']:.2f} steps/s, final loss {res['final_loss']:.4f}"
    if "heldout_accuracy" in res:
        msg += f", held-out greedy accuracy {res['heldout_accuracy']:.3f}"
    typer.echo(msg + ")")


@app.command()
@cli_errors
def fit(
    data: Path = typer.Option(..., help="DF shards (dfgen mask output); sample shards suffice for --objective grpo."),
    model: Path = typer.Option(..., help="Policy to train (normally the checkpoint that sampled the shards)."),
    out: Path = typer.Option(..., help="Output folder: final HF model, step_* checkpoints, metrics.jsonl."),
    objective: Objective = _Fit.objective,
    steps: int = typer.Option(_Fit.steps, help="Optimizer steps."),
    groups_per_step: GroupsPerStep = _Fit.groups_per_step,
    grad_accum: int = typer.Option(_Fit.grad_accum, help="Batches of groups accumulated per optimizer step."),
    updates_per_batch: UpdatesPerBatch = _Fit.updates_per_batch,
    micro_batch: int = typer.Option(_Fit.micro_batch, help="Sequences per forward/backward pass (memory only: "
                                    "the step's loss and gradient are the same at every size)."),
    shared_prefix: bool = typer.Option(_Fit.shared_prefix, help="Run each group's prompt, image included, once and "
                                       "let its completions continue its key/value cache (the same loss and "
                                       "gradient as one forward per completion, with less compute)."),
    pack: bool = typer.Option(_Fit.pack, help="Micro-batches of rows of like completion length (less padding; "
                              "the same loss and gradient)."),
    lr: Lr = _Fit.lr,
    weight_decay: float = typer.Option(_Fit.weight_decay, help="AdamW weight decay."),
    max_grad_norm: float = typer.Option(_Fit.max_grad_norm, help="Gradient clipping norm."),
    kappa: Kappa = _Fit.kappa,
    marked: Marked = _Fit.marked,
    delta: Delta = _Fit.delta,
    mass: Mass = _Fit.mass,
    repaired_weight: RepairedWeight = _Fit.repaired_weight,
    kappa_rep: KappaRep = _Fit.kappa_rep,
    fail_advantage: FailAdvantage = _Fit.fail_advantage,
    rep_in_denominator: RepInDenominator = _Fit.rep_in_denominator,
    dedup_repaired: DedupRepaired = _Fit.dedup_repaired,
    policy_loss: PolicyLoss = _Fit.policy_loss,
    clip_low: ClipLow = _Fit.clip_low,
    clip_high: ClipHigh = _Fit.clip_high,
    dual_clip: DualClip = _Fit.dual_clip,
    beta: Beta = _Fit.beta,
    adv_scale: AdvScale_ = _Fit.adv_scale,
    agg: Agg = _Fit.agg,
    buffer_size: int = typer.Option(_Fit.buffer_size, help="Shuffle buffer (groups)."),
    freeze_vision: bool = typer.Option(_Fit.freeze_vision, help="Keep the vision tower and projector fixed, as dftrain sft does "
                                       "(training it in RL broke the tiny policy's perception; docs/RESULTS.md); "
                                       "the family's tower (dfgen/models) must exist."),
    lora_rank: int = typer.Option(_Fit.lora_rank, help="LoRA rank (0 = full fine-tuning): adapters on the text "
                                   "model's attention projections, as the family declares them (dfgen/models)."),
    lora_alpha: int = typer.Option(_Fit.lora_alpha, help="LoRA alpha."),
    gradient_checkpointing: bool = typer.Option(_Fit.gradient_checkpointing, help="Trade compute for memory."),
    dtype: DTypeName = typer.Option(_Fit.dtype, help="float32, or bfloat16 on a GPU."),
    save_every: int = typer.Option(_Fit.save_every, help="Checkpoint every N steps (0 = at the end)."),
    resume: bool = typer.Option(_Fit.resume, help="Continue from the latest checkpoint in --out."),
    optimizer_from: Path = typer.Option(_Fit.optimizer_from, help="A previous fit's output: continue its AdamW "
                                        "state (rounds of sample -> fit as one optimisation)."),
    seed: int = typer.Option(_Fit.seed, help="Data order and RNG seed."),
    log_every: int = typer.Option(_Fit.log_every, help="Print every N steps (metrics.jsonl has every step)."),
    threads: int = typer.Option(_Fit.threads, help="torch CPU threads (0 = torch's default)."),
    report_to: str = typer.Option(_Fit.report_to, help="Where step metrics go, comma-separated: jsonl "
                                  "(OUT/metrics.jsonl, always written), tensorboard (OUT/tb), wandb (OUT/wandb, "
                                  "offline unless WANDB_MODE=online); pip install 'dfkit[report]'."),
    fsdp: bool = typer.Option(_Fit.fsdp, help="Under torchrun: shard weights, gradients and AdamW state over the "
                              "processes (FSDP2, per decoder layer) instead of DDP replicas (dftrain/parallel.py)."),
    fsdp_mixed_precision: str = typer.Option(_Fit.fsdp_mixed_precision, help="--fsdp: none, or bfloat16 "
                                             "(parameters gathered in bf16 for compute, gradients reduced in fp32)."),
):
    """Train the policy on DF shards with the masked GRPO objective (or plain GRPO).

    Example: dftrain fit --data runs/r0/df --model runs/sft --out runs/r1 --steps 20
    """
    cfg = _config(_Fit, dict(locals()))
    quiet_hf()
    from rich.console import Console

    from dftrain.fit import run_fit

    con = Console(stderr=True)
    res = run_fit(cfg, log=lambda m: con.print(m, highlight=False))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        typer.echo(f"trained {res['steps']} steps in {res['seconds']:.1f}s; model saved to {out}")


@app.command()
@cli_errors
def loop(
    model: Path = typer.Option(..., help="Starting policy (e.g. dftrain sft output)."),
    out: Path = typer.Option(..., help="Output folder: round_RRR/{prompts,sample,repair,df,fit}, loop.json."),
    rounds: int = typer.Option(_Loop.rounds, help="Rounds of sample -> [repair -> mask] -> fit."),
    objective: Objective = _Loop.objective,
    prompts: Path = typer.Option(_Loop.prompts, help="Prompt set to draw each round's prompts from "
                                                     "(default: fresh synthetic train problems every round)."),
    prompts_per_round: int = typer.Option(_Loop.prompts_per_round, help="Prompts sampled per round."),
    task: str = typer.Option(json.dumps(_Loop.__dataclass_fields__["task"].default_factory()),
                             help="Synthetic task knobs as JSON (dfgen synth's options), e.g. "
                                  "'{\"min_reads\": 3, \"max_reads\": 4}'; ignored with --prompts."),
    group_size: int = typer.Option(_Loop.group_size, help="Rollouts per prompt."),
    temperature: float = typer.Option(_Loop.temperature, help="Sampling temperature."),
    max_new_tokens: int = typer.Option(_Loop.max_new_tokens, help="Most tokens per rollout (default: fits "
                                       "the round's reference solutions, as dfgen sample)."),
    repairer: RepairerName = typer.Option(_Loop.repairer, help="auto (oracle for prompts with a step solution, "
                                          "sibling-resample for the rest), oracle, sibling, model, resample or "
                                          "sibling-resample (dfgen repair --help)."),
    repair_model: Path = typer.Option(_Loop.repair_model, help="--repairer model: the repair model's checkpoint "
                                                              "(default: each round's sampling policy)."),
    fit_steps: int = typer.Option(_Loop.fit_steps, help="Optimizer steps per round."),
    groups_per_step: GroupsPerStep = _Loop.groups_per_step,
    updates_per_batch: UpdatesPerBatch = _Loop.updates_per_batch,
    lr: Lr = _Loop.lr,
    kappa: Kappa = _Loop.kappa,
    marked: Marked = _Loop.marked,
    delta: Delta = _Loop.delta,
    mass: Mass = _Loop.mass,
    repaired_weight: RepairedWeight = _Loop.repaired_weight,
    kappa_rep: KappaRep = _Loop.kappa_rep,
    fail_advantage: FailAdvantage = _Loop.fail_advantage,
    rep_in_denominator: RepInDenominator = _Loop.rep_in_denominator,
    dedup_repaired: DedupRepaired = _Loop.dedup_repaired,
    policy_loss: PolicyLoss = _Loop.policy_loss,
    clip_low: ClipLow = _Loop.clip_low,
    clip_high: ClipHigh = _Loop.clip_high,
    dual_clip: DualClip = _Loop.dual_clip,
    beta: Beta = _Loop.beta,
    adv_scale: AdvScale_ = _Loop.adv_scale,
    agg: Agg = _Loop.agg,
    carry_optimizer: bool = typer.Option(_Loop.carry_optimizer, help="Continue AdamW state across rounds."),
    eval: list[Path] = typer.Option([], help="Prompt set(s) to score by greedy accuracy (repeatable)."),
    eval_n: int = typer.Option(_Loop.eval_n, help="Problems scored per eval set."),
    eval_every: int = typer.Option(_Loop.eval_every, help="Evaluate every N rounds (and after the last)."),
    report_to: str = typer.Option(_Loop.report_to, help="Where metrics go, comma-separated: jsonl (loop.json and "
                                  "each round's metrics.jsonl, always), tensorboard, wandb (OUT/tb, OUT/wandb: rounds; "
                                  "round_NNN/fit/: its steps); pip install 'dfkit[report]'."),
    seed: int = typer.Option(_Loop.seed, help="Prompt, sampling and data-order seed."),
):
    """R rounds of the decoupled pipeline; each round's checkpoint samples the next (resumable).

    Example: dftrain loop --model runs/sft --out runs/loop --rounds 4 --eval runs/test
    """
    cfg = _config(_Loop, dict(locals()), task=_json_object(task, "--task"), eval=[str(e) for e in eval])
    quiet_hf()
    from rich.console import Console

    from dftrain.loop import run_loop

    con = Console(stderr=True)
    res = run_loop(cfg, log=lambda m: con.print(m, highlight=False))
    typer.echo(f"{len(res['rounds'])} rounds in {res['seconds']:.0f}s; final model {res['final_model']}")


from dfgen.backends import BackendName as _EvalBackend  # noqa: E402 - the eval command's option types
from dftrain.evaluate import BENCH_NAMES as _BENCH_NAMES, Bench as _Bench  # noqa: E402 - light module (no torch at import)
from dftrain.evaluate import EvalConfig as _Eval  # noqa: E402


@app.command("eval")
@cli_errors
def eval_(
    model: Path = typer.Option(None, help="Policy folder to evaluate (not needed with --predictions)."),
    bench: _Bench = typer.Option(_Eval.bench, help=f"Benchmark: {', '.join(_BENCH_NAMES)}."),
    data: Path = typer.Option(None, help="Benchmark records: dfgen synth output, or the benchmark's "
                                         "json/jsonl/parquet/folder (images next to it)."),
    backend: _EvalBackend = typer.Option(_Eval.backend, help="Generation engine."),
    limit: int = typer.Option(None, help="Evaluate only the first N usable records."),
    out: Path = typer.Option(_Eval.out, help="Summary JSON; per-item records go next to it "
                                                        "as <stem>.items.jsonl."),
    samples: int = typer.Option(_Eval.samples, help="Samples per record: pass@k (1 = greedy)."),
    temperature: float = typer.Option(None, help="Sampling temperature (default 0 = greedy for 1 sample, "
                                                 "1.0 for pass@k)."),
    max_new_tokens: int = typer.Option(None, help="Most tokens per answer (default: synth fits every "
                                                 "reference solution, at least 64; 512 otherwise)."),
    seed: int = typer.Option(_Eval.seed, help="Base seed; sample k of record id uses hash(seed, id, k)."),
    batch_size: int = typer.Option(_Eval.batch_size, help="Records per generate call."),
    device: str = typer.Option(_Eval.device, help="hf backend device: auto, cpu, cuda, cuda:N."),
    predictions: Path = typer.Option(None, help="Score existing answers instead of generating: JSONL with an "
                                                "id and a response per line (needs --data, no --model)."),
    prediction_field: str = typer.Option(None, help="Field of --predictions holding the answer text "
                                                    "(default: response, else prediction)."),
):
    """Score a checkpoint (or existing predictions) on a benchmark: overall and per-category accuracy.

    Records that cannot be evaluated (missing fields, missing or undecodable images, unknown answer
    types) are counted as skipped and listed, never counted correct.

    Example: dftrain eval --model runs/sft --bench mathvista --data data/mathvista/testmini_with_images.jsonl --out runs/eval/mathvista.json
    """
    from dftrain.evaluate import EvalConfig, evaluate, items_path, summary_table

    cfg = EvalConfig(bench=bench.value, data=data, model=model, predictions=predictions,
                     prediction_field=prediction_field, backend=backend.value, out=out, limit=limit,
                     samples=samples, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                     batch_size=batch_size, device=device).validate()
    quiet_hf()
    from rich.console import Console

    err = Console(stderr=True)
    prog = {"bar": None}

    def progress(total=None, advance=0):
        if total is not None and cfg.predictions is None:
            from dfgen.console import progress_bar

            prog["bar"], prog["task"] = progress_bar(total, "evaluating")
            prog["bar"].start()
        elif prog["bar"] is not None and advance:
            prog["bar"].update(prog["task"], advance=advance)

    try:
        summary = evaluate(cfg, progress=progress, log=lambda m: err.print(m, highlight=False, markup=False))
    finally:
        if prog["bar"] is not None:
            prog["bar"].stop()
    Console().print(summary_table(summary))
    typer.echo(f"wrote {out} and {items_path(out)}")


def main():
    run_app(app)


if __name__ == "__main__":
    main()
