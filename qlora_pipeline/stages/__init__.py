"""One module per rules/*.smk, one function per rule, named like it.

A stage function takes the rule's declared inputs, outputs and params as keyword arguments
under the names the rule gives them (plus the wildcards it needs and the job's `policy`),
writes exactly the outputs the rule declares through `outputs.stage_outputs`, and is callable
without Snakemake (tests, `qlora-stage`). Domain code lives below (data/, models/, training/,
evaluation/) and never imports this package.
"""

from __future__ import annotations

import importlib

from ..code_digest import stage_functions


def stage_function(rule: str):
    """The stage function of a rule; imports only the stage module that defines it."""
    found = stage_functions()
    if rule not in found:
        raise KeyError(f"no stage named {rule!r}; expected one of: {', '.join(found)}")
    return getattr(importlib.import_module(found[rule][0]), rule)


def rules() -> list[str]:
    """Every stage's name (= its rule's name), read from the source without importing it."""
    return list(stage_functions())
