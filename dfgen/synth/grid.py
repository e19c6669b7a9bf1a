"""Counting-by-colour on a grid: a multi-step visual reasoning task with exact steps.

The image is a ``grid x grid`` board of 28-pixel cells (so with Qwen2-VL's 14-px patches and
2x2 merge, *one image token per cell*). Each cell is empty or holds a coloured square or
circle. A question names ``reads`` colours and an operator chain, e.g.
"How many red plus blue minus green?". The canonical solution reads one colour per step and
folds it into the running value immediately::

    Step 1: red = 3
    Step 2: blue = 5
    Step 3: 3 + 5 = 8
    Step 4: green = 2
    Step 5: 8 - 2 = 6
    Answer: 6

Every step's value is stored (``Problem.steps``), so the reward is exact and an oracle can
locate the first wrong step and repair it minimally (``dfgen.repairers.oracle``).

Splits never overlap by construction: a problem's *content* (board + question) is hashed and
``hash % 10 == 0`` belongs to ``test``, ``== 1`` to ``val`` (for tuning, e.g. the learning rate),
everything else to ``train``; each generator rejects problems of the other splits. Seeds only choose which problems of a split are drawn.

Difficulty knobs (``GridTask``): ``grid`` (2-4 cells a side -> 56-112 px), ``reads``
(colours read per question: 2-4, a range), ``colors`` (palette size), ``max_count`` (most
cells of one colour), ``ops`` (the operators drawn from: "+", "+-", or with "*" for times, e.g.
"+-*"). Operators fold left to right, as the steps say: "red plus blue times green" is
(red + blue) * green. Multiplication makes the arithmetic, not only the reads, a place where a
small policy fails: products of the running value reach two digits, and digits are single tokens.

Run: ``dfgen synth --out data/synth_train --n 1000 --seed 0``.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw

CELL = 28  # pixels per cell = one merged Qwen2-VL image token (14-px patch, 2x2 merge)
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("square", "circle")
OPS = {"+": "plus", "-": "minus", "*": "times"}


@dataclass(frozen=True)
class GridTask:
    """Difficulty knobs. Defaults are the embedded demo's: a 3x3 board (9 image tokens),
    2-3 reads, which a 1M-parameter model learns to >30% in a couple of minutes of SFT."""

    grid: int = 3  # cells per side; image is 28*grid px (56-112 px for grid 2-4)
    min_reads: int = 2  # colours read per question (each read is one step)
    max_reads: int = 3
    colors: int = 4  # palette size (first N of PALETTE)
    max_count: int = 3  # at most this many cells of one colour
    ops: str = "+"  # operators to draw from: "+", "+-" (negative answers), "+-*" (two-digit products)

    def validate(self) -> None:
        if not 2 <= self.grid <= 4:
            raise ValueError(f"grid must be 2..4 (56-112 px images), got {self.grid}")
        if not 1 <= self.min_reads <= self.max_reads <= self.colors:
            raise ValueError("need 1 <= min_reads <= max_reads <= colors")
        if not 2 <= self.colors <= len(PALETTE):
            raise ValueError(f"colors must be 2..{len(PALETTE)}")
        if self.max_count < 1:
            raise ValueError("max_count must be >= 1")
        if not self.ops or set(self.ops) - set(OPS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops must be distinct operators from '+-*' (e.g. '+', '+-', '+-*'), got {self.ops!r}")


@dataclass
class Problem:
    cells: list  # grid*grid entries: None or [color, shape]
    colors: list  # colours read, in order
    ops: list  # len(colors)-1 operators
    steps: list = field(default_factory=list)  # [{"kind","line","value",...}]
    answer: int = 0

    @property
    def grid(self) -> int:
        return int(round(len(self.cells) ** 0.5))

    def question(self) -> str:
        words = [self.colors[0]]
        for op, c in zip(self.ops, self.colors[1:]):
            words += [OPS[op], c]
        return "How many " + " ".join(words) + "?"

    def content_hash(self) -> str:
        key = json.dumps([self.cells, self.colors, self.ops], separators=(",", ":"))
        return hashlib.sha256(key.encode()).hexdigest()

    def render(self) -> bytes:
        g = self.grid
        img = Image.new("RGB", (g * CELL, g * CELL), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for k, cell in enumerate(self.cells):
            if cell is None:
                continue
            color, shape = cell
            x0, y0 = (k % g) * CELL + 4, (k // g) * CELL + 4
            box = (x0, y0, x0 + CELL - 9, y0 + CELL - 9)
            (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=PALETTE[color])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()


def _solve(p: Problem) -> None:
    counts = {}
    for cell in p.cells:
        if cell is not None:
            counts[cell[0]] = counts.get(cell[0], 0) + 1
    steps, k = [], 1
    value = None
    for i, color in enumerate(p.colors):
        n = counts.get(color, 0)
        steps.append({"kind": "read", "color": color, "value": n, "line": f"Step {k}: {color} = {n}"})
        k += 1
        if value is None:
            value = n
            continue
        op = p.ops[i - 1]
        new = value + n if op == "+" else value - n if op == "-" else value * n
        steps.append({"kind": "op", "op": op, "a": value, "b": n, "value": new,
                      "line": f"Step {k}: {value} {op} {n} = {new}"})
        k += 1
        value = new
    p.steps, p.answer = steps, value


def solution_text(steps: list, answer: int) -> str:
    """The canonical completion: one line per step, then ``Answer: N``."""
    return "\n".join([s["line"] for s in steps] + [f"Answer: {answer}"])


def solution_tokens(records, tokenizer) -> list[int]:
    """Token count (eos included) of each record's canonical solution, for records that hold one."""
    out = []
    for r in records:
        sol = json.loads(r["solution"]) if r.get("solution") else None
        if sol and "steps" in sol:
            out.append(len(tokenizer(solution_text(sol["steps"], sol["answer"]), add_special_tokens=False)["input_ids"]) + 1)
    return out


def token_budget(records, tokenizer, floor: int = 64, margin: int = 4) -> int:
    """A generation budget that fits every canonical solution among ``records`` (+ ``margin``), at
    least ``floor``: 64 for the default task (solutions <= 59 tokens), ~85 for 3-4 reads (<= 81).
    A fixed 64 silently truncated longer chains (docs/RESULTS.md 3c)."""
    return max([floor] + [n + margin for n in solution_tokens(records, tokenizer)])


def _draw(task: GridTask, rng: random.Random) -> Problem:
    palette = list(PALETTE)[: task.colors]
    n_cells = task.grid * task.grid
    cells: list = [None] * n_cells
    free = list(range(n_cells))
    rng.shuffle(free)
    for color in rng.sample(palette, len(palette)):  # shuffled: no colour is starved by order
        for _ in range(rng.randint(0, task.max_count)):
            if free:
                cells[free.pop()] = [color, rng.choice(SHAPES)]
    reads = rng.randint(task.min_reads, task.max_reads)
    colors = rng.sample(palette, reads)
    ops = [rng.choice(task.ops) for _ in range(reads - 1)]
    p = Problem(cells=cells, colors=colors, ops=ops)
    _solve(p)
    return p


def split_of(p: Problem) -> str:
    return SPLITS.get(int(p.content_hash()[:8], 16) % 10, "train")


SPLITS = {0: "test", 1: "val"}


def make_problems(n: int, seed: int, split: str = "train", task: GridTask = GridTask()):
    """Yield ``n`` problems of ``split``, deterministic in (seed, split, task)."""
    task.validate()
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    rng = random.Random(f"dfgen-grid|{seed}|{split}|{json.dumps(asdict(task), sort_keys=True)}")
    made, tries = 0, 0
    while made < n:
        tries += 1
        if tries > 200 * (n + 10):
            raise ValueError("task space too small for this many problems of this split")
        p = _draw(task, rng)
        if split_of(p) != split:
            continue
        made += 1
        yield p


def to_record(p: Problem, idx: int, seed: int, split: str, task: GridTask) -> dict:
    """A prompt record (DESIGN.md data contract)."""
    return {
        "id": f"grid-{split}-s{seed}-{idx:06d}",
        "question": p.question(),
        "image": p.render(),
        "image_path": None,
        "answer": str(p.answer),
        "answer_type": "integer",
        "choices": None,
        "precision": None,
        "unit": None,
        "source": "synth",
        "category": f"reads{len(p.colors)}",
        "solution": json.dumps({"steps": p.steps, "answer": p.answer}),
        "meta": json.dumps({"cells": p.cells, "task": asdict(task), "hash": p.content_hash()}),
    }


def corpus_texts(n: int = 3000, seed: int = 12345) -> list[str]:
    """Questions and solutions over the widest knob settings, to train the tiny tokenizer."""
    out = []
    wide = GridTask(grid=4, min_reads=2, max_reads=4, colors=len(PALETTE), max_count=4, ops="+-")
    rng = random.Random(seed)
    for _ in range(n):
        p = _draw(wide, rng)
        out += [p.question(), solution_text(p.steps, p.answer)]
    return out


def write_synth(out, n: int, seed: int = 0, split: str = "train", task: GridTask = GridTask(),
                shard_size: int = 2000) -> int:
    """Write ``n`` prompt records as prompt shards into ``out`` (atomic per shard)."""
    from pathlib import Path

    from dfgen.errors import UserError
    from dfgen.shards import ShardWriter, write_json_atomic

    if n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    try:
        task.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(out)
    if out.exists() and any(out.glob("*.parquet")):
        raise UserError(f"{out} already holds shards; choose an empty output folder")
    meta = {"task": asdict(task), "seed": seed, "split": split, "n": n, "generator": "grid"}
    w = ShardWriter(out, "prompts", meta)
    rows, chunk = [], 0
    for i, p in enumerate(make_problems(n, seed, split, task)):
        rows.append(to_record(p, i, seed, split, task))
        if len(rows) == shard_size:
            w.write(chunk, rows)
            rows, chunk = [], chunk + 1
    if rows:
        w.write(chunk, rows)
    write_json_atomic(out / "config.json", meta)
    return n


_READ = re.compile(r"^Step \d+: ([a-z]+) = (-?\d+)$")
_OP = re.compile(r"^Step \d+: (-?\d+) ([-+*]) (-?\d+) = (-?\d+)$")


def correct_prefix(response: str, solution: dict) -> int:
    """How many of the response's leading lines equal the canonical steps (0: the first step is wrong)."""
    gold = [s["line"] for s in solution["steps"]]
    lines = [ln.strip() for ln in response.strip().splitlines()]
    k = 0
    while k < min(len(gold), len(lines)) and lines[k] == gold[k]:
        k += 1
    return k


def reads_right(response: str, solution: dict) -> tuple[int, int]:
    """(right, total) read steps: a read line of the canonical solution counts as right when the
    response's line at the same position equals it (reads do not depend on earlier values, so a
    read after an arithmetic slip still counts)."""
    lines = [ln.strip() for ln in response.strip().splitlines()]
    reads = [(k, s["line"]) for k, s in enumerate(solution["steps"]) if s["kind"] == "read"]
    return sum(k < len(lines) and lines[k] == g for k, g in reads), len(reads)


def classify_response(response: str, solution: dict) -> tuple[str, bool]:
    """(kind of the first wrong line, every step right) of a response against the canonical solution.

    Kinds: ``ok``, ``colour`` (a read names the wrong colour: the question was misread), ``count``
    (right colour, wrong count: the image was misread), ``arithmetic`` (right operands, wrong
    result), ``carried`` (operands differ from the canonical ones), ``answer`` (all steps right,
    wrong or inconsistent answer line), ``format`` (missing or malformed lines)."""
    gold = [s["line"] for s in solution["steps"]]
    lines = [ln.strip() for ln in response.strip().splitlines()]
    for k, g in enumerate(gold):
        if k >= len(lines):
            return "format", False
        if lines[k] == g:
            continue
        mg, mr = _READ.match(g), _READ.match(lines[k])
        if mg and mr:
            return ("colour" if mg.group(1) != mr.group(1) else "count"), False
        og, orr = _OP.match(g), _OP.match(lines[k])
        if og and orr:
            same_operands = og.group(1, 2, 3) == orr.group(1, 2, 3)
            return ("arithmetic" if same_operands else "carried"), False
        return "format", False
    tail = lines[len(gold):]
    if tail != [f"Answer: {solution['answer']}"]:
        return ("answer" if tail and tail[0].startswith("Answer:") else "format"), True
    return "ok", True
