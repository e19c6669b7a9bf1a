"""Token alignment of a failed trajectory and its repair, and the masks Differential Feedback trains on.

A failed rollout `bad` (token ids of the policy tokenizer) and its minimal repair `rep` are aligned
with a minimal Levenshtein edit script (`rapidfuzz.distance.Levenshtein.editops`, unit cost for insert,
delete and replace). Substitutions matter: one wrong digit is one `replace` and marks exactly that
token on both sides, where an insert/delete (LCS) alignment would report a deletion plus an
insertion. `Alignment.editops` holds the script (one `(tag, i, j)` per edited token) and
`Alignment.opcodes` the same script as difflib-style `(tag, i1, i2, j1, j2)` blocks, equal blocks
included, identical to `Levenshtein.opcodes(bad, rep)`; `apply_opcodes(bad, rep, a.opcodes) == rep`.
The masks are filled from the editops in one pass; opcodes are built only when first read.

    from dfgen.align import align, step_ids, step_mask
    a = align(bad_ids, rep_ids)           # Python lists of ints (numpy arrays are converted)
    a.mask_bad, a.mask_repaired           # 0/1 lists, len(bad_ids) and len(rep_ids)
    a.root_bad, a.root_repaired           # the same, first edit (root cause) only
    steps = step_ids(token_texts)         # step (line) index of each token of a trajectory
    step_mask(a.mask_bad, steps)          # whole step marked if any of its tokens is marked

Masks (lengths always equal the trajectory lengths, also for empty sequences; all values 0/1):
- `mask_bad[t] = 1` where the repair replaced or deleted token t of the bad trajectory;
  `mask_repaired[t] = 1` where the repair inserted or replaced token t of the repaired trajectory.
- Hunks. Consecutive non-equal opcodes (no equal token between them, e.g. `replace` then `delete`
  when "12" is repaired to "5") form one *hunk*: one edit location. Every bad token inside a hunk is
  replaced or deleted and every repaired token inside it is inserted or replaced, so masks are filled
  hunk by hunk.
- Insertion rule (`anchor=True`, the default). A hunk that is a pure insertion before bad position
  i deletes nothing, so by the letter of the rule above it would mark no bad token, and a failed
  rollout whose repair only adds tokens (a missing step, a missing digit) would get an all-zero
  `mask_bad`: with `w_t = m_t + kappa * (1 - m_t)` it would then carry kappa-scaled blame everywhere
  and none where it went wrong. Instead the hunk marks bad token i, the token the policy emitted
  where it should have emitted the inserted ones (the decision that went wrong), or the last bad
  token when the insertion is at the end (the policy stopped too early; its stop token is not in
  the trajectory). Symmetrically a pure deletion marks repaired token j (what the policy should
  have emitted instead of the deleted tokens), or the last repaired token at the end. Consequence:
  whenever `bad != rep`, each non-empty side has at least one marked token, and a marked token may
  be an unedited (equal) one next to the edit. `anchor=False` gives the literal rule (pure
  insertions mark nothing on the bad side, pure deletions nothing on the repaired side).
- Root cause. `root_bad` / `root_repaired` mark only the first hunk (same insertion rule): the
  first place the trajectories diverge. A hunk is usually one opcode; taking the whole hunk rather
  than the first non-equal opcode keeps "12" -> "5" (replace + delete) one root cause, both digits.
  Later hunks are usually downstream consequences (a minimal repair also rewrites later steps that
  were consistent with the wrong value). root <= mask always.
- Repeated tokens and ties. Several minimal alignments can exist (bad [5, 5, 5] vs rep [5, 5]: any
  of the three 5s can be "the deleted one"). rapidfuzz first strips the longest common prefix and
  suffix, so the first hunk always starts exactly at the first position where the sequences differ,
  i.e. edits in a run of repeated tokens go to its end: [5, 5, 5] -> [5, 5] deletes (marks) bad
  token 2; [5, 5] -> [5, 5, 5] inserts at the end, which marks bad token 1 (insertion rule).
  Hence, for bad != rep, `first_edit_position(mask_bad) == min(p, len(bad) - 1)` with p the common
  prefix length (tested). Ties further inside are broken by rapidfuzz's backtrace: deterministic
  for a given rapidfuzz version, not a promise across versions.
- `distance` is the Levenshtein distance in tokens; `edit_ratio = distance / max(len(bad), 1)` (can
  exceed 1 when the repair is much longer than the bad trajectory).

Steps (`step_ids`): a step is a line. Each token is given the step of the character it starts
with in the concatenated decoded text; a new step starts after every "\\n" (so a token containing a
newline ends its step and the next token starts a new one), and also where a `Step <n>:` marker
(case-sensitive, regex `[ \\t]*\\bStep[ \\t]*\\d+[ \\t]*:`, leading blanks included) follows other text
on the same line, so "Step 1: 3 Step 2: 5" on one line is two steps. A marker at the start of a line
starts no extra step. Step ids are consecutive integers from 0. Pass the *decoded* text of each
token (e.g. `[tokenizer.decode([i]) for i in ids]`), not byte-level BPE pieces such as "Ċ" from
`convert_ids_to_tokens`, whose newline is not "\\n". Tokens that decode to "" belong to the step of
the next character; a newline that ends the text starts no step, so trailing "" tokens (an end token
decoded without special tokens) stay in the last step.

Pure Python + rapidfuzz, deterministic. Pass lists, not numpy arrays (rapidfuzz is ~7x slower on
numpy ints); `align` converts arrays with `.tolist()`. Speed (`python -m bench.bench_align`, 10k
pairs of 300 tokens, 10% edits, 2-core x86_64): align 47 us/pair, 1.4x bare rapidfuzz opcodes and
17x faster than difflib.SequenceMatcher(autojunk=False).
Tests: `python -m pytest tests/test_align.py -q`.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property

from rapidfuzz.distance import Editops, Levenshtein

Opcode = tuple[str, int, int, int, int]  # (tag, i1, i2, j1, j2), difflib convention
Editop = tuple[str, int, int]  # (tag, i, j): replace bad[i] by rep[j] / delete bad[i] / insert rep[j] at i

_STEP_MARKER = re.compile(r"[ \t]*\bStep[ \t]*\d+[ \t]*:")


@dataclass(frozen=True)
class Alignment:
    mask_bad: list[int]  # (len(bad),) 1 on replaced/deleted bad tokens (+ insertion anchors)
    mask_repaired: list[int]  # (len(rep),) 1 on inserted/replaced repaired tokens (+ deletion anchors)
    root_bad: list[int]  # (len(bad),) first hunk only; root_bad <= mask_bad
    root_repaired: list[int]  # (len(rep),) first hunk only; root_repaired <= mask_repaired
    distance: int  # Levenshtein distance in tokens (== len(editops))
    edit_ratio: float  # distance / max(len(bad), 1)
    editops: list[Editop]  # the edit script, one (tag, i, j) per edited token (rapidfuzz convention)

    @cached_property
    def opcodes(self) -> list[Opcode]:
        """The same script as difflib-style blocks, equal blocks included (built on first access)."""
        ops = Editops(self.editops, len(self.mask_bad), len(self.mask_repaired))
        return ops.as_opcodes().as_list()


def _as_list(ids) -> list[int]:
    if type(ids) is list:
        return ids
    if hasattr(ids, "tolist"):  # numpy / torch arrays: rapidfuzz is much slower on numpy scalars
        return ids.tolist()
    return list(ids)


def _mark(mask: list[int], lo: int, hi: int, anchor: bool) -> None:
    """Set mask[lo:hi] to 1; an empty range marks the token at lo (or the last one) if anchor."""
    if hi > lo:
        mask[lo:hi] = [1] * (hi - lo)
    elif anchor and mask:
        mask[lo if lo < len(mask) else len(mask) - 1] = 1


def align(bad_ids, rep_ids, *, anchor: bool = True) -> Alignment:
    """Align a bad trajectory with its repair; see the module docstring for what each mask means."""
    bad, rep = _as_list(bad_ids), _as_list(rep_ids)
    n, m = len(bad), len(rep)
    editops = Levenshtein.editops(bad, rep).as_list()
    mask_bad, mask_rep = [0] * n, [0] * m
    # One pass over the edit script (hot loop: item assignment only, no slices, no calls).
    # Consecutive editops belong to one hunk when the next starts where the previous ended;
    # (hs, hd) is where the open hunk started, (es, ed) where it ends so far.
    first = None  # (i1, i2, j1, j2) of the first hunk
    hs = hd = es = ed = -1
    for tag, s, d in editops:
        if s != es or d != ed:  # an equal block lies between: close the open hunk
            if hs >= 0:
                if first is None:
                    first = (hs, es, hd, ed)
                if anchor:  # an equal block follows, so es < n and ed < m
                    if hs == es:
                        mask_bad[es] = 1
                    if hd == ed:
                        mask_rep[ed] = 1
            hs, hd = s, d
        if tag == "replace":
            mask_bad[s] = 1
            mask_rep[d] = 1
            es, ed = s + 1, d + 1
        elif tag == "delete":
            mask_bad[s] = 1
            es, ed = s + 1, d
        else:  # insert
            mask_rep[d] = 1
            es, ed = s, d + 1
    if hs >= 0:  # close the last hunk (it may end the sequences)
        if first is None:
            first = (hs, es, hd, ed)
        if anchor:
            if hs == es and n:
                mask_bad[es if es < n else n - 1] = 1
            if hd == ed and m:
                mask_rep[ed if ed < m else m - 1] = 1
    root_bad, root_rep = [0] * n, [0] * m
    if first is not None:
        _mark(root_bad, first[0], first[1], anchor)
        _mark(root_rep, first[2], first[3], anchor)
    distance = len(editops)
    return Alignment(mask_bad, mask_rep, root_bad, root_rep, distance, distance / (n or 1), editops)


def apply_opcodes(bad_ids, rep_ids, opcodes) -> list[int]:
    """Rebuild the repaired sequence from bad_ids: equal blocks copied from bad, edits from rep.

    Checks that the opcodes tile both sequences in order; raises ValueError otherwise. The result
    equals rep_ids exactly when the equal blocks really are equal.
    """
    bad, rep = _as_list(bad_ids), _as_list(rep_ids)
    out: list[int] = []
    pi = pj = 0
    for tag, i1, i2, j1, j2 in opcodes:
        if (i1, j1) != (pi, pj) or i2 < i1 or j2 < j1:
            raise ValueError(f"opcode {(tag, i1, i2, j1, j2)} does not continue at ({pi}, {pj})")
        if tag == "equal":
            out += bad[i1:i2]
        elif tag in ("replace", "insert"):
            out += rep[j1:j2]
        elif tag != "delete":
            raise ValueError(f"unknown opcode tag {tag!r}")
        pi, pj = i2, j2
    if (pi, pj) != (len(bad), len(rep)):
        raise ValueError(f"opcodes end at ({pi}, {pj}), sequences have lengths ({len(bad)}, {len(rep)})")
    return out


def step_ids(token_texts: list[str]) -> list[int]:
    """Step (line / `Step <n>:` segment) index of each token, from each token's decoded text."""
    text = "".join(token_texts)
    starts, pos = [], 0
    for piece in token_texts:
        starts.append(pos)
        pos += len(piece)
    cuts = {nl.end() for nl in re.finditer("\n", text) if nl.end() < len(text)}
    for match in _STEP_MARKER.finditer(text):
        s = match.start()
        if text[text.rfind("\n", 0, s) + 1 : s].strip():  # other text before it on this line
            cuts.add(s)
    cuts = sorted(cuts)
    raw = [bisect_right(cuts, s) for s in starts]  # non-decreasing, may skip (blank lines)
    out, prev, step = [], None, -1
    for r in raw:
        if r != prev:
            step, prev = step + 1, r
        out.append(step)
    return out


def step_mask(token_mask: list[int], steps: list[int]) -> list[int]:
    """Token-level mask where a step is marked whole if any of its tokens is marked."""
    if len(token_mask) != len(steps):
        raise ValueError(f"mask has {len(token_mask)} tokens, steps has {len(steps)}")
    marked = {s for s, v in zip(steps, token_mask) if v}
    return [1 if s in marked else 0 for s in steps]


def first_edit_position(mask) -> int | None:
    """Index of the first marked token, or None if nothing is marked."""
    for t, v in enumerate(mask):
        if v:
            return t
    return None
