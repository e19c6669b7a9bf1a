"""The resample repairer: verifier-guided first-error search. Needs no ``solution``, only the reward.

A failed rollout's token ids are cut into lines s_1..s_K after each token holding a newline.
*Prefix c* keeps s_1..s_c verbatim (c = 0 keeps nothing). A *probe* of prefix c asks the continuing
model for ``n`` samples of the rest of the answer (the prompt and the prefix prefilled once and
shared by the n samples: the hf backend's grouped decode, vLLM's prefix cache); c is *salvageable*
when at least ``min_wins`` of them get reward 1 from the prompt's own scorer
(``dfgen.benchmarks.reward``: the right final answer, nothing else). Prefix K is the rollout itself,
which failed. ``min_wins`` > 1 asks for a Monte Carlo value, not one success: a prefix holding an
error still reaches the right answer now and then by a lucky slip, and the minimal-edit choice below
favours exactly such continuations (they copy the bad rollout's wrong steps and fix only the answer).

Search: the longest salvageable c in [0, K-1], assuming salvageability falls as c grows.
* ``binary`` (OmegaPRM's first-error search): ``lo, hi = 0, K-1``; probe ``mid = (lo + hi + 1) // 2``:
  salvageable -> ``lo = mid``, else ``hi = mid - 1``; when the interval closes on a c never probed
  (c = 0 when every probe failed) that c is probed last. About log2(K) + 1 probes.
* ``backward``: probe c = K-1, K-2, ... and stop at the first salvageable one. Late errors (slips
  after correct steps) cost one probe of a short suffix; early ones cost many.
The kept prefix is always the longest one *seen* to be salvageable; none seen (or the budget spent
first) -> rejected as ``no salvageable prefix``.

The repair: that prefix + the successful continuation whose full text is closest to the failed
rollout by policy-token edit distance (the minimal edit among the successes; ties: the first).
Like every repair it is then verified, aligned and masked by the common code (``dfgen.repair``).

Budget, per failed rollout: at most ``max_probes`` probes (ceil(log2 K) + 1 finish the search), and
no probe starts once the rollout's generated tokens reach ``token_budget`` (the probe in flight may
overshoot it by up to n * max_new_tokens). Each continuation may run ``max_new_tokens`` tokens.
Cost, per rollout (written to the shards, summed by ``dfgen stats``): ``repair_probes``,
``repair_samples`` and ``repair_gen_tokens``, every token the continuations generated, the
successful one included, so matched-token comparisons charge all of it.

Failed rollouts search in lockstep: each round sends one probe per rollout still searching as one
``generate`` call. Seeds: sample j of probe p of rollout i of prompt ``id`` draws with
``sample_seed(seed, f"{id}|{i}|{p}", j)``, so a repair does not depend on batching or workers.

The continuing model is the sampling policy (by default) or ``--repair-model``: with a foreign
tokenizer the prefix is re-tokenized from its text, as the model repairer's text output is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dfgen.repairers import Proposal, register_repairer


def line_cuts(tok, ids: list[int]) -> list[int]:
    """Token positions where a prefix may end: 0, and after every token that holds a newline (the
    last line's own end excluded: prefix K is the failed rollout itself)."""
    eos = tok.eos_token_id
    body = ids[:-1] if ids and ids[-1] == eos else ids
    cuts = [0] + [k + 1 for k, t in enumerate(body) if "\n" in tok.decode([t])]
    return [c for c in dict.fromkeys(cuts) if c < len(body)]


@dataclass
class Search:
    """One failed rollout's search for its longest salvageable prefix (``strategy``: binary | backward)."""

    row: dict
    i: int
    cuts: list  # prefix c ends at token cuts[c]
    strategy: str = "binary"
    lo: int = 0
    hi: int = 0  # every prefix above hi is known (or, for backward, taken) to be unsalvageable
    best: int | None = None  # the longest prefix seen salvageable
    wins: dict = field(default_factory=dict)  # c -> its successful full answers (text)
    probed: set = field(default_factory=set)
    probes: int = 0
    samples: int = 0
    tokens: int = 0

    def __post_init__(self):
        self.hi = len(self.cuts) - 1

    def next_c(self, max_probes: int, budget: int) -> int | None:
        """The prefix to probe next, or None when the search is over."""
        if self.probes >= max_probes or self.tokens >= budget:
            return None
        if self.strategy == "backward":  # the longest first: the first success ends it
            return self.hi if self.best is None and self.hi >= 0 else None
        if self.lo < self.hi:
            return (self.lo + self.hi + 1) // 2
        return self.lo if self.lo not in self.probed else None

    def record(self, c: int, wins: list[str]) -> None:
        self.probed.add(c)
        if wins:
            self.wins[c] = wins
            self.best = c if self.best is None else max(self.best, c)
            self.lo = max(self.lo, c)
        else:
            self.hi = c - 1


def _probe_round(active: list, env, tok, same_tok: bool) -> None:
    """One probe for every search in ``active`` (as ``(search, c)``), in one generate call."""
    from dfgen.backends import Prompt, SamplingConfig
    from dfgen.benchmarks import reward
    from dfgen.images import decode_image
    from dfgen.seeds import sample_seed

    gtok = env.gen.tokenizer
    prompts, seeds = [], []
    for s, c in active:
        ids = list(s.row["rollouts"][s.i]["token_ids"][: s.cuts[c]])
        prefix = ids if same_tok else gtok(tok.decode(ids, skip_special_tokens=True), add_special_tokens=False)["input_ids"]
        img = decode_image(s.row["image"]) if s.row["image"] is not None else None
        prompts.append(Prompt(s.row["question"], img, tuple(prefix)))
        seeds.append([sample_seed(env.seed, f"{s.row['id']}|{s.i}|{s.probes}", j) for j in range(env.resample_n)])
    outs = env.gen.generate(prompts, seeds, SamplingConfig(temperature=env.temperature,
                                                           max_new_tokens=env.max_new_tokens))
    for (s, c), p, samples in zip(active, prompts, outs):
        texts = [gtok.decode(list(p.prefix) + list(o.token_ids), skip_special_tokens=True)
                 for o in samples if o.finish_reason == "stop"]
        s.probes += 1
        s.samples += len(samples)
        s.tokens += sum(len(o.token_ids) for o in samples)
        wins = [t for t in texts if reward(s.row, t)[1] >= 1]
        s.record(c, wins if len(wins) >= env.min_wins else [])


def _closest(tok, bad: list[int], texts: list[str]) -> str:
    from rapidfuzz.distance import Levenshtein

    return min(texts, key=lambda t: Levenshtein.distance(bad, tok(t, add_special_tokens=False)["input_ids"]))


@register_repairer("resample")
def propose(jobs: list, env) -> list[Proposal]:
    if not jobs:  # nothing to search: no generator is built (vLLM would start an engine)
        return []
    tok = env.tokenizer
    same_tok = env.gen.tokenizer is tok or env.gen.tokenizer.get_vocab() == tok.get_vocab()
    searches = [Search(row, i, line_cuts(tok, list(row["rollouts"][i]["token_ids"])), env.search) for row, i in jobs]
    while active := [(s, c) for s in searches if (c := s.next_c(env.max_probes, env.token_budget)) is not None]:
        _probe_round(active, env, tok, same_tok)  # the backend batches the probes' samples
    out = []
    for s in searches:
        cost = {"repair_probes": s.probes, "repair_samples": s.samples, "repair_gen_tokens": s.tokens}
        if s.best is None:
            out.append(Proposal(None, "no salvageable prefix", cost))
        else:
            out.append(Proposal(_closest(tok, list(s.row["rollouts"][s.i]["token_ids"]), s.wins[s.best]), "", cost))
    return out
