"""DF's cost inside TRL: the time ``DFGRPOTrainer`` spends repairing, aligning and weighting a
generation batch (``df_masks`` + ``df_weights``) as a fraction of its training step, and its step
time against stock ``GRPOTrainer`` on the same data, interleaved in one run.

The policy is the pipeline's miniature (``bench_trainer.make_df_shards``: tiny Qwen2-VL, a short
SFT), the data 16 synthetic prompts x 4 generations per step, ``max_completion_length`` 64.

Run: python -m bench.bench_trl_df [--steps 6] [--json out.json]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path


from bench._env import machine, versions
from dftrain.integrations import answer_reward as reward  # noqa: E402 - light (no trl, no torch)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bench.bench_trainer import make_df_shards
    from dfgen.images import decode_image
    from dfgen.policy import load_policy
    from dfgen.records import load_prompts
    from dftrain.integrations.trl import DFConfig, DFGRPOTrainer

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    d = Path(tempfile.mkdtemp())
    make_df_shards(d, prompts=16)
    recs, _ = load_prompts(d / "train", limit=64)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
                             "image": decode_image(r["image"]), "answer": r["answer"], "answer_type": r["answer_type"],
                             "source": r["source"], "solution": r["solution"]} for r in recs])

    class Timed(DFGRPOTrainer):
        df_s = 0.0

        def df_masks(self, *x):
            t = time.perf_counter()
            out = super().df_masks(*x)
            Timed.df_s += time.perf_counter() - t
            return out

        def df_weights(self, *x):
            t = time.perf_counter()
            out = super().df_weights(*x)
            Timed.df_s += time.perf_counter() - t
            return out

    def run(cls, rep, **kw):
        model, processor = load_policy(d / "sft")
        args = GRPOConfig(output_dir=str(d / f"o{rep}"), per_device_train_batch_size=64, num_generations=4,
                          max_completion_length=64, max_steps=a.steps, learning_rate=1e-4, beta=0.0, use_cpu=True,
                          bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=rep)
        t = cls(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=processor, **kw)
        t0 = time.perf_counter()
        t.train()
        return (time.perf_counter() - t0) / a.steps

    stock, df, df_part = [], [], []
    for rep in range(a.reps):
        stock.append(run(GRPOTrainer, rep))
        Timed.df_s = 0.0
        df.append(run(Timed, rep, df=DFConfig()))
        df_part.append(Timed.df_s / a.steps)
    res = {"machine": machine(), "versions": versions(), "steps": a.steps, "reps": a.reps,
           "batch": "16 prompts x 4 generations, max_completion_length 64",
           "stock_step_s": [round(x, 3) for x in stock], "df_step_s": [round(x, 3) for x in df],
           "df_part_s_per_step": [round(x, 4) for x in df_part],
           "df_part_of_df_step": round(sum(df_part) / sum(df), 4),
           "df_over_stock_step": round(sum(df) / sum(stock), 3)}
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
