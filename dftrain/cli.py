"""``dftrain``: the learning stage (sft, fit, eval).

Errors are one line on stderr with a non-zero exit; the resolved config is saved next to
every output; heavy imports stay inside command bodies so ``--help`` is instant.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer

from dfgen.cli import _quiet_hf
from dfgen.errors import UserError, cli_errors

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
    steps: int = typer.Option(600, help="Optimizer steps."),
    batch_size: int = typer.Option(32, help="Prompts per step."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (cosine decay)."),
    seed: int = typer.Option(0, help="Data order and init seed."),
    eval_data: Path = typer.Option(None, help="Held-out prompts: report greedy accuracy at the end."),
    eval_n: int = typer.Option(200, help="Held-out problems to score."),
):
    """Supervised warm start on the synthetic solutions (loss on the answer only).

    Example: dftrain sft --data runs/train --model runs/tiny --out runs/sft --steps 600
    """
    _quiet_hf()
    from rich.console import Console

    from dftrain.sft import SFTConfig, run_sft

    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise UserError("--steps, --batch-size and --lr must be positive")
    cfg = SFTConfig(data=data, model=model, out=out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                    eval_data=eval_data, eval_n=eval_n)
    con = Console(stderr=True)
    res = run_sft(cfg, progress=lambda r: con.print(
        f"step {r['step']}/{steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | {r['elapsed_s']:.1f}s"))
    msg = f"saved {out} ({res['steps_per_s']:.2f} steps/s, final loss {res['final_loss']:.4f}"
    if "heldout_accuracy" in res:
        msg += f", held-out greedy accuracy {res['heldout_accuracy']:.3f}"
    typer.echo(msg + ")")


def main():
    app()


if __name__ == "__main__":
    main()
