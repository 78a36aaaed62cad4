"""The rewards of task.kind rl: what a verifier checks a completion against, and how.

- `math`: the record's gold number (`answer_field`, or the response's `#### N`); a completion
  earns 1 when its last number equals it (the math task's flexible rule), else 0.
- `code`: the record is a problem in HumanEval's form (`prompt_field` the function's signature
  and docstring, `test` a `check(candidate)` function, `entry_point` the function's name); a
  completion earns 1 when the program it makes (tasks/code.program) passes the tests inside the
  OS sandbox, else 0. It runs model-written code, so it needs the code task's double opt-in
  (`task.execute_code: true` and the environment variable) and a working sandbox.

A reward is 0 or 1, never NaN; a record a verifier cannot check is refused at load in one line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from lorasweep.config import TaskSpec
from lorasweep.errors import StudyError
from lorasweep.sandbox import Limits, require_opt_in
from lorasweep.tasks.code import program, run_programs
from lorasweep.tasks.math import (
    extract_flexible,
    gold_answer,
    is_correct,
    normalize_number,
    question_prompt,
)

# The fields a code problem carries besides its prompt, as HumanEval names them.
CODE_FIELDS = ("test", "entry_point")


class Verifier(ABC):
    """Checks completions against each record's reference."""

    @abstractmethod
    def prompt(self, record: dict, templated: bool) -> str:
        """The text the model is asked, before any chat template."""

    @abstractmethod
    def reference(self, record: dict, where: str) -> Any:
        """What the record is checked against; a StudyError naming it (`where`: "row 3 of the
        training data") when it cannot be."""

    @abstractmethod
    def rewards(self, texts: list[str], references: list[Any]) -> list[float]:
        """1.0 or 0.0 for each completion text against the reference beside it."""


class MathVerifier(Verifier):
    """The right number or not."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def prompt(self, record: dict, templated: bool) -> str:
        return question_prompt(str(record[self.spec.prompt_field]), templated)

    def reference(self, record: dict, where: str) -> str:
        gold = gold_answer(record, self.spec, where)
        if normalize_number(gold) is None:  # no completion could ever be rewarded
            raise StudyError(f"task.answer_field: {where} answers {gold!r}, not a "
                             "number the verifier can compare with")
        return gold

    def rewards(self, texts: list[str], references: list[str]) -> list[float]:
        return [float(is_correct(extract_flexible(text), gold))
                for text, gold in zip(texts, references, strict=True)]


class CodeVerifier(Verifier):
    """Passes the problem's tests in the sandbox or not, one process per completion."""

    def __init__(self, spec: TaskSpec) -> None:
        require_opt_in(spec.execute_code)
        self.spec = spec
        self.limits = Limits(timeout=spec.timeout)

    def prompt(self, record: dict, templated: bool) -> str:
        return str(record[self.spec.prompt_field])  # without a template the model continues it

    def reference(self, record: dict, where: str) -> dict:
        for field in CODE_FIELDS:
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise StudyError(f"rl.verifier code: {where} has no '{field}' text "
                                 f"(a code problem needs {' and '.join(CODE_FIELDS)}, as "
                                 "HumanEval's)")
        return {"prompt": str(record[self.spec.prompt_field]),
                **{field: record[field] for field in CODE_FIELDS}}

    def rewards(self, texts: list[str], references: list[dict]) -> list[float]:
        jobs = [program(problem, text) for text, problem in zip(texts, references, strict=True)]
        return [float(passed) for passed in run_programs(jobs, self.limits)]


VERIFIERS: dict[str, type[Verifier]] = {"math": MathVerifier, "code": CodeVerifier}


def verifier_for(name: str, spec: TaskSpec) -> Verifier:
    return VERIFIERS[name](spec)
