"""Start one stage from the command line: `qlora-stage <rule> name=value ...` (also
`python -m qlora_pipeline.cli`). Values are JSON where they parse as JSON, else strings; the
names are the rule's input, output and param names. The stage runs as its job runs it (outputs
complete or absent, with provenance: jobs/runner.py); under torchrun each rank runs it on the
job's temporary outputs, which the job itself moves into place. Example:

    qlora-stage quantize base=results/models/base quantized=/tmp/q seed=0 \\
        'quantization={"method": "nf4", "double_quant": true, "compute_dtype": "auto",
                       "skip_modules": ["lm_head"]}'
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from .core.errors import InputError, ResumeLater


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse(argv: list[str]) -> argparse.Namespace:
    from .jobs.code_digest import stage_functions  # every stage's name, read without importing

    parser = argparse.ArgumentParser(
        prog="qlora-stage", description="Run one pipeline stage outside Snakemake.",
        epilog=f"stages: {', '.join(stage_functions())}")
    parser.add_argument("rule", help="the stage, named like its rule")
    parser.add_argument("arguments", nargs="*", metavar="name=value",
                        help="the rule's inputs, outputs and params (JSON or text)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--log", default=None, help="append the stage's output to this file")
    args = parser.parse_args(argv)
    bad = [a for a in args.arguments if "=" not in a]
    if bad:
        parser.error(f"found {bad}; expected name=value")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging
    import os

    from .core.policy import Policy
    from .jobs import launch
    from .jobs.environment import job_environment
    from .jobs.runner import Job, call, stage_function

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        stage = stage_function(args.rule)
    except KeyError as err:
        print(f"qlora-stage: {err.args[0]}", file=sys.stderr)
        return 2
    kwargs = {k: _value(v) for k, v in (a.split("=", 1) for a in args.arguments)}
    signature = inspect.signature(stage).parameters
    params = {n: p for n, p in signature.items() if n != "policy" and p.kind != p.VAR_KEYWORD}
    any_name = len(params) < len(signature) - 1  # `**written`: the report's outputs
    unknown = [] if any_name else sorted(set(kwargs) - set(params) - {"provenance"})
    missing = [n for n, p in params.items()
               if p.default is inspect.Parameter.empty and n not in kwargs]
    if unknown or missing:
        print(f"qlora-stage {args.rule}: found {sorted(kwargs)}; missing {missing}, unknown "
              f"{unknown}; expected {', '.join(params)}", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    try:
        if launch.is_worker():  # a torchrun rank: its job owns the outputs, it only computes
            logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                                format=f"%(asctime)s %(levelname)s rank {os.environ['RANK']} "
                                       f"%(name)s: %(message)s")
            with job_environment(threads):
                call(stage, kwargs, Policy.detect(threads))
        else:
            Job.from_call(args.rule, kwargs, log_path=args.log, threads=threads,
                          wants_gpu=True).run()
    except InputError as err:
        print(f"qlora-stage {args.rule}: {err}", file=sys.stderr)
        return 1
    except ResumeLater as err:
        print(f"qlora-stage {args.rule}: {err}", file=sys.stderr)
        return stopped_status()
    return 0


def stopped_status() -> int:
    """The status of a process whose training stopped before its job's time limit: 75, or 0
    for a torchrun rank, whose job learns it from launch.STOPPED_ENV's file. torchrun stops
    every rank when one fails, which would kill a rank still finishing its checkpoint. The
    file's folder is on the job's first node; ranks on other nodes leave it to those there."""
    import os

    from .jobs import launch

    marker = os.environ.get(launch.STOPPED_ENV)
    if not (launch.is_worker() and marker):
        return ResumeLater.EXIT_STATUS
    if Path(marker).parent.is_dir():
        try:
            Path(marker).touch()
        except OSError:
            return ResumeLater.EXIT_STATUS  # untold, the job must not take it for a success
    return 0


if __name__ == "__main__":
    sys.exit(main())
