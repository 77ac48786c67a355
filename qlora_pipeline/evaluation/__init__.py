"""Scoring every model variant with lm-evaluation-harness, and the report."""
