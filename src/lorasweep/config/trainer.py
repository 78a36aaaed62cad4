"""The study file's `trainer` section: an external training command run once per trial, where
its result comes from, and the templates it renders (checked against the names a trial gives)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator

from lorasweep.config.base import STRICT
from lorasweep.config.search import SearchSpec
from lorasweep.result_key import parse_key
from lorasweep.variants import variant


class ResultSpec(BaseModel):
    """Where an external command's metric comes from: a JSON file it writes (relative to its
    working folder) or JSON lines on its stdout (the last line with `key` is the result, the
    earlier ones its evaluation curve). `key` is a JSONPath to one value (`eval.accuracy`,
    `results[0].loss`, `"lora:{lr:.3g}".val_loss`: see result_key.py), its names templates."""

    model_config = STRICT

    file: str | None = Field(default=None, min_length=1)
    stdout: bool = False
    key: str = Field(min_length=1)

    @field_validator("key")
    @classmethod
    def _key_form(cls, value: str) -> str:
        parse_key(value)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ResultSpec:
        if (self.file is None) == (not self.stdout):
            raise ValueError("trainer.result: give file (a JSON file the command writes) or "
                             "stdout: true (JSON lines it prints), one of them")
        return self


# The names an external command's templates may use ({lr}, ...): every trial's, an adapter
# cell's, and the study's recipe axes beside them (trainers/command.py gives their values).
TRIAL_TEMPLATE_NAMES = ("lr", "seed", "method", "trial", "out_dir", "study_dir", "python")
ADAPTER_TEMPLATE_NAMES = ("rank", "lora_alpha", "init", "target_modules")


class TrainerSpec(BaseModel):
    """An external training command run once per trial in its own working folder.

    `command` is the argument list (no shell), or with `shell: true` one shell line (template
    values quoted); `method_args` are arguments appended for one method (e.g. full:
    [--full-finetune]); `env` is added to the worker's environment. Every argument and value is
    a template: `{lr}`, `{rank}`, ... (TRIAL_TEMPLATE_NAMES, ADAPTER_TEMPLATE_NAMES, recipe
    axes); `{{` and `}}` are literal braces. `study_dir` (the study file's folder unless given)
    is what `{study_dir}` gives, so a command names its script next to the study file.
    """

    model_config = STRICT

    command: Annotated[list[str], Field(min_length=1)]
    shell: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    method_args: dict[str, list[str]] = Field(default_factory=dict)
    # files written into the trial's folder before the command runs: name -> a template file
    # (relative to study_dir), e.g. an axolotl config with {lr} in it
    files: dict[str, str] = Field(default_factory=dict)
    result: ResultSpec
    study_dir: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_string(cls, value: Any) -> Any:
        """`command` as one string is the shell line of `shell: true`."""
        if isinstance(value, dict) and isinstance(value.get("command"), str):
            if value.get("shell") is not True:
                raise ValueError("trainer.command: one string is a shell line: set shell: true, "
                                 "or give the argument list ([program, arg, ...])")
            value = {**value, "command": [value["command"]]}
        return value

    @model_validator(mode="after")
    def _shell_line(self) -> TrainerSpec:
        if self.shell and len(self.command) != 1:
            raise ValueError("trainer.command: with shell: true, give one shell line "
                             "(a string, or a list of one string)")
        for name in self.files:
            if Path(name).name != name or name in (".", ".."):
                raise ValueError(f"trainer.files.{name}: a file name in the trial's folder "
                                 "(no folders)")
        return self

    def template_file(self, name: str) -> str:
        """The text of the template file that trainer.files names as `name`."""
        source = Path(self.study_dir or ".") / self.files[name]
        try:
            return source.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"trainer.files.{name}: cannot read {source} "
                             f"({getattr(exc, 'strerror', None) or exc})") from None

    def templates(self, label: str) -> list[tuple[str, str]]:
        """(field, template) of everything rendered for a trial of method `label`."""
        return ([(f"trainer.command[{i}]", text) for i, text in enumerate(self.command)]
                + [(f"trainer.method_args.{label}[{i}]", text)
                   for i, text in enumerate(self.method_args.get(label, []))]
                + [(f"trainer.env.{name}", text) for name, text in self.env.items()]
                + [("trainer.result.key", self.result.key)])


def template_fields(text: str) -> list[str]:
    """The names a template uses; ValueError for a malformed one (a lone brace, {a.b}, {0})."""
    names = []
    for _, name, spec, _ in string.Formatter().parse(text):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"'{{{name}}}' is not a plain name")
        names.append(name)
        if spec and "{" in spec:
            raise ValueError(f"'{{{name}:{spec}}}': a format spec holds no template")
    return names


def check_templates(trainer: TrainerSpec, search: SearchSpec) -> None:
    """Every template of the command names only what a trial of its method gives."""
    labels = [entry.display_name for entry in search.methods]
    for label in trainer.method_args:
        if label not in labels:
            raise ValueError(f"trainer.method_args.{label}: not a method of search.methods "
                             f"({', '.join(labels)})")
    axes = tuple(search.recipe)
    files = [(f"trainer.files.{name}", trainer.template_file(name)) for name in trainer.files]
    for entry in search.methods:
        adapter = variant(entry.name).is_adapter
        names = TRIAL_TEMPLATE_NAMES + (ADAPTER_TEMPLATE_NAMES if adapter else ()) + axes
        for where, text in trainer.templates(entry.display_name) + files:
            try:
                used = template_fields(text)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc} (write {{{{ and }}}} for braces)") from None
            for name in used:
                if name not in names:
                    which = (f"method '{entry.display_name}' has no {{{name}}}; put it in "
                             "trainer.method_args" if name in ADAPTER_TEMPLATE_NAMES
                             else f"{{{name}}} is not a template name")
                    raise ValueError(f"{where}: {which}; allowed: "
                                     + ", ".join(f"{{{n}}}" for n in names))
