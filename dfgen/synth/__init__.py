"""Synthetic visual-reasoning tasks: the embedded default that runs offline."""
from dfgen.synth.grid import GridTask, Problem, corpus_texts, make_problems, solution_text, write_synth

__all__ = ["GridTask", "Problem", "corpus_texts", "make_problems", "solution_text", "write_synth"]
