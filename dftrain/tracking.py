"""Where a run's scalars go: ``--report-to jsonl,tensorboard,wandb`` (TRL's ``report_to`` convention).

``dftrain fit``, ``loop`` and ``sft`` write their records to every sink named: fit its steps
(``train/*``), loop its rounds (``round/*``: sample reward, fit loss, accuracy per eval set; each
round's fit reports its steps in ``round_NNN/fit/``), sft its logged steps and held-out scores:

* ``jsonl``: the command's own record (fit: ``metrics.jsonl``; loop: ``loop.json``; sft:
  ``sft_metrics.json``), always written: resume, ``loop`` and the studies read it; naming it
  changes nothing;
* ``tensorboard``: event files under ``OUT/tb/`` (``torch.utils.tensorboard``; needs the
  ``tensorboard`` package: ``pip install 'dfkit[report]'``), every number of a record as the scalar
  ``train/NAME`` at its step. A resumed run purges the events past its checkpoint, so each step is
  logged once, as in ``metrics.jsonl``;
* ``wandb``: a Weights & Biases run in ``OUT/wandb/`` (needs ``wandb``), offline unless
  ``WANDB_MODE=online`` is set: nothing here needs the network (``wandb sync OUT/wandb/offline-run-*``
  uploads it later). ``WANDB_PROJECT`` names the project (default ``dfkit``); the resolved config is the
  run's config, and a resumed fit continues the same run id (``OUT/wandb_run_id``).

A sink whose package is missing, or an unknown name, is refused in one line before anything is
written. Only rank 0 reports.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from dfgen.errors import UserError

SINKS = ("jsonl", "tensorboard", "wandb")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse(report_to: str) -> list[str]:
    """The sinks of a ``--report-to`` value, checked: known names whose package imports."""
    import importlib.util

    names = [n.strip() for n in report_to.split(",") if n.strip()]
    for n in names:
        if n not in SINKS:
            raise UserError(f"--report-to: unknown sink {n!r} (choose from {', '.join(SINKS)}, comma-separated)")
        pkg = _PACKAGE.get(n)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise UserError(f"--report-to {n} needs the {pkg} package: pip install 'dfkit[report]'")
    return names


class Reporter:
    """The sinks beyond the JSONL file, for one output folder. ``log(record)`` takes a record with a
    ``step`` and numbers (others are skipped); ``close()`` flushes."""

    def __init__(self, out: Path, report_to: str, config: dict, start_step: int = 0, name: str | None = None,
                 prefix: str = "train"):
        self.sinks, self.tb, self.wb, self.prefix = parse(report_to), None, None, prefix
        out = Path(out)
        if "tensorboard" in self.sinks:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out / "tb"), purge_step=start_step + 1 if start_step else None)
        if "wandb" in self.sinks:
            self.wb = _wandb_run(out, config, name or f"{out.parent.name}/{out.name}")

    def log(self, record: dict, step: int | None = None) -> None:
        """Every finite number of ``record`` (nested dicts flattened: ``heldout/accuracy``) as
        ``PREFIX/NAME`` at ``step`` (default ``record["step"]``)."""
        step = int(record["step"] if step is None else step)
        scalars = {f"{self.prefix}/{k}": v for k, v in _numbers(record) if k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _numbers(record: dict, at: str = ""):
    """(name, value) of every finite int or float in ``record``, nested dicts joined with ``/``."""
    for k, v in record.items():
        if isinstance(v, dict):
            yield from _numbers(v, f"{at}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield f"{at}{k}", float(v)


def _wandb_run(out: Path, config: dict, name: str):
    import secrets
    import string

    import wandb

    id_file = out / "wandb_run_id"
    alphabet = string.ascii_lowercase + string.digits
    run_id = id_file.read_text().strip() if id_file.is_file() else "".join(secrets.choice(alphabet) for _ in range(8))
    out.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "dfkit"), name=name, id=run_id, resume="allow",
                      dir=str(out), config=config, mode=os.environ.get("WANDB_MODE", "offline"))
