"""A pydantic validation error as the one line a user reads: `field.path: what is wrong (got X)`."""

from __future__ import annotations

import reprlib

from pydantic import ValidationError

# The offending value as the error shows it: cut short, so a huge value stays one short line.
SHORT_REPR = reprlib.Repr()  # keyword settings need Python 3.12
SHORT_REPR.maxlevel, SHORT_REPR.maxlist, SHORT_REPR.maxdict = 2, 6, 4
SHORT_REPR.maxstring = SHORT_REPR.maxother = 60


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a pydantic error as `field.path: what is wrong (got X)`."""
    error = exc.errors()[0]
    location = ".".join(
        str(part)
        for part in error["loc"]
        if not str(part).startswith(("function-", "list[", "constrained-"))
        and str(part) not in {"LRRange", "float", "str", "int"}
    )
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if error["type"] in {"missing", "value_error"} or isinstance(got, dict) else (
        f" (got {SHORT_REPR.repr(got)})"
    )
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    if location and message.startswith(f"{location}."):  # a section's check names its field
        return f"{message}{shown}{more}"
    return f"{location or 'study'}: {message}{shown}{more}"
