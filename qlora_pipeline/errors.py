"""One exception type for bad input, so scripts and tests can tell it from a crash."""


class InputError(ValueError):
    """Bad user input: the message names the file/key, what was found and what was expected."""
