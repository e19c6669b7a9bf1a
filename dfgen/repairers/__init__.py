"""Repairers: turn a failed trajectory into a minimally edited correct one.

Each repairer proposes a repaired *text* for a failed rollout (or a rejection reason); the
repair stage (``dfgen.repair``) then verifies every proposal the same way, whoever made it:
the extracted answer must be correct and the token edit ratio under a bound.

* ``oracle`` (synthetic tasks with a step-by-step ``solution``): keeps every line that is
  semantically right verbatim (the trajectory's own wording), replaces wrong or missing steps
  by the recomputed canonical line, and ends with the correct ``Answer:``.
* ``sibling``: the correct rollout of the same group nearest in token edit distance.
* ``model``: a repair model (the policy by default) prompted with the image, question,
  reference answer and the erroneous solution (template file, replaceable).

The registry: ``REPAIRERS[name]`` is a function ``(jobs, env) -> list[Proposal]``, one proposal per
job, where a job is ``(row, i)`` (a group row of the sample shards and the index of its failed
rollout) and ``env`` a ``RepairEnv`` (what a repairer may need besides the rows: the model
repairer's generator, template and budget). A new repairer registers itself with
``@register_repairer("name")`` and is then a ``dfgen repair --repairer`` choice.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Proposal:
    text: str | None  # repaired trajectory text, or None when the repairer gave up
    reason: str = ""  # why not, when text is None


@dataclass
class RepairEnv:
    gen: object = None  # model repairer: the generation backend (dfgen.backends)
    template: str = ""  # model repairer: the prompt template ({question}, {reference_answer}, {solution})
    ctx: int | None = None  # model repairer: its context length (a prompt that does not fit is rejected)
    max_new_tokens: int = 96
    batch_size: int = 64


REPAIRERS: dict = {}


def register_repairer(name: str):
    def deco(fn):
        REPAIRERS[name] = fn
        return fn
    return deco


from dfgen.repairers import oracle, sibling, model  # noqa: E402,F401 - each registers itself, in this order

from enum import Enum  # noqa: E402

RepairerName = Enum("RepairerName", {k: k for k in REPAIRERS}, type=str)  # the CLI option type, from the registry
