import json
import shutil
import subprocess

import polars as pl
import pytest

from dfgen.answers import score
from dfgen.errors import UserError
from dfgen.repairers import oracle
from dfgen.synth.grid import GridTask, make_problems, solution_text, to_record


def _rec(seed=0, **kw):
    p = next(make_problems(1, seed=seed, task=GridTask(min_reads=3, max_reads=3, **kw)))
    return p, to_record(p, 0, seed, "train", GridTask(min_reads=3, max_reads=3, **kw))


def test_oracle_fixes_the_first_wrong_read_and_recomputes_what_follows_keeping_correct_lines():
    p, rec = _rec()
    lines = solution_text(p.steps, p.answer).split("\n")
    wrong = p.steps[1]["value"] + 1  # second read is wrong
    bad = list(lines)
    bad[1] = f"Step 2: {p.steps[1]['color']} = {wrong}"
    a = p.steps[0]["value"]
    bad[2] = f"Step 3: {a} + {wrong} = {a + wrong}"
    bad[0] = bad[0].replace(": ", ":  ", 1)  # the model's own (odd) wording of a correct step
    bad[-1] = "Answer: 999"
    fixed = oracle.repair(rec, "\n".join(bad)).text
    out = fixed.split("\n")
    assert out[0] == bad[0]  # correct step kept verbatim
    assert out[1:] == lines[1:]  # wrong read fixed, downstream recomputed, answer corrected
    assert score(rec, fixed)[1] == 1.0


def test_oracle_completes_truncated_rollouts_and_rejects_free_text():
    p, rec = _rec(seed=1)
    lines = solution_text(p.steps, p.answer).split("\n")
    assert oracle.repair(rec, "\n".join(lines[:2])).text == "\n".join(lines)
    prop = oracle.repair(rec, "I think it is seven")
    assert prop.text is None and prop.reason == "not in step format"
    assert oracle.repair({**rec, "solution": None}, "Step 1: red = 1").reason.startswith("no solution")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, sft_model, train_prompts):
    from dfgen.mask import MaskConfig, run_mask
    from dfgen.repair import RepairConfig, run_repair
    from dfgen.sample import SampleConfig, run_sample

    d = tmp_path_factory.mktemp("pipe")
    run_sample(SampleConfig(prompts=train_prompts, model=sft_model, out=d / "s", group_size=4, limit=24,
                            chunk_size=8, seed=11))
    rep = run_repair(RepairConfig(rollouts=d / "s", out=d / "r", repairer="oracle"))
    st = run_mask(MaskConfig(repairs=d / "r", out=d / "m"))
    return d, rep, st


def _flat(path):
    return pl.read_parquet(str(path / "*.parquet")).explode("rollouts").unnest("rollouts")


def test_oracle_repairs_almost_all_step_format_failures_and_every_kept_repair_verifies(pipeline):
    d, rep, _ = pipeline
    f = _flat(d / "r")
    failed = f.filter(pl.col("reward") < 1)
    assert failed.height > 0 and failed.height == rep["failed"]
    def follows_format(row):  # every line a step or the answer, as many steps as the solution
        lines = [ln for ln in row["text"].split("\n") if ln.strip()]
        n_steps = len(json.loads(row["solution"])["steps"])
        steps = [ln for ln in lines if oracle.parse_line(ln) is not None]
        return len(steps) == n_steps and len(lines) == n_steps + 1 and lines[-1].startswith("Answer:")

    fmt = [r for r in failed.iter_rows(named=True) if follows_format(r)]
    assert len(fmt) >= 5
    assert sum(r["repair_status"] == "ok" for r in fmt) >= 0.95 * len(fmt)
    ok = failed.filter(pl.col("repair_status") == "ok")
    assert set(failed["repair_status"].unique().to_list()) <= {"ok", "not in step format", "edit ratio above bound"}
    for row in ok.iter_rows(named=True):
        assert score(row, row["repaired_text"])[1] == 1.0
        assert row["edit_ratio"] <= 0.5
        assert len(row["repaired_ids"]) == len(row["repaired_logprobs"])
    assert f.filter(pl.col("reward") >= 1)["repair_status"].null_count() == f.filter(pl.col("reward") >= 1).height


def test_repaired_logprobs_are_the_sampling_policys_teacher_forced_logprobs(pipeline, sft_model):
    from dfgen.backends import Prompt
    from dfgen.backends.hf import HFBackend
    from dfgen.images import decode_image

    d, _, _ = pipeline
    ok = _flat(d / "r").filter(pl.col("repair_status") == "ok").head(6)
    b = HFBackend(sft_model)
    tf = b.score([Prompt(r["question"], decode_image(r["image"])) for r in ok.iter_rows(named=True)],
                 ok["repaired_ids"].to_list())
    for stored, ref in zip(ok["repaired_logprobs"].to_list(), tf):
        assert max(abs(a - c) for a, c in zip(stored, ref)) < 1e-4


def test_masks_have_trajectory_lengths_and_start_at_the_known_first_wrong_step(pipeline, sft_model):
    from transformers import AutoTokenizer

    d, _, st = pipeline
    tok = AutoTokenizer.from_pretrained(sft_model)
    ok = _flat(d / "m").filter(pl.col("repair_status") == "ok")
    assert ok.height == st["masked"] > 0
    checked = 0
    for r in ok.iter_rows(named=True):
        for a, b in (("mask_bad", "token_ids"), ("root_bad", "token_ids"), ("step_mask_bad", "token_ids"),
                     ("mask_repaired", "repaired_ids"), ("root_repaired", "repaired_ids"),
                     ("step_mask_repaired", "repaired_ids")):
            assert len(r[a]) == len(r[b])
        assert sum(r["mask_bad"]) > 0
        # the known first wrong step, from the task's solution
        sol = json.loads(r["solution"])
        lines = r["text"].split("\n")
        first_wrong = next((k for k, s in enumerate(sol["steps"])
                            if k >= len(lines) or oracle.parse_line(lines[k]) != oracle.canonical_tuple(s, k + 1)),
                           len(sol["steps"]))
        if any(oracle.parse_line(ln) is None for ln in lines[:first_wrong]):
            continue  # unusual layouts: the line-to-step mapping below assumes one step per line
        prefix = "\n".join(lines[:first_wrong]) + ("\n" if first_wrong else "")
        n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"]) if first_wrong else 0
        first_marked = r["mask_bad"].index(1)
        assert first_marked >= n_prefix - 1, (r["text"], r["repaired_text"])  # nothing before the wrong step
        assert r["root_bad"].index(1) == first_marked
        checked += 1
    assert checked >= 3


def test_step_level_widens_every_mask_including_the_root_cause_to_whole_steps(pipeline, tmp_path):
    from dfgen.mask import MaskConfig, run_mask

    d, _, _ = pipeline
    run_mask(MaskConfig(repairs=d / "r", out=tmp_path / "m", level="step"))
    tok_rows = _flat(d / "m").filter(pl.col("repair_status") == "ok").sort("id", "token_ids")
    step_rows = _flat(tmp_path / "m").filter(pl.col("repair_status") == "ok").sort("id", "token_ids")
    assert step_rows.height == tok_rows.height > 0
    wider = 0
    for t, s in zip(tok_rows.iter_rows(named=True), step_rows.iter_rows(named=True)):
        assert s["mask_bad"] == t["step_mask_bad"] and s["mask_repaired"] == t["step_mask_repaired"]
        for side in ("bad", "repaired"):
            root_tok, root_step = t[f"root_{side}"], s[f"root_{side}"]
            assert all(b >= a for a, b in zip(root_tok, root_step))  # covers the token-level root
            assert all(b <= m for b, m in zip(root_step, s[f"mask_{side}"]))  # inside the step mask
            wider += sum(root_step) > sum(root_tok)
    assert wider > 0  # the root cause's step holds more tokens than the edit itself


def test_sibling_repairer_only_repairs_groups_with_a_correct_rollout(pipeline):
    from dfgen.repair import RepairConfig, run_repair

    d, _, _ = pipeline
    run_repair(RepairConfig(rollouts=d / "s", out=d / "sib", repairer="sibling"))
    f = _flat(d / "sib")
    per_group = f.group_by("id").agg(pl.col("reward").max().alias("best"))
    fails = f.filter(pl.col("reward") < 1).join(per_group, on="id")
    assert (fails.filter(pl.col("best") < 1)["repair_status"] == "no correct sibling").all()
    for r in fails.filter(pl.col("repair_status") == "ok").iter_rows(named=True):
        assert score(r, r["repaired_text"])[1] == 1.0


def _first_shard(src, dst):
    """A copy of the first shard of ``src`` alone in ``dst``: a one-shard input folder."""
    dst.mkdir()
    first = sorted(src.glob("*.parquet"))[0]
    shutil.copy(first, dst / first.name)
    return dst


def test_model_repairer_runs_end_to_end_and_records_a_reason_for_each_rejection(pipeline, tmp_path):
    from dfgen.repair import RepairConfig, run_repair

    d, _, _ = pipeline
    # one shard is enough: the tiny policy is not a good repairer; verification is what is tested
    src = _first_shard(d / "s", tmp_path / "s1")
    st = run_repair(RepairConfig(rollouts=src, out=tmp_path / "r", repairer="model", max_new_tokens=24))
    f = _flat(tmp_path / "r").filter(pl.col("reward") < 1)
    assert f.height == st["failed"] > 0
    assert f["repair_status"].null_count() == 0
    assert set(f["repair_status"].to_list()) <= {"ok", "wrong answer after repair", "edit ratio above bound",
                                                  "repair model hit max tokens"}
    assert (f["repairer"] == "model").all()


def test_model_repairer_rejects_prompts_beyond_the_context_per_rollout(pipeline, tmp_path):
    from dfgen.policy import context_length
    from dfgen.repair import RepairConfig, run_repair

    d, _, _ = pipeline
    src = _first_shard(d / "s", tmp_path / "s1")
    ctx = context_length(json.loads((d / "s" / "config.json").read_text())["model"])
    template = tmp_path / "long.txt"  # the tiny tokenizer has "red" as one token: ctx of them cannot fit
    template.write_text("Fix it. " + "red " * ctx + "\nQuestion: {question}\nSolution:\n{solution}\n")
    st = run_repair(RepairConfig(rollouts=src, out=tmp_path / "r", repairer="model", template=template,
                                 max_new_tokens=24))
    f = _flat(tmp_path / "r").filter(pl.col("reward") < 1)
    assert f.height == st["failed"] > 0  # every failure recorded, none generated past the positions
    assert set(f["repair_status"].to_list()) == {"repair prompt too long for the repair model"}
    assert _flat(tmp_path / "r").height == _flat(src).height  # no rollout lost


def test_model_repairer_generates_for_the_prompts_that_fit_and_rejects_only_the_others(pipeline, tmp_path):
    """A template sized so that some failures' repair prompts fit the context and some do not: each
    rollout gets the status of its own prompt (the generated outputs are not shifted by the rejects)."""
    from dfgen.backends import Prompt
    from dfgen.images import decode_image
    from dfgen.policy import context_length, load_policy, prompt_lengths
    from dfgen.repair import RepairConfig, run_repair

    d, _, _ = pipeline
    src = _first_shard(d / "s", tmp_path / "s1")
    model = json.loads((d / "s" / "config.json").read_text())["model"]
    ctx, new = context_length(model), 24
    _, processor = load_policy(model)
    bad = _flat(src).filter(pl.col("reward") < 1)

    def lengths(text):
        return prompt_lengths(processor, [Prompt(text.format(question=r["question"], reference_answer=r["answer"],
                                                             solution=r["text"]), decode_image(r["image"]))
                                          for r in bad.iter_rows(named=True)])

    head = "Fix it.\nQuestion: {question}\nSolution:\n{solution}\n"
    base = sorted(lengths(head))
    per_word = (lengths("red " * 100 + head)[0] - lengths(head)[0]) / 100  # filler tokens per word
    fill = int((ctx - new - base[len(base) // 2]) / per_word)  # puts the median prompt at the edge
    template = tmp_path / "edge.txt"
    template.write_text("red " * fill + head)
    fits = [n + new <= ctx for n in lengths(template.read_text())]
    assert 0 < sum(fits) < len(fits), "the template must split the failures"
    st = run_repair(RepairConfig(rollouts=src, out=tmp_path / "r", repairer="model", template=template,
                                 max_new_tokens=new))
    out = _flat(tmp_path / "r").filter(pl.col("reward") < 1)
    assert out.height == st["failed"] == len(fits)
    key = ["id", "seed"]
    status = dict(zip(map(tuple, out.select(key).rows()), out["repair_status"]))
    for r, ok in zip(bad.select(key).rows(), fits):
        assert (status[tuple(r)] == "repair prompt too long for the repair model") != ok, (r, ok, status[tuple(r)])
    generated = out.filter(pl.col("repair_status") != "repair prompt too long for the repair model")
    assert generated.height == sum(fits) and generated["repaired_text"].null_count() == 0


def test_no_failed_rollouts_gives_an_empty_but_valid_output(tmp_path, pipeline):
    from tests.conftest import run_cli

    d, _, _ = pipeline
    g = pl.read_parquet(str(d / "s" / "*.parquet"))
    rows = g.to_dicts()
    for row in rows:
        row["rollouts"] = [x for x in row["rollouts"] if x["reward"] >= 1]
    rows = [r for r in rows if r["rollouts"]] or rows[:1]
    if not rows[0]["rollouts"]:
        pytest.skip("no correct rollout sampled")
    from dfgen.shards import open_shards, ShardWriter

    meta = open_shards(d / "s").meta
    ShardWriter(tmp_path / "s", "sample", {k: v for k, v in meta.items() if k not in ("stage", "schema_version")}
                ).write(0, rows)
    r = run_cli("dfgen", "repair", "--rollouts", tmp_path / "s", "--out", tmp_path / "r")
    assert "nothing to repair" in r.stdout
    assert pl.read_parquet(str(tmp_path / "r" / "*.parquet")).height == len(rows)


def test_mask_refuses_another_tokenizer_and_corrupt_shards(pipeline, tmp_path):
    from dfgen.mask import MaskConfig, run_mask
    from dfgen.tiny import build_tiny
    from tests.conftest import run_cli

    d, _, _ = pipeline
    other = build_tiny(tmp_path / "other", seed=5)
    # the tokenizer corpus depends on the seed, so the vocabulary differs
    with pytest.raises(UserError, match="another tokenizer"):
        run_mask(MaskConfig(repairs=d / "r", out=tmp_path / "m", tokenizer=other))
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "part-w000-00000.parquet").write_bytes(b"PAR1 not really parquet")
    r = run_cli("dfgen", "mask", "--repairs", bad, "--out", tmp_path / "m2", check=False)
    assert r.returncode != 0 and "not a readable parquet" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m2").exists() or not list((tmp_path / "m2").glob("*.parquet"))


def test_stats_report_repairs_and_masks(pipeline):
    from dfgen.stats import compute_stats

    d, _, _ = pipeline
    s = compute_stats(d / "m")
    assert s["stage"] == "mask" and 0 < s["mask_density"] < 1 and 0 < s["root_density"] <= s["mask_density"]
    assert s["repair_success_rate"] > 0 and sum(s["edit_ratio_hist"].values()) > 0
    assert 0 <= s["first_edit_rel_mean"] < 1


def test_report_escapes_model_text_and_renders_in_headless_chromium(pipeline, tmp_path):
    from dfgen.report import write_report
    from dfgen.shards import ShardWriter, open_shards

    d, _, _ = pipeline
    rows = pl.read_parquet(str(d / "m" / "*.parquet")).to_dicts()
    for row in rows:
        row["question"] = "<script>alert(1)</script>" + row["question"]
        for x in row["rollouts"]:
            if x["reward"] < 1:
                x["pred"] = "<script>alert(2)</script>"
                x["repaired_text"] = "<script>alert(3)</script>" + (x["repaired_text"] or "")
    meta = open_shards(d / "m").meta
    ShardWriter(tmp_path / "m", "mask", {k: v for k, v in meta.items() if k not in ("stage", "schema_version")}
                ).write(0, rows)
    html_path = tmp_path / "report.html"
    write_report(tmp_path / "m", html_path, groups=5)
    text = html_path.read_text()
    assert "&lt;script&gt;" in text
    assert "<script" not in text.lower()
    write_report(d / "m", html_path, groups=5)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium not installed (apt-get install chromium)")
    png = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1000,900",
                    html_path.as_uri()], capture_output=True, timeout=120)
    assert png.is_file()
    from PIL import Image

    im = Image.open(png).convert("RGB")
    colors = im.getcolors(maxcolors=1_000_000)
    assert colors is not None and len(colors) > 50  # text, image and highlights: not a blank page
    reds = sum(n for n, (r, g, b) in colors if r > 230 and 180 < g < 210 and 180 < b < 210)
    assert reds > 0  # masked tokens are highlighted
