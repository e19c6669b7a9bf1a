"""The transformers backend: batched ``generate`` with KV cache, left padding, per-sample seeds.

Sampling runs inside ``generate`` as its last logits processor (``_SeededSampler``): it applies
the suppression mask, temperature and top-p, draws each row's token from that row's own
``torch.Generator`` (seeded per sample), records the log-probability of the drawn token under
exactly that distribution, and forces ``generate`` (in greedy mode) to take it. So:

* behaviour logprobs are those of the distribution sampled from: ``log softmax(z / T)`` over
  the non-suppressed tokens, renormalised over the top-p nucleus when ``top_p < 1``;
* at ``top_p = 1`` they equal teacher-forced logprobs at the same temperature (tested to 1e-4);
* a sample depends on its seed, not on the other rows of its batch (up to float noise of
  left padding).
Greedy (``temperature == 0``) takes the argmax and stores its log-probability at T = 1.

Decoding itself runs in ``fast_decode`` (a lean loop over the model's own weights; faster than
``generate`` on the tiny policy on CPU, BENCHMARKS.md has the ratio) whenever it supports the model and batch, else in
``generate``; both feed the same sampler, give the same tokens (tested), and
``HFBackend(fast_decode=False)`` forces ``generate``.
"""
from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from dfgen.backends import Prompt, Sample, SamplingConfig
from dfgen.backends import fast_decode as _fast
from dfgen.errors import UserError
from dfgen.policy import completion_inputs, load_policy, prefix_inputs, prompt_inputs, suppress_ids, token_logprobs


class _SeededSampler(LogitsProcessor):
    def __init__(self, seeds: list[int], cfg: SamplingConfig, suppress: list[int]):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.cfg, self.suppress = cfg, suppress
        self.logprobs: list[torch.Tensor] = []
        self._u, self._t = None, 0

    def _uniforms(self):
        """One U(0,1) per row, from that row's generator. Drawn in blocks of max_new_tokens per
        row (one call instead of one per token): a generator gives the same numbers either way."""
        if self._u is None or self._t >= self._u.shape[1]:
            n = max(1, self.cfg.max_new_tokens)
            self._u, self._t = torch.stack([torch.rand(n, generator=g) for g in self.gens]), 0
        self._t += 1
        return self._u[:, self._t - 1]

    def draw(self, scores):
        """Next token per row from last-position logits (B, V); records its logprob."""
        z = scores.float()
        if self.suppress:
            z[:, self.suppress] = float("-inf")
        if self.cfg.temperature <= 0:
            tok = z.argmax(-1)
            lp = torch.log_softmax(z, -1)
        else:
            z = z / self.cfg.temperature
            if self.cfg.top_p < 1.0:
                sz, si = z.sort(-1, descending=True)
                cum = torch.softmax(sz, -1).cumsum(-1)
                drop = cum - torch.softmax(sz, -1) >= self.cfg.top_p  # keep the smallest nucleus
                sz = sz.masked_fill(drop, float("-inf"))
                z = torch.full_like(z, float("-inf")).scatter(-1, si, sz)
            lp = torch.log_softmax(z, -1)
            cdf = lp.exp().cumsum(-1)
            u = self._uniforms() * cdf[:, -1]
            # right=True: the first token whose cdf exceeds u, so a zero-probability token (a
            # suppressed id, p underflowed to 0) is never drawn, even when u is exactly 0 or lands
            # on a plateau of the cdf (that drew -inf logprobs once in ~250k draws)
            tok = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1).clamp_max(z.shape[-1] - 1)
        self.logprobs.append(lp.gather(-1, tok.unsqueeze(-1)).squeeze(-1))
        return tok

    def __call__(self, input_ids, scores):  # as generate()'s last logits processor
        tok = self.draw(scores)
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(-1, tok.unsqueeze(-1), 0.0)
        return forced


class HFBackend:
    name = "hf"
    offline_prompt_ids = True  # the processor alone renders them

    def __init__(self, model_dir, batch_size: int = 64, device: str = "cpu", dtype=None,
                 trust_remote_code: bool = False, model=None, processor=None, fast_decode: bool = True):
        if model is None:
            model, processor = load_policy(model_dir, dtype=dtype, device=device,
                                           trust_remote_code=trust_remote_code)
        self.model, self.processor = model.eval(), processor
        self.tok = self.tokenizer = processor.tokenizer
        self.suppress = suppress_ids(self.tok)
        self.batch_size = batch_size
        self.fast_decode = fast_decode
        cfg = getattr(model.config, "text_config", None) or model.config
        self.context = getattr(cfg, "max_position_embeddings", None)  # positions the model was built for

    def _inputs(self, prompts: list[Prompt]):
        inputs = prompt_inputs(self.processor, [p.question for p in prompts], [p.image for p in prompts])
        if any(p.prefix for p in prompts):
            inputs = prefix_inputs(inputs, [p.prefix for p in prompts], self.tok.pad_token_id)
        return inputs

    def prompt_ids(self, prompts):
        ids = self._inputs(prompts)
        return [row[m.bool()].tolist() for row, m in zip(ids["input_ids"], ids["attention_mask"])]

    @torch.no_grad()
    def generate(self, prompts, seeds, cfg: SamplingConfig):
        flat = [(i, s) for i, ss in enumerate(seeds) for s in ss]
        out: list[list[Sample]] = [[] for _ in prompts]
        for k in range(0, len(flat), self.batch_size):
            chunk = flat[k: k + self.batch_size]
            for (i, _), smp in zip(chunk, self._generate(prompts, chunk, cfg)):
                out[i].append(smp)
        return out

    def _generate(self, prompts, chunk, cfg):
        """Samples for ``chunk``, a list of (prompt index, seed); each distinct prompt is rendered
        and prefilled once on the fast path (a group's samples share it)."""
        uniq = list(dict.fromkeys(i for i, _ in chunk))
        inputs = self._inputs([prompts[i] for i in uniq]).to(self.model.device)
        n = int(inputs["attention_mask"].sum(-1).max())
        if self.context and n + cfg.max_new_tokens > self.context:  # would decode garbage past the positions
            raise UserError(f"prompt too long ({n} tokens + {cfg.max_new_tokens} new > the model's "
                            f"{self.context}-token context)")
        sampler = _SeededSampler([s for _, s in chunk], cfg, self.suppress)
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        if self.fast_decode and _fast.supported(self.model, inputs):
            at = {i: j for j, i in enumerate(uniq)}
            rows = torch.tensor([at[i] for i, _ in chunk], device=self.model.device)
            gen = _fast.decode(self.model, inputs, cfg.max_new_tokens, eos, sampler.draw, rows=rows)
        else:
            inputs = self._inputs([prompts[i] for i, _ in chunk]).to(self.model.device)
            gc = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=pad, num_beams=1)
            seqs = self.model.generate(**inputs, generation_config=gc,
                                       logits_processor=LogitsProcessorList([sampler]))
            gen = seqs[:, inputs["input_ids"].shape[1]:].tolist()
        lps = torch.stack(sampler.logprobs, 1).tolist() if sampler.logprobs else [[] for _ in gen]
        res = []
        for ids, lp in zip(gen, lps):
            n = ids.index(eos) + 1 if eos in ids else len(ids)
            ids = ids[:n]
            res.append(Sample(token_ids=ids, logprobs=lp[:n], finish_reason="stop" if ids and ids[-1] == eos else "length",
                              text=self.tok.decode(ids, skip_special_tokens=True)))
        return res

    @torch.no_grad()
    def score(self, prompts, completions, temperature: float = 1.0):
        out = []
        for k in range(0, len(prompts), self.batch_size):
            ps, cs = prompts[k: k + self.batch_size], completions[k: k + self.batch_size]
            inputs, cmask = completion_inputs(self._inputs(ps), cs, self.tok.pad_token_id)
            lp = token_logprobs(self.model, inputs, cmask.shape[1], self.suppress, temperature)
            out += [row[: len(c)].tolist() for row, c in zip(lp, cs)]
        return out
