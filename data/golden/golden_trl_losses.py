"""Golden numbers for every policy loss, from TRL 1.16's own ``GRPOTrainer._compute_loss``.

Fixed inputs (seeded: 3 groups x 4 rollouts, 10 completion tokens, ragged lengths, log-ratios wide
enough that every clip, the dual clip and the CISPO clamp bite) go through TRL's unbound
``_compute_loss`` with a stand-in ``self`` that holds only the attributes that method reads (the
loss type, epsilons, temperatures, beta) and a model call that returns the fixed log-probabilities
as a leaf tensor. The loss and its gradient with respect to those log-probabilities are recorded for:

* each TRL surrogate: ``grpo``/``bnpo``/``dr_grpo``/``dapo`` (PPO clip, our ``ppo`` with the matching
  aggregation), clip-higher (``epsilon_high``), two-sided ``delta`` (our ``dual_clip``),
  ``importance_sampling_level="sequence"`` (GSPO), ``sapo``, ``cispo``, with and without ``beta``
  (with ``use_bias_correction_kl=False``: TRL 1.16's default multiplies k3 by the differentiable
  ratio, DeepSeek-V3.2's correction, which ``dftrain.loss`` does not implement);
* "DF off" (one advantage per rollout, (B,)) and, for the token-level surrogates, "DF on": TRL fed
  the per-token advantages A_i * w_t, (B, T), as a subclass would (TRL's own comment allows (B, T)).
  GSPO's "DF on" gradient is not recorded (only its loss): TRL differentiates the sequence ratio and
  we use GSPO-token (``dftrain/loss.py`` says why), so there the gradients differ by design.

``tests/test_loss.py`` checks ``dftrain.loss`` against the JSON to 1e-5, and reruns this script
(TRL is installed by ``make setup``) to check that it reproduces the committed numbers.

Run: ``python data/golden/golden_trl_losses.py --out data/golden/trl_policy_losses.json``
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

B, T, GROUPS = 12, 10, 3
TRL_VERSION = "1.16.0"


def inputs() -> dict:
    import torch

    g = torch.Generator().manual_seed(20261201)
    lengths = torch.tensor([10, 7, 4, 9, 10, 3, 8, 6, 10, 5, 2, 9])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # (B, T)
    old = -torch.rand(B, T, generator=g) * 3 - 0.05  # (B, T) log-probs in (-3.05, -0.05)
    logp = old + torch.randn(B, T, generator=g) * 0.6  # ratios from ~0.2 to ~5
    ref = old + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, generator=g)  # (B,)
    adv = adv - adv.view(GROUPS, -1).mean(-1).repeat_interleave(B // GROUPS)  # centred per group
    w = torch.ones(B, T)  # DF token weights on the rows with A < 0: root tokens 1, others kappa or -kappa
    for i in range(B):
        if adv[i] < 0:
            n = int(lengths[i])
            w[i, :n] = 0.1 if i % 2 else -0.2
            w[i, n // 2: n // 2 + 2] = 1.0
    w = w * mask
    return {"mask": mask, "old": old, "logp": logp, "ref": ref, "adv": adv, "weights": w}


# name -> (TRL GRPOConfig fields, our policy_loss arguments)
CASES = {
    "grpo": ({"loss_type": "grpo"}, {"agg": "seq-mean-token-mean"}),
    "bnpo": ({"loss_type": "bnpo"}, {"agg": "token-mean"}),
    "dr_grpo": ({"loss_type": "dr_grpo"}, {"agg": "seq-mean-token-sum-norm"}),
    "dapo": ({"loss_type": "dapo"}, {"agg": "token-mean"}),
    "dapo,clip_higher": ({"loss_type": "dapo", "epsilon_high": 0.28}, {"agg": "token-mean", "clip_high": 0.28}),
    "dapo,delta": ({"loss_type": "dapo", "delta": 1.6}, {"agg": "token-mean", "dual_clip": 1.6}),
    "grpo,beta": ({"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False}, {"agg": "seq-mean-token-mean", "beta": 0.04}),
    "gspo": ({"loss_type": "grpo", "importance_sampling_level": "sequence"},
             {"agg": "seq-mean-token-mean", "surrogate": "gspo"}),
    "gspo,bnpo": ({"loss_type": "bnpo", "importance_sampling_level": "sequence", "epsilon": 3e-4,
                   "epsilon_high": 4e-4},
                  {"agg": "token-mean", "surrogate": "gspo", "clip_low": 3e-4, "clip_high": 4e-4}),
    "gspo,delta": ({"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 0.1, "delta": 1.2},
                   {"agg": "seq-mean-token-mean", "surrogate": "gspo", "clip_low": 0.1, "clip_high": 0.1,
                    "dual_clip": 1.2}),
    "sapo": ({"loss_type": "sapo"}, {"agg": "seq-mean-token-mean", "surrogate": "sapo"}),
    "sapo,temps": ({"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0},
                   {"agg": "seq-mean-token-mean", "surrogate": "sapo", "sapo_tau": [0.5, 2.0]}),
    "cispo": ({"loss_type": "cispo", "epsilon_high": 5.0}, {"agg": "token-mean", "surrogate": "cispo", "clip_high": 4.0}),
    "cispo,tight": ({"loss_type": "cispo", "epsilon_high": 1.5},
                    {"agg": "token-mean", "surrogate": "cispo", "clip_high": 0.5}),
    "cispo,beta": ({"loss_type": "cispo", "epsilon_high": 5.0, "beta": 0.04, "use_bias_correction_kl": False},
                   {"agg": "token-mean", "surrogate": "cispo", "clip_high": 4.0, "beta": 0.04}),
}
SEQUENCE_LEVEL = {name for name, (trl, _) in CASES.items() if trl.get("importance_sampling_level") == "sequence"}


def trl_loss(trl_kw: dict, inp: dict, advantages):
    """TRL's loss and d loss / d logp on the fixed inputs, through its own ``_compute_loss``."""
    import torch
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir="/tmp/unused", report_to=[], use_cpu=True, bf16=False, **{k: v for k, v in trl_kw.items()
                                                               if k not in ("loss_type",)}, loss_type=trl_kw["loss_type"])
    logp = inp["logp"].clone().requires_grad_(True)
    ident = SimpleNamespace(reduce=lambda x, reduction="sum": x, gather=lambda x: x, gather_for_metrics=lambda x: x,
                            num_processes=1)
    fake = SimpleNamespace(
        args=args, loss_type=args.loss_type, beta=args.beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, max_completion_length=T,
        model=SimpleNamespace(training=False), accelerator=ident, current_gradient_accumulation_steps=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    batch = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
             "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": inp["mask"].long(),
             "advantages": advantages, "old_per_token_logps": inp["old"], "ref_per_token_logps": inp["ref"],
             "num_items_in_batch": inp["mask"].sum()}
    loss = GRPOTrainer._compute_loss(fake, None, batch)
    loss.backward()
    return float(loss.detach()), logp.grad.tolist()


def build() -> dict:
    import warnings

    import trl

    warnings.filterwarnings("ignore", category=FutureWarning)  # TrainingArguments' deprecation notes

    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"goldens are for trl=={TRL_VERSION}; this environment has {trl.__version__}")
    inp = inputs()
    out = {"trl_version": TRL_VERSION, "B": B, "T": T,
           "inputs": {k: v.tolist() for k, v in inp.items()}, "cases": {}}
    for name, (trl_kw, ours) in CASES.items():
        case = {"trl": trl_kw, "ours": ours}
        case["loss"], case["grad"] = trl_loss(trl_kw, inp, inp["adv"])
        df_loss, df_grad = trl_loss(trl_kw, inp, inp["adv"][:, None] * inp["weights"])
        case["df_loss"] = df_loss  # GSPO: the value is shared with GSPO-token, the gradient is not
        if name not in SEQUENCE_LEVEL:
            case["df_grad"] = df_grad
        out["cases"][name] = case
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {len(CASES)} cases to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
