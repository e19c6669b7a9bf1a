"""The policy-loss family of dftrain/loss.py (ppo, gspo, sapo, cispo; clip-higher, dual clip):
golden numbers from TRL 1.16's own implementation, DF off and on, and the properties DF's token
weights must keep under every surrogate."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dftrain.loss import POLICY_LOSSES, df_token_weights, policy_loss
from tests.conftest import DATA, ROOT

GOLDEN = DATA / "golden" / "trl_policy_losses.json"
TOL = 1e-5
GOLD = json.loads(GOLDEN.read_text())
INP = {k: torch.tensor(v) for k, v in GOLD["inputs"].items()}


def ours(case: dict, df: bool):
    kw = dict(case["ours"])
    if "sapo_tau" in kw:
        kw["sapo_tau"] = tuple(kw["sapo_tau"])
    lp = INP["logp"].clone().requires_grad_(True)
    loss, _ = policy_loss(lp, INP["old"], INP["adv"], INP["mask"], INP["weights"] if df else None,
                          ref_logprobs=INP["ref"], **kw)
    loss.backward()
    return float(loss.detach()), lp.grad


@pytest.mark.parametrize("name", list(GOLD["cases"]))
def test_loss_and_gradient_equal_trls_with_df_off(name):
    case = GOLD["cases"][name]
    loss, grad = ours(case, df=False)
    assert abs(loss - case["loss"]) <= TOL * max(1, abs(case["loss"])), (loss, case["loss"])
    assert torch.allclose(grad, torch.tensor(case["grad"]), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(GOLD["cases"]))
def test_df_weights_equal_trl_fed_the_same_per_token_advantages(name):
    """What a TRL subclass passing (B, T) advantages gets; for GSPO the value only (GSPO-token)."""
    case = GOLD["cases"][name]
    loss, grad = ours(case, df=True)
    assert abs(loss - case["df_loss"]) <= TOL * max(1, abs(case["df_loss"]))
    if "df_grad" in case:
        assert torch.allclose(grad, torch.tensor(case["df_grad"]), atol=TOL, rtol=0)


def test_goldens_cover_every_surrogate_and_every_option_bites():
    used = {c["ours"].get("surrogate", "ppo") for c in GOLD["cases"].values()}
    assert used == set(POLICY_LOSSES)
    on = INP["mask"] > 0
    ratio = (INP["logp"] - INP["old"]).exp()[on]
    assert (ratio > 1.6).sum() >= 5 and (ratio < 0.8).sum() >= 5  # the clips, the dual clip and cispo's clamp act
    zeros = {n: int((torch.tensor(GOLD["cases"][n]["grad"])[on] == 0).sum()) for n in ("dapo", "dapo,delta")}
    assert 0 < zeros["dapo"] < zeros["dapo,delta"], zeros  # the dual clip silences tokens the clip kept


def test_golden_script_reproduces_the_committed_numbers(tmp_path):
    out = tmp_path / "g.json"
    p = subprocess.run([sys.executable, str(ROOT / "data" / "golden" / "golden_trl_losses.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    new = json.loads(out.read_text())
    assert new["inputs"] == GOLD["inputs"]
    for name, case in GOLD["cases"].items():
        for key in ("loss", "df_loss"):
            assert abs(new["cases"][name][key] - case[key]) < 1e-7, (name, key)
        assert torch.allclose(torch.tensor(new["cases"][name]["grad"]), torch.tensor(case["grad"]), atol=1e-7)


# ---------------------------------------------------------------- DF properties under every surrogate
SETTINGS = {"ppo": {}, "ppo+dual": {"dual_clip": 1.6}, "ppo+higher": {"clip_high": 0.28},
            "gspo": {"surrogate": "gspo"}, "sapo": {"surrogate": "sapo"}, "cispo": {"surrogate": "cispo", "clip_high": 4.0}}


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 8
    old = -torch.rand(B, T, generator=g) * 2 - 0.1
    lp = old + torch.randn(B, T, generator=g) * 0.5
    cm = (torch.arange(T)[None] < torch.tensor([8, 6, 5, 8, 3, 7])[:, None]).float()
    adv = torch.tensor([1.2, -0.8, -0.4, 0.5, -1.0, -0.3])
    bad = (torch.rand(B, T, generator=g) < 0.3).float() * cm
    root = bad * (torch.arange(T)[None] == bad.argmax(-1, keepdim=True)).float()
    failed = adv < 0
    return lp, old, adv, cm, bad, root, failed


def _grad(lp, old, adv, cm, w, kw):
    x = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, old, adv, cm, w, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kappa_one_is_the_surrogate_without_df(setting, seed):
    lp, old, adv, cm, bad, root, failed = _batch(seed)
    w = df_token_weights(bad, cm, failed, kappa=1.0, root_mask=root, marked="root")
    a, ga = _grad(lp, old, adv, cm, w, SETTINGS[setting])
    b, gb = _grad(lp, old, adv, cm, None, SETTINGS[setting])
    assert torch.allclose(a, b, atol=1e-7) and torch.allclose(ga, gb, atol=1e-7)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_a_marked_token_gets_more_gradient_than_an_unmarked_one(setting):
    """One failed rollout, on-policy (ratio 1, so no clip decides): its root token at weight 1 is
    pushed down harder than its unmarked tokens at kappa = 0.1, in the same direction."""
    T = 6
    lp = old = torch.full((1, T), -1.0)
    cm, bad = torch.ones(1, T), torch.zeros(1, T)
    bad[0, 3] = 1
    w = df_token_weights(bad, cm, torch.tensor([True]), kappa=0.1, root_mask=bad, marked="root")
    _, g = _grad(lp, old, torch.tensor([-1.0]), cm, w, SETTINGS[setting])
    assert (g > 0).all(), g  # descent lowers every token's log-prob of a failed rollout
    assert g[0, 3] > 5 * g[0, 0] and torch.allclose(g[0, [0, 1, 2, 4, 5]], g[0, 0].expand(5))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_non_negative_weights_never_flip_a_tokens_update(setting, seed):
    lp, old, adv, cm, bad, root, failed = _batch(seed)
    for kappa in (0.0, 0.1, 0.5):
        w = df_token_weights(bad, cm, failed, kappa=kappa, root_mask=root, marked="root")
        _, g_df = _grad(lp, old, adv, cm, w, SETTINGS[setting])
        _, g = _grad(lp, old, adv, cm, None, SETTINGS[setting])
        both = (g_df != 0) & (g != 0)
        assert (torch.sign(g_df[both]) == torch.sign(g[both])).all()
        assert (g_df[(g == 0) & (w > 0)] == 0).all()  # where the surrogate cut a token, DF does not revive it


@pytest.mark.parametrize("kw,msg", [
    ({"surrogate": "trpo"}, "surrogate='trpo'"),
    ({"surrogate": "sapo", "dual_clip": 3.0}, "sapo has none"),
    ({"surrogate": "cispo", "dual_clip": 3.0}, "cispo has none"),
    ({"dual_clip": 1.1}, "must exceed 1 + clip_high"),
    ({"clip_low": 1.2}, "clip_low=1.2"),
    ({"surrogate": "sapo", "sapo_tau": (1.0, 0.0)}, "temperatures must be positive"),
])
def test_bad_surrogate_settings_are_refused_in_one_line(kw, msg):
    lp, old, adv, cm, *_ = _batch(0)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("+", r"\+")):
        policy_loss(lp, old, adv, cm, **kw)
