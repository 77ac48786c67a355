"""One module per rules/*.smk, one function per rule, named like it.

A stage function takes the rule's declared inputs, outputs and params as keyword arguments
under the names the rule gives them (plus the wildcards it needs and the job's `policy`) and
writes exactly the outputs the rule declares; the job that runs it (jobs/runner.py) owns their
completeness and provenance. Callable without Snakemake (tests, `qlora-stage`). Domain code
lives below (training/, evaluation/, analysis/, report/, models/, data/) and never imports
this package.
"""

from pathlib import Path

# What a stage's signature says of each argument, read by the job that runs it
# (jobs/runner.py): a path the rule declares as an input (Inputs: a list of them), or as an
# output, which the stage writes and its job moves into place. Everything else is a param.
Input = Output = Path
Inputs = list
