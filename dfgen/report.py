"""``dfgen show``: one static HTML page a person would read (no network, no scripts).

For a seeded sample of groups: the image, the question and reference answer, group reward
statistics, and for each failed rollout with a repair the bad and repaired trajectories side by
side, token by token, with masked tokens highlighted (red on the bad side, green on the repaired
side; the root cause underlined), plus its repair status and edit ratio. All model text is
HTML-escaped, so a trajectory containing ``<script>`` shows as text.

Run: ``dfgen show runs/r0/df --out report.html``
"""
from __future__ import annotations

import base64
import html
import random
from pathlib import Path

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{font-size:20px} .group{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin:16px 0}
.head{display:flex;gap:16px;align-items:flex-start} .head img{width:112px;height:112px;image-rendering:pixelated;
border:1px solid #ccc} .q{font-size:15px} .meta{color:#666;font-size:13px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px;margin-top:10px}
.traj{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;background:#f6f6f6;padding:8px;
border-radius:4px} .bad .m{background:#f8c4c4} .rep .m{background:#c4f0c8} .root{text-decoration:underline 2px}
.lbl{font-size:12px;color:#555;margin-bottom:2px} .ok{color:#1a7f37} .rej{color:#b42318}
table.sum{border-collapse:collapse;margin:8px 0} table.sum td{padding:2px 10px;border-bottom:1px solid #eee}
"""


def _tokens_html(pieces: list[str], mask, root) -> str:
    out = []
    for k, p in enumerate(pieces):
        t = html.escape(p)
        cls = []
        if mask is not None and k < len(mask) and mask[k]:
            cls.append("m")
        if root is not None and k < len(root) and root[k]:
            cls.append("root")
        out.append(f'<span class="{" ".join(cls)}">{t}</span>' if cls else t)
    return "".join(out)


def write_report(path: Path, out: Path, groups: int = 20, seed: int = 0) -> int:
    """A self-contained HTML page of ``groups`` groups of a shard set (those with a repair first):
    image, question, and up to 3 failed rollouts beside their repairs, masked tokens marked.
    Returns the number of groups shown."""
    from dfgen.errors import UserError
    from dfgen.shards import open_shards
    from dfgen.stats import compute_stats

    ss = open_shards(path, stage=("sample", "repair", "mask"))
    rows = list(ss.iter_rows())
    rng = random.Random(seed)
    pool = [r for r in rows if any(x.get("repaired_text") for x in r["rollouts"])] or rows  # groups with a repair
    pick = sorted(rng.sample(range(len(pool)), min(groups, len(pool))))
    tok = None
    model_dir = Path(ss.meta.get("model", ""))
    if (model_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    st = compute_stats(path)
    summary = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v if not isinstance(v, float) else round(v, 4)))}</td></tr>"
                      for k, v in st.items() if not isinstance(v, (list, dict)))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dfgen report: {html.escape(str(path))}</title>",
             f"<style>{CSS}</style></head><body><h1>Differential Feedback report: {html.escape(str(path))}</h1>",
             f"<table class='sum'>{summary}</table>"]
    parts += [_group_html(pool[gi], tok) for gi in pick]
    parts.append("</body></html>")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give an .html file path")
    tmp = out.with_name("." + out.name + ".tmp")
    tmp.write_text("".join(parts), encoding="utf-8")
    tmp.replace(out)
    return len(pick)


def _group_html(g: dict, tok) -> str:
    """One group: its head (image, question, rewards) and up to 3 failed rollouts with their repairs."""
    def pieces(ids, text):
        return [text or ""] if tok is None or ids is None else [tok.decode([i]) for i in ids]

    img = ""
    if g.get("image"):
        img = f"<img alt='image' src='data:image/png;base64,{base64.b64encode(g['image']).decode()}'>"
    rewards = [x["reward"] for x in g["rollouts"]]
    parts = [f"<div class='group'><div class='head'>{img}<div><div class='q'>{html.escape(g['question'])}</div>"
             f"<div class='meta'>id {html.escape(g['id'])} · answer {html.escape(str(g['answer']))} · "
             f"rewards {html.escape(str([round(x, 2) for x in rewards]))}</div></div></div>"]
    shown = 0
    for i, x in enumerate(g["rollouts"]):
        if x["reward"] >= 1 or shown >= 3:
            continue
        shown += 1
        status = x.get("repair_status")
        sclass = "ok" if status == "ok" else "rej"
        bp, rp = pieces(x["token_ids"], x["text"]), pieces(x.get("repaired_ids"), x.get("repaired_text"))
        info = f"rollout {i} · reward {x['reward']:.0f} · pred {html.escape(str(x.get('pred')))}"
        if status:
            info += f" · repair <span class='{sclass}'>{html.escape(status)}</span>"
        if x.get("edit_ratio") is not None:
            info += f" · edit ratio {x['edit_ratio']:.2f}"
        if x.get("mask_bad") is not None:
            info += f" · masked {sum(x['mask_bad'])}/{len(x['mask_bad'])} tokens"
        parts.append(f"<div class='meta'>{info}</div><div class='pair'>"
                     f"<div><div class='lbl'>bad trajectory</div><div class='traj bad'>"
                     f"{_tokens_html(bp, x.get('mask_bad'), x.get('root_bad'))}</div></div>"
                     f"<div><div class='lbl'>repaired trajectory</div><div class='traj rep'>"
                     f"{_tokens_html(rp, x.get('mask_repaired'), x.get('root_repaired')) if x.get('repaired_text') is not None else '(no repair)'}"
                     f"</div></div></div>")
    if not shown:
        parts.append("<div class='meta'>all rollouts correct</div>")
    parts.append("</div>")
    return "".join(parts)
