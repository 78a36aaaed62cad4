"""Optional integrations (optuna-dashboard, MLflow, trackio), found at run time as transformers'
`report_to` finds its trackers: none is a requirement of lorasweep, and one that is asked for but
not installed is one line naming what asked for it and the pip command, before anything runs."""

from __future__ import annotations

import importlib.util

from lorasweep.errors import StudyError


def installed(module: str) -> bool:
    """Whether `module` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def require(module: str, package: str, asked_by: str) -> None:
    """Refuse, in one line, what `asked_by` (a field or a command) needs but is not installed."""
    if not installed(module):
        raise StudyError(f"{asked_by}: needs {package}, which is not installed here: "
                         f"pip install {package}")
