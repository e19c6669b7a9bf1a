"""Studies: the experiments and probes behind docs/RESULTS.md, built on the trainer's configs.

Run each as a module from the repository root, e.g. ``python -m studies.experiment --help``.
(Speed and memory benchmarks live in ``bench/``.)
"""
