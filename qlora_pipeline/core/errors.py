"""One exception type for bad input, so scripts and tests can tell it from a crash."""


class InputError(ValueError):
    """Bad user input: the message names the file/key, what was found and what was expected."""


class NumericsError(RuntimeError):
    """A computation does not match its definition (a quantized layer's math, a written
    adapter's factors): the job stops rather than produce a silently wrong result."""
