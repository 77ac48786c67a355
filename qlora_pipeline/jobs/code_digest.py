"""A digest of the library code one stage runs: a rule's `params: code=` (a rerun trigger) and
its provenance's `code`.

Snakemake reruns a job when its script changes, not when the library the script calls does.
So each rule carries, as a param, a digest of what its stage function uses: the function
itself and the helpers it calls in its stage module, then every library module those name,
with everything those modules import in turn. Editing the training loop changes the digest
of train_qlora and recover, and nothing of the data stages. The code is compared as parsed
(`ast.dump`), so comments and blank lines are not edits.

Code that decides how a job runs, not what it computes, is no trigger: the INFRASTRUCTURE
modules are left out of every digest (and not followed), so that editing the warm-start server,
the GPU claims, the launcher, the memory check, the logging or the provenance writer reruns
nothing. Their rule: they may refuse, schedule or log; nothing they produce reaches an output
(docs/architecture.md; tests/test_code_digest.py edits each and plans nothing).

Read from the source with `ast`, not by importing: the workflow computes it when it is parsed,
in an environment that may lack torch. Written by hand because no library does this: Snakemake
hashes only a rule's own script, and importlib's module graph needs the imports executed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

PACKAGE = "qlora_pipeline"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
STAGE_MODULES = ("data", "model", "train", "analyze", "combine", "evaluate", "export", "report")
INFRASTRUCTURE = (
    f"{PACKAGE}.jobs",  # the job runner, outputs and provenance, warm start, GPUs, launch, this
    f"{PACKAGE}.core.memory",  # estimates and refusals before loading; where weights are placed
    f"{PACKAGE}.core.disk",  # the bytes a stage writes, refused before it runs; a full disk
    f"{PACKAGE}.core.machine",  # the machine's facts, recorded in provenance
    f"{PACKAGE}.training.deadline",  # when a training stops for its time limit (resumed alike)
)


def infrastructure(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in INFRASTRUCTURE)


def _stamp(path: Path) -> tuple:
    """Cache key of a file's content: an edited file is parsed again."""
    stat = path.stat()
    return path, stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=None)
def _parse_at(path: Path, *_stamp) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@functools.lru_cache(maxsize=None)
def _dump_at(path: Path, *stamp) -> bytes:
    return ast.dump(_parse_at(path, *stamp)).encode()


@functools.lru_cache(maxsize=None)
def _module_imports(module: str, path: Path, *stamp) -> tuple[str, ...]:
    return tuple(_imports(_parse_at(path, *stamp), module, path.name == "__init__.py").values())


def _module_file(module: str, root: Path) -> Path | None:
    parts = module.split(".")[1:]
    candidates = (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py"))
    return next((path for path in candidates if parts and path.is_file()), None)


def _imports(node: ast.AST, module: str, is_package: bool, walk=ast.walk) -> dict[str, str]:
    """Library modules imported anywhere under `node` (walk: ast.iter_child_nodes for its own
    statements alone): bound name -> module name."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = {}
    for item in walk(node):
        if isinstance(item, ast.Import):
            found.update({(a.asname or a.name).split(".")[0]: a.name for a in item.names
                          if a.name.split(".")[0] == PACKAGE})
        elif isinstance(item, ast.ImportFrom):
            base = here[: len(here) - item.level + 1] if item.level else []
            origin = ".".join(base + (item.module.split(".") if item.module else []))
            if origin.split(".")[0] != PACKAGE:
                continue
            for alias in item.names:  # `from .. import provenance` names a module
                found[alias.asname or alias.name] = f"{origin}.{alias.name}"
            found.setdefault(origin, origin)  # importing a submodule runs its package too
    return found


def _existing(modules, root: Path) -> set[str]:
    """Module names that are files (a `from x import name` may name a function, not a module)."""
    named = (name if _module_file(name, root) else name.rsplit(".", 1)[0] for name in modules)
    return {name for name in named if _module_file(name, root)}


def _closure(modules: set[str], root: Path) -> set[str]:
    """The modules plus every library module they import, at any depth."""
    seen, todo = set(), list(modules)
    while todo:
        name = todo.pop()
        if name in seen or infrastructure(name):
            continue
        seen.add(name)
        todo += _existing(_module_imports(name, *_stamp(_module_file(name, root))), root)
    return seen


def stage_functions(root: Path = PACKAGE_DIR) -> dict[str, tuple[str, ast.Module, ast.FunctionDef]]:
    """Every public stage function, by name: (its module, the module's tree, its definition)."""
    found = {}
    for name in STAGE_MODULES:
        module = f"{PACKAGE}.stages.{name}"
        tree = _parse_at(*_stamp(_module_file(module, root)))
        found.update({node.name: (module, tree, node) for node in tree.body
                      if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")})
    return found


def stage_source(rule: str, root: Path = PACKAGE_DIR) -> tuple[str, ast.Module, ast.FunctionDef]:
    """The stage function named like `rule`: (its module, the module's tree, its definition)."""
    found = stage_functions(root)
    if rule not in found:
        raise KeyError(f"no stage named {rule!r}; expected one of: {', '.join(found)}")
    return found[rule]


def _used(function: ast.FunctionDef, tree: ast.Module, module: str) -> tuple[list, set[str]]:
    """The module-level definitions `function` reaches in its own module, and the library
    modules those name."""
    top = {node.name: node for node in tree.body
           if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    # The module's own imports: its top-level statements (not those inside its functions).
    imported = _imports(tree, module, False, ast.iter_child_nodes)
    reached, modules, todo = [], set(), [function]
    while todo:
        node = todo.pop()
        if node in reached:
            continue
        reached.append(node)
        modules |= set(_imports(node, module, False).values())  # imports inside the function
        for name in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}:
            if name in top:
                todo.append(top[name])
            elif name in imported:
                modules.add(imported[name])
    return reached, modules


def for_rule(rule: str, root: Path = PACKAGE_DIR) -> str:
    """sha256 (16 hex digits) of the code the stage function named like `rule` runs.

    Parsing and dumping the library takes about a second, at every parse of the workflow;
    so the digests are kept on disk, valid while no library file (path, mtime, size) and not
    the Python version (ast.dump's output) changed: a no-op dry run reads them back."""
    key = _library_stamp(root)
    cache = _cache_file(root)
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    digests = cached.get("digests", {}) if cached.get("stamp") == key else {}
    if rule not in digests:
        digests[rule] = _digest(rule, root)
        _write_quietly(cache, {"stamp": key, "digests": digests})
    return digests[rule]


def _library_stamp(root: Path) -> str:
    stamps = hashlib.sha256(sys.version.encode())
    for path in sorted(root.rglob("*.py")):
        stat = path.stat()
        stamps.update(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}\n".encode())
    return stamps.hexdigest()


def _cache_file(root: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-pipeline"
    return cache / f"code-digests-{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"


def _write_quietly(path: Path, record: dict) -> None:
    """Written whole (rename) or not at all: a cache that cannot be written is recomputed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def _digest(rule: str, root: Path) -> str:
    module, tree, function = stage_source(rule, root)
    reached, modules = _used(function, tree, module)
    digest = hashlib.sha256()
    for node in sorted(reached, key=lambda n: n.lineno):
        digest.update(ast.dump(node).encode())  # the code, not its comments or blank lines
    for name in sorted(_closure(_existing(modules, root), root)):
        digest.update(name.encode())
        digest.update(_dump_at(*_stamp(_module_file(name, root))))
    return digest.hexdigest()[:16]

