"""One module per rules/*.smk, one function per rule, named like it.

A stage function takes the rule's declared inputs, outputs and params as keyword arguments
under the names the rule gives them (plus the wildcards it needs and the job's `policy`),
writes exactly the outputs the rule declares through `outputs.stage_outputs`, and is callable
without Snakemake (tests, `qlora-stage`). Domain code lives below (data/, models/, training/,
evaluation/) and never imports this package.
"""

from __future__ import annotations

import importlib

from ..code_digest import STAGE_MODULES


def stage_function(rule: str):
    """The stage function of a rule, found by name in the stage modules."""
    for name in STAGE_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        function = getattr(module, rule, None)
        if callable(function) and getattr(function, "__module__", None) == module.__name__:
            return function
    raise KeyError(f"no stage named {rule!r}; expected one of: {', '.join(rules())}")


def rules() -> list[str]:
    """Every stage's name (= its rule's name)."""
    import ast

    from ..code_digest import PACKAGE_DIR

    names = []
    for name in STAGE_MODULES:
        tree = ast.parse((PACKAGE_DIR / "stages" / f"{name}.py").read_text(encoding="utf-8"))
        names += [n.name for n in tree.body
                  if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    return names
