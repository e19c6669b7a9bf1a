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
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Proposal:
    text: str | None  # repaired trajectory text, or None when the repairer gave up
    reason: str = ""  # why not, when text is None


REPAIRERS = ("oracle", "sibling", "model")
