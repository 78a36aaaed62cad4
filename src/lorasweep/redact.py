"""Secrets kept out of what a study folder records (the command line in runs.jsonl and
environment.json): folders are shared, copied and committed, so a password there is leaked.

Hand-written because what counts as a secret here is lorasweep's own convention: the password of
any URL, and the value of any NAME=VALUE or `--NAME VALUE` whose name says it is a secret.
"""

from __future__ import annotations

import re

MASK = "***"
# env-var-like names that hold secrets: *_TOKEN, *PASSWORD*, *SECRET*, *KEY* (any case)
SECRET_NAME = re.compile(r"TOKEN|PASSW(OR)?D|SECRET|KEY", re.IGNORECASE)
# scheme://user:PASSWORD@host; the password runs to the last '@' before a space (over-masking a
# token with two '@' is safe, under-masking is not)
URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)\S*@")


def redact_text(text: str) -> str:
    """`text` with the password of every URL in it masked."""
    return URL_PASSWORD.sub(lambda match: f"{match.group(1)}{MASK}@", text)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line safe to record: URL passwords and secret-named values masked."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        name, sep, _ = arg.partition("=")
        if sep and SECRET_NAME.search(name):
            arg = f"{name}={MASK}"
        elif not sep and arg.startswith("--") and SECRET_NAME.search(arg):
            hide_next = True
        out.append(redact_text(arg))
    return out


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """Environment variables safe to record: secret-named values and URL passwords masked."""
    return {name: MASK if SECRET_NAME.search(name) else redact_text(value)
            for name, value in env.items()}
