"""``dfgen repair``: a verified, minimally edited correct trajectory for every failed rollout.

Reads sample shards, asks a repairer (``dfgen.repairers``: ``oracle``, ``sibling``, ``model``, ``resample``)
for a repaired text per failed rollout (reward < 1), and **verifies** every proposal the same
way before keeping it:

1. its extracted answer must be correct (the same checker as the reward);
2. its token edit ratio, ``Levenshtein(bad_ids, repaired_ids) / len(bad_ids)`` on the policy
   tokenizer's ids, must be at most ``max_edit_ratio`` (minimality).

Per rollout it writes ``repair_status`` ("ok", or the rejection reason; null for rollouts that
needed no repair), ``repairer``, ``repaired_text``, ``edit_ratio``, what a generating repairer spent (``repair_probes``, ``repair_samples``,
``repair_gen_tokens``; null for the others), and for kept repairs
``repaired_ids`` (the tokenized text plus EOS) and ``repaired_logprobs``: the *sampling*
policy's teacher-forced log-probabilities of those ids (same suppression and temperature as
sampling), the behaviour logprobs of the trainer's optional off-policy repaired term. Nothing
is dropped: rejected repairs keep their reason and text.

Shards map one to one (input ``part-w000-00003`` -> output ``part-w000-00003``), so a killed
run resumes where it stopped.

Run: ``dfgen repair --rollouts runs/r0/sample --out runs/r0/repair --repairer oracle``
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from dfgen.errors import UserError


@dataclass
class RepairConfig:
    rollouts: Path  # sample shards
    out: Path  # repair shards
    repairer: str = "auto"  # oracle for prompts with a step solution, else sibling-resample (dfgen.repairers.auto)
    repair_model: Path | None = None  # model repairer's checkpoint (default: the sampling policy)
    backend: str = "hf"  # engine for the model repairer
    model: Path | None = None  # sampling policy for teacher-forced scoring (default: from the shards)
    max_edit_ratio: float = 0.5  # a repair rewriting more than half the tokens is not minimal
    template: Path | None = None  # model repairer's prompt template (default: dfgen/templates/repair_prompt.txt)
    max_new_tokens: int = 96  # model repairer's budget (resample continues with the sampling run's)
    search: str = "backward"  # resample: backward (longest prefix first) | binary (OmegaPRM's first-error search);
    # backward verified more failures with less false blame at no more tokens (docs/RESULTS.md, localisation)
    resample_n: int = 4  # resample: continuations per probe
    min_wins: int = 1  # resample: a prefix is salvageable when this many of its continuations are right
    max_probes: int = 8  # resample: probes per failed rollout (binary needs ceil(log2 lines) + 1; backward one a line)
    token_budget: int = 2048  # resample: no probe starts once a rollout has generated this many tokens
    temperature: float | None = None  # resample: the continuations' temperature (None: the sampling run's)
    seed: int = 0  # resample: the continuations' seeds derive from it
    batch_size: int = 64
    device: str = "auto"  # hf scorer and hf model repairer: auto | cpu | cuda | cuda:N

    def validate(self):
        from dfgen.repairers import REPAIRERS

        if self.repairer not in REPAIRERS:
            raise UserError(f"unknown repairer {self.repairer!r} ({', '.join(REPAIRERS)})")
        if not 0 < self.max_edit_ratio:
            raise UserError("--max-edit-ratio must be positive")
        if not 1 <= self.min_wins <= self.resample_n:
            raise UserError(f"--min-wins must be in [1, --resample-n {self.resample_n}]")
        if min(self.resample_n, self.max_probes, self.token_budget, self.max_new_tokens) < 1:
            raise UserError("--resample-n, --max-probes, --token-budget and --max-new-tokens must be at least 1")
        if self.search not in SEARCHES:
            raise UserError(f"unknown --search {self.search!r} ({' or '.join(SEARCHES)})")
        if self.temperature is not None and not self.temperature > 0:
            raise UserError("--temperature must be positive (resample draws several continuations)")
        self._refuse_unused()
        from dfgen.policy import check_device

        check_device(self.device)

    def _refuse_unused(self) -> None:
        """An option the chosen repairer never reads is an error, not a silent no-op."""
        from dataclasses import fields

        uses = set(RESAMPLE_KEYS) if self.repairer in RESAMPLES else set()
        uses |= {"repair_model", "backend"} if self.repairer in GENERATES else set()
        uses |= {"template", "max_new_tokens"} if self.repairer == "model" else set()
        for f in fields(self):
            if f.name in UNUSED_CHECKED and f.name not in uses and getattr(self, f.name) != f.default:
                raise UserError(f"--{f.name.replace('_', '-')} does nothing with --repairer {self.repairer}")


GENERATES = ("model", "resample", "sibling-resample", "auto")  # repairers that may call a generator
RESAMPLES = GENERATES[1:]  # repairers that may run the resample search
SEARCHES = ("binary", "backward")  # resample's search strategies
RESAMPLE_KEYS = ("search", "resample_n", "min_wins", "max_probes", "token_budget", "temperature", "seed")  # settings a resample run's shards depend on
UNUSED_CHECKED = RESAMPLE_KEYS + ("repair_model", "backend", "template", "max_new_tokens")  # each read by some repairers only


def _template(cfg: RepairConfig) -> str:
    p = cfg.template or Path(__file__).parent / "templates" / "repair_prompt.txt"
    if not Path(p).is_file():
        raise UserError(f"template not found: {p}")
    t = Path(p).read_text()
    for key in ("{question}", "{solution}"):
        if key not in t:
            raise UserError(f"template {p} lacks the {key} placeholder")
    return t


def _gen_env(cfg: RepairConfig, scorer, model_dir: Path, device: str, sampling: dict):
    """The generating repairers' environment: the generator (the scorer itself when the policy repairs
    on an in-process engine; otherwise built on first use), and for ``model`` its template and context
    (a token budget that leaves no room for a repair prompt is refused), for ``resample`` (also under
    ``sibling-resample`` and ``auto``) its search settings."""
    from dfgen.backends import EngineOptions, get_backend, get_spec
    from dfgen.policy import context_length
    from dfgen.repairers import RepairEnv

    def make_gen():
        if cfg.repair_model is None and get_spec(cfg.backend).in_process:
            return scorer
        return get_backend(cfg.backend, cfg.repair_model or model_dir, EngineOptions(batch_size=cfg.batch_size, device=device))

    env = RepairEnv(make_gen=make_gen, tokenizer=scorer.tokenizer, batch_size=cfg.batch_size,
                    max_new_tokens=cfg.max_new_tokens)
    if cfg.repairer != "model":  # continuations get the policy's own budget and temperature
        return replace(env, max_new_tokens=int(sampling.get("max_new_tokens") or cfg.max_new_tokens), seed=cfg.seed,
                       temperature=cfg.temperature or float(sampling.get("temperature") or 1.0),
                       search=cfg.search, resample_n=cfg.resample_n, min_wins=cfg.min_wins,
                       max_probes=cfg.max_probes, token_budget=cfg.token_budget)
    # the repair prompt holds the failed solution, so it is longer than the sampling prompt: one that
    # would not fit the repair model's positions is rejected per rollout, never generated into garbage
    ctx = min((n for n in (context_length(cfg.repair_model or model_dir), getattr(env.gen, "max_model_len", None))
               if n), default=None)
    if ctx and cfg.max_new_tokens >= ctx:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a repair prompt in the "
                        f"repair model's {ctx}-token context")
    return replace(env, template=_template(cfg), ctx=ctx)


def _repair_rows(rows: list[dict], cfg: RepairConfig, env, scorer, temperature: float, st: dict) -> list[dict]:
    """Propose a repair for every failed rollout of one shard's rows, verify each (right answer, edit
    ratio within the bound), and score the kept ones under the sampling policy; rows are updated in place."""
    from rapidfuzz.distance import Levenshtein

    from dfgen.benchmarks import reward as score
    from dfgen.backends import Prompt
    from dfgen.images import decode_image
    from dfgen.repairers import REPAIRERS

    tok = scorer.tokenizer
    todo = [(row, i) for row in rows for i, r in enumerate(row["rollouts"]) if r["reward"] is not None and r["reward"] < 1]
    keep = []  # (row, i, ids)
    for (row, i), prop in zip(todo, REPAIRERS[cfg.repairer](todo, env)):
        r = row["rollouts"][i]
        r["repairer"] = prop.by or cfg.repairer
        st["failed"] += 1
        status = prop.reason or "ok"
        if prop.text is not None:
            r["repaired_text"] = prop.text
            ids = tok(prop.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            bad = list(r["token_ids"])
            r["edit_ratio"] = Levenshtein.distance(bad, ids) / max(len(bad), 1)
            if status == "ok" and score(row, prop.text)[1] < 1:
                status = "wrong answer after repair"
            elif status == "ok" and r["edit_ratio"] > cfg.max_edit_ratio:
                status = "edit ratio above bound"
            if status == "ok":
                keep.append((row, i, ids))
        r["repair_status"] = status
        r.update(prop.cost)
        st["reasons"][status] = st["reasons"].get(status, 0) + 1
        st["generated_tokens"] += prop.cost.get("repair_gen_tokens", 0)
    if keep:
        prompts = [Prompt(row["question"], decode_image(row["image"]) if row["image"] is not None else None)
                   for row, _, _ in keep]
        lps = scorer.score(prompts, [ids for _, _, ids in keep], temperature=temperature)
        for (row, i, ids), lp in zip(keep, lps):
            row["rollouts"][i]["repaired_ids"] = ids
            row["rollouts"][i]["repaired_logprobs"] = lp
        st["ok"] += len(keep)
        st["repaired_tokens"] += sum(len(ids) for _, _, ids in keep)
    return rows


def run_repair(cfg: RepairConfig, progress=None, only_worker: int | None = None) -> dict:
    """Repair every failed rollout of ``cfg.rollouts`` (only the shards of input worker ``only_worker``
    when given: one Ray task's share, ``dfgen.cluster``)."""
    from dfgen.backends import get_backend
    from dfgen.policy import model_fingerprint, resolve_device
    from dfgen.shards import open_shards, shard_position
    from dfgen.stage import rewrite_plan, run_stage

    cfg.validate()
    ss = open_shards(cfg.rollouts, stage="sample")
    model_dir = Path(cfg.model or ss.meta.get("model", ""))
    if not (model_dir / "config.json").is_file():
        raise UserError(f"sampling policy {model_dir} not found; pass --model with the checkpoint that sampled "
                        f"{cfg.rollouts}")
    if ss.meta.get("model_fingerprint") and model_fingerprint(model_dir) != ss.meta["model_fingerprint"]:
        raise UserError(f"{model_dir} is not the checkpoint that sampled {cfg.rollouts} (fingerprint differs); "
                        f"pass --model with the sampling checkpoint")
    device = resolve_device(cfg.device)
    scorer = get_backend("hf", model_dir, batch_size=cfg.batch_size, device=device)
    temperature = float(ss.meta.get("sampling", {}).get("temperature", 1.0)) or 1.0  # the scorer's
    sampling = ss.meta.get("sampling", {})
    env = _gen_env(cfg, scorer, model_dir, device, sampling) if cfg.repairer in GENERATES else None
    files = [f for f in ss.files if only_worker is None or shard_position(f)[0] == only_worker]
    meta, units = rewrite_plan(ss, Path(cfg.out), cfg.rollouts, "--rollouts", {"repair": {
        "repairer": cfg.repairer, "max_edit_ratio": cfg.max_edit_ratio,
        "repair_model": str(cfg.repair_model) if cfg.repair_model else None,
        **({k: getattr(cfg, k) for k in RESAMPLE_KEYS} if cfg.repairer in RESAMPLES else {})}}, files)

    def differs(have: dict) -> str | None:
        same = have.get("stage") == "repair" and have.get("repair") == meta["repair"] and \
            have.get("model_fingerprint") == meta.get("model_fingerprint")
        return None if same else "holds shards of another run"

    def repair_shard(rows):
        rows = _repair_rows(rows, cfg, env, scorer, temperature, st)
        if progress:
            progress(len(rows))
        return rows

    def summarize(st: dict) -> None:
        st["repaired_per_s"] = round(st["failed"] / st["seconds"], 1) if st["seconds"] > 0 else 0.0

    st = {"failed": 0, "ok": 0, "repaired_tokens": 0, "generated_tokens": 0, "reasons": {}, "repaired_per_s": 0.0}
    return run_stage(Path(cfg.out), "repair", meta, units, repair_shard, differs=differs, config=cfg, stats=st,
                     workers=[shard_position(f)[0] for f in files], summarize=summarize)
