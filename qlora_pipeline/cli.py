"""Start one stage from the command line: `qlora-stage <rule> name=value ...` (also
`python -m qlora_pipeline.cli`). Values are JSON where they parse as JSON, else strings; the
names are the rule's input, output and param names. This is how a rule runs a stage under a
launcher (`shell: "torchrun ... -m qlora_pipeline.cli train_qlora ..."`); plain rules keep
`script:`. Example:

    qlora-stage quantize base=results/models/base quantized=/tmp/q seed=0 \\
        'quantization={"method": "nf4", "double_quant": true, "compute_dtype": "auto",
                       "skip_modules": ["lm_head"]}'
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

from .errors import InputError


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse(argv: list[str]) -> argparse.Namespace:
    from .stages import rules

    parser = argparse.ArgumentParser(
        prog="qlora-stage", description="Run one pipeline stage outside Snakemake.",
        epilog=f"stages: {', '.join(rules())}")
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
    import contextlib
    import os

    from .policy import Policy
    from .runtime import job_environment, logged_to
    from .stages import stage_function

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        stage = stage_function(args.rule)
    except KeyError as err:
        print(f"qlora-stage: {err.args[0]}", file=sys.stderr)
        return 2
    kwargs = {k: _value(v) for k, v in (a.split("=", 1) for a in args.arguments)}
    params = {n: p for n, p in inspect.signature(stage).parameters.items() if n != "policy"}
    expected = list(params)
    unknown = sorted(set(kwargs) - set(params))
    missing = [n for n, p in params.items()
               if p.default is inspect.Parameter.empty and n not in kwargs]
    if unknown or missing:
        print(f"qlora-stage {args.rule}: found {sorted(kwargs)}; missing {missing}, unknown "
              f"{unknown}; expected {', '.join(expected)}", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    if not args.log:  # the caller's streams (a torchrun rank: its job's log), named by rank
        import logging

        rank = f" rank {os.environ['RANK']}" if "RANK" in os.environ else ""
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s{rank} %(name)s: %(message)s")
    with (logged_to(args.log) if args.log else contextlib.nullcontext()), job_environment(threads):
        try:
            stage(**kwargs, policy=Policy.detect(threads))
        except InputError as err:
            print(f"qlora-stage {args.rule}: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
