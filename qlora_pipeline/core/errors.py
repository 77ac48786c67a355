"""One exception type for bad input, so scripts and tests can tell it from a crash."""


class InputError(ValueError):
    """Bad user input: the message names the file/key, what was found and what was expected."""


class DiskFull(InputError):
    """A stage's outputs do not fit the free space of their folder (estimated before it runs,
    or ENOSPC while writing): the message names the output or folder, bytes needed and free."""


class NumericsError(RuntimeError):
    """A computation does not match its definition (a quantized layer's math, a written
    adapter's factors): the job stops rather than produce a silently wrong result."""


class ResumeLater(RuntimeError):
    """A training stopped itself before its job's time limit, its checkpoint saved: the job
    exits with EXIT_STATUS, and its retry (or a rerun) resumes from the checkpoint."""

    EXIT_STATUS = 75  # EX_TEMPFAIL of sysexits.h: try again later
