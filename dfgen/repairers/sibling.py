"""The sibling repairer: no extra model, the nearest correct rollout of the same group.

Among the group's rollouts with reward 1, the one with the smallest token edit distance to the
failed rollout (ties: the lowest index) is its repair. Groups without a correct rollout give
``no correct sibling``: exactly the all-fail groups where GRPO is blind, which is where the
oracle or model repairers are needed.
"""
from __future__ import annotations

from rapidfuzz.distance import Levenshtein

from dfgen.repairers import Proposal, register_repairer


def repair(rollouts: list[dict], i: int) -> Proposal:
    bad = list(rollouts[i]["token_ids"])
    best, best_d = None, None
    for j, r in enumerate(rollouts):
        if j == i or not r["reward"] or r["reward"] < 1:
            continue
        d = Levenshtein.distance(bad, list(r["token_ids"]))
        if best_d is None or d < best_d:
            best, best_d = j, d
    if best is None:
        return Proposal(None, "no correct sibling")
    return Proposal(rollouts[best]["text"])


@register_repairer("sibling")
def propose(jobs: list, env) -> list[Proposal]:
    return [repair(row["rollouts"], i) for row, i in jobs]
