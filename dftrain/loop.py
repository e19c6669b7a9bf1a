"""``dftrain loop``: R rounds of the decoupled pipeline, each round's checkpoint sampling the next.

Round ``r`` (folder ``OUT/round_RRR/``):

1. ``prompts/``: the round's training prompts: records ``[r*N, (r+1)*N)`` of ``--prompts`` (wrapping
   around), or, without ``--prompts``, N fresh synthetic ``train`` problems (seed ``seed*1000 + r``,
   so every round sees new problems and two loops with the same seed see the same ones);
2. ``sample/``: ``dfgen sample`` from the current policy (G rollouts per prompt);
3. ``repair/`` + ``df/``: ``dfgen repair`` and ``dfgen mask`` (skipped for ``--objective grpo``,
   which trains on the sample shards: the same data path with no masks);
4. ``fit/``: ``dftrain fit`` for ``--fit-steps`` steps, starting from the previous round's
   checkpoint *and its AdamW state* (``--optimizer-from``), so R rounds are one continuous
   optimisation on fresh on-policy data, not R cold restarts;
5. optionally, greedy accuracy on each ``--eval`` set (every ``--eval-every`` rounds and after the
   last), then ``round.json`` (stats, timings, generated tokens, accuracies) written atomically.

Every round's shards, checkpoint and metrics are kept. ``OUT/loop.json`` holds the config and the
per-round records. Resumable at round granularity: a rerun with the same config skips finished
rounds (``round.json`` present) and redoes an unfinished one from its first unfinished stage
(sampling itself resumes chunk by chunk); a rerun with a different config is refused.

Run: ``dftrain loop --model runs/sft --out runs/loop --rounds 4 --eval runs/test``
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from dfgen.errors import UserError
from dfgen.repair import RepairConfig as _Repair
from dfgen.sample import SampleConfig as _Sample
from dftrain.settings import TrainSettings


@dataclass(kw_only=True)
class LoopConfig(TrainSettings):
    """The loop's own settings, then those it hands to each stage. What every round's fit optimises is
    inherited from ``dftrain.settings.TrainSettings`` (as ``FitConfig``'s) and handed to it whole
    (round r's fit seed is ``seed * 1000 + r``). A sample or repair setting takes ``SampleConfig``'s or
    ``RepairConfig``'s default (one source). ``updates_per_batch`` is 2 here (two PPO epochs per round,
    as every study loop ran), 1 in a single ``dftrain fit``."""

    model: Path  # starting policy (e.g. dftrain sft output)
    out: Path
    rounds: int = 3
    prompts: Path | None = None  # prompt set to draw rounds from; None = fresh synthetic problems
    prompts_per_round: int = 64
    task: dict = field(default_factory=dict)  # GridTask knobs for synthetic prompts
    # sample
    group_size: int = _Sample.group_size
    temperature: float = _Sample.temperature
    max_new_tokens: int | None = _Sample.max_new_tokens  # None: fits the round's reference solutions, as dfgen sample
    # repair
    repairer: str = _Repair.repairer
    repair_model: Path | None = _Repair.repair_model  # --repairer model: its checkpoint (default: the round's policy)
    # fit
    fit_steps: int = 8  # fit_steps * groups_per_step = prompts_per_round uses each group once
    updates_per_batch: int = 2
    carry_optimizer: bool = True
    # evaluation
    eval: list = field(default_factory=list)  # prompt sets scored by greedy accuracy
    eval_n: int = 500
    eval_every: int = 1
    report_to: str = "jsonl"  # + tensorboard, wandb (dftrain.tracking): rounds to OUT/, each round's fit steps to its fit/

    def validate(self):
        if self.rounds <= 0 or self.prompts_per_round <= 0 or self.fit_steps <= 0 or self.group_size < 2:
            raise UserError("--rounds, --prompts-per-round and --fit-steps must be positive, --group-size >= 2")
        if self.eval_every <= 0 or self.eval_n <= 0:
            raise UserError("--eval-every and --eval-n must be positive")
        from dftrain.fit import FitConfig

        # the objective's settings are checked by the trainer's own rules before round 0 samples anything
        FitConfig(data=Path("."), model=Path("."), out=Path("."), report_to=self.report_to,
                  **self.train_settings()).validate()
        from dataclasses import fields

        from dfgen.synth.grid import GridTask

        known = [f.name for f in fields(GridTask)]
        unknown = sorted(set(self.task) - set(known))
        if unknown:
            raise UserError(f"--task: unknown knob(s) {', '.join(unknown)} (known: {', '.join(known)})")
        try:
            GridTask(**self.task).validate()
        except (TypeError, ValueError) as e:
            raise UserError(f"--task: {e}") from None


def _jsonable(cfg: LoopConfig) -> dict:
    from dfgen.shards import config_json

    return config_json(cfg)


def _round_prompts(cfg: LoopConfig, r: int, dst: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dfgen.records import load_prompts
    from dfgen.shards import PROMPT_SCHEMA
    from dfgen.synth.grid import GridTask, write_synth

    if cfg.prompts is None:
        write_synth(dst, cfg.prompts_per_round, seed=cfg.seed * 1000 + r, split="train", task=GridTask(**cfg.task))
        return
    recs, _ = load_prompts(cfg.prompts)
    if not recs:
        raise UserError(f"{cfg.prompts} holds no usable prompts")
    n = cfg.prompts_per_round
    chosen = [recs[(r * n + k) % len(recs)] for k in range(n)]
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(chosen, schema=PROMPT_SCHEMA), tmp / "prompts.parquet")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


# what a loop ran with before the field existed (a loop.json written then lacks the key)
BEFORE_FIELD = {"kappa_rep": 0.0, "fail_advantage": 0.0, "repair_model": None, "marked": "edit", "repairer": "oracle",
                "policy_loss": "ppo", "clip_high": 0.2, "dual_clip": None,
                # fit's defaults, which every round used before the loop passed these on
                "delta": 0.5, "clip_low": 0.2, "adv_scale": "group", "agg": "token-mean", "beta": 0.0,
                "rep_in_denominator": False, "dedup_repaired": True}


def _check_resumable(cfg: LoopConfig, state_f: Path, out: Path) -> None:
    """A loop.json already there must be of these settings (bar --rounds); a setting an older
    loop.json lacks had the value it had before the field existed (``BEFORE_FIELD``)."""
    if not state_f.exists():
        return
    free = ("rounds", "report_to")  # more rounds may be added to a finished loop; reporting changes no result
    want = {k: v for k, v in _jsonable(cfg).items() if k not in free}
    have = {k: v for k, v in (BEFORE_FIELD | json.loads(state_f.read_text())["config"]).items() if k not in free}
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise UserError(f"{out} holds a loop with other settings ({', '.join(diff)}); use a new --out")


def repair_tokens(rec: dict) -> int:
    """The tokens a round's repairs are charged in matched-token comparisons: every token the repairer
    generated (resample's probes, the model's outputs); for repairers that generate nothing (oracle,
    sibling) the repaired tokens, as if a model had written them (the committed studies' charge)."""
    rep = rec.get("repair", {})
    return rep.get("generated_tokens") or rep.get("repaired_tokens", 0)


def _df_data(cfg: LoopConfig, rd: Path, r: int, rec: dict) -> Path:
    """The round's repair + mask stages (an unfinished one is redone from scratch); the DF shards."""
    from dfgen.mask import MaskConfig, run_mask
    from dfgen.repair import RESAMPLES, RepairConfig, run_repair
    from dfgen.shards import done_info

    t1 = time.time()
    for stage in ("repair", "df"):
        if done_info(rd / stage, 0) is None:
            shutil.rmtree(rd / stage, ignore_errors=True)
    if done_info(rd / "repair", 0) is None:
        seeded = {"seed": cfg.seed * 1000 + r} if cfg.repairer in RESAMPLES else {}  # resample's probes
        run_repair(RepairConfig(rollouts=rd / "sample", out=rd / "repair", repairer=cfg.repairer,
                                repair_model=cfg.repair_model, **seeded))
    if done_info(rd / "df", 0) is None:
        run_mask(MaskConfig(repairs=rd / "repair", out=rd / "df"))
    rep = done_info(rd / "repair", 0)
    rec["repair"] = {k: rep.get(k) for k in ("failed", "ok", "repaired_tokens", "generated_tokens") if k in rep}
    rec["seconds"]["repair_mask"] = round(time.time() - t1, 2)
    return rd / "df"


def _fit_round(cfg: LoopConfig, rd: Path, data: Path, policy: Path, prev_fit, r: int, rec: dict) -> None:
    """The round's training, from the previous round's checkpoint and AdamW state (an interrupted fit restarts)."""
    from dfgen.shards import done_info
    from dftrain.fit import FitConfig, run_fit

    t2 = time.time()
    if (rd / "fit").exists() and done_info(rd / "fit") is None:
        shutil.rmtree(rd / "fit")
    if done_info(rd / "fit") is None:
        res = run_fit(FitConfig(data=data, model=policy, out=rd / "fit", steps=cfg.fit_steps,
                                **(cfg.train_settings() | {"seed": cfg.seed * 1000 + r}),
                                optimizer_from=prev_fit if cfg.carry_optimizer else None, report_to=cfg.report_to),
                      log=lambda m: None)
        rec["fit_loss_mean"] = sum(res["losses"]) / len(res["losses"])
    rec["seconds"]["fit"] = round(time.time() - t2, 2)


def _evaluate_round(cfg: LoopConfig, rd: Path, policy: Path, rec: dict) -> None:
    """Greedy accuracy and profile on every --eval set; per-problem rows in ``rd/eval/SET.jsonl``."""
    from dfgen.policy import load_policy
    from dfgen.shards import write_jsonl_atomic
    from dftrain.evaluate import greedy_profile

    t3 = time.time()
    model, processor = load_policy(policy)
    rec["profile"] = {}
    for e in cfg.eval:
        prof = greedy_profile(model, processor, Path(e), limit=cfg.eval_n, items=True)
        rec["accuracy"][Path(e).name] = prof["accuracy"]
        rec["profile"][Path(e).name] = {k: prof[k] for k in ("steps_right", "lucky", "read_acc", "first_error")}
        (rd / "eval").mkdir(exist_ok=True)
        write_jsonl_atomic(rd / "eval" / f"{Path(e).name}.jsonl", prof["items"])
    rec["seconds"]["eval"] = round(time.time() - t3, 2)


def run_loop(cfg: LoopConfig, log=print) -> dict:
    from dfgen.policy import check_policy_dir
    from dfgen.sample import SampleConfig, run_sample, truncation_warning
    from dfgen.shards import write_json_atomic
    from dftrain.loss import OBJECTIVES
    from dftrain.tracking import Reporter

    cfg.validate()
    check_policy_dir(Path(cfg.model))
    for e in cfg.eval:
        if not Path(e).exists():
            raise UserError(f"--eval {e}: no such prompt set")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_f = out / "loop.json"
    _check_resumable(cfg, state_f, out)
    records: list[dict] = []
    policy, prev_fit, reporter = Path(cfg.model), None, None
    t_loop = time.time()
    for r in range(cfg.rounds):
        rd = out / f"round_{r:03d}"
        done_f = rd / "round.json"
        if done_f.exists():
            records.append(json.loads(done_f.read_text()))
            policy = prev_fit = rd / "fit"
            continue
        if reporter is None:  # resumed at round r: its events and later ones are written again
            reporter = Reporter(out, cfg.report_to, _jsonable(cfg), start_step=r, prefix="round")
        t0 = time.time()
        rd.mkdir(parents=True, exist_ok=True)
        if not (rd / "prompts").exists():
            _round_prompts(cfg, r, rd / "prompts")
        st = run_sample(SampleConfig(prompts=rd / "prompts", model=policy, out=rd / "sample", group_size=cfg.group_size,
                                     temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                     seed=cfg.seed * 1000 + r, chunk_size=32))
        rec = {"round": r, "rollouts": st["rollouts"], "generated_tokens": st["tokens"],
               "sample_reward": st.get("mean_reward"), "seconds": {"sample": round(time.time() - t0, 2)}}
        if warning := truncation_warning(st, st["max_new_tokens"]):
            log(f"round {r + 1}/{cfg.rounds}: {warning}")
        data = _df_data(cfg, rd, r, rec) if OBJECTIVES[cfg.objective].token_weights else rd / "sample"  # no masks needed
        _fit_round(cfg, rd, data, policy, prev_fit, r, rec)
        policy = prev_fit = rd / "fit"
        rec["accuracy"] = {}
        if cfg.eval and ((r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1):
            _evaluate_round(cfg, rd, policy, rec)
        write_json_atomic(done_f, rec)
        records.append(rec)
        reporter.log({k: v for k, v in rec.items() if k != "round"}, step=r + 1)
        acc = " ".join(f"{k} {v:.3f}" for k, v in rec["accuracy"].items())
        log(f"round {r + 1}/{cfg.rounds}: sample reward {rec['sample_reward'] or 0:.3f}"
            + (f" | greedy {acc}" if acc else "") + f" | {time.time() - t0:.0f}s")
        write_json_atomic(state_f, {"config": _jsonable(cfg), "rounds": records})
    write_json_atomic(state_f, {"config": _jsonable(cfg), "rounds": records})
    if reporter is not None:
        reporter.close()
    return {"rounds": records, "final_model": str(policy), "seconds": round(time.time() - t_loop, 1)}
