"""The pipeline's size in code lines: qlora_pipeline/, rules/, scripts/ and the Snakefile,
without blank lines, comments and docstrings (issue 32 counts it so, so that cutting
explanations never looks like simplifying).

    python benchmarks/code_lines.py [REPO] [--files]

A Python line counts when a token other than a comment sits on it and it is not part of a
module, class or function docstring; a rule file's line counts when it is not blank and does
not start with `#`.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

NOT_CODE = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER)


def docstring_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def python_code_lines(text: str) -> int:
    skip, code = docstring_lines(ast.parse(text)), set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in NOT_CODE:
            code.update(line for line in range(token.start[0], token.end[0] + 1)
                        if line not in skip)
    return len(code)


def rule_code_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))


def files(root: Path) -> list[Path]:
    return [*sorted((root / "qlora_pipeline").rglob("*.py")),
            *sorted((root / "scripts").glob("*.py")), *sorted((root / "rules").glob("*.smk")),
            root / "Snakefile"]


def count(path: Path) -> int:
    text = path.read_text(encoding="utf-8")
    return python_code_lines(text) if path.suffix == ".py" else rule_code_lines(text)


def main(argv: list[str]) -> None:
    root = Path(next((a for a in argv if not a.startswith("--")), "."))
    found = {path: count(path) for path in files(root)}
    if "--files" in argv:
        for path, lines in sorted(found.items(), key=lambda item: -item[1]):
            print(f"{lines:6d} {path.relative_to(root)}")
    total = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in found)
    print(f"{total} lines, {sum(found.values())} code lines in {len(found)} files")


if __name__ == "__main__":
    main(sys.argv[1:])
