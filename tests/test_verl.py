"""DF's verl integration against the real verl (0.9.1), at the deepest level verl runs on CPU (its own
venv: `make test-verl`, since verl pins transformers < 5.11): the `algorithm.df.*` keys through hydra
on verl's own `ppo_trainer` config; verl's real `ray_trainer.compute_advantage` on a real `DataProto`,
which with `adv_estimator=df_grpo` raises without the hook (never plain GRPO) and gives DF's per-token
advantages with it; `norm_adv_by_std_in_grpo` honoured; the repairer's inputs read from
`reward_model` / `extra_info`; equal to verl's GRPO with unit weights. Bad completions are made by
changing one read of the synthetic task's canonical solution."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl lives in .venv-verl (make test-verl): it pins transformers < 5.11")
pytestmark = pytest.mark.verl

from dftrain.integrations import verl as dfverl  # noqa: E402


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
    from verl import DataProto

    extra = [{"solution": sol, "index": i} for i, sol in enumerate(sols)]  # where verl keeps a row's extras
    return DataProto.from_dict({"responses": responses, "response_mask": mask, "token_level_rewards": rewards},
                               {"uid": np.array(uids, dtype=object), "extra_info": np.array(extra, dtype=object),
                                "reward_model": np.array([{"ground_truth": "x"} for _ in uids], dtype=object)})


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _algorithm(tiny_model, *overrides):
    """verl's own ppo_trainer config composed by hydra with these overrides; its ``algorithm`` node."""
    import os

    import verl
    from hydra import compose, initialize_config_dir

    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=[f"actor_rollout_ref.model.path={tiny_model}", *overrides])
    return cfg.algorithm


DF_KEYS = ["algorithm.adv_estimator=df_grpo", "+algorithm.df.repairer=oracle", "+algorithm.df.kappa=0.1",
           "+algorithm.df.tokenizer=${actor_rollout_ref.model.path}"]


def test_df_grpo_is_registered_in_verl_and_equals_grpo_with_unit_weights(tiny_tokenizer):
    data = _batch(tiny_tokenizer)
    fn = core_algos.get_adv_estimator_fn("df_grpo")
    assert fn is dfverl.compute_df_grpo_advantage
    b = data.batch
    ref, ref_ret = core_algos.compute_grpo_outcome_advantage(b["token_level_rewards"], b["response_mask"],
                                                             data.non_tensor_batch["uid"])
    adv, ret = fn(token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"],
                  index=data.non_tensor_batch["uid"], df_weights=torch.ones_like(b["response_mask"]))
    assert torch.equal(adv, ref) and torch.equal(ret, ref_ret)
    assert (ref < 0).any() and (ref > 0).any()


def test_verls_compute_advantage_refuses_df_grpo_without_the_hook_never_plain_grpo(tiny_model, tiny_tokenizer):
    from verl.trainer.ppo import ray_trainer

    orig = getattr(ray_trainer.compute_advantage, "__wrapped__", ray_trainer.compute_advantage)
    with pytest.raises(ValueError, match="df_grpo got no DF weights"):
        orig(_batch(tiny_tokenizer), "df_grpo", config=_algorithm(tiny_model, *DF_KEYS))


@pytest.mark.parametrize("norm", [True, False])
def test_the_hook_gives_verls_fit_dfs_advantages_from_the_config_keys(tiny_model, tiny_tokenizer, norm):
    """install(), then the call RayPPOTrainer.fit makes (ray_trainer.py: compute_advantage(batch,
    adv_estimator=..., norm_adv_by_std_in_grpo=..., config=config.algorithm)) with the keys from hydra:
    full blame on the first wrong line, kappa on the rest, verl's GRPO (normalised or not) elsewhere;
    other estimators untouched."""
    from verl.trainer.ppo import ray_trainer

    dfverl.install()
    dfverl.install()  # idempotent
    alg = _algorithm(tiny_model, *DF_KEYS, f"algorithm.norm_adv_by_std_in_grpo={str(norm).lower()}")
    assert alg.df.kappa == 0.1 and alg.adv_estimator == "df_grpo"
    data = _batch(tiny_tokenizer)
    ref, _ = core_algos.compute_grpo_outcome_advantage(data.batch["token_level_rewards"], data.batch["response_mask"],
                                                       data.non_tensor_batch["uid"], norm_adv_by_std_in_grpo=norm)
    out = ray_trainer.compute_advantage(data, adv_estimator=alg.adv_estimator,
                                        norm_adv_by_std_in_grpo=alg.get("norm_adv_by_std_in_grpo", True), config=alg)
    _check_blame(out, ref, tiny_tokenizer, kappa=0.1)
    plain = ray_trainer.compute_advantage(_batch(tiny_tokenizer), adv_estimator="grpo", norm_adv_by_std_in_grpo=norm,
                                          config=_algorithm(tiny_model))
    assert torch.equal(plain.batch["advantages"], ref)


@pytest.mark.parametrize("key,msg", [("+algorithm.df.repaired_weight=1", "carries the token weights only"),
                                     ("+algorithm.df.kapa=0.2", "is not a DF setting"),
                                     ("++algorithm.df.kappa=3", "kappa must be in"),
                                     ("+algorithm.df.marked=first", "marked must be one of")])
def test_bad_df_keys_are_refused_in_one_line(tiny_model, tiny_tokenizer, key, msg):
    with pytest.raises(ValueError, match=msg):
        dfverl.compute_df_advantage(_batch(tiny_tokenizer), config=_algorithm(tiny_model, *DF_KEYS, key))
    with pytest.raises(ValueError, match="needs its DF settings"):
        dfverl.compute_df_advantage(_batch(tiny_tokenizer), config=_algorithm(tiny_model))


def _check_blame(data, ref, tok, kappa):
    adv, m = data.batch["advantages"], data.batch["response_mask"]
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
