"""Datasets: sources (builtin, local, hub), prompt formats and tokenization."""
