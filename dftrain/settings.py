"""DF's settings, declared once: ``DFWeights``.

``dftrain fit`` (``FitConfig``) and ``dftrain loop`` (``LoopConfig``) inherit these fields, so their
defaults, CLI options and ``config.json`` keys are these; the TRL and verl integrations and the
studies take their defaults from here. What each does to the objective: ``dftrain/loss.py``'s
docstring (``df_token_weights``, ``repaired_term``) and ``dftrain/fit.py``'s.

No torch here: the CLIs read these defaults for ``--help``.
"""
from __future__ import annotations

from dataclasses import dataclass

MARKED_MODES = ("edit", "root", "root+prop")
MASS_MODES = ("keep", "redistribute")


@dataclass(kw_only=True)
class DFWeights:
    """How DF weighs the tokens of a failed rollout with a verified repair, and its repaired samples.
    The defaults are the variant chosen on val by the study (docs/RESULTS.md, "DF's weight options
    re-screened": root + repaired samples + all-fail blame)."""

    kappa: float = 0.1  # weight of the unmarked tokens of a repaired failed rollout (1 = GRPO; < 0 = credit)
    marked: str = "root"  # root | root+prop | edit: which tokens get weight 1 (root beat edit, docs/RESULTS.md)
    delta: float = 0.5  # root+prop: weight of the edited tokens after the root cause
    mass: str = "keep"  # keep | redistribute (same total blame as GRPO, concentrated on the marked tokens)
    repaired_weight: float = 1.0  # A_plus of repaired samples (credit on their corrected tokens); 0 = not used
    kappa_rep: float = 0.0  # weight of the unedited tokens of a repaired sample
    fail_advantage: float = 1.0  # A: advantage -A on the root token of repaired rollouts in all-fail groups; 0 = off

    def check_weights(self) -> str | None:
        """The first thing wrong with these settings, as one line naming the CLI option; None if fine."""
        checks = [(self.marked in MARKED_MODES, f"--marked must be one of {', '.join(MARKED_MODES)}"),
                  (self.mass in MASS_MODES, f"--mass must be one of {', '.join(MASS_MODES)}"),
                  (-1 <= self.kappa <= 1, "--kappa must be in [-1, 1]"),
                  (-1 <= self.kappa_rep <= 1, "--kappa-rep must be in [-1, 1]"),
                  (0 <= self.delta <= 1, "--delta must be in [0, 1]"),
                  (self.repaired_weight >= 0, "--repaired-weight must be >= 0 (it is a positive advantage)"),
                  (self.fail_advantage >= 0, "--fail-advantage must be >= 0 (it is the size of a negative advantage)")]
        return next((msg for ok, msg in checks if not ok), None)

    def df_weights(self) -> "DFWeights":
        """These settings alone (e.g. from a FitConfig), for the integrations and studies."""
        return DFWeights(**{f: getattr(self, f) for f in DFWeights.__dataclass_fields__})
