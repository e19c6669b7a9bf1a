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
w_t, folded into a per-token advantage A_t = A_i * w_t; the loss per token is PPO's clipped surrogate

    L_t = -min(rho_t * A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) * A_t)   (+ beta * k3_t)

Folding w into A_t, rather than multiplying L_t by w_t, is what makes negative weights correct: for
w >= 0 both are the same number (w commutes with min), and for w < 0 the clip acts on the side that
matches the token's effective sign, as for any negative-advantage token. log(rho) is clamped to
[-20, 20] (as verl) so garbage log-probs on padding never make inf * 0 = NaN.
The optional KL term is k3 = exp(ref - logp) - (ref - logp) - 1 per token, added before aggregation
and NOT weighted by w (it is a regulariser, not credit). TRL adds beta * k3 per token the same way;
verl aggregates it separately with the same mode, which is the same number since aggregation is linear.
verl's "low_var_kl" also clamps k3 to [-10, 10]; k3 >= 0 and reaches 10 only when ref - logp > 2.53 or
< -11, which never happens on the golden inputs (max k3 there is 1.24), so we do not clamp k3 (its
gradient stays); like verl we clamp ref - logp to [-20, 20] so exp never overflows on padding.
We do not implement verl's dual clip (clip_ratio_c = 3 for A < 0); it only bites when rho > 3 and
the golden inputs have rho < 2.9, so verl and TRL agree there and so do we.

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

import torch
from torch import Tensor

ADV_SCALES = ("group", "batch", "none")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
MARKED_MODES = ("edit", "root", "root+prop")
MASS_MODES = ("keep", "redistribute")
LOG_RATIO_CLAMP = 20.0  # as verl: exp(20) is finite, so padding never produces inf * 0 = NaN


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {', '.join(choices)}")


def group_advantages(rewards: Tensor, group_index: Tensor, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Per-rollout advantage, (B,). group_index: any ints, equal for rollouts of one prompt."""
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
        adv = centered / (r.std() + eps) if r.numel() > 1 else centered
    else:
        adv = centered
    return torch.where(constant, torch.zeros_like(adv), adv)  # (B,) exactly 0 without a baseline


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - logp, (B, T)."""
    d = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    return torch.exp(d) - d - 1


def aggregate(
    loss_mat: Tensor,
    completion_mask: Tensor,
    agg: str,
    max_len: int | None = None,
    in_denominator: Tensor | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar. in_denominator (B,) bool: rows counted in the
    denominators (default all); rows outside it still add their numerator."""
    _check("agg", agg, AGG_MODES)
    mask = completion_mask.to(loss_mat.dtype)  # (B, T)
    rows = mask.new_ones(mask.shape[0]) if in_denominator is None else in_denominator.to(mask.dtype)  # (B,)
    row_sum = (loss_mat * mask).sum(-1)  # (B,)
    row_tokens = mask.sum(-1)  # (B,)
    n_rows = rows.sum().clamp(min=1)
    if agg == "token-mean":
        return row_sum.sum() / (row_tokens * rows).sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return (row_sum / row_tokens.clamp(min=1)).sum() / n_rows
    if agg == "seq-mean-token-sum":
        return row_sum.sum() / n_rows
    return row_sum.sum() / (n_rows * (mask.shape[-1] if max_len is None else max_len))  # token-sum-norm


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate on per-token advantages A_t = A * w_t, aggregated by `aggregate`.
    logprobs, old_logprobs, completion_mask, token_weights: (B, T); advantages: (B,) or (B, T)."""
    mask = completion_mask.to(logprobs.dtype)  # (B, T)
    adv = advantages.to(logprobs.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # (B, 1) or (B, T)
    if token_weights is not None:
        adv = adv * token_weights  # (B, T) signed per-token advantage
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    surr = -adv * ratio  # (B, T)
    surr_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)  # (B, T)
    pg_mat = torch.maximum(surr, surr_clipped)  # (B, T) = -min(rho A, clip(rho) A)
    loss_mat = pg_mat
    kl_mat = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        kl_mat = kl_k3(logprobs, ref_logprobs)  # (B, T)
        loss_mat = pg_mat + beta * kl_mat
    loss = aggregate(loss_mat, mask, agg, max_len, in_denominator)
    with torch.no_grad():
        ratio_d, mask_d = ratio.detach(), mask.detach()
        metrics = {
            "pg_loss": aggregate(pg_mat.detach(), mask_d, agg, max_len, in_denominator),
            "clipfrac": _masked_mean((surr_clipped > surr).to(mask_d.dtype).detach(), mask_d),  # verl pg_clipfrac
            "ppo_kl": _masked_mean(-log_ratio.detach(), mask_d),  # verl ppo_kl
            "ratio_mean": _masked_mean(ratio_d, mask_d),
            "ratio_max": torch.where(mask_d > 0, ratio_d, torch.zeros_like(ratio_d)).max(),
        }
        if kl_mat is not None:
            metrics["kl"] = _masked_mean(kl_mat.detach(), mask_d)
    return loss, metrics


def df_token_weights(
    mask_bad: Tensor,
    completion_mask: Tensor,
    failed: Tensor,
    kappa: float = 0.1,
    root_mask: Tensor | None = None,
    marked: str = "edit",  # the function's default needs no root_mask; trainers default to "root" (FitConfig)
    delta: float = 0.5,
    mass: str = "keep",
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
        w_fail = w_fail * (tokens / torch.where(total > 0, total, tokens.clamp(min=1)))  # all-zero rows stay 0
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
) -> tuple[Tensor, dict[str, Tensor]]:
    """DF-GRPO on one batch of rollouts and (optionally) repaired samples, rows flagged by is_repaired
    (B,) bool. token_weights (B, T) from df_token_weights / repaired_term; None means all 1."""
    in_denominator = None
    if is_repaired is not None and not rep_in_denominator:
        in_denominator = ~is_repaired.bool()  # (B,)
    loss, metrics = policy_loss(
        logprobs, old_logprobs, advantages, completion_mask, token_weights, clip_low, clip_high, agg, max_len,
        ref_logprobs=ref_logprobs, beta=beta, in_denominator=in_denominator,
    )
    with torch.no_grad():
        mask = completion_mask.to(logprobs.dtype)  # (B, T)
        if token_weights is not None:
            rollout = mask if is_repaired is None else mask * (~is_repaired.bool()).to(mask.dtype).unsqueeze(-1)
            metrics["weight_mean"] = _masked_mean(token_weights.detach().to(mask.dtype), rollout)
        if is_repaired is not None:
            metrics["rep_frac"] = is_repaired.to(mask.dtype).mean()
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
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain GRPO with the same signature as df_loss: token_weights are ignored and repaired rows are
    dropped (masked out and out of every denominator), so one batch can feed either objective."""
    del token_weights, rep_in_denominator
    mask = completion_mask
    if is_repaired is not None:
        mask = completion_mask * (~is_repaired.bool()).to(completion_mask.dtype).unsqueeze(-1)  # (B, T)
    return df_loss(
        logprobs, old_logprobs, advantages, mask, is_repaired=is_repaired, rep_in_denominator=False,
        ref_logprobs=ref_logprobs, beta=beta, clip_low=clip_low, clip_high=clip_high, agg=agg, max_len=max_len,
    )


LOSSES = {"grpo": grpo_loss, "df-grpo": df_loss}  # objective name -> loss with one signature
