"""Generation backends: prompts in, per-sample token ids + sampled-token logprobs out.

Every backend implements the same three calls (``Backend`` below) and returns the same
``Sample`` record, so ``dfgen sample``, ``dfgen repair --repairer model`` and ``dftrain eval``
do not know which engine ran. Seeds are per sample (derived by the caller from
(seed, prompt id, sample index)), so a sample does not depend on which batch it landed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass
class Sample:
    token_ids: list  # sampled ids, EOS included when the sample stopped
    logprobs: list  # log-prob of each sampled id under the distribution actually sampled from
    text: str  # decoded, special tokens skipped
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class Prompt:
    question: str
    image: object  # PIL image or None


class Backend(Protocol):
    name: str
    tokenizer: object  # the policy tokenizer (fingerprints, decoding, suppression ids)
    offline_prompt_ids: bool  # prompt_ids needs no engine call (safe for prompts beyond the context)

    def prompt_ids(self, prompts: list[Prompt]) -> list[list[int]]: ...

    def generate(self, prompts: list[Prompt], seeds: list[list[int]], cfg: SamplingConfig) -> list[list[Sample]]: ...

    def score(self, prompts: list[Prompt], completions: list[list[int]], temperature: float = 1.0) -> list[list[float]]: ...


# the registry: name -> (module, class); one place that names the engines (CLI choices come from it)
BACKENDS = {"hf": ("dfgen.backends.hf", "HFBackend"), "vllm": ("dfgen.backends.vllm", "VLLMBackend")}
_NEEDS = {"vllm": "vLLM installed (make setup-vllm)"}  # engines that are an optional install
BackendName = Enum("BackendName", {k: k for k in BACKENDS}, type=str)  # the CLI option type


def get_backend(name: str, model_dir, **kwargs) -> Backend:
    import importlib.util

    from dfgen.errors import UserError

    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} ({' or '.join(BACKENDS)})")
    if name in _NEEDS and importlib.util.find_spec(name) is None:  # before anything loads (engines import lazily)
        raise UserError(f"the {name} backend needs {_NEEDS[name]}; this environment has no {name} module")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(model_dir, **kwargs)
