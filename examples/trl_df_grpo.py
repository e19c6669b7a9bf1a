"""DF-GRPO with TRL: a stock TRL GRPO script where the lines marked "DF:" change.

The shipped research-regime policy (``data/policies/regime_start``, the tiny Qwen2-VL of the
embedded default) is trained on prompt records of its task from ``dfgen synth`` (question, image,
answer, and the step ``solution`` the oracle repairer reads). Offline: nothing is downloaded. From a
clean clone, after ``make setup`` (the README's commands; a test runs them as written):

    .venv/bin/dfgen synth --out runs/trl/prompts --n 64 --seed 1 --min-reads 3 --max-reads 4 --ops '+-*'
    .venv/bin/python examples/trl_df_grpo.py --model data/policies/regime_start --prompts runs/trl/prompts --out runs/trl/policy --steps 2

The vision tower stays frozen, as ``dftrain fit`` and ``dftrain sft`` keep it: RL on the tower broke
the policy's perception (docs/RESULTS.md).
"""
import argparse
import json

from datasets import Dataset
from trl import GRPOConfig

from dfgen.images import decode_image
from dfgen.models import save_processor, vision_parameters
from dfgen.policy import load_policy
from dfgen.records import load_prompts
from dftrain.integrations import answer_reward as reward  # the exact-answer reward of the prompt records
from dftrain.integrations.trl import DFConfig, DFGRPOTrainer  # DF: instead of `from trl import GRPOTrainer`


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--n", type=int, default=16)
    a = ap.parse_args()
    recs, _ = load_prompts(a.prompts, limit=a.n)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
                             "image": decode_image(r["image"]), "answer": r["answer"], "answer_type": r["answer_type"],
                             "source": r["source"], "solution": r["solution"]} for r in recs])
    model, processor = load_policy(a.model)
    for p in vision_parameters(model):  # frozen, as our own recipe keeps it (module docstring)
        p.requires_grad_(False)
    args = GRPOConfig(output_dir=a.out, per_device_train_batch_size=16, num_generations=4, max_completion_length=64,
                      max_steps=a.steps, learning_rate=1e-4, beta=0.0, use_cpu=True, bf16=False, report_to="none",
                      logging_steps=1, save_strategy="no")
    trainer = DFGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=processor,
                            df=DFConfig(), repairer="oracle")  # DF: the two extra arguments
    trainer.train()
    # trainer.save_model(a.out) for a hub Qwen2-VL; the tiny policy's processor has no video processor to save
    trainer.model.save_pretrained(a.out, safe_serialization=True)
    save_processor(processor, a.out)
    for h in trainer.state.log_history:
        if "df/repaired_frac" in h:
            print(json.dumps({k: h[k] for k in ("step", "loss", "reward", "df/repaired_frac", "df/mask_density") if k in h}))


if __name__ == "__main__":
    main()
