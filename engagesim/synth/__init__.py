"""A synthetic social world with known ground truth (see README.md beside this file)."""

from engagesim.synth.generate import generate

__all__ = ["generate"]
