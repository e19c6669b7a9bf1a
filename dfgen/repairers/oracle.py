"""The oracle repairer for synthetic step-format tasks: the smallest correct line edit.

Lines are parsed as ``Step k: <colour> = <n>`` (a read), ``Step k: <a> <op> <b> = <c>`` (an
operation) or ``Answer: <x>``. Walking the canonical solution step by step, a trajectory line
that means the same step with the same values is kept *verbatim*; any other line is replaced by
the canonical (recomputed) line. So the first wrong step gets its value fixed and every later
step that depended on it is recomputed, while correct steps keep the model's own wording.
Trailing extra lines are dropped; missing steps are appended. A rollout none of whose lines
parses as a step is rejected as ``not in step format`` (nothing to keep, so nothing minimal).
"""
from __future__ import annotations

import json
import re

from dfgen.repairers import Proposal, register_repairer

READ = re.compile(r"^\s*Step\s*(\d+)\s*:\s*([A-Za-z]+)\s*=\s*(-?\d+)\s*$")
OP = re.compile(r"^\s*Step\s*(\d+)\s*:\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


def parse_line(line: str):
    """A normalised tuple for a step line, or None."""
    m = READ.match(line)
    if m:
        return ("read", int(m[1]), m[2].lower(), int(m[3]))
    m = OP.match(line)
    if m:
        return ("op", int(m[1]), int(m[2]), m[3], int(m[4]), int(m[5]))
    return None


def canonical_tuple(step: dict, k: int):
    if step["kind"] == "read":
        return ("read", k, step["color"], step["value"])
    return ("op", k, step["a"], step["op"], step["b"], step["value"])


def repair(record: dict, text: str) -> Proposal:
    if not record.get("solution"):
        return Proposal(None, "no solution (oracle needs a synthetic task)")
    sol = json.loads(record["solution"])
    steps, answer = sol.get("steps"), sol.get("answer")
    if not steps:
        return Proposal(None, "no solution (oracle needs a synthetic task)")
    lines = (text or "").split("\n")
    step_lines = [ln for ln in lines if parse_line(ln) is not None]
    if not step_lines:
        return Proposal(None, "not in step format")
    out = []
    for k, step in enumerate(steps, 1):
        have = step_lines[k - 1] if k - 1 < len(step_lines) else None
        if have is not None and parse_line(have) == canonical_tuple(step, k):
            out.append(have)  # semantically right: keep the model's own wording
        else:
            out.append(step["line"])
    ans_lines = [ln for ln in lines if ln.strip().lower().startswith("answer")]
    keep_ans = ans_lines and re.fullmatch(rf"\s*Answer\s*:\s*{re.escape(str(answer))}\s*", ans_lines[-1])
    out.append(ans_lines[-1] if keep_ans else f"Answer: {answer}")
    return Proposal("\n".join(out))


@register_repairer("oracle")
def propose(jobs: list, env) -> list[Proposal]:
    return [repair(row, row["rollouts"][i]["text"]) for row, i in jobs]
