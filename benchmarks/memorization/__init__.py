"""Memorization-heavy kNN-LM evaluations across base-model sizes (see docs/memorization.md)."""
