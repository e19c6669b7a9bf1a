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
* ``resample``: verifier-guided first-error search: the longest line prefix from which the
  policy (or ``--repair-model``) still reaches the right answer, then the successful continuation
  closest to the failed rollout. Needs only the reward.
* ``sibling-resample``: sibling where the group has a correct rollout, resample elsewhere;
  ``auto`` (the default): oracle for prompts with a step solution, sibling-resample for the rest.

The registry: ``REPAIRERS[name]`` is a function ``(jobs, env) -> list[Proposal]``, one proposal per
job, where a job is ``(row, i)`` (a group row of the sample shards and the index of its failed
rollout) and ``env`` a ``RepairEnv`` (what a repairer may need besides the rows: the model
repairer's generator, template and budget). A proposal carries its ``cost`` (what it generated),
which the repair stage writes beside it. A new repairer registers itself with
``@register_repairer("name")`` and is then a ``dfgen repair --repairer`` choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Proposal:
    text: str | None  # repaired trajectory text, or None when the repairer gave up
    reason: str = ""  # why not, when text is None
    cost: dict = field(default_factory=dict)  # what it generated: repair_probes, repair_samples, repair_gen_tokens
    by: str = ""  # the repairer that made it, when a router (auto, sibling-resample) chose one


@dataclass
class RepairEnv:
    make_gen: object = None  # () -> the generation backend (dfgen.backends) of model and resample, built on first use
    tokenizer: object = None  # the sampling policy's tokenizer (the ids of the shards)
    template: str = ""  # model repairer: the prompt template ({question}, {reference_answer}, {solution})
    ctx: int | None = None  # model repairer: its context length (a prompt that does not fit is rejected)
    max_new_tokens: int = 96  # tokens one generation may run
    batch_size: int = 64
    seed: int = 0  # resample: per-sample seeds derive from it
    temperature: float = 1.0  # resample: the continuations' sampling temperature
    search: str = "backward"  # resample: backward | binary (dfgen.repairers.resample)
    resample_n: int = 4  # resample: continuations per probe
    min_wins: int = 1  # resample: right continuations that make a prefix salvageable
    max_probes: int = 8  # resample: probes per failed rollout
    token_budget: int = 2048  # resample: no probe starts once a rollout's generated tokens reach it
    _gen: object = field(default=None, repr=False)

    @property
    def gen(self):
        """The generator, built when a proposal first needs it (``auto`` on synthetic prompts never does)."""
        if self._gen is None and self.make_gen is not None:
            self._gen = self.make_gen()
        return self._gen


REPAIRERS: dict = {}


def register_repairer(name: str):
    def deco(fn):
        REPAIRERS[name] = fn
        return fn
    return deco


from dfgen.repairers import oracle, sibling, model, resample, auto  # noqa: E402,F401 - each registers itself, in this order

from enum import Enum  # noqa: E402

RepairerName = Enum("RepairerName", {k: k for k in REPAIRERS}, type=str)  # the CLI option type, from the registry
