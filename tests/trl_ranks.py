"""One rank of a multi-process DFGRPOTrainer batch, for ``tests/test_trl_integration.py`` (run under
``torchrun --nproc_per_node 2``; accelerate picks gloo on CPU). Each rank generates its share of the
batch (TRL's layout: rank r holds rows [r * n, (r + 1) * n), so a group may span ranks), computes
DF's advantages and repaired samples (gathering across ranks where groups span them), then the loss
and its local gradient, and saves them to ``OUT/rank{r}.pt`` for the test to compare with
``dftrain fit`` on the whole batch.

    torchrun --nproc_per_node 2 tests/trl_ranks.py MODEL DATASET OUT G PROMPTS
"""
import sys

import torch
from datasets import load_from_disk
from trl import GRPOConfig

from dfgen.policy import load_policy
from dftrain.integrations import answer_reward
from dftrain.integrations.trl import DFConfig, DFGRPOTrainer

model_dir, data_dir, out_dir, G, prompts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ds = load_from_disk(data_dir)
model, processor = load_policy(model_dir)
n = prompts * G // 2
args = GRPOConfig(output_dir=f"{out_dir}/trl", per_device_train_batch_size=n, num_generations=G,
                  max_completion_length=64, max_steps=1, learning_rate=1e-3, beta=0.0, use_cpu=True, bf16=False,
                  report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0, num_iterations=2,
                  scale_rewards="none", loss_type="dapo")
t = DFGRPOTrainer(model=model, reward_funcs=answer_reward, args=args, train_dataset=ds, processing_class=processor,
                  df=DFConfig(), repairer="oracle")
t.current_gradient_accumulation_steps = 1
t.model.train()
rank = t.accelerator.process_index
rows = [ds[i] for i in range(prompts) for _ in range(G)][rank * n:(rank + 1) * n]
torch.manual_seed(1 + rank)
out = t._generate_and_score_completions(rows)
t.model.zero_grad(set_to_none=True)
loss = t.compute_loss(t.model, out)
loss.backward()
grad = torch.cat([p.grad.flatten() for p in t.model.parameters() if p.grad is not None])
keep = {k: v.cpu() for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
torch.save({"out": keep, "loss": float(loss.detach()), "grad": grad}, f"{out_dir}/rank{rank}.pt")
