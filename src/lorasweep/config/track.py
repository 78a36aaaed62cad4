"""The study file's `track` section: experiment trackers that also get each finished trial as a
run, for those who follow their work there (trials.csv stays the study's record)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from lorasweep.config.base import STRICT
from lorasweep.redact import redact_text


class TrackSpec(BaseModel):
    """Each finished trial (complete, diverged or stopped early) logged once as a run: MLflow
    (an experiment per study) and trackio (a project per study, in its local store), each
    installed separately (`pip install mlflow`, `pip install trackio`). `track: [mlflow]` is
    short for `track: {report_to: [mlflow]}`."""

    model_config = STRICT

    # the trackers, each an optional package found at run time (lorasweep/tracking/)
    report_to: Annotated[list[Literal["mlflow", "trackio"]], Field(min_length=1)]
    # MLflow's tracking URI (default: $MLFLOW_TRACKING_URI, else an sqlite store in the study
    # folder, mlflow/mlflow.db); no password in it: MLflow reads MLFLOW_TRACKING_PASSWORD
    mlflow_uri: str | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, list | str):
            return {"report_to": [value] if isinstance(value, str) else value}
        return value

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        for name in value:
            if value.count(name) > 1:
                raise ValueError(f"track.report_to: '{name}' is named twice")
        return value

    @field_validator("mlflow_uri")
    @classmethod
    def _no_secret(cls, value: str | None) -> str | None:
        """The study file is written into the folder and the store: a secret there leaks."""
        if value is not None and redact_text(value) != value:
            raise ValueError(f"track.mlflow_uri {redact_text(value)}: holds a secret, which "
                             "the study folder would keep; give the URI without it and the "
                             "secret in MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        return value
