"""``dfgen sample``: G rollouts per prompt with behaviour logprobs and exact rewards.

For every prompt record, sample a GRPO group of ``group_size`` trajectories from the policy and
store everything the trainer needs, so generation and learning never run in the same process:
per rollout ``text``, ``token_ids`` (exactly the sampled ids, EOS included when the sample
stopped), ``logprobs`` (the sampled tokens' log-probabilities under the distribution actually
sampled from: special tokens suppressed, logits divided by the temperature, renormalised over
the top-p nucleus when ``top_p < 1``), ``finish_reason`` ("stop"/"length"), ``pred`` and
``reward`` from the answer checker, and the per-sample ``seed``. Rows are groups: the image is
stored once for its G rollouts.

* **Reproducible:** sample k of prompt ``id`` uses ``seeds.sample_seed(seed, id, k)``.
* **Resumable:** the worker's prompts are cut into fixed chunks of ``chunk_size`` groups; each
  chunk becomes one atomically written shard listed in the worker's manifest. A rerun with the
  same arguments skips finished chunks, so every group ends up present exactly once.
* **Scale-out:** ``--num-workers K --worker-index i`` takes prompts ``i, i+K, i+2K, ...``;
  K processes (or machines) write disjoint shards into one folder that reads as one set.
* **Safe:** an output folder holding shards of another model, tokenizer or sampling settings
  is refused, never overwritten.

Run: ``dfgen sample --prompts runs/train --model runs/sft --out runs/r0 --group-size 8``
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from dfgen.errors import UserError


@dataclass
class SampleConfig:
    prompts: Path  # prompt set (parquet folder/file or jsonl)
    model: Path  # policy folder (HF format)
    out: Path  # output shard folder
    backend: str = "hf"  # hf (transformers) or vllm
    group_size: int = 8  # G rollouts per prompt; GRPO needs G >= 2
    temperature: float = 1.0  # 1.0 keeps behaviour logprobs equal to the policy's
    top_p: float = 1.0  # < 1 truncates the distribution (logprobs renormalised; see docstring)
    max_new_tokens: int | None = None  # None: default_budget (solutions' length, else the model's or REASONING_BUDGET)
    seed: int = 0
    limit: int | None = None  # first N usable prompts only
    batch_size: int = 64  # sequences per generate call
    chunk_size: int = 64  # groups per shard (the unit of resumption)
    num_workers: int = 1
    worker_index: int = 0
    tensor_parallel_size: int = 1  # vllm only
    gpu_memory_utilization: float = 0.9  # vllm only
    max_model_len: int = 1024  # vllm only: prompt + completion tokens
    dtype: str = "auto"  # vllm only: "auto" = the checkpoint's dtype
    device: str = "auto"  # hf only: auto | cpu | cuda | cuda:N (auto: cuda when available)

    def engine_options(self):
        """The engine settings; the backend takes the ones it uses (``dfgen.backends.BackendSpec``)."""
        from dfgen.backends import EngineOptions

        return EngineOptions(batch_size=self.batch_size, device=self.device, seed=self.seed,
                             tensor_parallel_size=self.tensor_parallel_size, max_model_len=self.max_model_len,
                             gpu_memory_utilization=self.gpu_memory_utilization, dtype=self.dtype)

    def validate(self) -> None:
        from dfgen.policy import check_device

        check_device(self.device)
        if self.group_size < 1:
            raise UserError(f"--group-size must be at least 1, got {self.group_size}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
        if (self.max_new_tokens is not None and self.max_new_tokens < 1) or self.batch_size < 1 or self.chunk_size < 1:
            raise UserError("--max-new-tokens, --batch-size and --chunk-size must be positive")
        if not 0 <= self.worker_index < self.num_workers:
            raise UserError(f"--worker-index must be in [0, {self.num_workers})")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be positive")


REASONING_BUDGET = 512  # new tokens for prompts without a step solution: real chain-of-thought answers run to hundreds
TRUNCATION_WARN = 0.05  # a run with more of its rollouts stopped at the limit says so


def default_budget(records: list[dict], tokenizer, model_dir: Path) -> int:
    """The generation budget when ``--max-new-tokens`` is not given: when every record carries a
    synthetic step ``solution``, what fits the longest (``grid.token_budget``, >= 64); otherwise the
    model folder's ``generation_config.json`` ``max_new_tokens``, else ``REASONING_BUDGET``."""
    import json

    from dfgen.synth.grid import token_budget

    if records and all(r.get("solution") for r in records):
        return token_budget(records, tokenizer)
    gc = Path(model_dir) / "generation_config.json"
    n = json.loads(gc.read_text()).get("max_new_tokens") if gc.is_file() else None
    return max(token_budget(records, tokenizer), int(n) if n else REASONING_BUDGET)


def truncation_warning(st: dict, max_new_tokens: int) -> str | None:
    """One line when more than ``TRUNCATION_WARN`` of a run's rollouts stopped at the token limit."""
    n, cut = st.get("rollouts", 0), st.get("truncated", 0)
    if not n or cut / n <= TRUNCATION_WARN:
        return None
    return (f"warning: {cut} of {n} rollouts ({cut / n:.0%}) stopped at the {max_new_tokens}-token limit; "
            f"their rewards count them as wrong. Raise --max-new-tokens")


def sampling_meta(cfg: SampleConfig) -> dict:
    return {"group_size": cfg.group_size, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}


def existing_differs(have: dict, meta: dict) -> str | None:
    """Why shards already in the output folder (provenance ``have``) are of another model, tokenizer or
    sampling setup than this run's ``meta``; None if they are of this run."""
    for k in ("stage", "model_fingerprint", "tokenizer_fingerprint", "sampling", "prompts_fingerprint",
              "num_workers", "seed"):
        if have.get(k) != meta.get(k):
            return f"holds shards with a different {k} ({have.get(k)} vs {meta.get(k)})"
    return None


def prompts_fingerprint(records: list[dict]) -> str:
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(r["id"].encode() + b"\0")
    return h.hexdigest()[:16]


def rollout_row(s, reward: float, pred, seed: int) -> dict:
    return {"text": s.text, "token_ids": s.token_ids, "logprobs": s.logprobs, "reward": reward, "pred": pred,
            "finish_reason": s.finish_reason, "seed": seed}


def _sample_chunk(chunk: list[dict], backend, cfg: SampleConfig, scfg, ctx, stats: dict, skipped: list,
                  progress=None) -> list[dict]:
    """One chunk of prompt records -> its group rows (a prompt beyond the context is counted in ``skipped``)."""
    from dfgen.benchmarks import reward as score
    from dfgen.backends import Prompt
    from dfgen.images import decode_image
    from dfgen.policy import prompt_lengths
    from dfgen.seeds import sample_seed

    prompts = [Prompt(r["question"], decode_image(r["image"]) if r["image"] is not None else None) for r in chunk]
    n_chunk = len(chunk)
    # hf renders prompt ids with the processor alone, so they double as the lengths below; vLLM's
    # come from an engine call, which refuses the whole batch on one long prompt: count first.
    pids = backend.prompt_ids(prompts) if prompts and backend.offline_prompt_ids else None
    if ctx:  # a prompt beyond the context is skipped and counted, never sampled into garbage
        lens = ([len(p) for p in pids] if pids is not None
                else prompt_lengths(backend.processor, prompts, cfg.batch_size))
        fits = [n + cfg.max_new_tokens <= ctx for n in lens]
        for r, n, ok in zip(chunk, lens, fits):
            if not ok:
                skipped.append((r["id"], f"prompt too long ({n} tokens + {cfg.max_new_tokens} new > "
                                         f"the model's {ctx}-token context)"))
        chunk, prompts = ([x for x, ok in zip(xs, fits) if ok] for xs in (chunk, prompts))
        pids = [x for x, ok in zip(pids, fits) if ok] if pids is not None else None
    if pids is None:
        pids = backend.prompt_ids(prompts) if prompts else []
    seeds = [[sample_seed(cfg.seed, r["id"], k) for k in range(cfg.group_size)] for r in chunk]
    outs = backend.generate(prompts, seeds, scfg) if chunk else []
    rows = []
    for r, samples, ss, pid in zip(chunk, outs, seeds, pids):
        rolls = []
        for s, sd in zip(samples, ss):
            pred, reward = score(r, s.text)
            rolls.append(rollout_row(s, reward, pred, sd))
            stats["tokens"] += len(s.token_ids)
            stats["truncated"] += s.finish_reason == "length"
            stats["reward_sum"] += reward
        rows.append({**r, "prompt_ids": pid, "rollouts": rolls})
    stats["groups"] += len(rows)
    stats["rollouts"] += len(rows) * cfg.group_size
    if progress:
        progress(n_chunk * cfg.group_size, sum(len(s.token_ids) for o in outs for s in o))
    return rows


def run_sample(cfg: SampleConfig, progress=None) -> dict:
    from dfgen.backends import SamplingConfig, get_backend, get_spec
    from dfgen.policy import check_policy_dir, context_length, model_fingerprint, tokenizer_fingerprint
    from dfgen.records import load_prompts
    from dfgen.stage import Unit, run_stage

    cfg.validate()
    check_policy_dir(cfg.model)
    # prompt + completion must fit the positions the model knows (and the engine's own cap)
    ctx = get_spec(cfg.backend).context(context_length(cfg.model), cfg.engine_options())
    if ctx and cfg.max_new_tokens and cfg.max_new_tokens >= ctx:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's "
                        f"{ctx}-token context")
    records, skipped = load_prompts(cfg.prompts, limit=cfg.limit)
    mine = records[cfg.worker_index:: cfg.num_workers]
    chunks = [mine[k: k + cfg.chunk_size] for k in range(0, len(mine), cfg.chunk_size)]
    backend = get_backend(cfg.backend, cfg.model, cfg.engine_options())
    if cfg.max_new_tokens is None:  # from all records, so every worker of a run resolves the same budget
        cfg = replace(cfg, max_new_tokens=default_budget(records, backend.tokenizer, cfg.model))
    meta = {"model": str(cfg.model), "model_fingerprint": model_fingerprint(cfg.model),
            "tokenizer_fingerprint": tokenizer_fingerprint(backend.tokenizer),
            "sampling": sampling_meta(cfg), "backend": cfg.backend, "prompts": str(cfg.prompts),
            "prompts_fingerprint": prompts_fingerprint(records), "num_workers": cfg.num_workers,
            "seed": cfg.seed}
    scfg = SamplingConfig(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    stats = {"groups": 0, "rollouts": 0, "tokens": 0, "truncated": 0, "reward_sum": 0.0, "skipped_prompts": len(skipped)}

    def summarize(st: dict) -> None:
        st["skipped_prompts"] = len(skipped)
        st["mean_reward"] = st["reward_sum"] / st["rollouts"] if st["rollouts"] else None
        st["skipped"] = skipped[:20]
        st["max_new_tokens"] = cfg.max_new_tokens

    units = [Unit(cfg.worker_index, ci, lambda c=c: c) for ci, c in enumerate(chunks)]
    return run_stage(Path(cfg.out), "sample", meta, units,
                     lambda c: _sample_chunk(c, backend, cfg, scfg, ctx, stats, skipped, progress),
                     differs=lambda have: existing_differs(have, {**meta, "stage": "sample"}), config=cfg,
                     stats=stats, workers=[cfg.worker_index], summarize=summarize,
                     on_start=(lambda: progress(0, 0, total=len(mine) * cfg.group_size)) if progress else None,
                     on_skip=(lambda u: progress(len(chunks[u.chunk]) * cfg.group_size, 0)) if progress else None)
