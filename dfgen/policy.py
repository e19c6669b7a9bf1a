"""Policy I/O: load any HF VLM folder, render prompts, score tokens, fingerprint, save processors.
(The tiny offline policy is built by ``dfgen.tiny``; images are checked by ``dfgen.images``.)

``load_policy(path)`` returns ``(model, processor)`` for any HF image-text-to-text folder (the
tiny one, or any family ``dfgen.models`` declares). The processor is assembled by
``dfgen.models.load_processor`` (no video processor, no torchvision). Weights load as safetensors
only; ``trust_remote_code`` is off unless asked for.

``prompt_inputs`` renders chat prompts (image placeholder + question) through the processor;
``completion_inputs`` appends exact completion token ids to those inputs (every token-aligned
tensor is extended, so the dict stays opaque to callers); ``token_logprobs`` scores the
completion tokens by teacher forcing under the same suppression mask and temperature used for
sampling, so behaviour and current logprobs agree.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dfgen.errors import UserError
from dfgen.models import family_of, load_processor, processor_family  # noqa: F401 (load_processor re-exported)


# ----------------------------------------------------------------------------- loading
def check_policy_dir(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        c = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg} is not valid JSON: {e}") from None
    if "vision_config" not in c:
        raise UserError(f"{path} is not a vision-language model (config.json has no vision_config)")
    family_of(c)  # an unsupported family: one line naming the supported ones
    if not list(path.glob("*.safetensors")):
        raise UserError(f"{path} has no .safetensors weights (only safetensors checkpoints are loaded)")
    return path


def check_device(device: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, else UserError (no torch import: configs call it)."""
    d = str(device)
    if d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise UserError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)")


def resolve_device(device: str) -> str:
    """The one device rule of every command: ``auto`` is cuda when torch sees a GPU, else cpu."""
    if check_device(device) != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_policy(path: Path, dtype=None, device: str = "cpu", trust_remote_code: bool = False):
    """Return ``(model, processor)`` for an HF VLM folder. Raises UserError on a non-VLM folder."""
    import torch
    import transformers

    path = check_policy_dir(path)
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot load {path} as an image-text-to-text model: {str(e).splitlines()[0]}") from None
    model.to(device)
    return model, load_processor(path, trust_remote_code=trust_remote_code)


# ----------------------------------------------------------------------------- fingerprints
def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: shards are only valid for the same tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps([vocab, tokenizer.all_special_tokens, tokenizer.eos_token], ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_fingerprint(path: Path) -> str:
    """Cheap checkpoint identity: config plus size and head/tail bytes of every weight file."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- inputs and logprobs
def suppress_ids(tokenizer) -> list[int]:
    """Special tokens that must never be sampled (all added special tokens but EOS):
    a sampled ``<|image_pad|>`` breaks the next forward pass."""
    ids = set(tokenizer.all_special_ids)
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    ids.discard(tokenizer.eos_token_id)
    return sorted(ids)


def context_length(model_dir: Path) -> int | None:
    """Longest sequence (prompt + completion) the checkpoint's positions cover, from its
    config.json (``max_position_embeddings`` of the text model); None if not recorded."""
    try:
        c = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for d in (c.get("text_config") or {}, c):
        n = d.get("max_position_embeddings") if isinstance(d, dict) else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def chat_text(processor, question: str, has_image: bool) -> str:
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    msgs = [{"role": "user", "content": content}]
    # the processor's template through its tokenizer: some processors' own renderer reads their
    # (absent) video processor's settings
    return processor.tokenizer.apply_chat_template(msgs, chat_template=processor.chat_template,
                                                   add_generation_prompt=True, tokenize=False)


def prompt_inputs(processor, questions: list[str], images: list):
    """Left-padded model inputs for a batch of prompts (images: PIL or None per prompt)."""
    texts = [chat_text(processor, q, im is not None) for q, im in zip(questions, images)]
    imgs = [im for im in images if im is not None]
    if imgs and processor_family(processor).nest_images:
        imgs = [[im] if im is not None else [] for im in images]
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=imgs or None, return_tensors="pt", padding=True)


def prompt_lengths(processor, prompts: list, batch_size: int = 64) -> list[int]:
    """Token count of each prompt (``dfgen.backends.Prompt``) as the policy's processor builds it,
    image placeholders expanded; no model or engine call, so it is safe for prompts too long to run."""
    out: list[int] = []
    for k in range(0, len(prompts), batch_size):
        chunk = prompts[k: k + batch_size]
        enc = prompt_inputs(processor, [p.question for p in chunk], [p.image for p in chunk])
        out += enc["attention_mask"].sum(-1).tolist()
    return out


def completion_inputs(inputs, completions: list[list[int]], pad_id: int):
    """Append completion ids to left-padded prompt inputs (right-padded), extending every
    token-aligned tensor; returns (inputs, completion_mask (B, Tc))."""
    import torch

    ids = inputs["input_ids"]
    B, L = ids.shape
    Tc = max(1, max((len(c) for c in completions), default=1))
    comp = torch.full((B, Tc), pad_id, dtype=ids.dtype)
    cmask = torch.zeros((B, Tc), dtype=torch.long)
    for i, c in enumerate(completions):
        comp[i, : len(c)] = torch.as_tensor(c, dtype=ids.dtype)
        cmask[i, : len(c)] = 1
    out = dict(inputs)
    for k, v in inputs.items():
        if not hasattr(v, "shape") or v.dim() != 2 or v.shape[0] != B or v.shape[1] != L:
            continue
        if k == "input_ids":
            out[k] = torch.cat([v, comp], 1)
        elif k == "attention_mask":
            out[k] = torch.cat([v, cmask.to(v.dtype)], 1)
        else:  # other per-token fields (e.g. mm_token_type_ids): text tokens are type 0
            out[k] = torch.cat([v, torch.zeros((B, Tc), dtype=v.dtype)], 1)
    return out, cmask


def prefix_inputs(inputs, prefixes: list, pad_id: int):
    """Left-padded prompt inputs with each row's ``prefixes[i]`` (token ids) appended right after its
    prompt, still left-padded (generation continues from the last column of every row)."""
    import torch

    out, cmask = completion_inputs(inputs, [list(p) for p in prefixes], pad_id)
    shift = (cmask.shape[1] - cmask.sum(-1)).tolist()  # each row's trailing padding, moved to the left
    for k, v in out.items():
        if hasattr(v, "shape") and v.dim() == 2 and v.shape == out["input_ids"].shape:
            out[k] = torch.stack([torch.roll(row, s) for row, s in zip(v, shift)])
    return type(inputs)(out)  # the processor's BatchFeature (``.to(device)``)


def token_logprobs(model, inputs, n_completion: int, suppress: list[int] | None = None,
                   temperature: float = 1.0):
    """Logprobs (B, Tc) of the last ``n_completion`` input tokens under the model, with the
    sampling suppression mask and temperature applied (same distribution as the sampler)."""
    import torch

    out = model(**inputs, use_cache=False, logits_to_keep=n_completion + 1)
    logits = out.logits[:, -(n_completion + 1):-1, :].float()  # (B, Tc, V) predicts the completion
    if temperature != 1.0:
        logits = logits / temperature
    if suppress:
        logits[..., suppress] = float("-inf")
    targets = inputs["input_ids"][:, -n_completion:]
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _cache_kwarg(model) -> str:
    """The forward's name for a key/value cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    base = getattr(model, "module", model)  # DDP
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # peft
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def shared_prefix_logprobs(model, prompt_inputs_1: dict, completions, suppress: list[int] | None = None,
                           temperature: float = 1.0):
    """Logprobs (n, Tc) of ``completions`` (n, Tc) right-padded ids, all continuing ONE prompt, with the
    prompt run once: ``prompt_inputs_1`` (one row, image included) goes through the model with its
    key/value cache kept (and its gradient), the cache is expanded to n rows (a view), and the n
    completions run on top of it. Their positions continue the prompt's: ``P + t``, plus the prompt's
    M-RoPE offset (``rope_deltas``) where the model has one. The same distribution as
    ``token_logprobs`` on the concatenated rows (suppression mask and temperature applied).
    A family is served this way only where its test shows it exact (``Family.shared_prefix``)."""
    import torch

    n, T = completions.shape
    P = prompt_inputs_1["input_ids"].shape[1]
    mrope = [m for m in model.modules() if hasattr(m, "rope_deltas")]
    for m in mrope:  # set afresh by this prompt's forward (stale from another call otherwise)
        m.rope_deltas = None
    po = model(**prompt_inputs_1, use_cache=True, logits_to_keep=1)
    cache = getattr(po, "cache", None) or po.past_key_values
    for layer in cache.layers:  # one prompt, n continuations: broadcast, no copy until the cache grows
        layer.keys, layer.values = layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)
    kw = {"input_ids": completions}
    for k, v in prompt_inputs_1.items():  # per-token fields (token types): text tokens are type 0
        if k not in ("input_ids", "attention_mask") and hasattr(v, "shape") and v.dim() == 2 and v.shape[1] == P:
            kw[k] = torch.zeros((n, T), dtype=v.dtype, device=v.device)
    pos = torch.arange(P, P + T, device=completions.device)
    deltas = next((m.rope_deltas for m in mrope if m.rope_deltas is not None), None)
    if deltas is not None:  # M-RoPE: text after the prompt sits at its max position + 1 on all three axes
        kw["position_ids"] = (pos + deltas.reshape(-1)[0]).view(1, 1, T).expand(3, n, T)
    else:
        kw["position_ids"] = pos.view(1, T).expand(n, T)
    co = model(**kw, **{_cache_kwarg(model): cache}, use_cache=True)
    logits = torch.cat([po.logits[:, -1:].expand(n, 1, -1), co.logits[:, :-1]], 1).float()  # (n, Tc, V)
    if temperature != 1.0:
        logits = logits / temperature
    if suppress:
        logits[..., suppress] = float("-inf")
    return torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
