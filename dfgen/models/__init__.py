"""The model-family layer: what differs between VLM families, declared once per family.

Every stage reaches a checkpoint's family through ``family_of`` (keyed by ``config.json``'s
``model_type``), never by class names of its own. A ``Family`` declares:

* ``nest_images``: the processor wants images nested per prompt (``[[im], [im]]``), not flat;
* ``turn_end``: the token that ends the assistant's turn. The loaded tokenizer's EOS is set to it
  (Gemma's tokenizer says ``<eos>``, its chat turns end at ``<end_of_turn>``), so every stage that
  stops on, appends or keeps EOS (sampling, repair, sft targets, suppression) uses the turn end;
* ``vision_tower``: module paths of the vision encoder (and its projector), for ``--freeze-vision``
  and sft's vision lr; a path that finds no module in a loaded model is an error, never a no-op;
* ``lora_targets``: a regex over module names matching the text model's attention projections;
  ``lora_targets`` refuses one that matches nothing;
* ``packages``: pure-Python packages its processor imports (named in the error when missing);
* ``grid_split``: image tensors are patch rows sized by ``image_grid_thw`` (the Qwen families), so
  a batch splits per prompt (``split_images``); other families' rows are tiles, patches or prompts,
  and sft encodes their prompts one at a time;
* ``fast_decode``: the hf backend's lean decode loop applies (``dfgen.backends.fast_decode``);
* ``save_renames``: (pattern, replacement) pairs that ``save_model`` applies to saved weight names,
  so that a checkpoint we write has the hub layout vLLM loads. transformers 5.25 writes a SigLIP
  tower (Gemma 3, LLaVA-OneVision) as ``vision_tower.*``; the hub and vLLM 0.32 have
  ``vision_tower.vision_model.*``, which transformers reads back to the same weights.

Processors are loaded and saved generically (``load_processor``/``save_processor``): the processor
class named in ``processor_config.json`` (else the family's), its own settings from there, the
image processor (the PIL one when torchvision is absent), the tokenizer and the chat template, and
no video processor (none of our stages reads video; building one needs torchvision; ``NoVideo`` stands in
its place and refuses video). A saved
checkpoint keeps the class and settings it was loaded with.

An unknown ``model_type`` is a one-line error naming the supported ones.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dfgen.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    processor_class: str
    vision_tower: tuple[str, ...]
    lora_targets: str
    turn_end: str | None = None
    nest_images: bool = False
    packages: tuple[str, ...] = ()
    grid_split: bool = False
    fast_decode: bool = False
    save_renames: tuple[tuple[str, str], ...] = ()
    # the prompt can run once per group with its completions continuing its key/value cache, giving
    # the plain forward's log-probs and gradients (dfgen.policy.shared_prefix_logprobs; tested per family)
    shared_prefix: bool = False


def _families() -> tuple[Family, ...]:
    from dfgen.models import others, qwen

    return qwen.FAMILIES + others.FAMILIES


FAMILIES: tuple[Family, ...] = _families()
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> str:
    return ", ".join(sorted(_BY_TYPE))


def family_for_type(model_type: str | None) -> Family:
    if model_type not in _BY_TYPE:
        raise UserError(f"unsupported model family {model_type!r} (supported model_type: {supported()})")
    return _BY_TYPE[model_type]


def family_of(obj) -> Family:
    """The family of a loaded model, a config (object or dict) or a checkpoint folder."""
    if isinstance(obj, (str, Path)):
        try:
            obj = json.loads((Path(obj) / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{obj}: cannot read config.json ({e})") from None
    if isinstance(obj, dict):
        return family_for_type(obj.get("model_type"))
    cfg = getattr(obj, "config", obj)
    return family_for_type(getattr(cfg, "model_type", None))


# ----------------------------------------------------------------------------- processors
def _torchvision_ok() -> bool:
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:
        return False


class NoVideo(dict):
    """Stands where a processor's video processor goes (none is built: that needs torchvision, and no
    stage reads video). It carries the two settings SmolVLM's ``apply_chat_template`` reads, unset
    (TRL renders prompts through it), refuses to process a video in one line, and serialises as an
    empty dict (``processor.to_dict()``)."""

    num_frames = fps = None

    def __call__(self, *args, **kwargs):
        raise UserError("this processor was loaded without a video processor: video inputs are not supported")


@contextmanager
def _allow_missing(names=("video_processor",)):
    """Let a processor be built with ``video_processor=None`` (its class check refuses None)."""
    from transformers.processing_utils import ProcessorMixin

    orig = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        return None if arg is None and name in names else orig(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = orig


def _image_processor(path: Path, trust_remote_code: bool):
    """The folder's image processor; its PIL variant when torchvision is absent (no warning)."""
    import transformers

    f = path / "preprocessor_config.json"
    name = json.loads(f.read_text()).get("image_processor_type", "") if f.is_file() else ""
    name = name.removesuffix("Fast")
    if name and not name.endswith("Pil") and not _torchvision_ok() and hasattr(transformers, name + "Pil"):
        return getattr(transformers, name + "Pil").from_pretrained(path)
    return transformers.AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The checkpoint's tokenizer as its processor holds it (some processors add special tokens; EOS
    is the family's turn end): what stages without images (mask) tokenize and fingerprint with. A
    folder with a tokenizer but no model config gets the tokenizer as saved."""
    import transformers

    path = Path(path)
    if (path / "config.json").is_file():
        return load_processor(path, trust_remote_code=trust_remote_code).tokenizer
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_processor(path: Path, trust_remote_code: bool = False):
    """The checkpoint's processor, left-padding, built from its pieces (see the module docstring)."""
    import transformers

    path = Path(path)
    fam = family_of(path)
    missing = [p for p in fam.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"the {fam.name} processor needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)}")
    settings = json.loads((path / "processor_config.json").read_text()) if (path / "processor_config.json").is_file() else {}
    cls_name = settings.pop("processor_class", None) or fam.processor_class
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise UserError(f"{path}: unknown processor_class {cls_name!r}")
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in settings.items() if k in params and k not in ("image_processor", "tokenizer")}
    tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    chat = (path / "chat_template.jinja").read_text() if (path / "chat_template.jinja").is_file() else None
    kwargs |= dict(image_processor=_image_processor(path, trust_remote_code), tokenizer=tok,
                   chat_template=chat or getattr(tok, "chat_template", None))
    if "video_processor" in params:
        kwargs["video_processor"] = None
    with _allow_missing():
        proc = cls(**kwargs)
    if "video_processor" in params:
        proc.video_processor = NoVideo()
    proc.tokenizer.padding_side = "left"
    _set_turn_end(proc.tokenizer, fam, path)
    proc.df_family = fam
    return proc


def _set_turn_end(tok, fam: Family, path: Path) -> None:
    if fam.turn_end is None or tok.eos_token == fam.turn_end:
        return
    if fam.turn_end not in tok.get_vocab():
        raise UserError(f"{path}: the tokenizer has no {fam.turn_end!r}, the {fam.name} turn end")
    tok.eos_token = fam.turn_end


def processor_family(processor) -> Family:
    """The family a processor was loaded for (``load_processor``), else the one whose class it is."""
    fam = getattr(processor, "df_family", None)
    if fam is not None:
        return fam
    name = type(processor).__name__
    for f in FAMILIES:
        if f.processor_class == name:
            return f
    raise UserError(f"no supported model family uses the processor {name} (supported model_type: {supported()})")


def save_model(model, d: Path, state_dict: dict | None = None) -> None:
    """``model.save_pretrained(d)`` in safetensors, with the family's ``save_renames`` applied to
    the weight names of every shard and of the shard index; ``state_dict``: the weights to write
    when the module holds only a shard of them (FSDP gathers them first)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = Path(d)
    model.save_pretrained(d, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    renames = [(re.compile(p), r) for p, r in family_of(model).save_renames]
    if not renames:
        return

    def rename(k: str) -> str:
        for p, r in renames:
            k = p.sub(r, k)
        return k

    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            meta, tensors = sf.metadata(), {rename(k): sf.get_tensor(k) for k in sf.keys()}
        save_file(tensors, f, metadata=meta)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {rename(k): v for k, v in idx["weight_map"].items()}
        index.write_text(json.dumps(idx, indent=2))


_NOT_SETTINGS = ("image_processor", "video_processor", "tokenizer", "chat_template", "processor_class",
                 "audio_tokenizer", "feature_extractor")


def save_processor(processor, d: Path) -> None:
    """Write what ``load_processor`` reads: tokenizer, image processor, chat template, and the
    processor's class and own settings in ``processor_config.json`` (no video processor)."""
    d = Path(d)
    processor.tokenizer.save_pretrained(d)
    processor.image_processor.save_pretrained(d)
    chat = processor.chat_template or getattr(processor.tokenizer, "chat_template", None)
    if chat:
        (d / "chat_template.jinja").write_text(chat if isinstance(chat, str) else chat["default"])
    own = {k: v for k, v in processor.to_dict().items() if k not in _NOT_SETTINGS and _jsonable(v)}
    (d / "processor_config.json").write_text(json.dumps({"processor_class": type(processor).__name__, **own}, indent=2))


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


# ----------------------------------------------------------------------------- per-family behaviour
def _get(model, path: str):
    m = model
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def vision_modules(model) -> list:
    """The vision tower (and projector) modules of a loaded model; a UserError if none is found."""
    fam = family_of(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mods = [m for p in fam.vision_tower if (m := _get(base, p)) is not None]
    if not mods:
        raise UserError(f"no vision tower found in this {fam.name} model (looked for {', '.join(fam.vision_tower)})")
    return mods


def vision_parameters(model) -> list:
    """Every parameter of the vision tower and projector (a module path may name a bare parameter)."""
    import torch

    seen, out = set(), []
    for m in vision_modules(model):
        for q in ([m] if isinstance(m, torch.nn.Parameter) else m.parameters()):
            if id(q) not in seen:
                seen.add(id(q))
                out.append(q)
    return out


def lora_targets(model) -> str:
    """The family's LoRA target regex, checked to match at least one module of ``model``."""
    fam = family_of(model)
    rx = re.compile(fam.lora_targets)
    if not any(rx.fullmatch(n) for n, _ in model.named_modules()):
        raise UserError(f"the {fam.name} LoRA targets {fam.lora_targets!r} match no module of this model")
    return fam.lora_targets


def split_images(enc, has_image: list[bool], fam: Family) -> list[dict] | None:
    """Per-prompt image tensors of one processor batch, ``out[i]`` prompt i's (empty without an
    image), for families whose image tensors are patch rows sized by ``image_grid_thw``; None for
    the others (their rows are tiles, patches or prompts: encode such prompts one at a time)."""
    if not fam.grid_split:
        return None
    out: list[dict] = [{} for _ in has_image]
    if "image_grid_thw" not in enc:
        return out
    sizes = enc["image_grid_thw"].prod(-1).tolist()
    pix = list(enc["pixel_values"].split(sizes))
    for j, i in enumerate(i for i, h in enumerate(has_image) if h):
        out[i] = {"pixel_values": pix[j], "image_grid_thw": enc["image_grid_thw"][j: j + 1]}
    return out
