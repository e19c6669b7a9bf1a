"""The trainer's settings, declared once: ``DFWeights`` and ``TrainSettings``.

``DFWeights`` holds how DF weighs tokens (what ``dftrain.loss.batch_token_weights`` reads);
``TrainSettings`` adds what a fit optimises (objective, surrogate, aggregation, ...). ``dftrain fit``
(``FitConfig``) and ``dftrain loop`` (``LoopConfig``, which hands them to every round's fit) both
inherit ``TrainSettings``, so their defaults, CLI options and ``config.json`` keys are these fields;
the TRL and verl integrations and the studies take their defaults from ``DFWeights``. What each
setting does to the objective: ``dftrain/loss.py``'s docstring and ``dftrain/fit.py``'s.

The choices of the str settings are declared here too, as the CLI's ``Enum`` types (``ObjectiveName``,
``PolicyLossName``, ...). The objective and policy-loss names are the keys of ``dftrain.loss``'s
registries, which refuse a name not declared here (so ``--help`` never imports torch, and the two
cannot drift apart).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum

OBJECTIVE_NAMES = ("df-grpo", "grpo")  # dftrain.loss.OBJECTIVES
POLICY_LOSS_NAMES = ("ppo", "gspo", "sapo", "cispo")  # dftrain.loss.POLICY_LOSSES
ADV_SCALES = ("group", "batch", "none")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
MARKED_MODES = ("edit", "root", "root+prop")
MASS_MODES = ("keep", "redistribute")
DTYPES = ("float32", "bfloat16")  # dftrain fit --dtype (bfloat16: GPU)


def _choices(name: str, values: tuple[str, ...]):
    """The CLI option type of a choice: an Enum whose members are the strings themselves."""
    return Enum(name, {v: v for v in values}, type=str)


ObjectiveName = _choices("ObjectiveName", OBJECTIVE_NAMES)
PolicyLossName = _choices("PolicyLossName", POLICY_LOSS_NAMES)
AdvScale = _choices("AdvScale", ADV_SCALES)
AggMode = _choices("AggMode", AGG_MODES)
MarkedMode = _choices("MarkedMode", MARKED_MODES)
MassMode = _choices("MassMode", MASS_MODES)
DTypeName = _choices("DTypeName", DTYPES)


@dataclass(kw_only=True)
class DFWeights:
    """How DF weighs the tokens of a failed rollout with a verified repair, and its repaired samples.
    The defaults are the variant chosen on val by the study (docs/RESULTS.md, "DF's weight options
    re-screened": root + repaired samples + all-fail blame)."""

    kappa: float = 0.1  # weight of the unmarked tokens of a repaired failed rollout (1 = GRPO; < 0 = credit)
    marked: str = "root"  # root | root+prop | edit: which tokens get weight 1 (root beat edit, docs/RESULTS.md)
    delta: float = 0.5  # root+prop: weight of the edited tokens after the root cause
    mass: str = "keep"  # keep | redistribute (same total blame as GRPO, concentrated on the marked tokens)
    repaired_weight: float = 1.0  # A_plus of repaired samples (credit on their corrected tokens); 0 = not used
    kappa_rep: float = 0.0  # weight of the unedited tokens of a repaired sample
    fail_advantage: float = 1.0  # A: advantage -A on the root token of repaired rollouts in all-fail groups; 0 = off

    def check_weights(self) -> str | None:
        """The first thing wrong with these settings, as one line naming the CLI option; None if fine."""
        checks = [(self.marked in MARKED_MODES, f"--marked must be one of {', '.join(MARKED_MODES)}"),
                  (self.mass in MASS_MODES, f"--mass must be one of {', '.join(MASS_MODES)}"),
                  (-1 <= self.kappa <= 1, "--kappa must be in [-1, 1]"),
                  (-1 <= self.kappa_rep <= 1, "--kappa-rep must be in [-1, 1]"),
                  (0 <= self.delta <= 1, "--delta must be in [0, 1]"),
                  (self.repaired_weight >= 0, "--repaired-weight must be >= 0 (it is a positive advantage)"),
                  (self.fail_advantage >= 0, "--fail-advantage must be >= 0 (it is the size of a negative advantage)")]
        return next((msg for ok, msg in checks if not ok), None)

    def df_weights(self) -> "DFWeights":
        """These settings alone (e.g. from a FitConfig), for the integrations and studies."""
        return DFWeights(**{f.name: getattr(self, f.name) for f in fields(DFWeights)})


@dataclass(kw_only=True)
class TrainSettings(DFWeights):
    """What a fit optimises, shared by ``dftrain fit`` and ``dftrain loop``."""

    objective: str = "df-grpo"  # df-grpo | grpo (dftrain.loss.OBJECTIVES)
    groups_per_step: int = 8  # prompt groups per optimizer step (x group size = rollouts)
    updates_per_batch: int = 1  # PPO epochs over the same batch (prototype and TRL used 2)
    lr: float = 3e-5  # chosen on val over {1e-5, 3e-5, 1e-4} for both objectives on the regime start (docs/RESULTS.md)
    policy_loss: str = "ppo"  # ppo | gspo | sapo | cispo (dftrain.loss.POLICY_LOSSES)
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low: DAPO's clip-higher; cispo: the IS weight is capped at 1 + this
    dual_clip: float | None = None  # ppo/gspo: A < 0 tokens' loss bounded at -C*A (verl clip_ratio_c; 3 there)
    adv_scale: str = "group"  # group (GRPO) | batch (TRL scale_rewards="batch") | none (Dr. GRPO)
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    beta: float = 0.0  # k3 KL to the frozen initial policy; 0 = no reference model loaded
    rep_in_denominator: bool = False  # repaired rows count in the aggregation's denominator
    dedup_repaired: bool = True  # one copy of each distinct repaired trajectory per group
    seed: int = 0

    def check_training(self) -> str | None:
        """The first thing wrong with these settings (one line naming the option); None if fine."""
        checks = [(self.objective in OBJECTIVE_NAMES, f"--objective must be one of {', '.join(OBJECTIVE_NAMES)}"),
                  (self.policy_loss in POLICY_LOSS_NAMES,
                   f"--policy-loss must be one of {', '.join(POLICY_LOSS_NAMES)}, got {self.policy_loss!r}"),
                  (self.groups_per_step > 0 and self.updates_per_batch > 0, "sizes must be positive"),
                  (self.lr > 0, "--lr must be positive"),
                  (self.adv_scale in ADV_SCALES, f"--adv-scale must be one of {', '.join(ADV_SCALES)}"),
                  (self.agg in AGG_MODES, f"--agg must be one of {', '.join(AGG_MODES)}"),
                  (self.beta >= 0, "--beta must be >= 0")]
        return next((msg for ok, msg in checks if not ok), None) or self.check_weights()

    def train_settings(self) -> dict:
        """These settings as keyword arguments (the loop hands them to each round's FitConfig)."""
        return {f.name: getattr(self, f.name) for f in fields(TrainSettings)}
