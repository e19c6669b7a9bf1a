"""Generation backends: prompts in, per-sample token ids + sampled-token logprobs out.

Every backend implements the same three calls (``Backend`` below) and returns the same
``Sample`` record (for a prompt with a ``prefix``, the sample is the continuation after it), so ``dfgen sample``, ``dfgen repair --repairer model`` and ``dftrain eval``
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
    prefix: tuple = ()  # token ids the answer starts with (the resample repairer's kept lines); generation continues them


class Backend(Protocol):
    name: str
    tokenizer: object  # the policy tokenizer (fingerprints, decoding, suppression ids)
    offline_prompt_ids: bool  # prompt_ids needs no engine call (safe for prompts beyond the context)

    def prompt_ids(self, prompts: list[Prompt]) -> list[list[int]]: ...

    def generate(self, prompts: list[Prompt], seeds: list[list[int]], cfg: SamplingConfig) -> list[list[Sample]]: ...

    def score(self, prompts: list[Prompt], completions: list[list[int]], temperature: float = 1.0) -> list[list[float]]: ...


@dataclass(frozen=True)
class EngineOptions:
    """What a command knows about the engine it asks for; each backend takes the fields it uses
    (``BackendSpec.takes``), so no caller switches on the engine's name."""

    batch_size: int = 64
    device: str = "auto"  # in-process engines (hf): auto | cpu | cuda | cuda:N
    seed: int = 0  # engine seed (vllm); every sample also carries its own
    tensor_parallel_size: int = 1  # vllm
    max_model_len: int = 1024  # vllm: prompt + completion tokens
    gpu_memory_utilization: float = 0.9  # vllm
    dtype: str = "auto"  # vllm: "auto" = the checkpoint's dtype


@dataclass(frozen=True)
class BackendSpec:
    """A registered engine, named without importing it (vLLM is an optional install)."""

    module: str
    cls: str
    takes: tuple[str, ...]  # the EngineOptions fields its constructor takes
    needs: str | None = None  # an optional install, named in the error when it is missing
    in_process: bool = False  # runs the policy in this process on --device (repair reuses its scorer model)
    caps_context: bool = False  # max_model_len bounds prompt + completion, below the model's own context

    def gpus(self, opts: EngineOptions) -> int:
        """GPUs one worker of this engine reserves on a Ray cluster (in-process engines: none)."""
        return opts.tensor_parallel_size if "tensor_parallel_size" in self.takes else 0

    def context(self, model_ctx: int | None, opts: EngineOptions) -> int | None:
        """Tokens a prompt plus its completion may use."""
        return min(model_ctx or opts.max_model_len, opts.max_model_len) if self.caps_context else model_ctx


# the registry: one place that names the engines (the CLI's choices come from it)
BACKENDS: dict[str, BackendSpec] = {}


def register_backend(name: str, spec: BackendSpec) -> None:
    BACKENDS[name] = spec


register_backend("hf", BackendSpec("dfgen.backends.hf", "HFBackend", takes=("batch_size", "device"), in_process=True))
register_backend("vllm", BackendSpec("dfgen.backends.vllm", "VLLMBackend", needs="vLLM installed (make setup-vllm)",
                                     takes=("batch_size", "seed", "tensor_parallel_size", "max_model_len",
                                            "gpu_memory_utilization", "dtype"), caps_context=True))
BackendName = Enum("BackendName", {k: k for k in BACKENDS}, type=str)  # the CLI option type


def get_spec(name: str) -> BackendSpec:
    """The registered engine ``name``; a one-line UserError for an unknown one or a missing install."""
    import importlib.util

    from dfgen.errors import UserError

    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} ({' or '.join(BACKENDS)})")
    spec = BACKENDS[name]
    if spec.needs and importlib.util.find_spec(name) is None:  # before anything loads (engines import lazily)
        raise UserError(f"the {name} backend needs {spec.needs}; this environment has no {name} module")
    return spec


def get_backend(name: str, model_dir, opts: EngineOptions | None = None, **kwargs) -> Backend:
    """Engine ``name`` on ``model_dir`` with the options it takes from ``opts``; ``kwargs`` go to its
    constructor as they are (e.g. an in-memory ``model=``)."""
    import importlib

    spec = get_spec(name)
    kw = {k: getattr(opts, k) for k in spec.takes} if opts is not None else {}
    if "device" in kw:
        from dfgen.policy import resolve_device

        kw["device"] = resolve_device(kw["device"])
    return getattr(importlib.import_module(spec.module), spec.cls)(model_dir, **(kw | kwargs))
