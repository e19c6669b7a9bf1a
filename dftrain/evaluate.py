"""Scoring checkpoints (``dftrain eval``): greedy (or sampled pass@k) answers, per-item records,
overall and per-category accuracy.

Benchmarks: ``synth`` (prompt sets from ``dfgen synth``, exact answers) and the adapters in
``dfgen.benchmarks`` (MathVista, MMStar, TabMWP) with their official prompts and scoring.
Records that cannot be evaluated (missing fields, bad images) are counted as ``skipped`` and
reported, never as correct or wrong.

Run: ``dftrain eval --model runs/demo/sft --bench synth --data runs/demo/test --limit 500``
"""
from __future__ import annotations

from pathlib import Path


def load_bench(bench: str, data: Path, limit: int | None = None):
    """(records, skipped) for a benchmark name and path."""
    if bench == "synth":
        from dfgen.records import load_prompts

        return load_prompts(data, limit=limit)
    from dfgen.benchmarks import get_benchmark

    return get_benchmark(bench).load(Path(data), limit=limit)


def score_record(bench: str, rec: dict, text: str) -> dict:
    if bench == "synth":
        from dfgen.answers import extract, score

        pred, r = score(rec, text)
        return {"extraction": extract(text), "prediction": pred, "correct": bool(r)}
    from dfgen.benchmarks import get_benchmark

    return get_benchmark(bench).score(rec, text)


def run_eval(backend, records: list[dict], bench: str = "synth", max_new_tokens: int = 64,
             temperature: float = 0.0, samples: int = 1, seed: int = 0, progress=None) -> list[dict]:
    """Generate and score; one result dict per record (pass@k over ``samples``)."""
    from dfgen.backends import Prompt, SamplingConfig
    from dfgen.policy import decode_image
    from dfgen.seeds import sample_seed

    cfg = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    results = []
    bs = 64
    for k in range(0, len(records), bs):
        chunk = records[k: k + bs]
        prompts = [Prompt(r["question"], decode_image(r["image"]) if r.get("image") is not None else None)
                   for r in chunk]
        seeds = [[sample_seed(seed, r["id"], j) for j in range(samples)] for r in chunk]
        outs = backend.generate(prompts, seeds, cfg)
        for r, smps in zip(chunk, outs):
            scored = [score_record(bench, r, s.text) for s in smps]
            best = next((i for i, s in enumerate(scored) if s["correct"]), 0)
            results.append({"id": r["id"], "category": r.get("category"), "response": smps[best].text,
                            **scored[best], "n_correct": sum(s["correct"] for s in scored), "samples": len(smps)})
        if progress:
            progress(len(chunk))
    return results


def summarize(results: list[dict], skipped: list | None = None) -> dict:
    n = len(results)
    cats: dict = {}
    for r in results:
        c = r.get("category") or "all"
        a = cats.setdefault(c, [0, 0])
        a[0] += bool(r["correct"])
        a[1] += 1
    return {"n": n, "accuracy": (sum(bool(r["correct"]) for r in results) / n) if n else 0.0,
            "per_category": {c: {"n": v[1], "accuracy": v[0] / v[1]} for c, v in sorted(cats.items())},
            "skipped": len(skipped or []),
            "skipped_reasons": [list(s) for s in (skipped or [])[:20]]}


def greedy_accuracy(model, processor, data: Path, limit: int | None = 200, max_new_tokens: int = 64) -> float:
    """Held-out greedy exact-match accuracy of an in-memory policy on a synthetic prompt set."""
    from dfgen.backends.hf import HFBackend
    from dfgen.records import load_prompts

    recs, _ = load_prompts(data, limit=limit)
    backend = HFBackend(None, model=model, processor=processor)
    res = run_eval(backend, recs, "synth", max_new_tokens=max_new_tokens)
    return sum(r["correct"] for r in res) / len(res)
