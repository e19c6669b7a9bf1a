"""Re-screen DF's weight options on a finished study setting (issue 19, part 2).

Reads a ``studies/experiment.py`` folder (``--setting``: its SFT start, val/test sets, loop settings,
and the GRPO and DF-GRPO arms at their val-chosen lr) and runs DF-GRPO *variants* that differ from
the study's DF arm in one option each, on the same seeds, so every variant is paired with the same
GRPO runs:

* ``root`` (the study's DF arm itself, reused), ``edit``, ``root+prop`` (delta 0.5), ``kappa0.3``,
  ``kappa0.5``; ``rep`` (repaired samples as extra positives, A+ = 1, kappa_rep = 0: credit only on
  the corrected tokens); ``allfail`` (``--fail-advantage 1``: -1 on the root token of repaired
  rollouts in all-fail groups, where GRPO's advantage is 0); ``rep+allfail`` (both); ``model``
  (``--repairer model`` with ``--repair-model``, beside the oracle); ``oracle``, ``sibling``,
  ``resample``, ``sibling-resample`` (the repairer alone changed);
* ``redistribute`` at its own lr: the study's lr grid on the first seed, chosen on val, then the
  other seeds at that lr (every other variant runs at DF's chosen lr).

Ranking is by the mean paired *val* difference to GRPO (test plays no part in a choice); test
differences (accuracy, every-step-right, lucky) with 95% t-intervals are reported beside it, and
against the study's token-matched GRPO (``grpo-tok``, comparison (b)) where the setting has it, with
each variant's mask statistics and repair-token cost. Runs live in ``SETTING/options/VARIANT/lrLR/sS``
(resumable: finished runs are skipped); results in ``SETTING/options/options.json``.

Run: ``python -m studies.options_screen --setting runs/study19/times34 --seeds 3``
then ``--seeds 8 --variants BEST`` for the one or two best on val.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dftrain.loop import BEFORE_FIELD, repair_tokens
from studies.experiment import final_of, item_stats, load_runs, loop_base, mechanism, paired, run_job, test_items

VARIANTS = {
    "root": {},
    "edit": {"marked": "edit"},
    "root+prop": {"marked": "root+prop"},
    "kappa0.3": {"kappa": 0.3},
    "kappa0.5": {"kappa": 0.5},
    "redistribute": {"mass": "redistribute"},
    "rep": {"repaired_weight": 1.0, "kappa_rep": 0.0},
    "allfail": {"fail_advantage": 1.0},
    "rep+allfail": {"repaired_weight": 1.0, "kappa_rep": 0.0, "fail_advantage": 1.0},
    "model": {"repairer": "model"},
    # the repairer alone changed (issue "DF without an oracle"): beside a setting whose DF arm uses another
    "oracle": {"repairer": "oracle"},
    "sibling": {"repairer": "sibling"},
    "resample": {"repairer": "resample"},
    "sibling-resample": {"repairer": "sibling-resample"},
}
OWN_LR = ("redistribute",)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", type=Path, required=True, help="a finished studies/experiment.py --out folder")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repair-model", type=Path, default=None, help="the model variant's repair checkpoint")
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    res_f = args.setting / "results.json"
    if not res_f.is_file():
        ap.error(f"--setting {args.setting}: no results.json (run studies/experiment.py there first)")
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)} (known: {', '.join(VARIANTS)})")
    if "model" in variants and args.repair_model is not None and not (args.repair_model / "config.json").is_file():
        ap.error(f"--repair-model {args.repair_model} is not a policy folder")
    study = json.loads(res_f.read_text())
    conf, chosen = BEFORE_FIELD | study["config"], study["summary"]["lr_chosen_on_val"]  # a missing key: its value then
    seeds = list(range(args.seeds))
    base = loop_base(conf, conf["sft"], args.setting, args.threads) | {"objective": "df-grpo"}
    lrs = [float(x) for x in conf["lrs"].split(",")]
    opt_dir = args.setting / "options"

    def folder(v, lr, s):
        if v == "root":
            return args.setting / f"df-grpo/lr{lr:g}/s{s}"
        return opt_dir / v / f"lr{lr:g}" / f"s{s}"

    def spec(v, lr, s):
        extra = dict(VARIANTS[v])
        if v == "model":
            extra["repair_model"] = str(args.repair_model) if args.repair_model else None
        return base | extra | dict(name=f"{v}/lr{lr:g}/s{s}", out=str(folder(v, lr, s)), lr=lr, seed=s)

    def finished(p: Path) -> bool:
        return (p / f"round_{conf['rounds'] - 1:03d}" / "round.json").exists()

    def run(specs):
        for sp in specs:
            if finished(Path(sp["out"])) or args.summarize_only:
                continue
            if sp["name"].startswith("root/"):
                sys.exit(f"options_screen.py: error: the study's DF run {sp['out']} is missing; rerun studies/experiment.py")
            r = run_job(dict(sp))
            print(f"  {r['name']}: {r['seconds']}s", flush=True)

    def val_of(p: Path) -> float:
        runs = load_runs(p.parent, [p.name])
        return final_of(runs, p.name, "val", conf["rounds"], conf["avg_last"]) if runs else float("nan")

    lr_of = {}
    for v in variants:  # seed-major over variants, so a cut-short screen still has whole seeds
        if v in OWN_LR:
            run([spec(v, lr, 0) for lr in lrs])
            lr_of[v] = max(lrs, key=lambda lr: val_of(folder(v, lr, 0)))
        else:
            lr_of[v] = float(chosen["df-grpo"])
    for s in seeds:
        run([spec(v, lr_of[v], s) for v in variants])

    grpo = {s: args.setting / f"grpo/lr{chosen['grpo']}/s{s}" for s in seeds}
    out_f = opt_dir / "options.json"
    report = json.loads(out_f.read_text()) if out_f.exists() else {}
    report["setting"], report["grpo_lr"] = str(args.setting), chosen["grpo"]
    report.setdefault("variants", {})
    eval_dirs = {"test": args.setting / "test"}
    n_evals = conf["rounds"]  # every evaluation (at most one per round)
    g_stats = {s: item_stats(test_items(grpo[s], eval_dirs, conf["eval_n"], conf["avg_last"], n_evals), {})
               for s in seeds if finished(grpo[s])}
    tok_lr = chosen.get("grpo-tok")  # (b): the study's token-matched GRPO, where it ran
    tok = {s: args.setting / f"grpo-tok/lr{tok_lr}/s{s}" for s in seeds} if tok_lr else {}
    t_stats = {s: item_stats(test_items(p, eval_dirs, conf["eval_n"], conf["avg_last"], n_evals), {})
               for s, p in tok.items() if finished(p)}
    for v in variants:
        done = [s for s in seeds if finished(folder(v, lr_of[v], s)) and s in g_stats]
        if not done:
            continue
        st = {s: item_stats(test_items(folder(v, lr_of[v], s), eval_dirs, conf["eval_n"], conf["avg_last"], n_evals), {})
              for s in done}
        val_d = [val_of(folder(v, lr_of[v], s)) - val_of(grpo[s]) for s in done]
        rounds = [r for s in done for r in json.loads((folder(v, lr_of[v], s) / "loop.json").read_text())["rounds"]]
        gen = sum(r["generated_tokens"] for r in rounds)
        rep = sum(repair_tokens(r) for r in rounds)  # what the repairs are charged (generated tokens, if any)
        failed = sum(r.get("repair", {}).get("failed", 0) for r in rounds)
        ok = sum(r.get("repair", {}).get("ok", 0) for r in rounds)
        o = base | VARIANTS[v]
        mech = [m for s in done for p in sorted(folder(v, lr_of[v], s).glob("round_*/df"))
                if (m := mechanism(p, o["kappa"], o["marked"], o["mass"]))]
        report["variants"][v] = {
            "options": VARIANTS[v], "lr": lr_of[v], "seeds": done,
            "val_minus_grpo": paired(val_d),
            "test_minus_grpo": paired([st[s]["accuracy"] - g_stats[s]["accuracy"] for s in done]),
            "test_steps_right_minus_grpo": paired([st[s]["steps_right"] - g_stats[s]["steps_right"] for s in done]),
            "test_lucky_minus_grpo": paired([st[s]["lucky"] - g_stats[s]["lucky"] for s in done]),
            "test_mean": sum(st[s]["accuracy"] for s in done) / len(done),
            **({"test_minus_grpo_tok": paired([st[s]["accuracy"] - t_stats[s]["accuracy"] for s in done]),
                "test_steps_right_minus_grpo_tok": paired([st[s]["steps_right"] - t_stats[s]["steps_right"] for s in done]),
                "test_lucky_minus_grpo_tok": paired([st[s]["lucky"] - t_stats[s]["lucky"] for s in done]),
                "grpo_tok_token_match": study["summary"].get("b_token_match")}
               if t_stats and all(s in t_stats for s in done) else {}),
            "token_ratio": (gen + rep) / gen, "repairs_verified": ok / failed if failed else None,
            "mechanism_mean": {k: sum(m[k] for m in mech) / len(mech) for k in mech[0]} if mech else {}}
    ranked = sorted(report["variants"], key=lambda v: -report["variants"][v]["val_minus_grpo"]["mean"])
    report["ranked_on_val"] = [(v, len(report["variants"][v]["seeds"]), round(report["variants"][v]["val_minus_grpo"]["mean"], 4))
                               for v in ranked]
    report["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    opt_dir.mkdir(parents=True, exist_ok=True)
    out_f.write_text(json.dumps(report, indent=2))
    for v in ranked:
        r = report["variants"][v]
        t = r["test_minus_grpo"]
        print(f"{v:13s} lr {r['lr']:g} seeds {len(r['seeds'])}: val {r['val_minus_grpo']['mean']:+.4f} | "
              f"test {t['mean']:+.4f} ({t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}) | tokens x{r['token_ratio']:.2f}")


if __name__ == "__main__":
    main()
