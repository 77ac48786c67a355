"""`make bench`: one module per benchmark, driven by benchmarks/run.py (docs/performance.md)."""
