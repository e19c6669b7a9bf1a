"""``DFGRPOTrainer`` (TRL 1.16) on every other VLM family of ``tests/tiny_families.py``.

TRL generates from the family's tiny checkpoint with its own processor (images, chat template, turn
end); a reward that alternates 1, 0 within each group makes every group mixed, and a repairer that
appends a word to each failed completion gives DF something to align in the family's tokenizer.
Checked per family: DF's (B, T) advantages hold two levels on repaired rows (A on the edit, kappa * A
elsewhere); with kappa = 1 the loss and gradients equal stock ``GRPOTrainer``'s on the same batch;
the gradient reaches the text model; one ``train()`` step runs and moves the weights.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (make setup installs the trl extra)")

G, PROMPTS = 2, 2


def _families() -> list[str]:
    from tests.tiny_families import FAMILIES

    return list(FAMILIES)


@pytest.fixture(scope="module")
def dataset(train_prompts):
    from datasets import Dataset

    from dfgen.images import decode_image
    from dfgen.records import load_prompts

    recs, _ = load_prompts(train_prompts, limit=PROMPTS)
    return Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": r["question"]}]}],
                               "image": decode_image(r["image"])} for r in recs])


@pytest.fixture(scope="module", params=_families())
def family_model(request, tmp_path_factory):
    from tests.tiny_families import build_family

    return request.param, build_family(request.param, tmp_path_factory.mktemp(f"trl-{request.param}") / "m")


def alternating(completions, **kw):
    """1, 0 within each group (groups are contiguous, so each one is mixed); 1 for a repair (it ends
    with the appended digit), so DF's verification lets the repairs count."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(t.endswith(" 7") or i % 2 == 0) for i, t in enumerate(texts)]


def append_a_digit(row, text):
    """A repair that keeps the completion and adds a word. A random policy writes byte fragments, which
    decode to U+FFFD and tokenize back differently, so the alignment marks those too; the tokens that
    round-trip stay unmarked, which is what the two-level check needs."""
    return text + " 7"  # random text re-tokenizes far from its ids: the edit limit is lifted in make()


def make(model_dir, dataset, tmp_path, kappa, **df):
    from trl import GRPOConfig

    from dfgen.policy import load_policy
    from dftrain.integrations.trl import DFConfig, DFGRPOTrainer

    torch.manual_seed(0)
    model, processor = load_policy(model_dir)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=8, max_steps=1, learning_rate=1e-2, beta=0.0, use_cpu=True, bf16=False,
                      report_to="none", logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0)
    t = DFGRPOTrainer(model=model, reward_funcs=alternating, args=args, train_dataset=dataset,
                      processing_class=processor, df=DFConfig(kappa=kappa, marked="edit", max_edit_ratio=10.0, fail_advantage=0.0, **df),
                      repairer=append_a_digit)
    t.current_gradient_accumulation_steps = 1
    return t


def _loss_and_grad(trainer, out):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, out)
    loss.backward()
    named = [(n, p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None]
    return float(loss.detach()), torch.cat([g.flatten() for _, g in named]), [n for n, _ in named]


def test_df_grpo_trainer_runs_on_the_family(family_model, dataset, tmp_path):
    from trl import GRPOTrainer

    family, model_dir = family_model
    batch = [dataset[i] for i in range(PROMPTS) for _ in range(G)]
    kappa = 0.1
    t = make(model_dir, dataset, tmp_path, kappa)
    t.model.train()
    torch.manual_seed(1)
    out = t._generate_and_score_completions(batch)
    torch.manual_seed(1)
    stock = GRPOTrainer._generate_and_score_completions(t, batch)
    assert torch.equal(out["completion_ids"], stock["completion_ids"]), family
    adv, a, cm = out["advantages"], stock["advantages"], out["completion_mask"]
    assert adv.shape == cm.shape and (a != 0).any(), family
    two_level = 0
    for i in range(adv.shape[0]):
        n = int(cm[i].sum())
        if a[i] >= 0:
            assert torch.allclose(adv[i, :n], a[i].expand(n)), family
            continue
        full, part = (adv[i, :n] - a[i]).abs() < 1e-6, (adv[i, :n] - kappa * a[i]).abs() < 1e-6
        assert (full | part).all(), family
        two_level += bool(full.any() and part.any())
    assert two_level > 0, f"{family}: no repaired completion got DF weights"
    # the repaired samples: a second pass through TRL's loss with the row's prompt and image
    assert out["rep_completion_mask"].sum() > 0, family
    l_rep, _, _ = _loss_and_grad(t, out)
    l_roll, _, _ = _loss_and_grad(t, {k: v for k, v in out.items() if not k.startswith("rep_")})
    assert l_rep < l_roll - 1e-4, family  # a positive advantage on the repairs lowers the loss

    # kappa = 1: stock TRL's loss and gradients on the same batch
    one = make(model_dir, dataset, tmp_path, 1.0, repaired_weight=0.0)
    one.model.train()
    torch.manual_seed(1)
    ours = one._generate_and_score_completions(batch)
    l1, g1, names = _loss_and_grad(one, ours)
    l2, g2, _ = _loss_and_grad(one, stock)
    assert abs(l1 - l2) < 1e-5 and torch.allclose(g1, g2, atol=1e-5), family
    assert any("language_model" in n or "text_model" in n or "model.layers" in n for n in names), family

    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    assert any(not torch.equal(before[n], p.detach()) for n, p in t.model.named_parameters()), family
