"""How the probability of the root-cause token moves under each objective.

Input: DF shards (``dfgen mask`` output) sampled from the common start policy, ideally on prompts
no RL run trained on (the val split), and a list of policies (``name=DIR``: the start, and the final
GRPO / DF policies trained from it). For every failed rollout with a verified repair, take the root
cause, the first edit position t (``root_bad``): the bad rollout and its repair share the prefix
before t, so the bad token b_t (the misread) and the repaired token r_t are two alternatives under
one context. Teacher-force the bad rollout under each policy and report, averaged over rollouts:

* ``lp_bad_root`` / ``lp_fix_root``: log p(b_t) and log p(r_t) at the root;
* ``fix_beats_bad``: share of rollouts where the policy now ranks r_t above b_t;
* ``lp_prefix``: mean log p of the verified tokens before t (what DF spares; negative kappa credits);
* ``lp_after``: mean log p of the tokens after t (the consequences the ``edit`` mask also blames).

Sampling suppression is applied as in the sampler. A rollout whose prefix differs from its repair
before t (cannot happen for an oracle repair) is counted in ``skipped``.

Run: ``python -m studies.root_probe --shards runs/probe/df sft=runs/sft2000 grpo=.../fit df=.../fit``
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def root_items(shards: Path) -> tuple[list[dict], int]:
    import polars as pl

    from dfgen.images import decode_image
    from dfgen.shards import open_shards

    items, skipped = [], 0
    ss = open_shards(shards, stage="mask")
    if ss.meta.get("mask", {}).get("level") != "token":
        raise SystemExit(f"root_probe.py: error: {shards} holds step-level masks; the probe needs --level token")
    for f in ss.files:
        for g in pl.read_parquet(f).to_dicts():
            image = None
            for r in g["rollouts"]:
                if r["repair_status"] != "ok" or r["reward"] >= 1 or not r.get("root_bad"):
                    continue
                bad, fix = r["token_ids"], r["repaired_ids"]
                t = next((i for i, m in enumerate(r["root_bad"]) if m), None)
                if t is None or t >= len(fix) or bad[:t] != fix[:t] or bad[t] == fix[t]:
                    skipped += 1
                    continue
                image = image or decode_image(g["image"])
                items.append({"question": g["question"], "image": image, "ids": bad, "t": t, "fix": fix[t]})
    return items, skipped


def probe(policy: Path, items: list[dict], batch: int = 64) -> dict:
    import torch

    from dfgen.policy import completion_inputs, load_policy, prompt_inputs, suppress_ids

    model, proc = load_policy(policy)
    sup = suppress_ids(proc.tokenizer)
    acc = {"lp_bad_root": 0.0, "lp_fix_root": 0.0, "fix_beats_bad": 0.0, "lp_prefix": 0.0, "lp_after": 0.0}
    n_pre = n_after = 0
    with torch.inference_mode():
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            inputs, cm = completion_inputs(prompt_inputs(proc, [c["question"] for c in chunk], [c["image"] for c in chunk]),
                                           [c["ids"] for c in chunk], proc.tokenizer.pad_token_id)
            T = cm.shape[1]
            logits = model(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, -(T + 1):-1, :].float()
            logits[..., sup] = float("-inf")
            lp = torch.log_softmax(logits, -1)
            for b, c in enumerate(chunk):
                t, ids = c["t"], c["ids"]
                tok_lp = lp[b, torch.arange(len(ids)), torch.as_tensor(ids)]
                bad, fix = lp[b, t, ids[t]].item(), lp[b, t, c["fix"]].item()
                acc["lp_bad_root"] += bad
                acc["lp_fix_root"] += fix
                acc["fix_beats_bad"] += fix > bad
                acc["lp_prefix"] += tok_lp[:t].sum().item()
                acc["lp_after"] += tok_lp[t + 1:].sum().item()
                n_pre += t
                n_after += len(ids) - t - 1
    n = max(1, len(items))
    return {"lp_bad_root": acc["lp_bad_root"] / n, "lp_fix_root": acc["lp_fix_root"] / n,
            "fix_beats_bad": acc["fix_beats_bad"] / n, "lp_prefix": acc["lp_prefix"] / max(1, n_pre),
            "lp_after": acc["lp_after"] / max(1, n_after)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    ap.add_argument("policies", nargs="+", help="name=DIR")
    args = ap.parse_args()
    if not any(args.shards.glob("*.parquet")):
        ap.error(f"--shards {args.shards}: no parquet shards there (dfgen mask output expected)")
    for spec in args.policies:
        name, eq, path = spec.partition("=")
        if not eq or not name or not (Path(path) / "config.json").is_file():
            ap.error(f"policy {spec!r}: expected name=DIR with DIR a policy folder (config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    items, skipped = root_items(args.shards)
    res = {"rollouts": len(items), "skipped": skipped, "policies": {}}
    print(f"{len(items)} failed rollouts with a root cause ({skipped} skipped)")
    print(f"{'policy':28s} {'lp_bad_root':>11s} {'lp_fix_root':>11s} {'fix>bad':>8s} {'lp_prefix':>9s} {'lp_after':>9s}")
    for spec in args.policies:
        name, _, path = spec.partition("=")
        r = res["policies"][name] = probe(Path(path), items) | {"path": path}
        print(f"{name:28s} {r['lp_bad_root']:11.3f} {r['lp_fix_root']:11.3f} {r['fix_beats_bad']:8.3f} "
              f"{r['lp_prefix']:9.3f} {r['lp_after']:9.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
