"""DF inside the real TRL (1.16) GRPOTrainer, on the tiny policy and the synthetic task, offline:
kappa = 1 is stock GRPOTrainer (same loss and gradients on the same batch), DF's per-token advantages
put full blame on the root cause and kappa on the rest, two training steps run end to end, and TRL
settings under which the weights would not be per token are refused. Time on the 2-core VM: about
40 s for the file once the session's shared fixtures (tiny policy, SFT) exist."""
from __future__ import annotations

import json

import pytest
import torch

from dftrain.integrations import answer_reward as reward  # the exact-answer reward, from the dataset columns
from dftrain.integrations.trl import DFConfig, DFGRPOTrainer  # make setup installs the trl extra

G, PROMPTS = 4, 4


@pytest.fixture(scope="module")
def dataset(train_prompts):
    from datasets import Dataset

    from dfgen.images import decode_image
    from dfgen.records import load_prompts

    recs, _ = load_prompts(train_prompts, limit=16)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
             "image": decode_image(r["image"]), "answer": r["answer"], "answer_type": r["answer_type"],
             "source": r["source"], "solution": r["solution"]} for r in recs]
    return Dataset.from_list(rows)


def make(sft_model, dataset, tmp_path, df=None, max_steps=2, repairer="oracle", **cfg):
    from trl import GRPOConfig

    from dfgen.policy import load_policy

    torch.manual_seed(0)
    model, processor = load_policy(sft_model)
    args = GRPOConfig(**{**dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=PROMPTS * G,
                                num_generations=G, max_completion_length=64, max_steps=max_steps, learning_rate=1e-3,
                                beta=0.0, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
                                save_strategy="no", seed=0, dataloader_num_workers=0), **cfg})
    t = DFGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=processor,
                      df=df or DFConfig(), repairer=repairer)
    t.current_gradient_accumulation_steps = 1  # Trainer.train() sets it; the tests also call compute_loss directly
    return t


def _batch(dataset):
    return [dataset[i] for i in range(PROMPTS) for _ in range(G)]  # TRL's layout: each prompt G times


def _loss_and_grad(trainer, out):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, out)
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


def test_kappa_one_is_stock_grpo_trainer_loss_and_gradients(sft_model, dataset, tmp_path):
    from trl import GRPOTrainer

    t = make(sft_model, dataset, tmp_path, df=DFConfig(kappa=1.0, repaired_weight=0.0, fail_advantage=0.0))
    t.model.train()
    batch = _batch(dataset)
    torch.manual_seed(1)
    ours = t._generate_and_score_completions(batch)
    torch.manual_seed(1)
    stock = GRPOTrainer._generate_and_score_completions(t, batch)
    assert torch.equal(ours["completion_ids"], stock["completion_ids"])
    assert ours["advantages"].dim() == 2 and stock["advantages"].dim() == 1
    assert (stock["advantages"] != 0).any(), "the batch should hold mixed groups"
    assert any(v > 0 for v in t._metrics["train"]["df/repaired_frac"])  # repairs happened, kappa = 1 ignores them
    l1, g1 = _loss_and_grad(t, ours)
    l2, g2 = _loss_and_grad(t, stock)
    assert abs(l1 - l2) < 1e-5 and torch.allclose(g1, g2, atol=1e-5)


def _full_runs(trainer, batch, kappa):
    """Per blamed completion: (its A, the token positions at full weight A, at kappa * A, its length)."""
    from trl import GRPOTrainer

    torch.manual_seed(1)
    out = trainer._generate_and_score_completions(batch)
    torch.manual_seed(1)
    a = GRPOTrainer._generate_and_score_completions(trainer, batch)["advantages"]  # (B,) TRL's own
    return out, a


def _runs(idx: list[int]) -> int:
    return sum(1 for k, i in enumerate(idx) if k == 0 or i != idx[k - 1] + 1)


@pytest.mark.parametrize("marked", ["root", "edit"])
def test_df_advantages_put_full_blame_on_the_marked_tokens_and_kappa_on_the_rest(sft_model, dataset, tmp_path,
                                                                                 marked):
    from dfgen.synth.grid import correct_prefix

    kappa = 0.1
    t = make(sft_model, dataset, tmp_path, df=DFConfig(kappa=kappa, marked=marked, fail_advantage=0.0))
    batch = _batch(dataset)
    out, a = _full_runs(t, batch, kappa)
    adv, cm, ids = out["advantages"], out["completion_mask"], out["completion_ids"]
    tok = t.processing_class.tokenizer
    checked, runs = 0, []
    for i in range(adv.shape[0]):
        n = int(cm[i].sum())
        assert (adv[i, n:] == 0).all()
        if a[i] >= 0:
            assert torch.allclose(adv[i, :n], a[i].expand(n))  # not blamed: TRL's advantage on every token
            continue
        full = (adv[i, :n] - a[i]).abs() < 1e-6
        part = (adv[i, :n] - kappa * a[i]).abs() < 1e-6
        assert (full | part).all()  # two levels only: the root cause at A, the rest at kappa * A
        if not full.any() or full.all():
            continue  # not repaired (left at A everywhere) or nothing to tell apart
        text = tok.decode(ids[i, :n].tolist(), skip_special_tokens=True)
        first_wrong = correct_prefix(text, json.loads(batch[i]["solution"]))  # index of the first wrong line
        first_root = int(full.nonzero()[0])
        line_of_root = tok.decode(ids[i, :first_root + 1].tolist(), skip_special_tokens=True).count("\n")
        assert line_of_root == first_wrong, (text, first_root)  # the blame starts on the first wrong line
        runs.append(_runs(full.nonzero().flatten().tolist()))
        checked += 1
    assert checked > 0, "no repaired completion with a correct prefix in the batch"
    if marked == "root":
        assert set(runs) == {1}, runs  # one contiguous run: the first edit only
    else:
        assert max(runs) > 1, runs  # every edit: the recomputed later lines too (so "root" above can fail)


def test_the_readmes_trl_commands_run_as_written_and_train(tmp_path):
    """The README's TRL example, its lines run exactly as written from a clean checkout's layout (the
    repository's .venv, data/ and examples/ beside a fresh runs/): TRL's own train loop, two steps
    of the default variant on the shipped policy, DF's metrics logged, weights moved, tower frozen."""
    import os
    import re
    import subprocess

    from dfgen.models import vision_parameters
    from dfgen.policy import load_policy
    from tests.conftest import ROOT

    block = re.search(r"<!-- trl-example -->\n(.*?)<!-- /trl-example -->", (ROOT / "README.md").read_text(), re.S)
    lines = [ln.strip() for ln in block[1].splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[1].startswith(".venv/bin/python examples/trl_df_grpo.py")
    for name in (".venv", "data", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outs = [subprocess.run(["bash", "-c", ln], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
            for ln in lines]
    for p in outs:
        assert p.returncode == 0, p.stderr[-3000:]
    logged = [json.loads(x) for x in outs[1].stdout.splitlines() if x.startswith('{"step"')]
    assert [h["step"] for h in logged] == [1, 2]
    assert all(0 <= h["df/repaired_frac"] <= 1 and 0 <= h["df/mask_density"] <= 1 for h in logged)
    assert any(h["df/repaired_frac"] > 0 for h in logged)
    model, _ = load_policy(ROOT / "data" / "policies" / "regime_start")
    trained, _ = load_policy(tmp_path / "runs" / "trl" / "policy")
    tower = {n for n, p in model.named_parameters() if any(p is q for q in vision_parameters(model))}
    old, new = dict(model.named_parameters()), dict(trained.named_parameters())
    assert tower and all(torch.equal(new[k], old[k]) for k in tower)  # frozen, as the recipe keeps it
    assert any(not torch.equal(new[k], old[k]) for k in old if k not in tower)


def test_a_start_that_never_succeeds_is_reported_in_one_line(tiny_model, dataset, tmp_path):
    """The untrained tiny policy fails every group and no oracle repair of its text verifies (it is
    not in step format): nothing to learn, said once, not a silent zero-gradient run."""
    t = make(tiny_model, dataset, tmp_path)
    t.model.train()
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="no group of this batch has a success or a repair") as rec:
        out = t._generate_and_score_completions(_batch(dataset))
        t._generate_and_score_completions(_batch(dataset))
    assert sum("no group of this batch" in str(w.message) for w in rec) == 1  # once, not per batch
    assert not (out["advantages"] != 0).any()


@pytest.mark.parametrize("cfg,msg", [({"loss_type": "vespo"}, "DF needs a token-level loss"),
                                     ({"importance_sampling_level": "sequence"}, "importance_sampling_level='token'")])
def test_settings_where_weights_are_not_per_token_are_refused(sft_model, dataset, tmp_path, cfg, msg):
    with pytest.raises(ValueError, match=msg):
        make(sft_model, dataset, tmp_path, **cfg)


def test_bad_df_settings_are_refused_before_trl_starts(sft_model, dataset, tmp_path):
    with pytest.raises(ValueError, match="kappa"):
        make(sft_model, dataset, tmp_path, df=DFConfig(kappa=2.0))
    with pytest.raises(ValueError, match="repairer must be"):
        DFGRPOTrainer(model=None, reward_funcs=reward, repairer="nearest")


def test_oracle_without_a_solution_column_is_refused_at_construction(sft_model, dataset, tmp_path):
    with pytest.raises(ValueError, match="'solution' column"):
        make(sft_model, dataset.remove_columns("solution"), tmp_path)


@pytest.mark.parametrize("bad", [lambda text: text, lambda row, text, model: text, lambda: None])
def test_a_repairer_that_cannot_take_row_and_text_is_refused_at_construction(sft_model, dataset, tmp_path, bad):
    with pytest.raises(ValueError, match=r"must accept \(row, text\), its signature is"):
        make(sft_model, dataset, tmp_path, repairer=bad)


def test_a_failing_repairer_is_a_counted_skip_with_a_warning_or_fatal_when_strict(sft_model, dataset, tmp_path):
    """A repairer that raises, or returns a non-str, costs its row the repair (GRPO's advantage there),
    with one warning naming the repairer and the row; the rest of the batch is repaired as usual."""
    from dftrain.integrations import RepairerError, oracle_repairer

    calls = []

    def flaky(row, text):
        calls.append(text)
        if len(calls) == 1:
            raise KeyError("boom")
        if len(calls) == 2:
            return 42
        return oracle_repairer(row, text)

    t = make(sft_model, dataset, tmp_path)
    t.model.train()  # metrics go to "train"
    t.repairer = flaky
    batch = _batch(dataset)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=r"repairer .*flaky failed on row \d+ \(KeyError") as rec:
        out = t._generate_and_score_completions(batch)
    assert sum("flaky failed" in str(w.message) for w in rec) == 2
    assert any("TypeError: returned int" in str(w.message) for w in rec)
    m = t._metrics["train"]
    assert m["df/repair_errors"][-1] == 2.0 and m["df/repaired_frac"][-1] > 0
    assert out["advantages"].dim() == 2

    strict = make(sft_model, dataset, tmp_path, df=DFConfig(strict_repairs=True))
    calls.clear()
    strict.repairer = flaky
    torch.manual_seed(1)
    with pytest.raises(RepairerError, match="flaky failed on row"):
        strict._generate_and_score_completions(batch)


@pytest.mark.parametrize("marked", ["root", "edit"])
def test_mask_density_counts_the_tokens_marked_puts_at_full_weight(sft_model, dataset, tmp_path, marked):
    t = make(sft_model, dataset, tmp_path, df=DFConfig(marked=marked, fail_advantage=0.0, repaired_weight=0.0))
    t.model.train()
    torch.manual_seed(1)
    out = t._generate_and_score_completions(_batch(dataset))
    a, cm = out["advantages"], out["completion_mask"]
    rows = [i for i in range(a.shape[0]) if (a[i] < 0).any() and len(set(a[i, : int(cm[i].sum())].tolist())) == 2]
    full = sum(int((a[i, : int(cm[i].sum())] == a[i, : int(cm[i].sum())].min()).sum()) for i in rows)
    assert rows and t._metrics["train"]["df/mask_density"][-1] == pytest.approx(
        full / sum(int(cm[i].sum()) for i in rows))


def test_a_repair_counts_only_if_the_reward_functions_give_it_the_top_reward(sft_model, dataset, tmp_path):
    """Verification by TRL's own reward functions: a repair that changes the text but keeps a wrong
    answer is proposed, not counted; the oracle's right repairs are counted (and kept under the edit
    limit), and a long rewrite past ``max_edit_ratio`` is not."""
    from dftrain.integrations import oracle_repairer

    batch = _batch(dataset)

    def run(repairer, **df):
        t = make(sft_model, dataset, tmp_path, df=DFConfig(**df))
        t.model.train()
        t.repairer = repairer
        torch.manual_seed(1)
        out = t._generate_and_score_completions(batch)
        m = t._metrics["train"]
        return out, m["df/repaired_frac"][-1], m["df/verified_frac"][-1]

    out, rep, ver = run(lambda row, text: text + "\nANSWER: -999")  # proposed for every blamed row, all wrong
    assert rep == 0 and ver == 0 and out["advantages"].dim() == 2
    _, rep, ver = run(lambda row, text: text + "\nANSWER: -999", verify_repairs=False, fail_advantage=0.0)
    assert rep > 0  # without verification the same repairs count: the check above can fail
    _, rep, ver = run(oracle_repairer)
    assert rep > 0 and ver > 0
    _, rep, _ = run(oracle_repairer, max_edit_ratio=1e-9)  # any edit is too long
    assert rep == 0


def test_the_sibling_repairer_proposes_the_nearest_top_completion_of_the_group(sft_model, dataset, tmp_path):
    """repairer="sibling" needs no solution: every blamed completion in a mixed group gets a proposal,
    the group's best completion nearest to it; those within the edit limit are verified and count."""
    from rapidfuzz.distance import Levenshtein

    t = make(sft_model, dataset.remove_columns("solution"), tmp_path, df=DFConfig(max_edit_ratio=10.0),
             repairer="sibling")
    t.model.train()
    batch = _batch(dataset)
    torch.manual_seed(1)
    out = t._generate_and_score_completions(batch)
    m = t._metrics["train"]
    assert m["df/repaired_frac"][-1] == 1.0 and m["df/verified_frac"][-1] == 1.0  # a right sibling is top
    torch.manual_seed(1)
    from trl import GRPOTrainer

    a = GRPOTrainer._generate_and_score_completions(t, batch)["advantages"]
    lens = out["completion_mask"].sum(-1).tolist()
    ids = [out["completion_ids"][i, : int(n)].tolist() for i, n in enumerate(lens)]
    prop = t.sibling_proposals(t.processing_class.tokenizer, out["completion_ids"], lens, a)
    assert set(prop) == {i for i in range(len(ids)) if a[i] < 0}
    for i, rep in prop.items():
        g = range(i // G * G, i // G * G + G)
        tops = [j for j in g if a[j] == max(a[k] for k in g)]
        d = {j: Levenshtein.distance(ids[i], ids[j]) for j in tops}
        assert rep in [ids[j] for j in tops if d[j] == min(d.values())]  # the sibling's own ids
    kept = out["rep_completion_mask"].sum(-1) > 0
    for i in kept.nonzero().flatten().tolist():  # the repaired samples are siblings, token for token
        n = int(out["rep_completion_mask"][i].sum())
        assert out["rep_completion_ids"][i, :n].tolist() in ids


def _as_dfgen_groups(t, batch, out):
    """The batch TRL generated, as ``dfgen mask`` shards would hold it: per group, each rollout's ids,
    behaviour log-probs and reward, and for a failed one the oracle's repair with ``dfgen repair``'s
    rules (right answer, edit ratio <= 0.5) and ``dfgen mask``'s alignment. Made here from the
    completions alone, independently of DFGRPOTrainer's repair path."""
    from rapidfuzz.distance import Levenshtein

    from dfgen.align import align
    from dfgen.policy import completion_inputs, prompt_inputs, token_logprobs
    from dftrain.integrations import oracle_repairer

    tok = t.processing_class.tokenizer
    cm, old = out["completion_mask"], out["old_per_token_logps"]
    score = lambda row, text: reward([text], **{k: [row[k]] for k in ("answer", "answer_type", "source")})[0]  # noqa
    groups, reps = [], []
    for g in range(len(batch) // G):
        row = batch[g * G]
        rolls = []
        for i in range(g * G, g * G + G):
            n = int(cm[i].sum())
            ids = out["completion_ids"][i, :n].tolist()
            text = tok.decode(ids, skip_special_tokens=True)
            r = {"token_ids": ids, "logprobs": old[i, :n].tolist(), "reward": score(row, text), "repair_status": None}
            fixed = oracle_repairer(row, text) if r["reward"] < 1 else None
            if fixed is not None and fixed != text and score(row, fixed) == 1:
                rep = tok(fixed, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if ids[-1] == tok.eos_token_id else [])
                if Levenshtein.distance(ids, rep) <= 0.5 * len(ids):
                    a = align(ids, rep)
                    r.update(repair_status="ok", repaired_ids=rep, mask_bad=a.mask_bad, root_bad=a.root_bad,
                             mask_repaired=a.mask_repaired)
                    reps.append((g, i, rep))
            rolls.append(r)
        groups.append({"id": str(g), "question": row["prompt"][0]["content"][1]["text"], "_image": row["image"],
                       "rollouts": rolls})
    with torch.no_grad():  # repaired_logprobs: the sampling policy's teacher-forced ones, as dfgen repair stores
        for g, i, rep in reps:
            inputs, _ = completion_inputs(prompt_inputs(t.processing_class, [groups[g]["question"]],
                                                        [groups[g]["_image"]]), [rep], tok.pad_token_id)
            lp = token_logprobs(t.model, inputs, len(rep))[0].tolist()
            groups[g]["rollouts"][i - g * G]["repaired_logprobs"] = lp
    return groups, reps


def _dftrain_loss_and_grad(model, processor, rows, cfg, ref_model):
    from dftrain.batch import Batch
    from dftrain.fit import micro_loss

    batch = Batch.from_rows(rows, cfg)
    model.zero_grad(set_to_none=True)
    loss, _ = micro_loss(model, batch, cfg, processor, None, 1.0, ref_model)  # TRL scores without suppression
    loss.backward()
    return batch, float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _check_against_fit(t, batch, out, cfg, l_trl, g_trl, ref=None):
    """``out`` (one generation batch, whole), its loss and gradient under TRL against ``dftrain fit``'s
    on the same completions, rewards and repairs: per-token advantages of rollouts and repaired
    samples, behaviour log-probs of the repairs, loss and gradient, to 1e-5."""
    from dftrain.batch import build_rows
    from dftrain.loss import batch_token_weights

    groups, reps = _as_dfgen_groups(t, batch, out)
    assert t.df.df_weights() == cfg.df_weights()  # DFConfig's defaults are fit's: one declaration
    fb, l_fit, g_fit = _dftrain_loss_and_grad(t.model, t.processing_class, build_rows(groups, cfg), cfg, ref)
    roll = (~fb.is_repaired).nonzero().flatten()
    T = min(out["completion_ids"].shape[1], fb.token_ids.shape[1])
    adv_fit = fb.advantages[:, None] * batch_token_weights(fb, cfg)  # (B_fit, T_fit)
    assert torch.allclose(adv_fit[roll, :T], out["advantages"][:, :T], atol=1e-6)
    assert fb.root_only.any() and fb.is_repaired.any() and (fb.df_weighted & ~fb.root_only).any(), \
        "the batch should hold all three DF terms"
    kept = out["rep_completion_mask"].sum(-1) > 0
    assert int(kept.sum()) == int(fb.is_repaired.sum()) == len({(g, tuple(r)) for g, _, r in reps})
    for k, i in zip(fb.is_repaired.nonzero().flatten().tolist(), kept.nonzero().flatten().tolist()):
        n = int(out["rep_completion_mask"][i].sum())
        assert out["rep_completion_ids"][i, :n].tolist() == fb.token_ids[k, :n].tolist()
        assert torch.allclose(out["rep_advantages"][i, :n], adv_fit[k, :n], atol=1e-6)
        assert torch.allclose(out["rep_old_per_token_logps"][i, :n], fb.logprobs[k, :n], atol=1e-5)
    assert abs(l_trl - l_fit) < 1e-5, (l_trl, l_fit)
    assert torch.allclose(g_trl, g_fit, atol=1e-5), float((g_trl - g_fit).abs().max())


@pytest.mark.parametrize("loss_type,agg,beta,micro", [("dapo", "token-mean", 0.0, 1),
                                                      ("grpo", "seq-mean-token-mean", 0.0, 1),
                                                      ("bnpo", "token-mean", 0.0, 1),
                                                      ("sapo", "seq-mean-token-mean", 0.0, 1),
                                                      ("dapo", "token-mean", 0.05, 1),
                                                      ("dapo", "token-mean", 0.0, 2), ("grpo", "seq-mean-token-mean", 0.0, 2)])
def test_the_default_variant_equals_dftrain_fit_term_by_term(sft_model, dataset, tmp_path, loss_type, agg, beta,
                                                             micro):
    """DFConfig() (fit's defaults: root-cause weights, repaired samples, all-fail blame) on a batch TRL
    generated equals ``dftrain fit`` (``build_rows`` -> ``Batch`` -> ``micro_loss``) term by term, for
    TRL's dapo and bnpo (token-mean), grpo (seq-mean-token-mean) and sapo (fit's sapo surrogate), with
    the KL term, and under gradient
    accumulation (micro = 2: the batch split by TRL's own ``split_tensor_dict`` into the two
    micro-batches of one step, their gradients summed). num_iterations=2 makes TRL keep behaviour
    log-probs, as the shards do."""
    from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

    from dfgen.policy import load_policy
    from dftrain.settings import TrainSettings

    kl = {"use_bias_correction_kl": False} if beta else {}  # fit's k3 is not multiplied by the ratio
    t = make(sft_model, dataset, tmp_path, loss_type=loss_type, num_iterations=2, scale_rewards="none", beta=beta,
             gradient_accumulation_steps=micro, steps_per_generation=micro, **kl)
    t.current_gradient_accumulation_steps = micro
    t.model.train()
    batch = _batch(dataset)
    torch.manual_seed(3)
    out = t._generate_and_score_completions(batch)
    l_trl, g_trl = 0.0, 0.0
    for part in split_tensor_dict(split_pixel_values_by_grid(out), micro):  # TRL's _prepare_inputs, unshuffled
        part = unsplit_pixel_values_by_grid(part)
        loss, grad = _loss_and_grad(t, part)
        l_trl, g_trl = l_trl + loss, g_trl + grad
    cfg = TrainSettings(objective="df-grpo", agg=agg, adv_scale="none", beta=beta,  # fit's DF defaults
                        policy_loss="sapo" if loss_type == "sapo" else "ppo")
    _check_against_fit(t, batch, out, cfg, l_trl, g_trl, load_policy(sft_model)[0] if beta else None)


def test_two_processes_give_dftrain_fits_loss_and_gradient_on_the_whole_batch(sft_model, dataset, tmp_path):
    """torchrun, 2 ranks (gloo): groups span the ranks, so constant-group detection, the sibling-free
    dedup of repairs and verification gather across them. The ranks' batches together, their mean
    loss and DDP's mean gradient equal ``dftrain fit`` on the whole batch."""
    import os
    import subprocess
    import sys

    from dftrain.settings import TrainSettings

    prompts = 5  # 20 rows, 10 per rank: group 2 spans both
    dataset.select(range(prompts)).save_to_disk(str(tmp_path / "ds"))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29547", "tests/trl_ranks.py",
                        str(sft_model), str(tmp_path / "ds"), str(tmp_path), str(G), str(prompts)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    T = max(r["out"]["completion_ids"].shape[1] for r in ranks)
    T2 = max(r["out"]["rep_completion_ids"].shape[1] for r in ranks)
    width = lambda k: T2 if k.startswith("rep_") else T  # noqa: E731
    out = {k: torch.cat([torch.nn.functional.pad(r["out"][k], (0, width(k) - r["out"][k].shape[1]))
                         if r["out"][k].dim() == 2 else r["out"][k] for r in ranks]) for k in ranks[0]["out"]}
    t = make(sft_model, dataset, tmp_path, loss_type="dapo", num_iterations=2, scale_rewards="none")
    t.model.train()
    batch = [dataset[i] for i in range(prompts) for _ in range(G)]
    cfg = TrainSettings(objective="df-grpo", agg="token-mean", adv_scale="none")
    _check_against_fit(t, batch, out, cfg, sum(r["loss"] for r in ranks) / 2, (ranks[0]["grad"] + ranks[1]["grad"]) / 2)


def test_the_resample_repairer_searches_with_the_trainers_own_policy(sft_model, dataset, tmp_path):
    """repairer="resample" needs no solution: the current policy continues the longest salvageable
    line prefix of each failed completion; the repairs that verify count, and every token the search
    generated is reported."""
    from dftrain.integrations.trl import Resample

    t = make(sft_model, dataset.remove_columns("solution"), tmp_path, repairer=Resample(n=4, max_probes=3))
    t.model.train()
    torch.manual_seed(1)
    out = t._generate_and_score_completions(_batch(dataset))
    m = t._metrics["train"]
    assert t.model.training  # the search ran in eval mode and gave the model back as it was
    assert m["df/repair_gen_tokens"][-1] > 0 and m["df/repaired_frac"][-1] > 0, dict(m)
    assert out["rep_completion_mask"].sum() > 0


@pytest.mark.parametrize("drop,msg", [("answer", "needs an 'answer' column"), (None, "Resample settings")])
def test_resample_without_the_records_scorer_or_with_bad_settings_is_refused(sft_model, dataset, tmp_path, drop, msg):
    from dftrain.integrations.trl import Resample

    data = dataset.remove_columns(drop) if drop else dataset
    with pytest.raises(ValueError, match=msg):
        make(sft_model, data, tmp_path, repairer="resample" if drop else Resample(n=2, min_wins=3))
