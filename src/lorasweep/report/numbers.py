"""Numbers as the reports and the answer print them."""

from __future__ import annotations

import math


def fmt(value: object, digits: int = 4) -> str:
    """A value as the reports print it: 3-4 significant digits, "-" when missing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}g}"
    return str(value)
