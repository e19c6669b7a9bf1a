"""Benchmarks: speed and memory, one shape each, as ratios against a baseline measured in the same run
(figures in BENCHMARKS.md). Run each as a module from the repository root, e.g.
``python -m bench.bench_trainer --help``. (Experiments and probes live in ``studies/``.)
"""
