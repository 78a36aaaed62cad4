"""The study file of task.kind rl: its `rl` section, and one line (exit 2) for each bad value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lorasweep.cli import main
from lorasweep.config import load_study
from lorasweep.tasks.grpo import Objective
from lorasweep.tasks.rl import objective_of

from .conftest import tiny_study

RL_TASK = {"kind": "rl", "prompt_field": "text", "answer_field": "label"}


def rl_study(data_files: dict[str, Path], **rl: object) -> dict:
    study = tiny_study(data_files, task=RL_TASK, model={"source": "tiny:llama"})
    return {**study, "rl": {"group_size": 4, "max_new_tokens": 16, **rl}}


def write(tmp_path: Path, study: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def run_error(tmp_path: Path, study: dict, capsys) -> str:
    assert main(["run", str(write(tmp_path, study)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_rl_section_is_the_objective(tmp_path: Path, data_files):
    """The section's fields are the Objective's (a trainer builds one from the other), and
    optima are chosen on the mean reward, higher being better."""
    written = rl_study(data_files, loss_type="dr_grpo", beta=0.04, epsilon_high=0.28)
    written["search"]["methods"] = ["lora"]  # the KL needs adapters to switch off
    study = load_study(write(tmp_path, written))
    objective = objective_of(study.rl)
    named = set(study.rl.model_dump()) - {"verifier", "group_size", "eval_samples"}
    assert named == {f.name for f in dataclasses.fields(Objective)}
    assert (objective.loss_type, objective.beta, objective.clip_range) == ("dr_grpo", 0.04,
                                                                           (0.8, 1.28))
    assert study.task.objective == "mean_reward" and study.task.maximize


@pytest.mark.parametrize(("change", "expected"), [
    ({"rl": {"group_size": 1}}, "rl.group_size"),
    ({"rl": {"loss_type": "ppo"}}, "rl.loss_type"),
    ({"rl": {"epsilon": 1.5}}, "rl.epsilon"),
    ({"rl": {"beta": -0.1}}, "rl.beta"),
    ({"rl": {"scale_rewards": "global"}}, "rl.scale_rewards"),
    ({"rl": {"verifier": "sql"}}, "rl.verifier"),
    ({"rl": {"verifier": "code"}}, "task.execute_code: scoring code runs model-written"),
    ({"rl": {"samples": 4}}, "rl.samples"),
    ({"rl": {"eval_samples": 0}}, "rl.eval_samples"),
    ({}, "of the training data answers 'sports', not a number"),
    ({"rl": {"beta": 0.04}, "search": {"methods": ["lora", "full"]}},
     "rl.beta: the KL to the base needs the base model beside method 'full'"),
    ({"rl": {"beta": 0.04}, "search": {"methods": ["lora"], "inits": ["pissa"]}},
     "rl.beta: init 'pissa' (method 'lora') rewrites the base weight"),
    ({"rl": None}, "rl: the section of task.kind rl"),
    ({"task": {**RL_TASK, "kind": "math", "response_field": "label"}},
     "rl: the section of task.kind rl"),
    ({"task": {**RL_TASK, "answer_field": None}}, "rl.verifier math needs task.answer_field"),
    ({"task": {**RL_TASK, "prompt_field": None}}, "task.kind 'rl' needs task.prompt_field"),
    ({"task": {**RL_TASK, "prompt_field": None, "answer_field": None,
               "messages_field": "messages"}}, "task.messages_field: for kinds"),
])
def test_bad_rl_study_is_one_line_exit_2(tmp_path: Path, data_files, capsys, change, expected):
    study = rl_study(data_files)
    for section, value in change.items():
        if value is None:
            del study[section]
        else:
            study[section] = {**study[section], **value}
    assert expected in run_error(tmp_path, study, capsys)
