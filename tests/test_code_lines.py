"""benchmarks/code_lines.py counts what issue 32 counts: code, not blank lines, comments or
docstrings."""

from benchmarks.code_lines import python_code_lines, rule_code_lines

SAMPLE = '''"""A module docstring,
over two lines."""

import os  # a comment after code counts as code

# a comment alone


def f(x):
    """A function docstring."""
    text = """a string that is
not a docstring"""
    return (x +
            1)
'''


def test_python_lines():
    # import, def, text = (2 lines), return (2 lines)
    assert python_code_lines(SAMPLE) == 6


def test_rule_lines():
    assert rule_code_lines("# comment\n\nrule a:\n    input:\n        'x',\n    # no\n") == 3
