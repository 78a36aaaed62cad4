"""What every section of the study file shares: unknown fields refused, values frozen and
finite, the cap on how many values a list may hold, and names checked against a registry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict
from pydantic_core import PydanticCustomError

# Most values one list of the search may hold: a grid far beyond any real sweep is a mistake that
# would otherwise exhaust memory expanding trials.
MAX_VALUES = 1000
NO_INF_NAN = ConfigDict(allow_inf_nan=False)
# Every section's model_config: a misspelt field is an error, a loaded study never changes.
STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class OneOf:
    """A name registered in `table` (variants.VARIANTS, kinds.KINDS), read at validation time so
    that a registration counts; any other value gets pydantic's own message for a Literal."""

    table: Mapping[str, Any]

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.table:
            names = [repr(n) for n in self.table]
            raise PydanticCustomError("literal_error", "Input should be {expected}",
                                      {"expected": ", ".join(names[:-1]) + " or " + names[-1]})
        return value
