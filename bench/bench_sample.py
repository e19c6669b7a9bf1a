"""Generation throughput of the hf backend on the tiny model, by batch size.

Builds an untrained tiny policy (so every sample runs to --max-new-tokens) and times
``HFBackend.generate`` (seeded sampling, suppression, logprob capture: the real path) on
batches of 8..64 sequences x 64 new tokens, after one warm-up call, twice in the same run: the
default lean decode loop (``fast_decode``) and transformers' ``generate`` (``fast_decode=False``,
the baseline). Prints tok/s per batch size and the ratio; checks that both drew the same tokens.
Then the shape ``dfgen sample`` runs: 8 prompts x 8 samples (group size 8) in one batch of 64,
where the fast path renders and prefills each prompt once for its 8 samples.

Run: python -m bench.bench_sample [--repeats 3] [--json out.json]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench._env import machine, versions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    from dfgen.backends import Prompt, SamplingConfig
    from dfgen.backends.hf import HFBackend
    from dfgen.images import decode_image
    from dfgen.tiny import build_tiny
    from dfgen.synth.grid import make_problems

    d = Path(tempfile.mkdtemp())
    t0 = time.time()
    build_tiny(d / "tiny")
    build_s = time.time() - t0
    fast = HFBackend(d / "tiny", batch_size=1024)
    base = HFBackend(None, batch_size=1024, model=fast.model, processor=fast.processor, fast_decode=False)
    probs = list(make_problems(64, seed=0))
    prompts = [Prompt(p.question(), decode_image(p.render())) for p in probs]
    cfg = SamplingConfig(1.0, 1.0, args.max_new_tokens)
    for b in (fast, base):
        b.generate(prompts[:8], [[0]] * 8, cfg)  # warm-up
    rows = []
    for bs, group in ((8, 1), (16, 1), (32, 1), (64, 1), (64, 8)):
        best, toks = {}, {}
        ps = prompts[: bs // group]
        for rep in range(args.repeats):
            for name, b in (("fast", fast), ("generate", base)):  # interleaved
                t = time.time()
                out = b.generate(ps, [[rep * 1000 + i * group + j for j in range(group)] for i in range(len(ps))], cfg)
                dt = time.time() - t
                ntok = sum(len(s.token_ids) for o in out for s in o)
                best[name] = max(best.get(name, 0), ntok / dt)
                toks[name] = [s.token_ids for o in out for s in o]
        same = toks["fast"] == toks["generate"]
        rows.append({"batch": bs, "group_size": group, "tok_per_s": round(best["fast"]),
                     "generate_tok_per_s": round(best["generate"]),
                     "ratio": round(best["fast"] / best["generate"], 2), "same_tokens": same})
        print(f"batch {bs:3d} ({bs // group} prompts x {group}) x {args.max_new_tokens} new tokens: {best['fast']:,.0f} tok/s "
              f"(generate {best['generate']:,.0f}, {best['fast'] / best['generate']:.2f}x; same tokens: {same})")
    res = {"machine": machine(), "versions": versions(), "torch_threads": torch.get_num_threads(),
           "build_tiny_s": round(build_s, 2), "rows": rows}
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
