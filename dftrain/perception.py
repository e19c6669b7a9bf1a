"""Does a policy read its question and its image? Two teacher-forced diagnostics for the grid task.

Both are cheap (no sampling) and answer "is the policy blind?" before any RL is spent on it.

``read_dependence(model, processor, task)`` looks at the first read step, ``Step 1: <colour> = <n>``:

* **question**: for each board, the next-token distribution after ``Step 1:`` over the colour
  tokens, once per question: the board's own question (the task's form, so a 3-read policy is asked
  3-read questions) with each colour of the palette in turn as the first colour read
  (``colour_mass``: the probability on colour tokens at all). ``question_tv`` is the mean
  pairwise total-variation distance between those distributions on the same board (0: the policy
  names the same colour whatever is asked; 1: a different colour for every question).
  ``colour_acc`` is how often the most likely colour is the one asked.
* **image**: after ``Step 1: <colour> =`` (teacher-forced with the asked colour), the distribution
  over the count digits 0..max_count. ``image_tv`` is the mean TV distance between boards whose true
  count of that colour differs (0: the count ignores the image). ``count_acc`` is how often the most
  likely digit is the true count: the teacher-forced read accuracy.

``feature_probe(model, processor, task)`` asks whether the vision features the LM receives (the
merger output at the image placeholders, ``model.model.visual``) still hold each colour's count:
a linear probe (multinomial logistic regression on the concatenated cell features, 80/20 split)
per colour, held-out accuracy. On the untrained tiny policy it reads 0.99-1.00; training the
tower together with the LM drove it down to 0.43-0.86 (docs/RESULTS.md, "The policy that sees").

Boards come from the task's ``val`` split with a fixed seed, so two checkpoints see the same ones.
"""
from __future__ import annotations

import itertools
import json


def _boards(task, n: int, seed: int):
    from dfgen.synth.grid import make_problems

    return list(make_problems(n, seed, "val", task))


def _asking_first(board, colour: str) -> str:
    """The board's question with ``colour`` read first (the colour it displaces takes its place)."""
    from dfgen.synth.grid import Problem

    rest = [board.colors[0] if c == colour else c for c in board.colors[1:]]
    return Problem(cells=board.cells, colors=[colour, *rest], ops=board.ops).question()


def _next_token_probs(model, processor, questions, images, prefix_ids):
    """Next-token probabilities (B, V) after each row's prompt + its prefix ids (teacher forced)."""
    import torch

    from dfgen.policy import completion_inputs, prompt_inputs

    inputs, cmask = completion_inputs(prompt_inputs(processor, questions, images), prefix_ids,
                                      processor.tokenizer.pad_token_id)
    L = inputs["input_ids"].shape[1] - cmask.shape[1]
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()},
                       use_cache=False).logits.float()
    last = L + cmask.sum(1) - 1  # position of each row's last real token
    return torch.softmax(logits[torch.arange(len(prefix_ids)), last.to(logits.device)], -1).cpu()


def _tv(p, q) -> float:
    return 0.5 * float((p - q).abs().sum())


def read_dependence(model, processor, task, n_boards: int = 24, seed: int = 7) -> dict:
    """Question and image dependence of the first read (see the module docstring)."""
    import io

    import torch
    from PIL import Image

    from dfgen.synth.grid import PALETTE

    tok = processor.tokenizer
    colours = list(PALETTE)[: task.colors]
    boards = _boards(task, n_boards, seed)
    images = [Image.open(io.BytesIO(b.render())).convert("RGB") for b in boards]
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    colour_ids = [ids(f"Step 1: {c}")[-1] for c in colours]
    digit_ids = [ids(f"Step 1: red = {n}")[-1] for n in range(task.max_count + 1)]
    model.eval()
    q_tv, c_hit, c_n, mass = [], 0, 0, []
    count_p, truth = {c: [] for c in colours}, {c: [] for c in colours}
    for b, im in zip(boards, images):
        qs = [_asking_first(b, c) for c in colours]
        pc = _next_token_probs(model, processor, qs, [im] * len(qs), [ids("Step 1:")] * len(qs))[:, colour_ids]
        mass.append(float(pc.sum(-1).mean()))
        pc = pc / pc.sum(-1, keepdim=True).clamp_min(1e-12)
        q_tv.append(sum(_tv(pc[i], pc[j]) for i, j in itertools.combinations(range(len(qs)), 2))
                    / (len(qs) * (len(qs) - 1) / 2))
        c_hit += int((pc.argmax(-1) == torch.arange(len(qs))).sum())
        c_n += len(qs)
        pd = _next_token_probs(model, processor, qs, [im] * len(qs), [ids(f"Step 1: {c} =") + ids(" 0")[:-1]
                                                                     for c in colours])[:, digit_ids]
        pd = pd / pd.sum(-1, keepdim=True).clamp_min(1e-12)
        n_of = {c: sum(1 for cell in b.cells if cell and cell[0] == c) for c in colours}
        for k, c in enumerate(colours):
            count_p[c].append(pd[k])
            truth[c].append(n_of[c])
    i_tv, hits, n = [], 0, 0
    for c in colours:
        for i, j in itertools.combinations(range(len(boards)), 2):
            if truth[c][i] != truth[c][j]:
                i_tv.append(_tv(count_p[c][i], count_p[c][j]))
        hits += sum(int(p.argmax()) == t for p, t in zip(count_p[c], truth[c]))
        n += len(boards)
    return {"question_tv": round(sum(q_tv) / len(q_tv), 4), "colour_acc": round(c_hit / c_n, 4),
            "colour_mass": round(sum(mass) / len(mass), 4),
            "image_tv": round(sum(i_tv) / max(1, len(i_tv)), 4), "count_acc": round(hits / n, 4),
            "n_boards": len(boards)}


def vision_features(model, processor, boards, batch: int = 100):
    """(N, cells, H) features the LM receives at the image placeholders, one board per row."""
    import io

    import torch
    from PIL import Image

    from dfgen.policy import prompt_inputs

    out = []
    with torch.no_grad():
        for k in range(0, len(boards), batch):
            ch = boards[k: k + batch]
            ims = [Image.open(io.BytesIO(b.render())).convert("RGB") for b in ch]
            inp = prompt_inputs(processor, ["How many red?"] * len(ch), ims)
            v = model.model.visual(inp["pixel_values"].to(model.device), grid_thw=inp["image_grid_thw"].to(model.device))
            v = getattr(v, "pooler_output", None) if not isinstance(v, torch.Tensor) else v
            out.append(v.float().cpu().reshape(len(ch), -1, v.shape[-1]))
    return torch.cat(out)


def feature_probe(model, processor, task, n_boards: int = 2000, seed: int = 5, steps: int = 300) -> dict:
    """Held-out accuracy of a linear probe for each colour's count on the vision features."""
    import torch

    from dfgen.synth.grid import PALETTE

    colours = list(PALETTE)[: task.colors]
    boards = _boards(task, n_boards, seed)
    model.eval()
    X = vision_features(model, processor, boards)
    N = len(X)
    ntr = int(0.8 * N)
    Z = X.reshape(N, -1)
    Z = (Z - Z[:ntr].mean(0)) / (Z[:ntr].std(0) + 1e-6)
    g = torch.Generator().manual_seed(0)
    accs = []
    for c in colours:
        y = torch.tensor([sum(1 for cell in b.cells if cell and cell[0] == c) for b in boards])
        k = task.max_count + 1
        W = (0.01 * torch.randn(Z.shape[1], k, generator=g)).requires_grad_()
        b0 = torch.zeros(k, requires_grad=True)
        opt = torch.optim.Adam([W, b0], lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(Z[:ntr] @ W + b0, y[:ntr]) + 1e-3 * W.pow(2).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accs.append(round(float(((Z[ntr:] @ W + b0).argmax(-1) == y[ntr:]).float().mean()), 4))
    return {"per_colour": dict(zip(colours, accs)), "min": min(accs), "n_boards": N}


def main(argv=None) -> int:
    """``python -m dftrain.perception POLICY [GridTask JSON]``: both diagnostics as one JSON line."""
    import argparse
    import sys

    from dfgen.errors import UserError
    from dfgen.synth.grid import GridTask

    ap = argparse.ArgumentParser(prog="python -m dftrain.perception", description=main.__doc__)
    ap.add_argument("policy")
    ap.add_argument("task", nargs="?", default="{}", help="GridTask knobs as JSON (default: the default task)")
    args = ap.parse_args(argv)
    try:
        task = GridTask(**json.loads(args.task))
        task.validate()
    except (ValueError, TypeError) as e:
        ap.error(f"bad task {args.task!r}: {e}")
    from dfgen.models import family_of
    from dfgen.policy import load_policy

    try:
        m, p = load_policy(args.policy)
        if not family_of(m).grid_split:  # the feature probe reads the Qwen tower's merged patch features
            raise UserError(f"the perception probe reads Qwen-family vision features; {args.policy} is "
                            f"{family_of(m).name}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"dependence": read_dependence(m, p, task), "features": feature_probe(m, p, task)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
