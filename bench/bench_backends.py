"""Generation throughput of the hf and vllm backends on the same prompts, in one run.

Runs in ./.venv-vllm (it needs vLLM and transformers): ``make setup-vllm`` first.

--prompts synthetic grid problems (with images) x --group samples x --max-new-tokens, T = 1,
per-sample seeds, through ``backend.generate`` exactly as ``dfgen sample`` calls it. Each backend
gets one untimed warm-up call (vLLM's first call is much slower), then --repeat timed passes
alternate hf, vllm, hf, vllm, ... so a load spike on a shared machine hits both; the fastest
pass of each is reported. Tokens are those actually generated (EOS ends a sample early; the
untrained tiny model rarely emits it, so nearly every sample runs to --max-new-tokens).
vLLM start-up (engine process, model load, profiling) is reported separately, not in tok/s.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m bench.bench_backends            # tiny model
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m bench.bench_backends --model runs/sft --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from bench._env import versions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="HF policy folder (default: build the tiny random policy in a temp folder)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for hf")
    ap.add_argument("--dtype", default="auto", help="vLLM dtype (auto: the checkpoint's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from dfgen.backends import Prompt, SamplingConfig
    from dfgen.backends.hf import HFBackend
    from dfgen.backends.vllm import VLLMBackend
    from dfgen.images import decode_image
    from dfgen.tiny import build_tiny
    from dfgen.seeds import sample_seed
    from dfgen.synth.grid import make_problems

    torch.set_num_threads(args.threads)
    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-backends-")
        model = build_tiny(Path(tmp.name) / "tiny", seed=0)
    probs = list(make_problems(args.prompts, seed=3, split="train"))
    prompts = [Prompt(p.question(), decode_image(p.render())) for p in probs]
    seeds = [[sample_seed(0, f"b{i}", k) for k in range(args.group)] for i in range(len(prompts))]
    cfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)

    hf = HFBackend(model, batch_size=len(prompts) * args.group)
    t = time.perf_counter()
    vl = VLLMBackend(model, dtype=args.dtype, max_model_len=512)
    startup = time.perf_counter() - t

    backends = {"hf": hf, "vllm": vl}
    warm = {}
    for name, b in backends.items():
        t = time.perf_counter()
        b.generate(prompts[:2], [s[:1] for s in seeds[:2]], cfg)
        warm[name] = time.perf_counter() - t
    best = {name: None for name in backends}
    for _ in range(args.repeat):
        for name, b in backends.items():
            t = time.perf_counter()
            out = b.generate(prompts, seeds, cfg)
            dt = time.perf_counter() - t
            toks = sum(len(s.token_ids) for g in out for s in g)
            if best[name] is None or dt < best[name][0]:
                best[name] = (dt, toks)
    vl.close()

    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "versions": versions(),
           "model": str(args.model or "tiny (built)"), "prompts": args.prompts, "group": args.group,
           "max_new_tokens": args.max_new_tokens, "hf_threads": args.threads,
           "torch": torch.__version__, "vllm_startup_s": round(startup, 1), "rows": []}
    print(f"{args.prompts} prompts x {args.group} samples x {args.max_new_tokens} new tokens, "
          f"best of {args.repeat}; {res['machine']}; vLLM start-up {startup:.1f} s")
    print(f"{'backend':8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'warm-up s':>10}")
    for name, (dt, toks) in best.items():
        print(f"{name:8} {toks:7d} {dt:8.2f} {toks / dt:8.0f} {warm[name]:10.2f}")
        res["rows"].append({"backend": name, "tokens": toks, "seconds": round(dt, 3),
                            "tok_per_s": round(toks / dt, 1), "warmup_s": round(warm[name], 2)})
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
