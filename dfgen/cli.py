"""``dfgen``: the data-generation stage (synth, tiny, sample, repair, mask, stats, show).

Every command prints a one-line ``error: ...`` and exits non-zero on bad input, shows a
progress bar on long work, writes its outputs atomically and saves its resolved config as
``config.json`` next to them. Heavy imports (torch, transformers, vllm) live inside the
command bodies so ``--help`` is instant.
"""
from __future__ import annotations

import inspect
import json
from enum import Enum
from pathlib import Path

import typer

from dfgen.backends import BackendName as Backend
from dfgen.console import progress_bar, quiet_hf
from dfgen.errors import UserError, cli_errors, run_app
from dfgen.repair import SEARCHES
from dfgen.repair import RepairConfig as _Repair  # light modules: the configs are the one source of defaults
from dfgen.repairers import RepairerName
from dfgen.sample import SampleConfig as _Sample
from dfgen.mask import MaskConfig as _Mask
from dfgen.synth.grid import GridTask as _Task
from dfgen.synth.grid import write_synth as _write_synth
from dfgen.tiny import build_tiny as _build_tiny

_TINY = inspect.signature(_build_tiny).parameters  # `dfgen tiny`'s defaults are build_tiny's
_SYNTH = inspect.signature(_write_synth).parameters  # `dfgen synth`'s: write_synth's and GridTask's

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Differential Feedback data generation: sample GRPO groups, repair failures, "
                       "compute masks.\n\nExample: dfgen synth --out runs/train --n 1000 --seed 0")


class Split(str, Enum):
    train = "train"
    val = "val"
    test = "test"




@app.command()
@cli_errors
def synth(
    out: Path = typer.Option(..., help="Output folder for the prompt shards."),
    n: int = typer.Option(..., help="Number of problems."),
    seed: int = typer.Option(_SYNTH["seed"].default, help="Chooses which problems of the split are drawn."),
    split: Split = typer.Option(_SYNTH["split"].default, help="train, val and test never share a problem."),
    grid: int = typer.Option(_Task.grid, help="Cells per side (2-4): 56-112 px images, one image token per cell."),
    min_reads: int = typer.Option(_Task.min_reads, help="Fewest colours read per question (one step each)."),
    max_reads: int = typer.Option(_Task.max_reads, help="Most colours read per question."),
    colors: int = typer.Option(_Task.colors, help="Palette size (2-5)."),
    max_count: int = typer.Option(_Task.max_count, help="Most cells of one colour."),
    ops: str = typer.Option(_Task.ops, help="Operators to draw from: '+', '+-', '+-*' ('*' is times; operators fold left to right)."),
):
    """Synthetic visual-reasoning prompts (count colours on a grid, then add them up).

    Example: dfgen synth --out runs/train --n 1000 --seed 0 --split train
    """
    task = _Task(grid=grid, min_reads=min_reads, max_reads=max_reads, colors=colors,
                    max_count=max_count, ops=ops)
    _write_synth(out, n, seed, split.value, task)
    typer.echo(f"wrote {n} {split.value} problems to {out}")


@app.command()
@cli_errors
def tiny(
    out: Path = typer.Option(..., help="Output folder (a standard Hugging Face model folder)."),
    seed: int = typer.Option(_TINY["seed"].default, help="Weight initialisation and tokenizer corpus seed."),
    hidden: int = typer.Option(_TINY["hidden"].default, help="Hidden size (128 gives ~0.8M parameters; 256 with "
                               "--layers 4 ~5M)."),
    layers: int = typer.Option(_TINY["layers"].default, help="Decoder layers."),
):
    """Build the tiny Qwen2-VL policy offline (tokenizer, processor, random weights).

    Example: dfgen tiny --out runs/tiny
    """
    quiet_hf()
    if hidden % 64 or hidden <= 0 or layers <= 0:
        raise UserError("--hidden must be a positive multiple of 64 and --layers positive")
    p = _build_tiny(out, seed=seed, hidden=hidden, layers=layers)
    typer.echo(f"built tiny policy in {p}")


def _sample_ticker(prog, task):
    """The sample stage's progress callback: rollouts and tokens per second on the bar; the bar
    starts at the first call (inputs validated), so a refusal prints nothing before its line."""
    import time

    state = {"t0": time.time(), "n": 0, "tok": 0}

    def tick(n_roll, n_tok, total=None):
        if total is not None:  # first call: inputs validated, work starts
            prog.start()
            prog.update(task, total=total)
            state["t0"] = time.time()
        state["n"] += n_roll
        state["tok"] += n_tok
        dt = max(1e-6, time.time() - state["t0"])
        prog.update(task, advance=n_roll, rate=f"{state['n'] / dt:.0f} rollouts/s {state['tok'] / dt:.0f} tok/s")

    return tick


@app.command()
@cli_errors
def sample(
    prompts: Path = typer.Option(..., help="Prompt set: parquet folder/file or jsonl (prompt records)."),
    model: Path = typer.Option(..., help="Policy folder (Hugging Face format)."),
    out: Path = typer.Option(..., help="Output folder for rollout shards."),
    backend: Backend = typer.Option(_Sample.backend, help="Generation engine."),
    group_size: int = typer.Option(_Sample.group_size, help="Rollouts per prompt (G)."),
    temperature: float = typer.Option(_Sample.temperature, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(_Sample.top_p, help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(_Sample.max_new_tokens, help="Most tokens per rollout. Default: when every "
                                                  "record has a step solution (synthetic), long enough for the longest "
                                                  "(>= 64); otherwise the model's generation_config max_new_tokens, "
                                                  "else 512. A run with over 5% of rollouts cut at the limit warns."),
    seed: int = typer.Option(_Sample.seed, help="Base seed; sample k of prompt id uses hash(seed, id, k)."),
    limit: int = typer.Option(_Sample.limit, help="Use only the first N prompts."),
    batch_size: int = typer.Option(_Sample.batch_size, help="Sequences per generate call."),
    chunk_size: int = typer.Option(_Sample.chunk_size, help="Groups per shard (unit of resumption)."),
    num_workers: int = typer.Option(_Sample.num_workers, help="Total sampler processes sharing this prompt set."),
    worker_index: int = typer.Option(_Sample.worker_index, help="This process's index in [0, num_workers)."),
    tensor_parallel_size: int = typer.Option(_Sample.tensor_parallel_size, help="vllm: GPUs per engine."),
    gpu_memory_utilization: float = typer.Option(_Sample.gpu_memory_utilization, help="vllm: fraction of GPU memory for the engine."),
    max_model_len: int = typer.Option(_Sample.max_model_len, help="vllm: longest prompt + completion."),
    dtype: str = typer.Option(_Sample.dtype, help="vllm: model dtype (auto = the checkpoint's)."),
    device: str = typer.Option(_Sample.device, help="hf: auto, cpu, cuda or cuda:N (auto = cuda when available)."),
    ray: str = typer.Option(None, help="Run the --num-workers workers as Ray tasks on a cluster: auto (the "
                                       "cluster this node belongs to) or HOST:PORT. Needs pip install 'dfkit[ray]'."),
):
    """Sample G rollouts per prompt with behaviour logprobs and exact rewards (resumable).

    Example: dfgen sample --prompts runs/train --model runs/sft --out runs/r0 --group-size 8 --limit 64
    """
    quiet_hf()
    from dfgen.sample import SampleConfig, run_sample

    cfg = SampleConfig(prompts=prompts, model=model, out=out, backend=backend.value, group_size=group_size,
                       temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                       limit=limit, batch_size=batch_size, chunk_size=chunk_size, num_workers=num_workers,
                       worker_index=worker_index, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, dtype=dtype,
                       device=device)
    cfg.validate()
    if ray is not None:
        return _on_ray("sample", cfg, ray, "groups", "groups")
    prog, task = progress_bar(None, "sampling")
    try:
        st = run_sample(cfg, progress=_sample_ticker(prog, task))
    finally:
        prog.stop()
    typer.echo(f"wrote {st['groups']} groups / {st['rollouts']} rollouts ({st['tokens']} tokens) to {out}"
               + (f"; {st['shards_skipped']} finished shard(s) kept from an earlier run" if st["shards_skipped"] else "")
               + (f"; skipped {st['skipped_prompts']} bad prompt(s), e.g. {st['skipped'][0][0]}: {st['skipped'][0][1]}"
                  if st["skipped_prompts"] else ""))
    from dfgen.sample import truncation_warning

    if warning := truncation_warning(st, st["max_new_tokens"]):
        typer.echo(warning, err=True)


Repairer = RepairerName  # the option type, from the registry
Search = Enum("Search", {k: k for k in SEARCHES}, type=str)


class Level(str, Enum):
    token = "token"
    step = "step"


def _on_ray(stage: str, cfg, address: str, key: str, unit: str) -> None:
    """A stage's workers as Ray tasks (dfgen.cluster): one bar over all of them, then each one's throughput."""
    from dfgen import cluster

    prog, task = progress_bar(None, f"{stage} on Ray (groups)")
    started = {"on": False}

    def tick(done, total):
        if not started["on"]:
            prog.start()
            started["on"] = True
        prog.update(task, completed=done, total=total)

    try:
        stats = (cluster.sample_on_ray if stage == "sample" else cluster.repair_on_ray)(cfg, address, progress=tick)
    finally:
        prog.stop()
    for line in cluster.throughput_lines(stats, unit, key):
        typer.echo(line)
    typer.echo(f"{len(stats)} Ray workers wrote {cfg.out}")


def _stage_progress(desc: str):
    prog, task = progress_bar(None, desc)
    started = {"on": False}

    def tick(n):
        if not started["on"]:
            prog.start()
            started["on"] = True
        prog.update(task, advance=n)

    return prog, tick


@app.command()
@cli_errors
def repair(
    rollouts: Path = typer.Option(..., help="Sample shards (dfgen sample output)."),
    out: Path = typer.Option(..., help="Output folder for repair shards."),
    repairer: Repairer = typer.Option(_Repair.repairer, help="auto (oracle for prompts with a step solution, "
                                      "sibling-resample for the rest: never refuses a prompt set), oracle (needs a "
                                      "step solution: synthetic tasks), sibling (the nearest correct rollout of the "
                                      "group), model (a repair model prompted with the failure), resample (the "
                                      "longest line prefix from which the policy still reaches the right answer, "
                                      "then its closest successful continuation; needs only the reward), or "
                                      "sibling-resample (sibling where the group has a correct rollout, resample "
                                      "elsewhere)."),
    repair_model: Path = typer.Option(None, help="Model and resample repairers: another HF VLM folder, e.g. a "
                                                 "larger teacher (default: the sampling policy)."),
    backend: Backend = typer.Option(_Repair.backend, help="Engine for the model and resample repairers."),
    search: Search = typer.Option(_Repair.search, help="resample: backward (the longest prefix first, one probe "
                                                       "a line) or binary (OmegaPRM's first-error search, "
                                                       "ceil(log2 lines) + 1 probes)."),
    resample_n: int = typer.Option(_Repair.resample_n, help="resample: continuations per probe; a prefix is "
                                                            "salvageable if one of them gets the right answer."),
    min_wins: int = typer.Option(_Repair.min_wins, help="resample: right continuations (of --resample-n) that make "
                                                        "a prefix salvageable; above 1 resists lucky slips."),
    max_probes: int = typer.Option(_Repair.max_probes, help="resample: most probes per failed rollout."),
    token_budget: int = typer.Option(_Repair.token_budget, help="resample: no probe starts once a failed rollout's "
                                                                "continuations have generated this many tokens."),
    temperature: float = typer.Option(_Repair.temperature, help="resample: the continuations' temperature "
                                                                "[default: the sampling run's]."),
    seed: int = typer.Option(_Repair.seed, help="resample: seed of the continuations."),
    max_new_tokens: int = typer.Option(_Repair.max_new_tokens, help="model repairer: tokens of its repair "
                                                                    "(resample continues with the sampling run's)."),
    model: Path = typer.Option(None, help="Sampling policy (default: the one recorded in the shards)."),
    max_edit_ratio: float = typer.Option(_Repair.max_edit_ratio, help="Reject repairs editing more than this fraction of tokens."),
    template: Path = typer.Option(_Repair.template, help="Prompt template for the model repairer."),
    device: str = typer.Option(_Repair.device, help="hf scorer and model repairer: auto, cpu, cuda or cuda:N."),
    ray: str = typer.Option(None, help="One Ray task per input worker's shards: auto or HOST:PORT "
                                       "(pip install 'dfkit[ray]')."),
):
    """Repair every failed rollout minimally, verify it, score it under the sampling policy.

    Example: dfgen repair --rollouts runs/r0/sample --out runs/r0/repair

    (auto: the oracle on synthetic prompts, sibling-resample on any other prompt set)
    """
    quiet_hf()
    from dfgen.repair import RepairConfig, run_repair

    cfg = RepairConfig(rollouts=rollouts, out=out, repairer=repairer.value, repair_model=repair_model,
                       backend=backend.value, model=model, max_edit_ratio=max_edit_ratio, template=template,
                       device=device, search=search.value, resample_n=resample_n, min_wins=min_wins, max_probes=max_probes, token_budget=token_budget,
                       temperature=temperature, seed=seed, max_new_tokens=max_new_tokens)
    if ray is not None:
        return _on_ray("repair", cfg, ray, "failed", "failed rollouts")
    prog, tick = _stage_progress("repairing shards")
    try:
        st = run_repair(cfg, progress=tick)
    finally:
        prog.stop()
    typer.echo(_repair_line(st, rollouts, out))


def _repair_line(st: dict, rollouts: Path, out: Path) -> str:
    if st["failed"] == 0:
        return f"no failed rollouts in {rollouts}: nothing to repair; wrote the groups unchanged to {out}"
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(st["reasons"].items(), key=lambda kv: -kv[1]))
    spent = f"; generated {st['generated_tokens']} tokens" if st.get("generated_tokens") else ""
    return f"repaired {st['ok']}/{st['failed']} failed rollouts ({reasons}){spent}; wrote {out}"


@app.command()
@cli_errors
def mask(
    repairs: Path = typer.Option(..., help="Repair shards (dfgen repair output)."),
    out: Path = typer.Option(..., help="Output folder for DF shards (with masks)."),
    level: Level = typer.Option(_Mask.level, help="Granularity of mask_bad/mask_repaired and root_bad/root_repaired "
                                                     "(step: whole Step k: segments)."),
    tokenizer: Path = typer.Option(None, help="Policy folder whose tokenizer made the ids (default: from shards)."),
):
    """Align bad and repaired tokens; write token, root-cause and step masks.

    Example: dfgen mask --repairs runs/r0/repair --out runs/r0/df
    """
    quiet_hf()
    from dfgen.mask import MaskConfig, run_mask

    prog, tick = _stage_progress("masking shards")
    try:
        st = run_mask(MaskConfig(repairs=repairs, out=out, level=level.value, tokenizer=tokenizer), progress=tick)
    finally:
        prog.stop()
    if st["masked"] == 0:
        typer.echo(f"no verified repairs in {repairs}: wrote the groups with empty masks to {out}")
    else:
        typer.echo(f"masked {st['masked']} repaired rollouts (mask density {st['mask_density']:.3f}); wrote {out}")


@app.command()
@cli_errors
def show(
    path: Path = typer.Argument(..., help="Shard folder (repair or mask stage shows diffs)."),
    out: Path = typer.Option(..., help="HTML file to write."),
    groups: int = typer.Option(20, help="Groups to show."),
    seed: int = typer.Option(0, help="Which groups are sampled."),
):
    """A static HTML report: image, question, bad vs repaired side by side, masked tokens highlighted.

    Example: dfgen show runs/r0/df --out report.html
    """
    quiet_hf()
    from dfgen.report import write_report

    n = write_report(path, out, groups=groups, seed=seed)
    typer.echo(f"wrote {out} ({n} groups)")


@app.command()
@cli_errors
def stats(
    path: Path = typer.Argument(..., help="Shard folder of any stage."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Summary of a shard set: rewards, mixed groups, tokens, repairs, mask density.

    Example: dfgen stats runs/r0
    """
    from dfgen.stats import compute_stats, render_table

    st = compute_stats(path)
    if as_json:
        typer.echo(json.dumps(st, indent=2, default=str))
    else:
        from rich.console import Console

        Console().print(render_table(st))


def main():
    run_app(app)


if __name__ == "__main__":
    main()
