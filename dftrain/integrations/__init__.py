"""DF inside other trainers: ``trl`` (TRL's GRPOTrainer) and ``verl`` (a registered advantage estimator).

Both share ``repair_masks``: repair the blamed completions of a batch, align each with its repair,
and return the edit and root-cause masks that ``dftrain.loss.df_token_weights`` turns into weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from dftrain.settings import DFWeights


TRL_NON_DATA_KEYS = ("prompts", "completion_ids", "trainer_state", "log_extra", "log_metric")


def answer_reward(completions, **cols) -> list[float]:
    """A TRL reward function: the reward of prompt records (``dfgen.benchmarks.reward``, as
    ``dfgen sample`` scores rollouts: the benchmark's scorer, or the exact answer), read from the
    dataset's columns (answer, answer_type, source); a completion is a chat message list or a string."""
    from dfgen.benchmarks import reward as score

    keys = [k for k in cols if k not in TRL_NON_DATA_KEYS]
    return [score({k: cols[k][i] for k in keys}, c[0]["content"] if isinstance(c, list) else c)[1]
            for i, c in enumerate(completions)]


def oracle_repairer(row: dict, text: str) -> str | None:
    """The synthetic task's oracle (``dfgen.repairers.oracle``) from the row's ``solution`` column."""
    from dfgen.repairers import oracle

    if "solution" not in row:
        raise ValueError("repairer='oracle' needs a 'solution' column (dfgen synth's step solutions) in the data")
    sol = row["solution"]
    return oracle.repair({**row, "solution": json.dumps(sol) if isinstance(sol, dict) else sol}, text).text


def resolve_repairer(repairer, builtin: tuple[str, ...] = ()):
    """``oracle`` (the callable), a trainer's own ``builtin`` names (returned as given), or a callable."""
    if repairer == "oracle":
        return oracle_repairer
    if isinstance(repairer, str) and repairer in builtin:
        return repairer
    if not callable(repairer):
        names = " or ".join(repr(n) for n in ("oracle", *builtin))
        raise ValueError(f"repairer must be {names} or a callable (row, text) -> text | None, got {repairer!r}")
    import inspect

    try:
        sig = inspect.signature(repairer)
    except (TypeError, ValueError):  # some builtins have none to read: called as given
        return repairer
    try:
        sig.bind({}, "")
    except TypeError:
        raise ValueError(f"repairer {_name(repairer)} must accept (row, text), its signature is {sig}") from None
    return repairer


@dataclass
class Repairs:
    """What ``repair_masks`` found for a batch of B completions (T: their padded length)."""

    mask_bad: object  # (B, T) float 0/1: the tokens the counted repair edited
    root_bad: object  # (B, T) float 0/1: its first edit only (the root cause)
    repaired: object  # (B,) bool: the completion has a counted repair
    ids: list  # per row: the counted repair's token ids, or None
    mask_repaired: list  # per row: 0/1 over ``ids`` (the tokens the repair wrote), or None
    stats: dict  # df/* metrics


def repair_masks(tokenizer, rows: list[dict], completion_ids, lengths: list[int], blamed: list[bool], repairer,
                 marked: str = DFWeights.marked, strict: bool = False, max_edit_ratio: float | None = None,
                 verify=None) -> Repairs:
    """The counted repairs of the ``blamed`` completions, as ``Repairs``: the masks of each completion
    and, for the repaired samples, each repair's ids and ``mask_repaired``. ``repairer`` is a callable
    ``(row, text)`` or a dict of proposals per row from a trainer's own repairer (texts, or token ids
    taken as the repair's ids: ``sibling``). A completion is repaired when the repairer returns a text
    other than its own, the repair (tokenized, EOS appended when the completion ended in one) rewrites
    at most ``max_edit_ratio`` of the completion's tokens (token Levenshtein / completion length, as
    ``dfgen repair``), and ``verify`` accepts it. ``verify(texts, ids, candidates)`` gets every
    completion's text and ids and ``{row: (repair text, repair ids)}`` and returns the rows whose
    repair counts; it is called once
    per batch, candidates or not (a trainer's verifier may gather across processes). Each counted
    repair is aligned token by token (``dfgen.align.align``).

    A repairer that raises, or returns neither a str nor None, costs that row its repair: a counted
    skip with one warning naming the repairer and the row (``strict``: a ``RepairerError`` instead).

    Metrics: ``df/repaired_frac`` (counted repairs per blamed completion), ``df/verified_frac``
    (counted per proposed repair), ``df/mask_density`` (the tokens ``marked`` puts at full weight: the
    root-cause run for ``root``, every edited token otherwise, per token of the repaired
    completions), ``df/repair_errors``."""
    import warnings

    import torch
    from rapidfuzz.distance import Levenshtein

    from dfgen.align import align

    B, T = completion_ids.shape
    mask_bad, root = torch.zeros(B, T), torch.zeros(B, T)
    repaired = torch.zeros(B, dtype=torch.bool)
    rep_ids, rep_mask = [None] * B, [None] * B
    eos = tokenizer.eos_token_id
    ids_all = [completion_ids[i, : int(lengths[i])].tolist() for i in range(B)]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in ids_all]
    errors, proposed, cands = 0, 0, {}
    for i in (i for i in range(B) if blamed[i]):
        ids, text = ids_all[i], texts[i]
        given = None  # a trainer's own proposal may be token ids (sibling): used as they are, not re-tokenized
        try:
            fixed = repairer.get(i) if isinstance(repairer, dict) else repairer(rows[i], text)
            if isinstance(repairer, dict) and isinstance(fixed, list):
                given, fixed = fixed, tokenizer.decode(fixed, skip_special_tokens=True)
            if fixed is not None and not isinstance(fixed, str):
                raise TypeError(f"returned {type(fixed).__name__}, not str or None")
        except Exception as e:  # the user's code: one row lost, never the run (unless strict)
            msg = f"repairer {_name(repairer)} failed on row {i} ({type(e).__name__}: {e})"
            if strict:
                raise RepairerError(msg) from e
            warnings.warn(msg + "; that row keeps GRPO's advantage", stacklevel=2)
            errors += 1
            continue
        if fixed is None or fixed == text:
            continue
        proposed += 1
        rep = given if given is not None else \
            tokenizer(fixed, add_special_tokens=False)["input_ids"] + ([eos] if ids and ids[-1] == eos else [])
        if max_edit_ratio is None or Levenshtein.distance(ids, rep) <= max_edit_ratio * max(len(ids), 1):
            cands[i] = (fixed, rep)
    ok = set(cands) if verify is None else set(verify(texts, ids_all, cands)) & set(cands)
    for i in sorted(ok):
        a = align(ids_all[i], cands[i][1])
        mask_bad[i, : len(ids_all[i])] = torch.tensor(a.mask_bad, dtype=torch.float32)
        root[i, : len(ids_all[i])] = torch.tensor(a.root_bad, dtype=torch.float32)
        repaired[i] = True
        rep_ids[i], rep_mask[i] = cands[i][1], a.mask_repaired
    n_blamed, n_rep = sum(blamed), int(repaired.sum())
    rep_tokens = float(sum(lengths[i] for i in range(B) if repaired[i]))
    full = root if marked == "root" else mask_bad
    stats = {"df/repaired_frac": n_rep / n_blamed if n_blamed else 0.0,
             "df/verified_frac": n_rep / proposed if proposed else 0.0,
             "df/mask_density": float(full[repaired].sum()) / rep_tokens if rep_tokens else 0.0,
             "df/repair_errors": float(errors)}
    return Repairs(mask_bad, root, repaired, rep_ids, rep_mask, stats)


class RepairerError(RuntimeError):
    """A repairer raised or returned a wrong type, and the trainer was told to stop on it (strict)."""


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def shard_advantages(data, kappa: float = DFWeights.kappa, marked: str = DFWeights.marked,
                     delta: float = DFWeights.delta, mass: str = DFWeights.mass, adv_scale: str = "group"):
    """A DF shard set (``dfgen mask`` output) as a ``datasets.Dataset`` an external trainer consumes:
    one row per rollout with ``id``, ``question``, ``prompt_ids``, ``completion_ids``, ``logprobs``
    (behaviour), ``reward``, ``advantage`` (GRPO's, per group over the rollouts) and ``token_weights`` /
    ``token_advantages`` (lists of the completion's length: ``dftrain.loss.df_token_weights`` with these
    settings, and advantage x weight): what ``dftrain fit --objective df-grpo`` trains on with
    ``--repaired-weight 0 --fail-advantage 0``, the token weights alone (fit's defaults also add the
    repaired samples and the all-fail blame, which this export does not carry)."""
    from pathlib import Path

    import torch
    from datasets import Dataset

    from dfgen.shards import open_shards
    from dftrain.loss import df_token_weights, group_advantages

    ss = open_shards(Path(data), stage="mask")
    out = []
    for g, row in enumerate(ss.iter_rows()):
        rolls = row["rollouts"]
        adv = group_advantages(torch.tensor([float(r["reward"]) for r in rolls]), torch.zeros(len(rolls)),
                               scale=adv_scale)  # (G,) one group
        for k, (r, a) in enumerate(zip(rolls, adv.tolist())):
            n = len(r["token_ids"])
            ok = r.get("repair_status") == "ok" and r.get("mask_bad") is not None and r["reward"] < 1
            bad = torch.tensor([r["mask_bad"] if ok else [0] * n], dtype=torch.float32)  # (1, T)
            root = torch.tensor([r.get("root_bad") or [0] * n if ok else [0] * n], dtype=torch.float32)
            w = df_token_weights(bad, torch.ones(1, n), torch.tensor([ok]), kappa=kappa, root_mask=root,
                                 marked=marked, delta=delta, mass=mass)[0].tolist()
            out.append({"id": row["id"], "question": row["question"], "rollout": k, "prompt_ids": row["prompt_ids"],
                        "completion_ids": r["token_ids"], "logprobs": r["logprobs"], "reward": float(r["reward"]),
                        "advantage": a, "token_weights": w, "token_advantages": [a * x for x in w]})
    return Dataset.from_list(out)
