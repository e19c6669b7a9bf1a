"""Differential Feedback in verl (0.9.1): a registered advantage estimator, ``df_grpo``.

verl's ``compute_advantage`` hands a registered estimator ``token_level_rewards``, ``response_mask``,
``index`` (the group uid) and ``config``, and nothing else of the batch; the actor then keeps only the
batch keys it selects, ``advantages`` among them. So DF lives at the advantage: the masks are made
from the batch after the rewards (``df_weights_for_batch``: repair the completions with a
below-group-mean score, align them with their repairs, ``dftrain.loss.df_token_weights``), stored
in the batch as ``df_weights`` (B, T), and folded into verl's (B, T) GRPO advantages by the
estimator. verl's own policy losses (vanilla PPO clip, dual clip, GSPO's token mode, ...) then see
per-token advantages, exactly as with our trainer.

Two ways in, a few lines each in a verl trainer's fit loop (where ``compute_advantage`` is called):

    from dftrain.integrations.verl import compute_df_advantage, df_weights_for_batch
    batch.batch["df_weights"] = df_weights_for_batch(batch, tokenizer, repairer="oracle")
    batch = compute_df_advantage(batch, norm_adv_by_std_in_grpo=True)    # instead of compute_advantage

or, with ``algorithm.adv_estimator=df_grpo``, call the registered estimator with the extra key
(``core_algos.get_adv_estimator_fn("df_grpo")(..., df_weights=batch.batch["df_weights"])``).

Rows for the repairer: ``non_tensor_batch`` entries per sample (e.g. a ``solution`` column with the
synthetic task's steps for ``repairer="oracle"``, or anything a callable ``(row, text) -> text``
reads). With ``df_weights`` all 1 (kappa = 1, or nothing repaired) ``df_grpo`` is verl's ``grpo``.
Tested at the level verl allows on CPU, against the real ``verl.trainer.ppo.core_algos`` in its own
venv (``make test-verl``; verl 0.9.1 pins transformers < 5.11): ``tests/test_verl.py``. Not tested:
a live verl training run (Ray workers, FSDP, vLLM rollouts).
"""
from __future__ import annotations

import numpy as np
import torch
from verl.trainer.ppo import core_algos

from dftrain.integrations import repair_masks, resolve_repairer
from dftrain.settings import DFWeights


@core_algos.register_adv_est("df_grpo")
def compute_df_grpo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray,
                              epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config=None,
                              df_weights: torch.Tensor | None = None, **kwargs):
    """verl's GRPO outcome advantage (B, T) times DF's token weights (B, T); (advantages, returns)."""
    adv, ret = core_algos.compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=epsilon,
                                                         norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
                                                         config=config)
    if df_weights is None:
        return adv, ret
    w = df_weights.to(adv.dtype) * response_mask
    return adv * w, ret * w


def blamed_rows(scores: torch.Tensor, index) -> list[bool]:
    """Completions scoring below their group's mean: those GRPO gives a negative advantage."""
    groups: dict = {}
    for i, u in enumerate(index):
        groups.setdefault(u, []).append(i)
    out = [False] * len(index)
    for members in groups.values():
        mean = float(scores[members].mean())
        for i in members:
            out[i] = float(scores[i]) < mean
    return out


def df_weights_for_batch(data, tokenizer, repairer="oracle", kappa: float = DFWeights.kappa,
                         marked: str = DFWeights.marked, delta: float = DFWeights.delta,
                         mass: str = DFWeights.mass) -> torch.Tensor:
    """DF token weights (B, T) for a verl ``DataProto`` after the rewards: ``responses``,
    ``response_mask`` (or ``attention_mask``'s response part) and ``token_level_rewards`` from
    ``data.batch``, the group ``uid`` and the repairer's columns from ``data.non_tensor_batch``."""
    from dftrain.loss import df_token_weights

    repairer = resolve_repairer(repairer)
    responses = data.batch["responses"]
    mask = data.batch["response_mask"] if "response_mask" in data.batch.keys() else \
        data.batch["attention_mask"][:, -responses.shape[1]:]
    nt = data.non_tensor_batch
    rows = [{k: v[i] for k, v in nt.items()} for i in range(responses.shape[0])]
    scores = data.batch["token_level_rewards"].sum(-1)
    rep = repair_masks(tokenizer, rows, responses.cpu(), mask.sum(-1).tolist(), blamed_rows(scores, nt["uid"]),
                       repairer)
    return df_token_weights(rep.mask_bad, mask.float().cpu(), rep.repaired, kappa=kappa, root_mask=rep.root_bad,
                            marked=marked, delta=delta, mass=mass).to(responses.device)


def compute_df_advantage(data, norm_adv_by_std_in_grpo: bool = True, epsilon: float = 1e-6):
    """verl's ``compute_advantage`` step for DF-GRPO: ``data.batch['advantages'|'returns']`` from
    ``token_level_rewards``, ``response_mask``, ``uid`` and ``df_weights``."""
    adv, ret = compute_df_grpo_advantage(data.batch["token_level_rewards"], data.batch["response_mask"],
                                         data.non_tensor_batch["uid"], epsilon=epsilon,
                                         norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
                                         df_weights=data.batch.get("df_weights"))
    data.batch["advantages"], data.batch["returns"] = adv, ret
    return data
