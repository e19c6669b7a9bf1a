"""Run under ``torchrun --nproc_per_node 2 -m tests.fsdp_meta_worker OUT.json DIR...`` (a helper of
``tests/test_parallel.py``): for each checkpoint folder, load it as ``dftrain fit --fsdp`` does
(rank 0 reads it, rank 1 builds it on the meta device), shard it, and compare with the checkpoint
loaded whole on every rank: the gathered weights, every buffer (non-persistent ones included), and
a text-only forward's logits. Then once more for the first folder in bfloat16 with its vision
merger kept in float32 by ``from_pretrained`` (``_keep_in_fp32_modules_strict``, as some models
declare), which the meta-built rank must follow. Rank 0 writes ``{folder: [rank 0's checks,
rank 1's]}`` to OUT.json."""
import json
import sys
from pathlib import Path

import torch


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max([0.0, *((a[k].double() - b[k].double()).abs().max().item() for k in a)])


def check(par, folder: Path, dtype=None) -> dict:
    from dfgen.models import vision_parameters
    from dfgen.policy import load_policy

    model, _ = par.load_policy(folder, dtype=dtype)
    meta = [t.is_meta for t in [*model.parameters(), *model.buffers()]]
    for q in vision_parameters(model):  # as fit does: FSDP2 wants one dtype per unit's trainable parameters
        q.requires_grad_(False)
    ref, _ = load_policy(folder, dtype=dtype)
    par.wrap(model)
    full = par.full_state_dict(model)  # rank 0: the whole model, tied copies dropped as save_pretrained does
    res = {"meta_before_wrap": all(meta), "read_before_wrap": not any(meta),
           "dtypes_as_loaded": all(p.dtype == q.dtype for p, q in zip(model.parameters(), ref.parameters())),
           "float32_kept": sorted({str(p.dtype) for p in ref.parameters()}) == ["torch.bfloat16", "torch.float32"]}
    res["buffers"] = _max_diff(dict(model.named_buffers()), dict(ref.named_buffers()))
    if par.main:
        sd = ref.state_dict()
        res["weights"] = _max_diff(full, {k: sd[k] for k in full})  # a key the checkpoint lacks: KeyError
    ids = torch.arange(3, 11).unsqueeze(0)
    with torch.no_grad():
        res["logits"] = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    return res


def main() -> None:
    from dftrain.parallel import Parallel

    torch.set_num_threads(1)
    par = Parallel.start(fsdp=True)
    out, folders = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
    results = {}
    for name, f, dtype in [*((f.name, f, None) for f in folders), (folders[0].name + "+bf16", folders[0], torch.bfloat16)]:
        if dtype is not None:
            from transformers import AutoConfig
            from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING as classes

            classes[type(AutoConfig.from_pretrained(f))]._keep_in_fp32_modules_strict = ["merger"]
        mine = check(par, f, dtype)
        every = [None] * par.world
        torch.distributed.all_gather_object(every, mine)
        results[name] = every
    if par.main:
        out.write_text(json.dumps(results, indent=1))
    par.stop()


if __name__ == "__main__":
    main()
