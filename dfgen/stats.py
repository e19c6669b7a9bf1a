"""``dfgen stats DIR``: a summary of a shard set at any stage.

Sample: groups, rollouts, mean reward, fraction of groups with mixed rewards (the only groups
whose GRPO advantages are non-zero), all-fail / all-pass groups, token counts, finish reasons.
Repair: repair status counts by repairer (``ok`` or the rejection reason), success rate over
failed rollouts, edit-ratio histogram, and what the repairer generated (probes, continuations,
tokens in all and per kept repair; 0 for repairers that generate nothing). Mask: mask density over failed rollouts' tokens, root
density, and where the first edit falls (token position and relative position).

Run: ``dfgen stats runs/r0/df`` (``--json`` for machine-readable output).
"""
from __future__ import annotations

from pathlib import Path


def compute_stats(path: Path) -> dict:
    import polars as pl

    from dfgen.shards import open_shards

    ss = open_shards(path)
    cols = ["id", "rollouts"]
    frames = [pl.from_arrow(b) for b in ss.iter_batches(1024, columns=cols)] if ss.stage != "prompts" else []
    out: dict = {"path": str(path), "stage": ss.stage, "files": len(ss.files), "groups": ss.num_rows()}
    if ss.stage == "prompts":
        return out
    if not frames:
        return {**out, "rollouts": 0}
    g = pl.concat(frames)
    flat = g.explode("rollouts").unnest("rollouts").filter(pl.col("reward").is_not_null())
    per_group = flat.group_by("id").agg(pl.col("reward").mean().alias("mean"), pl.col("reward").min().alias("lo"),
                                        pl.col("reward").max().alias("hi"))
    ntok = flat.select(pl.col("token_ids").list.len()).to_series()
    out.update({
        "rollouts": flat.height,
        "mean_reward": float(flat["reward"].mean() or 0.0),
        "mixed_groups": float((per_group["lo"] != per_group["hi"]).mean() or 0.0),
        "all_fail_groups": float((per_group["hi"] <= 0).mean() or 0.0),
        "all_pass_groups": float((per_group["lo"] >= 1).mean() or 0.0),
        "tokens": int(ntok.sum()),
        "mean_tokens": float(ntok.mean() or 0.0),
        "finish_reasons": dict(flat.group_by("finish_reason").len().iter_rows()),
    })
    if ss.stage in ("repair", "mask"):
        failed = flat.filter(pl.col("reward") < 1)
        status = failed.group_by(["repairer", "repair_status"]).len().sort("len", descending=True)
        out["repair_status"] = [{"repairer": a, "status": b, "count": c} for a, b, c in status.iter_rows()]
        ok = failed.filter(pl.col("repair_status") == "ok")
        out["failed_rollouts"] = failed.height
        out["repair_success_rate"] = ok.height / failed.height if failed.height else 0.0
        out.update(_repair_cost(failed, ok.height))
        er = ok["edit_ratio"].drop_nulls()
        if er.len():
            edges = [0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, float("inf")]
            hist = {}
            for lo, hi in zip(edges, edges[1:]):
                hist[f"[{lo},{hi})"] = int(((er >= lo) & (er < hi)).sum())
            out["edit_ratio_mean"] = float(er.mean())
            out["edit_ratio_hist"] = hist
        if ss.stage == "mask" and ok.height:
            m = ok.select(pl.col("mask_bad").list.sum().alias("marked"), pl.col("root_bad").list.sum().alias("root"),
                          pl.col("mask_bad").list.len().alias("n"),
                          pl.col("mask_bad").list.eval(pl.element().arg_max()).list.first().alias("first"))
            n = int(m["n"].sum())
            out["mask_density"] = int(m["marked"].sum()) / n if n else 0.0
            out["root_density"] = int(m["root"].sum()) / n if n else 0.0
            marked = m.filter(pl.col("marked") > 0)
            if marked.height:
                out["first_edit_pos_mean"] = float(marked["first"].mean())
                out["first_edit_rel_mean"] = float((marked["first"] / marked["n"]).mean())
    return out


def _repair_cost(failed, n_ok: int) -> dict:
    """What a generating repairer (resample, model) spent on the failed rollouts; {} for shards that
    predate the cost columns."""
    import polars as pl

    if "repair_gen_tokens" not in failed.columns:
        return {}
    p, s, t = failed.select(*(pl.col(c).fill_null(0).sum() for c in ("repair_probes", "repair_samples",
                                                                      "repair_gen_tokens"))).row(0)
    return {"repair_probes": int(p), "repair_samples": int(s), "repair_gen_tokens": int(t),
            "repair_gen_tokens_per_ok": t / n_ok if n_ok else 0.0}


def render_table(st: dict):
    from rich.table import Table

    t = Table(title=f"{st['path']} ({st['stage']})", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in st.items():
        if k in ("path", "stage"):
            continue
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, (dict, list)):
            v = ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else \
                "; ".join(" ".join(str(x) for x in d.values()) for d in v)
        t.add_row(k, str(v))
    return t
