"""The one error type a user sees: bad input, printed as one line with exit code 2."""

EXIT_BAD_INPUT = 2  # the exit code of a StudyError, from the command line and from a worker


class StudyError(Exception):
    """A study file, a data file, a model or a command-line value that cannot be used.

    The message names the field or file and what is allowed; the CLI prints it alone on one line.
    """


def first_line(exc: Exception) -> str:
    """An exception's message cut to its first line (at most 200 characters), or its type's
    name when it has none: the reason inside a one-line error."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


class Terminated(BaseException):
    """SIGTERM reached a worker (a SLURM preemption, time limit or scancel; a Kubernetes pod
    deleted): it gives its running trials back under the lease rules, then stops. Not an
    Exception, as KeyboardInterrupt is not: no `except Exception` on the way (a trial's
    failure, a storage retry) may take it for an error of the trial's own."""
