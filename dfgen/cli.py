"""``dfgen``: the data-generation stage (synth, tiny, sample, repair, mask, stats, show).

Every command prints a one-line ``error: ...`` and exits non-zero on bad input, shows a
progress bar on long work, writes its outputs atomically and saves its resolved config as
``config.json`` next to them. Heavy imports (torch, transformers, vllm) live inside the
command bodies so ``--help`` is instant.
"""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from dfgen.errors import UserError, cli_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Differential Feedback data generation: sample GRPO groups, repair failures, "
                       "compute masks.\n\nExample: dfgen synth --out runs/train --n 1000 --seed 0")


class Split(str, Enum):
    train = "train"
    test = "test"


class Backend(str, Enum):
    hf = "hf"
    vllm = "vllm"


def _quiet_hf():
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


@app.command()
@cli_errors
def synth(
    out: Path = typer.Option(..., help="Output folder for the prompt shards."),
    n: int = typer.Option(..., help="Number of problems."),
    seed: int = typer.Option(0, help="Chooses which problems of the split are drawn."),
    split: Split = typer.Option(Split.train, help="train and test never share a problem."),
    grid: int = typer.Option(3, help="Cells per side (2-4): 56-112 px images, one image token per cell."),
    min_reads: int = typer.Option(2, help="Fewest colours read per question (one step each)."),
    max_reads: int = typer.Option(3, help="Most colours read per question."),
    colors: int = typer.Option(4, help="Palette size (2-5)."),
    max_count: int = typer.Option(3, help="Most cells of one colour."),
    ops: str = typer.Option("+", help="Operators: '+' or '+-'."),
):
    """Synthetic visual-reasoning prompts (count colours on a grid, then add them up).

    Example: dfgen synth --out runs/train --n 1000 --seed 0 --split train
    """
    from dfgen.synth.grid import GridTask, write_synth

    task = GridTask(grid=grid, min_reads=min_reads, max_reads=max_reads, colors=colors,
                    max_count=max_count, ops=ops)
    write_synth(out, n, seed, split.value, task)
    typer.echo(f"wrote {n} {split.value} problems to {out}")


@app.command()
@cli_errors
def tiny(
    out: Path = typer.Option(..., help="Output folder (a standard Hugging Face model folder)."),
    seed: int = typer.Option(0, help="Weight initialisation and tokenizer corpus seed."),
    hidden: int = typer.Option(128, help="Hidden size (128 gives ~0.8M parameters; 256 with --layers 4 ~5M)."),
    layers: int = typer.Option(2, help="Decoder layers."),
):
    """Build the tiny Qwen2-VL policy offline (tokenizer, processor, random weights).

    Example: dfgen tiny --out runs/tiny
    """
    _quiet_hf()
    from dfgen.policy import build_tiny

    if hidden % 64 or hidden <= 0 or layers <= 0:
        raise UserError("--hidden must be a positive multiple of 64 and --layers positive")
    p = build_tiny(out, seed=seed, hidden=hidden, layers=layers)
    typer.echo(f"built tiny policy in {p}")


def main():
    app()


if __name__ == "__main__":
    main()
