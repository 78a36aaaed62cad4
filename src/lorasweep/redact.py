"""Secrets kept out of everything lorasweep writes or prints (the study folder's files, its
messages): folders are shared, copied and committed and logs are pasted, so a password there is
leaked. The real value stays in memory only.

Hand-written because what counts as a secret here is lorasweep's own convention: the password of
any URL (`scheme://user:PASSWORD@host`), and the value of any NAME=VALUE (a URL's query key, a
libpq `key=value` word, an environment variable, an option) or `--NAME VALUE` whose name says it
is a secret. Masking too much is safe, too little is not: where a string could be read two ways,
both readings' secrets are masked.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
# names that hold secrets: *_TOKEN, *PASSWORD* (sslpassword), *PASSWD*, *SECRET*, *KEY* (any case)
SECRET_NAME = re.compile(r"TOKEN|PASSW(OR)?D|SECRET|KEY", re.IGNORECASE)
# scheme://user:PASSWORD@host; the password runs to the last '@' before a space (a password with
# an unencoded '@' is still masked whole)
URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:(\S*)@")
# NAME=VALUE at the start, after a space or after a URL's '?', '&' or ';'. Only looked ahead
# at, so that every separator is tried: a value that swallows a later NAME=VALUE (in one reading)
# does not hide it. A value runs to the next space, '&' or ';', or is quoted (libpq's 'a b').
NAME_VALUE = re.compile(r"(?:^|(?<=[\s?&;]))(?=([^\s=&;?'\"]+)=('(?:[^'\\]|\\.)*'|[^\s&;]*))")
IDENTIFIER = re.compile(r"-{0,2}[A-Za-z_][\w.-]*")


def redact_text(text: str) -> str:
    """`text` with every secret in it masked: URL passwords and secret-named values.

    The one masking routine: storage URLs in messages and files, driver errors and recorded
    command lines all pass through it.
    """
    spans = [match.span(1) for match in URL_PASSWORD.finditer(text)]
    spans += [match.span(2) for match in NAME_VALUE.finditer(text)
              if SECRET_NAME.search(unquote(match.group(1)))]
    out: list[str] = []
    done = -1  # where the last mask ends
    for start, end in sorted(span for span in spans if span[1] > span[0]):
        if start > done:
            out += [text[max(done, 0):start], MASK]
        done = max(done, end)  # a span that overlaps or touches the last one widens its mask
    out.append(text[max(done, 0):])
    return "".join(out)


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
        if sep and IDENTIFIER.fullmatch(name) and SECRET_NAME.search(name):
            arg = f"{name}={MASK}"  # the whole value, spaces included
        elif not sep and arg.startswith("--") and SECRET_NAME.search(arg):
            hide_next = True
        out.append(redact_text(arg))
    return out


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """Environment variables safe to record: secret-named values and URL passwords masked."""
    return {name: MASK if SECRET_NAME.search(name) else redact_text(value)
            for name, value in env.items()}
