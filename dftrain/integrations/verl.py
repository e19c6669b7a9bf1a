"""Differential Feedback in verl (0.9.1): a registered advantage estimator, ``df_grpo``, its config keys,
and the hook that gets it the DF weights.

verl's ``compute_advantage`` (``verl/trainer/ppo/ray_trainer.py``) hands a registered estimator
``token_level_rewards``, ``response_mask``, ``index`` (the group uid) and ``config`` (the
``algorithm`` config), and nothing else of the batch. DF's weights come from the batch (the responses,
and the repairer's inputs), so ``algorithm.adv_estimator=df_grpo`` alone cannot compute them: the
estimator then raises, it never falls back to GRPO. ``install()`` is the hook: it wraps the
``compute_advantage`` that ``RayPPOTrainer.fit`` calls, so that a ``df_grpo`` step first makes the
weights from the batch (``df_weights_for_batch``: repair the completions scoring below their group's
mean, align them with their repairs, ``dftrain.loss.df_token_weights``) and then runs the estimator
with them; every other estimator goes to verl's own function untouched. verl's policy losses (PPO
clip, dual clip, GSPO's token mode, ...) then see per-token advantages, as with our trainer.

Config keys (hydra, appended with ``+``; ``df_settings`` reads and checks them)::

    algorithm.adv_estimator=df_grpo
    +algorithm.df.repairer=oracle                               # or a dotted path to a (row, text) callable
    '+algorithm.df.tokenizer=${actor_rollout_ref.model.path}'   # to decode the responses
    +algorithm.df.kappa=0.1 +algorithm.df.marked=root           # optional: dftrain fit's defaults
    +algorithm.df.delta=0.5 +algorithm.df.mass=keep
    algorithm.norm_adv_by_std_in_grpo=true                      # honoured, as verl's grpo does

``repaired_weight`` and ``fail_advantage`` (the repaired samples and the all-fail blame of ``dftrain
fit``'s default) are refused: verl's integration carries the token weights only (the "mask alone"
variant). The repairer's row is built from where verl keeps a sample's data: ``extra_info`` (its keys,
e.g. the synthetic task's ``solution`` for the oracle), ``reward_model.ground_truth`` (as ``answer``),
and the other per-sample ``non_tensor_batch`` entries (``data_source``, ...).

In the process that runs ``RayPPOTrainer.fit`` (verl's ``TaskRunner``, with ``trainer.use_v1=false``),
before ``fit``::

    from dftrain.integrations.verl import install
    install()

Tested (``make test-verl``, ``tests/test_verl.py``) against the real verl 0.9.1 in its own venv:
the keys through hydra on verl's own ``ppo_trainer`` config, verl's real ``compute_advantage`` on a
``DataProto`` with and without the hook (an error without it, never GRPO), the weights per token,
``norm_adv_by_std_in_grpo`` either way. Not run here, and why: a live ``RayPPOTrainer.fit`` needs GPU
resource pools (``use_gpu=True`` is hard-coded in verl's ``create_resource_pool``), a vLLM, SGLang or
TensorRT-LLM rollout server (verl 0.9.1 has no CPU rollout), and NCCL; verl's default v1 trainer
also needs ``transfer_queue`` and fetches no ``responses`` for the advantage step (its ``df_grpo``
steps raise the estimator's error).
"""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch
from verl.trainer.ppo import core_algos

from dftrain.integrations import repair_masks, resolve_repairer
from dftrain.settings import DFWeights

CARRIED = ("kappa", "marked", "delta", "mass")  # the DFWeights fields verl's integration applies
DF_KEYS = (*CARRIED, "repairer", "tokenizer")


def df_settings(config) -> tuple[DFWeights, object, str | None]:
    """(DF weights, repairer, tokenizer path) from the ``algorithm`` config's ``df`` keys; ValueError (one
    line) for a missing block, an unknown or uncarried key, or bad values."""
    df = config.get("df") if config is not None else None
    if df is None:
        raise ValueError("algorithm.adv_estimator=df_grpo needs its DF settings: +algorithm.df.repairer=oracle and "
                         "'+algorithm.df.tokenizer=${actor_rollout_ref.model.path}' (dftrain/integrations/verl.py)")
    df = dict(df)
    uncarried = sorted(set(df) & {f.name for f in fields(DFWeights)} - set(CARRIED))
    if uncarried:
        raise ValueError(f"algorithm.df.{uncarried[0]}: verl's integration carries the token weights only "
                         f"({', '.join(CARRIED)}), not the repaired samples or the all-fail blame")
    unknown = sorted(set(df) - set(DF_KEYS))
    if unknown:
        raise ValueError(f"algorithm.df.{unknown[0]} is not a DF setting; known: {', '.join(DF_KEYS)}")
    w = DFWeights(**{k: df[k] for k in CARRIED if k in df})
    if (msg := w.check_weights()) is not None:
        raise ValueError("algorithm.df: " + msg.replace("--", ""))
    if "repairer" not in df:
        raise ValueError("algorithm.df.repairer is required: oracle, or a dotted path module.function to a "
                         "(row, text) -> text | None callable")
    rep = df["repairer"]
    if isinstance(rep, str) and rep != "oracle" and "." in rep:
        import importlib

        mod, _, name = rep.rpartition(".")
        rep = getattr(importlib.import_module(mod), name)
    return w, resolve_repairer(rep), df.get("tokenizer")


def _norm(norm_adv_by_std_in_grpo, config) -> bool:
    if norm_adv_by_std_in_grpo is not None:
        return bool(norm_adv_by_std_in_grpo)
    return bool(config.get("norm_adv_by_std_in_grpo", True)) if config is not None else True


@core_algos.register_adv_est("df_grpo")
def compute_df_grpo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray,
                              epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool | None = None, config=None,
                              df_weights: torch.Tensor | None = None, **kwargs):
    """verl's GRPO outcome advantage (B, T) times DF's token weights (B, T); (advantages, returns).
    ``norm_adv_by_std_in_grpo`` None: the config's (as verl's grpo_passk reads it), default True."""
    if df_weights is None:
        raise ValueError("df_grpo got no DF weights: verl's compute_advantage passes none to estimators; call "
                         "dftrain.integrations.verl.install() before RayPPOTrainer.fit (trainer.use_v1=false)")
    adv, ret = core_algos.compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=epsilon,
                                                         norm_adv_by_std_in_grpo=_norm(norm_adv_by_std_in_grpo,
                                                                                       config),
                                                         config=config)
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


def repairer_rows(non_tensor_batch: dict, n: int) -> list[dict]:
    """One dict per sample for the repairer, from where verl keeps its data: ``extra_info``'s keys,
    ``reward_model.ground_truth`` as ``answer``, and every other per-sample entry as it is."""
    rows = []
    for i in range(n):
        row = {k: v[i] for k, v in non_tensor_batch.items() if k not in ("extra_info", "reward_model")}
        extra = non_tensor_batch.get("extra_info")
        if extra is not None and isinstance(extra[i], dict):
            row.update(extra[i])
        rm = non_tensor_batch.get("reward_model")
        if rm is not None and isinstance(rm[i], dict) and "ground_truth" in rm[i]:
            row.setdefault("answer", rm[i]["ground_truth"])
        rows.append(row)
    return rows


def df_weights_for_batch(data, tokenizer, repairer="oracle", kappa: float = DFWeights.kappa,
                         marked: str = DFWeights.marked, delta: float = DFWeights.delta,
                         mass: str = DFWeights.mass) -> torch.Tensor:
    """DF token weights (B, T) for a verl ``DataProto`` after the rewards: ``responses``,
    ``response_mask`` (or ``attention_mask``'s response part) and ``token_level_rewards`` from
    ``data.batch``, the group ``uid`` and the repairer's inputs (``repairer_rows``) from
    ``data.non_tensor_batch``."""
    from dftrain.loss import df_token_weights

    repairer = resolve_repairer(repairer)
    responses = data.batch["responses"]
    mask = data.batch["response_mask"] if "response_mask" in data.batch.keys() else \
        data.batch["attention_mask"][:, -responses.shape[1]:]
    nt = data.non_tensor_batch
    scores = data.batch["token_level_rewards"].sum(-1)
    rep = repair_masks(tokenizer, repairer_rows(nt, responses.shape[0]), responses.cpu(), mask.sum(-1).tolist(),
                       blamed_rows(scores, nt["uid"]), repairer)
    return df_token_weights(rep.mask_bad, mask.float().cpu(), rep.repaired, kappa=kappa, root_mask=rep.root_bad,
                            marked=marked, delta=delta, mass=mass).to(responses.device)


def compute_df_advantage(data, tokenizer=None, config=None, norm_adv_by_std_in_grpo: bool | None = None,
                         epsilon: float = 1e-6):
    """verl's advantage step for DF-GRPO: ``data.batch['df_weights']`` from the batch under the config's
    ``df`` settings (``df_settings``; the tokenizer from ``algorithm.df.tokenizer`` unless given), then
    ``data.batch['advantages'|'returns']``."""
    w, repairer, tok_path = df_settings(config)
    if tokenizer is None:
        if tok_path is None:
            raise ValueError("algorithm.df.tokenizer is required to decode the responses: "
                             "'+algorithm.df.tokenizer=${actor_rollout_ref.model.path}'")
        tokenizer = _tokenizer(str(tok_path))
    if "response_mask" not in data.batch.keys():
        data.batch["response_mask"] = data.batch["attention_mask"][:, -data.batch["responses"].shape[1]:]
    data.batch["df_weights"] = df_weights_for_batch(data, tokenizer, repairer, kappa=w.kappa, marked=w.marked,
                                                    delta=w.delta, mass=w.mass)
    adv, ret = compute_df_grpo_advantage(data.batch["token_level_rewards"], data.batch["response_mask"],
                                         data.non_tensor_batch["uid"], epsilon=epsilon,
                                         norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config,
                                         df_weights=data.batch["df_weights"])
    data.batch["advantages"], data.batch["returns"] = adv, ret
    return data


_TOKENIZERS: dict = {}


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def install(tokenizer=None) -> None:
    """Route ``RayPPOTrainer.fit``'s advantage step through DF when ``algorithm.adv_estimator=df_grpo``:
    wraps ``verl.trainer.ppo.ray_trainer.compute_advantage`` (which ``fit`` looks up at each step), so a
    ``df_grpo`` step runs ``compute_df_advantage`` with ``fit``'s ``norm_adv_by_std_in_grpo`` and
    ``config``; any other estimator reaches verl's own function unchanged. Idempotent."""
    from verl.trainer.ppo import ray_trainer

    orig = ray_trainer.compute_advantage
    if getattr(orig, "df_installed", False):
        return

    def compute_advantage(data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1, norm_adv_by_std_in_grpo=True,
                          config=None):
        if getattr(adv_estimator, "value", adv_estimator) != "df_grpo":
            return orig(data, adv_estimator, gamma=gamma, lam=lam, num_repeat=num_repeat,
                        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)
        return compute_df_advantage(data, tokenizer, config, norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo)

    compute_advantage.df_installed = True
    compute_advantage.__wrapped__ = orig
    ray_trainer.compute_advantage = compute_advantage
