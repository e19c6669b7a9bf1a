"""DF's verl estimator against the real verl (0.9.1) core_algos, at the tensor level verl allows on
CPU (its own venv: `make test-verl`, since verl pins transformers < 5.11): registered by name,
equal to verl's GRPO when the weights are 1, and DF-weighted per token on repaired completions of
the synthetic task (bad completions made by changing one read of the canonical solution)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl lives in .venv-verl (make test-verl): it pins transformers < 5.11")
pytestmark = pytest.mark.verl

from dftrain.integrations import verl as dfverl  # noqa: E402


class Proto:
    """The two fields of verl's DataProto the functions read (DataProto itself needs a TensorDict)."""

    def __init__(self, batch: dict, non_tensor_batch: dict):
        self.batch, self.non_tensor_batch = batch, non_tensor_batch


def _batch(tiny_tokenizer, n_groups=3, g=4):
    from dfgen.synth.grid import GridTask, make_problems, solution_text

    tok = tiny_tokenizer
    probs = list(make_problems(n_groups, seed=0, task=GridTask(min_reads=3, max_reads=3)))
    texts, sols, uids, scores = [], [], [], []
    for k, p in enumerate(probs):
        gold = solution_text(p.steps, p.answer)
        for j in range(g):
            t = gold
            if j % 2:  # a wrong count in read j // 2 + 1: the repair fixes that line and what follows
                line = p.steps[0]["line"] if j == 1 else p.steps[1]["line"]
                t = gold.replace(line, line[:-1] + str((int(line[-1]) + 1) % 4))
            texts.append(t)
            sols.append(json.dumps({"steps": p.steps, "answer": p.answer}))
            uids.append(f"u{k}")
            scores.append(float(t == gold))
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(map(len, ids))
    responses = torch.full((len(ids), T), tok.pad_token_id)
    mask = torch.zeros(len(ids), T)
    rewards = torch.zeros(len(ids), T)
    for i, x in enumerate(ids):
        responses[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        rewards[i, len(x) - 1] = scores[i]  # outcome reward on the last token, as verl's reward managers
    return Proto({"responses": responses, "response_mask": mask, "token_level_rewards": rewards},
                 {"uid": np.array(uids, dtype=object), "solution": np.array(sols, dtype=object)})


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_df_grpo_is_registered_in_verl_and_equals_grpo_with_unit_weights(tiny_tokenizer):
    data = _batch(tiny_tokenizer)
    fn = core_algos.get_adv_estimator_fn("df_grpo")
    assert fn is dfverl.compute_df_grpo_advantage
    b = data.batch
    ref, ref_ret = core_algos.compute_grpo_outcome_advantage(b["token_level_rewards"], b["response_mask"],
                                                             data.non_tensor_batch["uid"])
    for w in (None, torch.ones_like(b["response_mask"])):
        adv, ret = fn(token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"],
                      index=data.non_tensor_batch["uid"], df_weights=w)
        assert torch.equal(adv, ref) and torch.equal(ret, ref_ret)
    assert (ref < 0).any() and (ref > 0).any()


def test_repaired_completions_get_full_blame_on_the_root_cause_and_kappa_on_the_rest(tiny_tokenizer):
    data = _batch(tiny_tokenizer)
    kappa = 0.1
    data.batch["df_weights"] = dfverl.df_weights_for_batch(data, tiny_tokenizer, "oracle", kappa=kappa)
    ref, _ = core_algos.compute_grpo_outcome_advantage(data.batch["token_level_rewards"], data.batch["response_mask"],
                                                       data.non_tensor_batch["uid"])
    dfverl.compute_df_advantage(data)
    adv, m = data.batch["advantages"], data.batch["response_mask"]
    tok = tiny_tokenizer
    for i in range(adv.shape[0]):
        n = int(m[i].sum())
        a = ref[i, 0]
        if a >= 0:
            assert torch.allclose(adv[i, :n], ref[i, :n])
            continue
        full = (adv[i, :n] - a).abs() < 1e-6
        part = (adv[i, :n] - kappa * a).abs() < 1e-6
        assert (full | part).all() and 0 < int(full.sum()) < n
        idx = full.nonzero().flatten().tolist()
        assert idx == list(range(idx[0], idx[-1] + 1))  # one contiguous run: the first edit
        wrong_line = tok.decode(data.batch["responses"][i, : idx[0] + 1].tolist()).count("\n")
        expect = 0 if i % 4 == 1 else 1  # the read that was changed (see _batch)
        assert wrong_line == expect
        assert (adv[i, n:] == 0).all()
