"""DF-GRPO loss: GRPO with Differential-Feedback token weights. Pure functions, torch only.

Objective
---------
A group of G rollouts of one prompt gets rewards r_i and one advantage per rollout

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)         scale="group" (GRPO)
    A_i =  r_i - mean_g(r)                              scale="none"  (Dr. GRPO)
    A_i = (r_i - mean_g(r)) / (std_batch(r) + eps)      scale="batch" (TRL's scale_rewards="batch")

std is the unbiased one (torch.std's default, as verl and TRL). A group of one sample, or a group whose
rewards are all equal, gets exactly A_i = 0: it has no baseline to learn from. (verl gives a lone sample
mean 0 and std 1, i.e. A = r; TRL gives NaN. Neither happens with the fixed group sizes we train on.)
eps: verl uses 1e-6, TRL 1e-4 (the golden advantages differ by up to 6e-4 because of it); our default
is verl's 1e-6 and the argument reproduces either.

Each completion token t of rollout i has ratio rho_t = exp(logp_theta - logp_old) and a signed weight
w_t, folded into a per-token advantage A_t = A_i * w_t. A *policy loss* (the surrogate, `POLICY_LOSSES`,
one signature, chosen by name as verl's `register_policy_loss`) turns (rho, A_t) into a per-token loss
L_t; `aggregate` is the only reduction. The surrogates:

  "ppo"    L_t = -min(rho_t A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) A_t)       (GRPO / PPO clip;
           clip_high > clip_low is DAPO's clip-higher, TRL `epsilon_high`)
           dual clip (`dual_clip` = c > 1 + clip_high, verl `clip_ratio_c`, TRL `delta`): for A_t < 0 also
           L_t <= -c A_t, so a token whose ratio ran past c stops pushing (its gradient is 0). TRL's
           two-sided `delta` clamps rho at delta before the min: for A < 0 the same number and gradient,
           for A > 0 no change (clip already caps rho at 1 + clip_high < delta).
  "gspo"   GSPO (Zheng et al. 2025, TRL `importance_sampling_level="sequence"`): the ratio of the whole
           sequence, s_i = exp(mean_t(logp_t - old_t)), clipped as "ppo" (the GSPO paper uses clip ranges
           of 3e-4 / 4e-4; set them with clip_low / clip_high). Where DF's weights enter: in A_t, per token,
           under the sequence ratio, as the paper's GSPO-token variant,
               s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)],   L_t = -min(s_{i,t} A_t, clip(s_{i,t}) A_t).
           Its value is s_i on every token and its gradient is s_i * grad log pi(y_t) per token. Plain
           GSPO differentiates s_i itself, which spreads every token's advantage over the whole sequence
           (grad_t = s_i / |y_i| * sum_u A_u): with per-token weights it would blame the correct steps of a
           failed rollout as much as its wrong ones, which is what DF exists to avoid. With one advantage
           per sequence (DF off, or kappa = 1) and any aggregation whose per-token factor is constant within
           a row (all four below), GSPO-token and GSPO give the same loss AND the same gradient, which is
           what the TRL goldens check. The clip decides per sequence, so it never splits a row.
  "sapo"   SAPO (Gao et al. 2025, TRL `loss_type="sapo"`): a soft gate instead of the clip,
               L_t = -(4 / tau) * sigmoid(tau * (rho_t - 1)) * A_t,  tau = tau_pos if A_t > 0 else tau_neg,
           (value and gradient equal PPO's at rho = 1, and the gradient decays smoothly off-policy). The
           temperature follows the sign of the *weighted* A_t, so a negative kappa's positive credit gets
           tau_pos. No clip: dual_clip is refused.
  "cispo"  CISPO (MiniMax-M1 2025, TRL `loss_type="cispo"`): a REINFORCE term whose importance weight is
           clamped and detached, L_t = -sg[min(rho_t, 1 + clip_high)] * A_t * logp_t, so every token keeps
           a gradient. TRL's `epsilon_high` is the bound itself (recommended 5.0), i.e. clip_high = 4.0 here.
           No lower bound, and dual_clip is refused.

DF's token weights enter every surrogate the same way, as A_t, which is what makes them meaningful for
all four: kappa = 1 is exactly the surrogate without DF; a weight never changes the sign of a token's
update for w >= 0; a marked token (w = 1) gets a larger gradient than an unmarked one (w = kappa < 1).
Folding w into A_t, rather than multiplying L_t by w_t, is what makes negative weights correct: for
w >= 0 both are the same number for "ppo" (w commutes with min), and for w < 0 the clip acts on the side
that matches the token's effective sign, as for any negative-advantage token. log(rho) is clamped to
[-20, 20] (as verl) so garbage log-probs on padding never make inf * 0 = NaN.
The optional KL term is k3 = exp(ref - logp) - (ref - logp) - 1 per token, added before aggregation
and NOT weighted by w (it is a regulariser, not credit). TRL adds beta * k3 per token the same way
(TRL 1.16's default `use_bias_correction_kl=True` also multiplies k3 by the ratio; we do not);
verl aggregates it separately with the same mode, which is the same number since aggregation is linear.
verl's "low_var_kl" also clamps k3 to [-10, 10]; k3 >= 0 and reaches 10 only when ref - logp > 2.53 or
< -11, which never happens on the golden inputs (max k3 there is 1.24), so we do not clamp k3 (its
gradient stays); like verl we clamp ref - logp to [-20, 20] so exp never overflows on padding.
Golden numbers: data/golden/grpo_peer_numbers.json (verl and TRL, "ppo"), and
data/golden/trl_policy_losses.json (TRL 1.16's own `_compute_loss` for every surrogate above, loss and
gradient, DF off and on; made by `data/golden/golden_trl_losses.py`).

How DF departs from GRPO (token weights, `df_token_weights`)
------------------------------------------------------------
A rollout that failed AND has a verified repair knows which of its tokens the repair replaced or
deleted (`mask_bad`, float 0/1, (B, T)). Its tokens get

    marked tokens   -> weight 1           (full GRPO blame A_i < 0)
    unmarked tokens -> weight kappa       (kappa in [-1, 1]; kappa = 1 is plain GRPO)

Which tokens are marked (`marked`):
  "edit"       every token the repair edited (m = mask_bad).
  "root"       only the first edit's tokens, the root cause (m = root_mask).
  "root+prop"  root tokens at 1, the other edited tokens (downstream consequences a minimal repair also
               rewrote) at `delta`, unmarked at kappa. delta = 1 gives "edit", delta = kappa gives "root".
Negative kappa: the unedited (verified-correct) steps of a failed rollout get a small POSITIVE credit,
because w_t < 0 flips the sign of A_t = A_i * w_t < 0. Weights are therefore signed multipliers.
Mass (`mass`):
  "keep"          weights as above; DF removes most of the negative gradient of a failed rollout.
  "redistribute"  rescale each failed row so sum_t |w_t| over its completion tokens equals its token
                  count: the same total blame as GRPO, concentrated on the marked tokens. With kappa < 0
                  the positive credits count in that mass (|w|). A row whose weights are all 0
                  (kappa = 0 and nothing marked) stays 0.
Rows that did not fail, or failed without a verified repair, get weight 1 everywhere. The result is
multiplied by the completion mask.

Repaired samples (`repaired_term`, `df_loss`)
---------------------------------------------
Optionally the repaired trajectory joins the batch as an extra positive, off-policy sample: advantage
A_plus (a config number), weights m'_t + kappa_rep * (1 - m'_t) with m' = mask_repaired; its "old"
log-probs are the sampling policy's teacher-forced log-probs stored at repair time. The trainer puts
rollouts and repaired samples in one batch (one forward pass) with a flag `is_repaired` (B,), and the
SAME clipped objective computes both. Deduplicating repaired samples within a group is the caller's job.
`rep_in_denominator` says whether repaired rows count in the aggregation denominators (tokens for
token-mean, sequences for the seq-mean modes); they always contribute their numerator. Default False:
adding repaired samples then adds gradient without diluting the rollouts' per-token scale.
Groups where every rollout fails have all A_i = 0; the repaired samples still carry A_plus, so DF
learns from them. (A fixed negative advantage for such rollouts, if wanted, is set by the caller in
`advantages` before calling the loss.)

Aggregation (`aggregate`, the only place the denominators live; they count completion tokens, never
weights):
  "token-mean"               sum_{i,t} L / number of completion tokens         (verl token-mean; TRL bnpo,
                                                                                dapo in one process)
  "seq-mean-token-mean"      mean_i (sum_t L / tokens_i)                        (TRL grpo; length bias)
  "seq-mean-token-sum"       mean_i sum_t L
  "seq-mean-token-sum-norm"  sum_{i,t} L / (num_sequences * max_len)            (Dr. GRPO, TRL dr_grpo;
                             max_len defaults to T)
verl's seq-mean-token-sum-norm divides by T only (sum_{i,t} L / T), i.e. num_sequences times ours; the
two differ by a constant factor per batch size. We follow TRL so that the number is a per-token scale
that does not grow with the batch. Empty rows count as sequences (as TRL) and contribute 0.

Run the checks with: `.venv/bin/python -m pytest tests/test_loss.py -q`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dftrain.settings import (  # noqa: E402  (the choices and defaults are declared with the settings, torch-free)
    ADV_SCALES,
    AGG_MODES,
    MARKED_MODES,
    MASS_MODES,
    OBJECTIVE_NAMES,
    POLICY_LOSS_NAMES,
    DFWeights,
)
SAPO_TAU = (1.0, 1.05)  # (tau_pos, tau_neg): the SAPO paper's and TRL's defaults
LOG_RATIO_CLAMP = 20.0  # as verl: exp(20) is finite, so padding never produces inf * 0 = NaN


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {', '.join(choices)}")


def group_advantages(rewards: Tensor, group_index: Tensor, scale: str = "group", eps: float = 1e-6,
                     batch_std: float | None = None) -> Tensor:
    """Per-rollout advantage, (B,). group_index: any ints, equal for rollouts of one prompt.
    batch_std: scale "batch"'s std when the batch is larger than ``rewards`` (data-parallel ranks)."""
    _check("scale", scale, ADV_SCALES)
    r = rewards if rewards.is_floating_point() else rewards.float()  # (B,)
    _, inv, counts = torch.unique(group_index, return_inverse=True, return_counts=True)  # (B,), (G,)
    n_groups = counts.numel()
    zeros = r.new_zeros(n_groups)  # (G,)
    mean = zeros.index_add(0, inv, r) / counts  # (G,)
    centered = r - mean[inv]  # (B,)
    var = zeros.index_add(0, inv, centered * centered) / (counts - 1).clamp(min=1)  # (G,) unbiased
    gmax = zeros.scatter_reduce(0, inv, r, "amax", include_self=False)  # (G,)
    gmin = zeros.scatter_reduce(0, inv, r, "amin", include_self=False)  # (G,)
    constant = (gmax == gmin)[inv]  # (B,) also true for groups of one
    if scale == "group":
        adv = centered / (var.sqrt()[inv] + eps)
    elif scale == "batch":
        std = batch_std if batch_std is not None else r.std() if r.numel() > 1 else 0.0
        adv = centered / (std + eps)
    else:
        adv = centered
    return torch.where(constant, torch.zeros_like(adv), adv)  # (B,) exactly 0 without a baseline


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - logp, (B, T)."""
    d = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    return torch.exp(d) - d - 1


@dataclass(frozen=True)
class StepNorm:
    """The denominators of one optimizer step, computed once over ALL its rows (`step_norm`) and
    handed unchanged to each of its micro-batches, so that a micro-batch's loss and metrics are its
    exact share of the step's and the shares sum to them: the micro-batch size is a memory knob only.
    loss: what `aggregate` divides by (tokens, sequences, or sequences x max_len, of the rows in the
    denominator); tokens: completion tokens the loss trains on (token-mean metrics); rollout_tokens:
    those of non-repaired rows (DF's weight_mean); rows: all rows (rep_frac)."""

    loss: float
    tokens: float
    rollout_tokens: float
    rows: float


def denominator(completion_mask: Tensor, agg: str, max_len: int | None = None,
                in_denominator: Tensor | None = None) -> Tensor:
    """What `aggregate` divides by for this batch: completion tokens (token-mean), sequences
    (seq-mean-token-mean, seq-mean-token-sum) or sequences x max_len (seq-mean-token-sum-norm; max_len
    defaults to T), counting only the rows of in_denominator (B,) bool (default all). Never below 1."""
    _check("agg", agg, AGG_MODES)
    mask = completion_mask.float()  # (B, T)
    rows = mask.new_ones(mask.shape[0]) if in_denominator is None else in_denominator.to(mask.dtype)  # (B,)
    if agg == "token-mean":
        return (mask.sum(-1) * rows).sum().clamp(min=1)
    n_rows = rows.sum().clamp(min=1)
    if agg == "seq-mean-token-sum-norm":
        return n_rows * (mask.shape[-1] if max_len is None else max_len)
    return n_rows


def aggregate(
    loss_mat: Tensor,
    completion_mask: Tensor,
    agg: str,
    max_len: int | None = None,
    in_denominator: Tensor | None = None,
    denom: float | Tensor | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar: a sum over rows (each row's token sum, or for
    seq-mean-token-mean its token mean) divided by `denominator`. in_denominator (B,) bool: rows counted
    in the denominator (default all); rows outside it still add their numerator. denom: the whole step's
    denominator when this batch is one micro-batch of a step (`StepNorm.loss`); default this batch's own."""
    _check("agg", agg, AGG_MODES)
    mask = completion_mask.to(loss_mat.dtype)  # (B, T)
    row_sum = (loss_mat * mask).sum(-1)  # (B,)
    if agg == "seq-mean-token-mean":
        row_sum = row_sum / mask.sum(-1).clamp(min=1)  # (B,)
    if denom is None:
        denom = denominator(mask, agg, max_len, in_denominator)
    return row_sum.sum() / denom


# ---------------------------------------------------------------- policy losses (surrogates)
# One signature: (logprobs, old_logprobs, adv, mask, clip_low, clip_high, dual_clip, sapo_tau) with adv the
# weighted per-token advantage (B, T), returning (per-token loss (B, T), cut (B, T): 1 where the clip or
# clamp was active) before any aggregation. Registered by name; the CLI's choices are this registry's keys.
POLICY_LOSSES: dict = {}


def register_policy_loss(name: str):
    if name not in POLICY_LOSS_NAMES:  # the CLI's choices (dftrain.settings) must name every registered loss
        raise ValueError(f"policy loss {name!r}: declare it in dftrain.settings.POLICY_LOSS_NAMES")

    def deco(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def _clipped(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float, dual_clip: float | None):
    surr = -adv * ratio  # (B, T)
    surr_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)  # (B, T)
    loss = torch.maximum(surr, surr_clipped)  # (B, T) = -min(rho A, clip(rho) A)
    cut = surr_clipped > surr  # (B, T) verl pg_clipfrac
    if dual_clip is not None:
        bound = -adv * dual_clip  # (B, T)
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        cut = cut | dual
    return loss, cut


@register_policy_loss("ppo")
def ppo_surrogate(logprobs, old_logprobs, adv, mask, clip_low, clip_high, dual_clip, sapo_tau):
    """PPO's clipped surrogate per token (GRPO, DAPO's clip-higher, verl's dual clip)."""
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (B, T)
    return _clipped(ratio, adv, clip_low, clip_high, dual_clip)


@register_policy_loss("gspo")
def gspo_surrogate(logprobs, old_logprobs, adv, mask, clip_low, clip_high, dual_clip, sapo_tau):
    """GSPO-token: the sequence ratio's value, each token's own gradient (module docstring)."""
    seq = ((logprobs - old_logprobs) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    log_ratio = seq.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) + logprobs - logprobs.detach()  # (B, T)
    return _clipped(torch.exp(log_ratio), adv, clip_low, clip_high, dual_clip)


@register_policy_loss("sapo")
def sapo_surrogate(logprobs, old_logprobs, adv, mask, clip_low, clip_high, dual_clip, sapo_tau):
    """SAPO's soft gate (no clip)."""
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (B, T)
    tau = torch.where(adv > 0, sapo_tau[0], sapo_tau[1]).to(ratio.dtype)  # (B, T)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv, torch.zeros_like(ratio, dtype=torch.bool)


@register_policy_loss("cispo")
def cispo_surrogate(logprobs, old_logprobs, adv, mask, clip_low, clip_high, dual_clip, sapo_tau):
    """CISPO: clamped, detached IS weight times A_t * logp_t."""
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).detach()  # (B, T)
    return -ratio.clamp(max=1 + clip_high) * adv * logprobs, ratio > 1 + clip_high


def check_surrogate(surrogate: str, clip_low: float, clip_high: float, dual_clip: float | None,
                    sapo_tau: tuple[float, float] = SAPO_TAU) -> None:
    """ValueError (one line) for a surrogate and settings that do not go together."""
    _check("surrogate", surrogate, tuple(POLICY_LOSSES))
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"clip_low={clip_low} must be in [0, 1) and clip_high={clip_high} >= 0")
    if dual_clip is not None:
        if surrogate not in ("ppo", "gspo"):
            raise ValueError(f"dual_clip bounds a clipped surrogate; {surrogate} has none (use ppo or gspo)")
        if not dual_clip > 1 + clip_high:
            raise ValueError(f"dual_clip={dual_clip} must exceed 1 + clip_high = {1 + clip_high}")
    if min(sapo_tau) <= 0:
        raise ValueError(f"sapo temperatures must be positive, got {sapo_tau}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    token_weights: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    max_len: int | None = None,
    *,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    in_denominator: Tensor | None = None,
    surrogate: str = "ppo",
    dual_clip: float | None = None,
    sapo_tau: tuple[float, float] = SAPO_TAU,
    norm: StepNorm | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A surrogate of `POLICY_LOSSES` on per-token advantages A_t = A * w_t, aggregated by `aggregate`.
    logprobs, old_logprobs, completion_mask, token_weights: (B, T); advantages: (B,) or (B, T).
    norm: the step's denominators when this batch is a micro-batch of it (loss and token-mean metrics
    are then this micro-batch's share; ratio_max stays its own max); default: this batch is the step."""
    check_surrogate(surrogate, clip_low, clip_high, dual_clip, sapo_tau)
    mask = completion_mask.to(logprobs.dtype)  # (B, T)
    adv = advantages.to(logprobs.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # (B, 1) or (B, T)
    if token_weights is not None:
        adv = adv * token_weights  # (B, T) signed per-token advantage
    adv = adv.expand_as(logprobs)  # (B, T)
    pg_mat, cut = POLICY_LOSSES[surrogate](logprobs, old_logprobs, adv, mask, clip_low, clip_high, dual_clip,
                                           sapo_tau)  # (B, T) each
    loss_mat = pg_mat
    kl_mat = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        kl_mat = kl_k3(logprobs, ref_logprobs)  # (B, T)
        loss_mat = pg_mat + beta * kl_mat
    denom = None if norm is None else norm.loss
    loss = aggregate(loss_mat, mask, agg, max_len, in_denominator, denom)
    with torch.no_grad():
        mask_d = mask.detach()
        tokens = mask_d.sum().clamp(min=1) if norm is None else norm.tokens

        def token_mean(x):
            return (x * mask_d).sum() / tokens

        log_ratio = (logprobs - old_logprobs).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
        ratio_d = torch.exp(log_ratio)
        metrics = {
            "pg_loss": aggregate(pg_mat.detach(), mask_d, agg, max_len, in_denominator, denom),
            "clipfrac": token_mean(cut.to(mask_d.dtype)),  # verl pg_clipfrac (+ dual clip, cispo clamp)
            "ppo_kl": token_mean(-log_ratio),  # verl ppo_kl
            "ratio_mean": token_mean(ratio_d),
            "ratio_max": torch.where(mask_d > 0, ratio_d, torch.zeros_like(ratio_d)).max(),
        }
        if kl_mat is not None:
            metrics["kl"] = token_mean(kl_mat.detach())
    return loss, metrics


# how a step's metrics combine over its micro-batches (each is already its share of the step's): summed,
# except these
METRIC_REDUCE = {"ratio_max": torch.maximum}


def reduce_metrics(into: dict, metrics: dict) -> None:
    """Add one micro-batch's metrics (0-d tensors, each its share of the step's) into ``into``, on
    device: no host sync per micro-batch."""
    for name, v in metrics.items():
        v = v.detach()
        into[name] = METRIC_REDUCE.get(name, torch.add)(into[name], v) if name in into else v


def df_token_weights(
    mask_bad: Tensor,
    completion_mask: Tensor,
    failed: Tensor,
    kappa: float = DFWeights.kappa,
    root_mask: Tensor | None = None,
    marked: str = "edit",  # the function's default needs no root_mask; trainers default to "root" (DFWeights)
    delta: float = DFWeights.delta,
    mass: str = DFWeights.mass,
) -> Tensor:
    """Signed DF token weights, (B, T). mask_bad, root_mask, completion_mask: (B, T) 0/1;
    failed: (B,) bool, rollout failed AND has a verified repair. See the module docstring."""
    _check("marked", marked, MARKED_MODES)
    _check("mass", mass, MASS_MODES)
    if not -1.0 <= kappa <= 1.0:
        raise ValueError(f"kappa={kappa} must be in [-1, 1]")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta={delta} must be in [0, 1]")
    bad = mask_bad.float() if not mask_bad.is_floating_point() else mask_bad  # (B, T)
    cm = completion_mask.to(bad.dtype)  # (B, T)
    if marked != "edit" and root_mask is None:
        raise ValueError(f"marked={marked!r} needs root_mask (the first edit's tokens)")
    if marked == "edit":
        full, part = bad, torch.zeros_like(bad)  # (B, T) each
    else:
        full = root_mask.to(bad.dtype)  # (B, T)
        part = bad * (1 - full) if marked == "root+prop" else torch.zeros_like(bad)  # (B, T)
    w_fail = full + delta * part + kappa * (1 - full - part)  # (B, T)
    if mass == "redistribute":
        tokens = cm.sum(-1, keepdim=True)  # (B, 1)
        total = (w_fail.abs() * cm).sum(-1, keepdim=True)  # (B, 1)
        # divide first: tokens / total overflows to inf for a subnormal total (a tiny delta), and 0 * inf is nan
        w_fail = w_fail / torch.where(total > 0, total, tokens.clamp(min=1)) * tokens  # all-zero rows stay 0
    w = torch.where(failed.bool().unsqueeze(-1), w_fail, torch.ones_like(w_fail))  # (B, T)
    return w * cm


def repaired_term(
    mask_repaired: Tensor, completion_mask: Tensor, a_plus: float, kappa_rep: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Advantages (B_rep,) = a_plus and weights (B_rep, T) = m' + kappa_rep (1 - m') for repaired samples,
    to be concatenated with the rollouts and fed to the same loss with is_repaired = True.
    kappa_rep defaults to 0: the kept tokens already appear in the failed rollout, so by default only the
    tokens the repair wrote carry the positive signal."""
    if not -1.0 <= kappa_rep <= 1.0:
        raise ValueError(f"kappa_rep={kappa_rep} must be in [-1, 1]")
    m = mask_repaired.float() if not mask_repaired.is_floating_point() else mask_repaired  # (B_rep, T)
    cm = completion_mask.to(m.dtype)  # (B_rep, T)
    adv = m.new_full((m.shape[0],), float(a_plus))  # (B_rep,)
    return adv, (m + kappa_rep * (1 - m)) * cm


# ---------------------------------------------------------------- DF losses on tensors
def df_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    token_weights: Tensor | None = None,
    is_repaired: Tensor | None = None,
    rep_in_denominator: bool = False,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    max_len: int | None = None,
    surrogate: str = "ppo",
    dual_clip: float | None = None,
    sapo_tau: tuple[float, float] = SAPO_TAU,
    norm: StepNorm | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DF-GRPO on one batch of rollouts and (optionally) repaired samples, rows flagged by is_repaired
    (B,) bool. token_weights (B, T) from df_token_weights / repaired_term; None means all 1.
    norm: the step's denominators (`step_norm`) when this batch is one of its micro-batches."""
    in_denominator = None
    if is_repaired is not None and not rep_in_denominator:
        in_denominator = ~is_repaired.bool()  # (B,)
    loss, metrics = policy_loss(
        logprobs, old_logprobs, advantages, completion_mask, token_weights, clip_low, clip_high, agg, max_len,
        ref_logprobs=ref_logprobs, beta=beta, in_denominator=in_denominator, surrogate=surrogate,
        dual_clip=dual_clip, sapo_tau=sapo_tau, norm=norm,
    )
    with torch.no_grad():
        mask = completion_mask.to(logprobs.dtype)  # (B, T)
        rollout = mask if is_repaired is None else mask * (~is_repaired.bool()).to(mask.dtype).unsqueeze(-1)
        if token_weights is not None:
            n = rollout.sum().clamp(min=1) if norm is None else max(norm.rollout_tokens, 1.0)
            metrics["weight_mean"] = (token_weights.detach().to(mask.dtype) * rollout).sum() / n
        if is_repaired is not None:
            metrics["rep_frac"] = is_repaired.to(mask.dtype).sum() / (mask.shape[0] if norm is None else norm.rows)
    return loss, metrics


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    token_weights: Tensor | None = None,
    is_repaired: Tensor | None = None,
    rep_in_denominator: bool = False,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    max_len: int | None = None,
    surrogate: str = "ppo",
    dual_clip: float | None = None,
    sapo_tau: tuple[float, float] = SAPO_TAU,
    norm: StepNorm | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain GRPO (or any surrogate without DF) with the same signature as df_loss: token_weights are ignored and repaired rows are
    dropped (masked out and out of every denominator), so one batch can feed either objective."""
    del token_weights, rep_in_denominator
    mask = completion_mask
    if is_repaired is not None:
        mask = completion_mask * (~is_repaired.bool()).to(completion_mask.dtype).unsqueeze(-1)  # (B, T)
    return df_loss(
        logprobs, old_logprobs, advantages, mask, is_repaired=is_repaired, rep_in_denominator=False,
        ref_logprobs=ref_logprobs, beta=beta, clip_low=clip_low, clip_high=clip_high, agg=agg, max_len=max_len,
        surrogate=surrogate, dual_clip=dual_clip, sapo_tau=sapo_tau, norm=norm,
    )


def step_norm(completion_mask: Tensor, is_repaired: Tensor, agg: str, *, trains_repaired: bool,
              rep_in_denominator: bool) -> StepNorm:
    """The denominators of a whole step (`StepNorm`), from its (B, T) completion mask and (B,) repaired
    flags: repaired rows count in the loss's denominator only if the objective trains on them AND
    rep_in_denominator; max_len of seq-mean-token-sum-norm is the step's T (its longest completion)."""
    cm = completion_mask.float()  # (B, T)
    rollout = cm * (~is_repaired.bool()).to(cm.dtype).unsqueeze(-1)  # (B, T)
    used = cm if trains_repaired else rollout
    counted = None if (trains_repaired and rep_in_denominator) else ~is_repaired.bool()
    return StepNorm(loss=float(denominator(used, agg, cm.shape[-1], counted)), tokens=max(float(used.sum()), 1.0),
                    rollout_tokens=float(rollout.sum()), rows=float(cm.shape[0]))


def batch_token_weights(batch, w) -> Tensor:
    """DF's signed token weights (B, T) for a batch whose fields are the shard columns (`dftrain.batch.Batch`:
    mask_bad, root_bad, mask_repaired, completion_mask, and the row flags df_weighted, is_repaired, root_only),
    under the settings w (`dftrain.settings.DFWeights` fields): `df_token_weights` on rollouts that failed
    with a verified repair (1 on the others), `repaired_term`'s on repaired rows, and root_bad alone on
    --fail-advantage rows (all-fail groups)."""
    cm = batch.completion_mask
    weights = df_token_weights(batch.mask_bad, cm, batch.df_weighted, kappa=w.kappa, root_mask=batch.root_bad,
                               marked=w.marked, delta=w.delta, mass=w.mass)  # (B, T)
    if batch.is_repaired.any():
        _, rep = repaired_term(batch.mask_repaired, cm, w.repaired_weight, w.kappa_rep)  # (B, T)
        weights = torch.where(batch.is_repaired.unsqueeze(-1), rep, weights)
    if batch.root_only.any():
        weights = torch.where(batch.root_only.unsqueeze(-1), batch.root_bad * cm, weights)
    return weights


# ---------------------------------------------------------------- objectives
# An objective is one signature, (logprobs (B, T), batch, cfg) -> (loss, metrics), as verl's registries:
# batch is a `dftrain.batch.Batch` (a whole step or one micro-batch of it, carrying the step's `norm`),
# cfg any object with the loss settings' fields (FitConfig). It declares what it needs from the data:
# the shard stages it trains on, and whether it uses DF's masks (token weights AND repaired rows).
# Registered by name, as the policy losses; ``dftrain fit/loop --objective`` accepts this registry's keys.
@dataclass(frozen=True)
class Objective:
    loss: Callable
    stages: tuple[str, ...]  # shard stages it can train on
    token_weights: bool  # True: DF's token weights and repaired rows; False: both ignored
    help: str


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, *, stages: tuple[str, ...], token_weights: bool, help: str):
    if name not in OBJECTIVE_NAMES:  # the CLI's choices (dftrain.settings) must name every registered objective
        raise ValueError(f"objective {name!r}: declare it in dftrain.settings.OBJECTIVE_NAMES")

    def deco(fn):
        OBJECTIVES[name] = Objective(fn, tuple(stages), token_weights, help)
        return fn

    return deco


def _surrogate_kw(batch, cfg) -> dict:
    return dict(ref_logprobs=batch.ref_logprobs, beta=cfg.beta, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                agg=cfg.agg, surrogate=cfg.policy_loss, dual_clip=cfg.dual_clip, norm=batch.norm)


@register_objective("df-grpo", stages=("mask",), token_weights=True,
                    help="masked GRPO on DF shards (dfgen mask output)")
def df_grpo_objective(logprobs: Tensor, batch, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """DF-GRPO: `batch_token_weights` under cfg's DF settings, rollouts and repaired rows in one loss."""
    return df_loss(logprobs, batch.logprobs, batch.advantages, batch.completion_mask,
                   token_weights=batch_token_weights(batch, cfg), is_repaired=batch.is_repaired,
                   rep_in_denominator=cfg.rep_in_denominator, **_surrogate_kw(batch, cfg))


@register_objective("grpo", stages=("sample", "repair", "mask"), token_weights=False,
                    help="plain GRPO, the baseline (sample shards suffice)")
def grpo_objective(logprobs: Tensor, batch, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain GRPO (any surrogate without DF): masks ignored, repaired rows dropped."""
    return grpo_loss(logprobs, batch.logprobs, batch.advantages, batch.completion_mask,
                     is_repaired=batch.is_repaired, **_surrogate_kw(batch, cfg))


LOSSES = {name: o.loss for name, o in OBJECTIVES.items()}  # objective name -> (logprobs, batch, cfg) -> (loss, metrics)
