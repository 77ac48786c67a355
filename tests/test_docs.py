"""Every fenced shell and YAML block of README.md and docs/*.md, checked in a dry form.

Blocks are found by markdown-it-py (already pinned: rich's parser), so fences inside lists and
HTML comments are read as a Markdown renderer reads them. The tools on PyPI for this
(pytest-examples, phmdoctest, mktestdocs) run Python blocks or run shell blocks as written;
none turns `snakemake ...` into `snakemake -n` or validates YAML as a config overlay, so the
dry forms below are our own:
- snakemake: `-n`, once per distinct set of options (config, profile; cores and resources
  aside) for the targets of every command sharing them, all in one Python process (snakemake's
  own entry point; a cold start is seconds, a dry run after it under one);
- qlora-chat: its own argument parser and config reading, the task checked, then `snakemake -n`
  for the files the variant loads (or the GGUF file), with the same config: the run can make
  what the command opens;
- make: `make -n` (the target exists), each VAR= read by the Makefile;
- other commands (qlora-stage, python -m ...): `--help`, which must name every option used;
- `$ command` lines followed by output (a transcript): the output's last line must be printed;
- YAML: validated over config/config.yaml as snakemake reads an overlay file
  (config.read_configfiles, then load_config), as what it is: a config overlay, a whole task
  file (`# config/tasks/<name>.yaml` with format and dataset), a task overlay (every task, or
  the task its first comment names), or a Snakemake profile (its keys snakemake's options, run
  as `--profile` with `-n`).
A block that has no dry form opts out with a marker in the line(s) just above it:
`<!-- docs-test: skip: <why> -->` (the whole block) or `<!-- docs-test: skip <command>: <why> -->`
(the block's lines that run <command>). A block with neither fails.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"docs-test:\s*skip(?:\s+([^\s:]+))?:\s*(\S[^>]*?)\s*-->")
BIN = Path(sys.executable).parent


def blocks() -> list[dict]:
    """Fenced blocks: where (file:line), info (language), text, skips ({command or '': why})."""
    from markdown_it import MarkdownIt

    found = []
    for path in DOCS:
        tokens = MarkdownIt("commonmark").parse(path.read_text())
        for before, token in zip([None, *tokens], tokens):
            if token.type != "fence":
                continue
            html = before.content if before is not None and before.type == "html_block" else ""
            found.append({"where": f"{path.relative_to(REPO)}:{token.map[0] + 1}",
                          "info": token.info.strip(), "text": token.content,
                          "skips": {cmd or "": why for cmd, why in MARKER.findall(html)}})
    return found


def named_yaml() -> dict[str, str]:
    """YAML blocks whose first line names a file (`# my-run.yaml`): by base name, so that a
    command naming that file (--configfile config/my-run.yaml) can use the block."""
    return {m.group(1).rsplit("/", 1)[-1]: b["text"] for b in blocks() if b["info"] == "yaml"
            for m in [re.match(r"#\s*(\S+\.yaml)\s*$", b["text"].split("\n", 1)[0])] if m}


# --- shell blocks -> commands -------------------------------------------------------------

def commands(block: dict) -> list[tuple[list[str], str | None]]:
    """(argv, the transcript's expected last output line or None) for each command of a block:
    every line of a shell block; `$ ` lines of a transcript (any label, or none)."""
    lines = block["text"].replace("\\\n", " ").splitlines()
    if any(line.startswith("$ ") for line in lines):
        found = []
        for line in lines:
            if line.startswith("$ "):
                found.append([line[2:], None])
            elif line.strip() and found:
                found[-1][1] = " ".join(line.split())
        steps = [(argv, out) for text, out in found for argv in split_steps(text)]
    elif block["info"] in SHELL or not block["info"] and lines and runnable(lines[0]):
        steps = [(argv, None) for line in lines for argv in split_steps(line)]
    else:
        return []
    return [(argv, out) for argv, out in steps
            if not ({"", program(argv)} & set(block["skips"]))]


def split_steps(line: str) -> list[list[str]]:
    """`a && b; c  # comment` -> [a], [b], [c], quoted as the shell quotes (shlex)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&")
    lexer.whitespace_split = True
    steps = [[]]
    for word in lexer:
        if word in ("&&", ";"):
            steps.append([])
        else:
            steps[-1].append(word)
    return [step for step in steps if step]


def program(argv: list[str]) -> str:
    return argv[0].removeprefix(".venv/bin/")


def runnable(line: str) -> bool:
    """An unlabelled block that starts with a command is a shell block."""
    first = program(line.split() or [""])
    return first in ("snakemake", "make", "python", "source") or (BIN / first).is_file()


def configfile(path: str, tmp: Path) -> str:
    """A config file a command names: the repository's, or the docs' YAML block of that name."""
    if (REPO / path).is_file():
        return path
    name = path.rsplit("/", 1)[-1]
    text = named_yaml().get(name)
    if text is None:
        raise LookupError(f"--configfile {path}: not in the repository, and no YAML block "
                          f"headed '# {name}' in the docs")
    (tmp / name).write_text(text)
    return str(tmp / name)


SNAKEMAKE_RUNNING_ONLY = {"--cores", "-c", "--jobs", "-j", "--resources", "-n", "--dry-run"}


def snakemake_dry(args: list[str], tmp: Path) -> list[str]:
    """The documented arguments as a dry run: -n, cores and resources left out (they change
    how a run runs, not what), config files the docs define written out."""
    dry, skipping = ["-n"], False
    for i, word in enumerate(args):
        if word in SNAKEMAKE_RUNNING_ONLY:
            skipping = word not in ("-n", "--dry-run")
            continue
        if skipping and (re.fullmatch(r"\w+=\S+", word) or word == "all" or word.isdigit()):
            continue
        skipping = False
        configfile_value = i > 0 and args[i - 1] == "--configfile"
        dry.append(configfile(word, tmp) if configfile_value else word)
    return dry


@functools.cache
def help_text(head: tuple[str, ...]) -> str:
    """`<command> --help` (a `python -m module` keeps its module); '' where it fails."""
    exe = [sys.executable, *head[1:]] if head[0] == "python" else [str(BIN / program(head))]
    result = subprocess.run([*exe, "--help"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    return result.stdout if result.returncode == 0 else ""


def check_help(argv: list[str]) -> str | None:
    """The command's --help works and names every option the command uses."""
    text = help_text(tuple(argv[:3] if argv[:2] == ["python", "-m"] else argv[:1]))
    unknown = [w.split("=")[0] for w in argv if w.startswith("--")
               and w.split("=")[0] not in text]
    return f"{' '.join(argv)}: not options of its --help: {unknown}" if unknown or not text \
        else None


def check_make(argv: list[str]) -> str | None:
    """make -n runs the targets, and the Makefile reads each VAR= given."""
    makefile = (REPO / "Makefile").read_text()
    unread = [w.split("=")[0] for w in argv if "=" in w and f"$({w.split('=')[0]})" not in makefile]
    targets = [w for w in argv[1:] if "=" not in w]
    result = subprocess.run(["make", "-n", *targets], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    if unread or result.returncode != 0:
        return f"{' '.join(argv)}: the Makefile never reads {unread}; make -n: " \
               f"{result.stderr[-500:]}"
    return None


def dry_uses(tmp: Path) -> tuple[list[dict], list[str]]:
    """Every snakemake and qlora-chat command, and every YAML profile, as a use for the child
    process; the problems of the other commands (checked here, or with no dry form)."""
    uses, problems = [], []
    for block in blocks():
        for argv, expected in commands(block):
            name = program(argv)
            use = {"where": block["where"], "command": " ".join(argv), "expected": expected}
            if name == "snakemake":
                try:
                    uses.append({**use, "kind": "snakemake", "argv": snakemake_dry(argv[1:], tmp)})
                except LookupError as err:
                    problems.append(f"{use['where']}: {err}")
            elif name == "qlora-chat":
                uses.append({**use, "kind": "chat", "argv": argv[1:]})
            elif argv == ["source", ".venv/bin/activate"]:
                continue  # the test runs in the project's environment already
            elif name == "make" or (BIN / name).is_file() or argv[:2] == ["python", "-m"]:
                problem = (check_make if name == "make" else check_help)(argv)
                problems += [f"{use['where']}: {problem}"] if problem else []
            else:
                problems.append(f"{use['where']}: {use['command']}: no dry form, and no "
                                f"`<!-- docs-test: skip {name}: <why> -->` above its block")
        if block["info"] == "yaml" and not block["skips"] and \
                yaml_kind(block["text"], yaml.safe_load(block["text"]))[0] == "profile":
            folder = tmp / f"profile{len(uses)}"
            folder.mkdir()
            (folder / "config.yaml").write_text(block["text"])
            uses.append({"where": block["where"], "command": "a profile of this block",
                         "expected": None, "kind": "snakemake",
                         "argv": ["-n", "--profile", str(folder), "--workflow-profile", "none"]})
    return uses, problems


def run_child(uses: list[dict]) -> list[dict]:
    """The uses in one child process (this file, run as a script): {rc, output} each."""
    result = subprocess.run([sys.executable, __file__], input=json.dumps(uses), text=True,
                            capture_output=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_shell_block_runs_dry(tmp_path):
    uses, failures = dry_uses(tmp_path)
    for use, result in zip(uses, run_child(uses)):
        output, expected = " ".join(result["output"].split()), use["expected"]
        if expected is None and result["rc"] != 0:
            failures.append(f"{use['where']}: {use['command']}: exit {result['rc']}:\n"
                            f"{result['output'][-1500:]}")
        elif expected is not None and expected not in output:
            failures.append(f"{use['where']}: {use['command']}: the docs show {expected!r}; "
                            f"it printed:\n{result['output'][-1500:]}")
    assert not failures, "\n\n".join(failures)


def test_markers_name_a_reason_and_are_used():
    """A marker skips only what is there: its command appears in its block."""
    for block in blocks():
        for command in block["skips"]:
            lines = [program(argv) for line in block["text"].replace("\\\n", " ").splitlines()
                     for argv in split_steps(line.removeprefix("$ "))]
            assert not command or command in lines, f"{block['where']}: marker for {command}"


# --- YAML blocks ---------------------------------------------------------------------------

def yaml_kind(text: str, data: dict) -> tuple[str, str | None]:
    """(kind, the task the first comment names) of a YAML block."""
    from qlora_pipeline.config.schema import load_schema

    first = re.search(r"config/tasks/(\w[\w.-]*)\.yaml\b", text.split("\n", 1)[0])
    task = first.group(1) if first else None
    keys = set(data)
    if keys <= set(load_schema("config.schema.yaml")["properties"]):
        return "config", None
    task_schema = load_schema("task.schema.yaml")
    if keys <= set(task_schema["properties"]):
        whole = task is not None and set(task_schema["required"]) <= keys
        return ("task file" if whole else "task overlay"), task
    return "profile", None


def check_yaml(text: str, tmp: Path) -> str:
    """Validate one YAML block as what it is, over config/config.yaml; returns its kind."""
    from qlora_pipeline.config import load_config, read_configfiles

    data = yaml.safe_load(text)
    kind, task = yaml_kind(text, data)
    if kind == "profile":
        return kind  # run by snakemake (test_every_shell_block_runs_dry)
    tasks = yaml.safe_load((REPO / "config/config.yaml").read_text())["tasks"]
    overlay = {"config": data, "task overlay": {"task_overrides": {
        name: data for name in ([task] if task else tasks)}},
        "task file": {"tasks": [task], "task_dir": str(tmp), "combinations": []}}[kind]
    if kind == "task file":
        (tmp / f"{task}.yaml").write_text(text)
    (tmp / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    load_config(read_configfiles([REPO / "config/config.yaml", tmp / "overlay.yaml"]), root=REPO)
    return kind


@pytest.mark.parametrize("block", [b for b in blocks() if b["info"] == "yaml" and not b["skips"]],
                         ids=lambda b: b["where"])
def test_yaml_block_validates(block, tmp_path):
    check_yaml(block["text"], tmp_path)


# --- figures -------------------------------------------------------------------------------

FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:min|minutes?|s|ms|seconds?|h|hours?|"
                    r"[KMGT]iB|[KMGT]B)(?![\w/])")
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")


def paragraphs(text: str) -> list[tuple[int, str]]:
    """README text outside fences, in runs of non-blank lines; a table joins the run before it
    (its caption). (first line number, text) each."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text,
                  flags=re.M | re.S)
    runs = []
    for match in re.finditer(r"(?:^[^\n]*\S[^\n]*(?:\n|$))+", text, re.M):
        line = text.count("\n", 0, match.start()) + 1
        if match.group(0).startswith("|") and runs:
            runs[-1] = (runs[-1][0], runs[-1][1] + "\n" + match.group(0))
        else:
            runs.append((line, match.group(0)))
    return runs


def uncommitted_figures(text: str) -> list[str]:
    """Figures (a number with a time or memory unit) whose clause (up to a `;` or a sentence's
    end) names no commit (7-40 hex digits); a table's figures, the table or its caption."""
    found = []
    for line, run in paragraphs(text):
        clauses = [run] if "\n|" in run or run.startswith("|") else \
            re.split(r";\s|\.\s+(?=[A-Z])", run)
        found += [f"README.md:{line}: {FIGURE.findall(clause)}" for clause in clauses
                  if FIGURE.search(clause) and not COMMIT.search(clause)]
    return found


def test_readme_figures_name_their_commit():
    assert not uncommitted_figures((REPO / "README.md").read_text())


def test_figure_rule():
    assert uncommitted_figures("a\n\nTook 5.61 min on 2026-11-30.\n") == \
        ["README.md:3: ['5.61 min']"]
    assert not uncommitted_figures("Took 5.61 min (commit dc277ce).\n\n2442240 params\n")
    assert uncommitted_figures("5.83 min at dc277ce; 5.61 min a day before.\n")
    assert uncommitted_figures("Peak 1242 MiB, 2442240 params.\n")  # a number is no commit
    assert not uncommitted_figures("Times at 16c7092:\n| a | b |\n|---|---|\n| 1 | 98.7 s |\n")
    assert not uncommitted_figures("```\n3 s\n```\nuse -n, 3.11 and gpu=2\n")


def test_gpu_table_says_whether_each_behaviour_ran_on_a_gpu():
    """docs/gpu.md: each row ends in 'not yet', or the date, the card and the command."""
    rows = [line for line in (REPO / "docs/gpu.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| behaviour")]
    assert len(rows) >= 10
    for row in rows:
        status = row.rstrip(" |").rsplit("|", 1)[1].strip()
        ran = re.fullmatch(r"\d{4}-\d{2}-\d{2}, [^,]+, `[^`]+`", status)
        assert status == "not yet" or ran, row


# --- the child process: every dry job through snakemake's own entry point ------------------

def chat_job(argv: list[str]) -> tuple[list[str], list[str]]:
    """qlora-chat's own checks (arguments, its config reading, the task), then (snakemake's
    config options, the targets) that ask for what it would load."""
    from qlora_pipeline import chat
    from qlora_pipeline.core import layout

    args = chat.parse_args(argv)
    config, tasks = chat.run_settings(args.configfile)
    chat.check_request(args, config, tasks)
    # export_gguf's output is the folder of a task's GGUF files
    targets = [str(Path(args.gguf).parent)] if args.gguf else \
        list(layout.variant_inputs(args.variant, args.task).values())
    return (["--configfile", *args.configfile] if args.configfile else []), targets


def captured(function, *args) -> tuple[int, str, object]:
    """(exit status, everything printed, value) of function(*args), at the file descriptors
    (snakemake's logger holds its own stream)."""
    import contextlib
    import traceback

    with tempfile.TemporaryFile("w+") as out:
        sys.stdout.flush(), sys.stderr.flush()
        saved, rc, value = (os.dup(1), os.dup(2)), 0, None
        os.dup2(out.fileno(), 1), os.dup2(out.fileno(), 2)
        try:
            value = function(*args)
        except SystemExit as err:
            rc = err.code if isinstance(err.code, int) or err.code is None else 1
            if isinstance(err.code, str):
                print(err.code)
        except Exception:  # an error of the command, reported as its output
            traceback.print_exc()
            rc = 1
        with contextlib.suppress(Exception):
            sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        out.seek(0)
        return rc or 0, out.read(), value


def dry_run(main, options: list[str], uses: dict[int, list[str]], results: dict) -> None:
    """snakemake -n for the uses' targets together; if it fails, for each use alone, to name
    the one that fails."""
    targets = dict.fromkeys(t for found in uses.values() for t in found)
    rc, output, _ = captured(main, ["-n", *targets, *options])
    results.update({i: {"rc": rc, "output": output} for i in uses})
    if rc and len(uses) > 1:
        for i, found in uses.items():
            dry_run(main, options, {i: found}, results)


def child() -> None:
    """One snakemake -n per distinct set of options (config, profile), asking for the targets
    of every use that shares them; each use gets its run's result."""
    from snakemake.cli import main

    uses = json.loads(sys.stdin.read())
    results, groups = {}, {}
    for i, use in enumerate(uses):
        if use["kind"] == "chat":
            rc, output, found = captured(chat_job, use["argv"])
            if rc:
                results[i] = {"rc": rc, "output": output}
                continue
            options, targets = found
        else:
            options, targets = use["argv"][1:], ["all"]
        groups.setdefault(json.dumps(options), {})[i] = targets
    for options, group in groups.items():
        dry_run(main, json.loads(options), group, results)
    print(json.dumps([results[i] for i in range(len(uses))]))


if __name__ == "__main__":
    child()
