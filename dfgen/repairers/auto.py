"""Repairers that route each failure to another: what to use when you do not want to choose.

* ``sibling-resample``: the nearest correct rollout of the group where the group has one (free), the
  ``resample`` search elsewhere (all-fail groups, where GRPO is blind). On the start's failures it
  localised the oracle's root line more often than either alone, at about half resample's tokens
  (docs/RESULTS.md, "Localisation without an oracle"; ``studies/repair_localisation.py``).
* ``auto`` (the default of ``dfgen repair`` and ``dftrain loop``): ``oracle`` for prompts that carry a
  step ``solution`` (the synthetic task), ``sibling-resample`` for every other prompt. It never refuses
  a prompt set for lacking solutions.

Each routed proposal is the routed repairer's own, and the ``repairer`` column names that repairer.
"""
from __future__ import annotations

from dataclasses import replace

from dfgen.repairers import REPAIRERS, Proposal, register_repairer


def _route(jobs: list, env, pick) -> list[Proposal]:
    """Proposals for ``jobs`` where ``pick(row, i)`` names each job's repairer; each proposal says which."""
    out: list = [None] * len(jobs)
    by: dict = {}
    for k, (row, i) in enumerate(jobs):
        by.setdefault(pick(row, i), []).append(k)
    for name, ks in by.items():
        for k, prop in zip(ks, REPAIRERS[name]([jobs[k] for k in ks], env)):
            out[k] = prop if prop.by else replace(prop, by=name)
    return out


def _has_correct_sibling(row: dict, i: int) -> bool:
    return any(j != i and (r["reward"] or 0) >= 1 for j, r in enumerate(row["rollouts"]))


@register_repairer("sibling-resample")
def sibling_resample(jobs: list, env) -> list[Proposal]:
    return _route(jobs, env, lambda row, i: "sibling" if _has_correct_sibling(row, i) else "resample")


@register_repairer("auto")
def auto(jobs: list, env) -> list[Proposal]:
    return _route(jobs, env, lambda row, i: "oracle" if row.get("solution") else "sibling-resample")
