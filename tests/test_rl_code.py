"""rl.verifier code: a completion's reward is whether it passes its problem's tests in the sandbox
(tasks/verifiers.py), and an RL study over HumanEval-style problems runs through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorasweep.cli import main
from lorasweep.config import TaskSpec
from lorasweep.sandbox import OPT_IN_ENV
from lorasweep.tasks.packaged_data import humaneval
from lorasweep.tasks.verifiers import CodeVerifier

from .conftest import read_rows, write_jsonl

WHERE = "row 0 of the training data"


@pytest.fixture
def allowed(monkeypatch, runnable) -> None:
    monkeypatch.setenv(OPT_IN_ENV, "1")


def code_study(tmp_path: Path, **task: object) -> Path:
    study = {
        "name": "rl-code", "seed": 0, "model": {"source": "tiny:llama"},
        "task": {"kind": "rl", "dataset": "builtin:humaneval", "prompt_field": "prompt",
                 "execute_code": True, "validation_size": 4, "max_eval_examples": 4,
                 "timeout": 10.0, **task},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 96, "warmup_ratio": 0.0,
                  "schedule": "constant", "eval_batch_size": 4},
        "rl": {"verifier": "code", "group_size": 2, "max_new_tokens": 8},
        "search": {"methods": ["lora"], "ranks": [2], "lora_alpha": [4], "lr": [1e-3, 1e-2],
                   "seeds": [0], "target_modules": "all-linear"},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_a_completion_earns_1_when_it_passes_the_tests(allowed):
    """The canonical body continuing the prompt, and a chat answer with the whole definition in
    a fenced block, pass; a wrong body and prose do not."""
    problem = humaneval()[0][0]
    verifier = CodeVerifier(TaskSpec(kind="rl", dataset="builtin:humaneval",
                                      prompt_field="prompt", execute_code=True))
    reference = verifier.reference(problem, WHERE)
    texts = [problem["canonical_solution"],
             f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\n",
             "    return None\n",
             "I cannot solve this."]
    assert verifier.rewards(texts, [reference] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_a_problem_without_tests_is_one_line(tmp_path, allowed, capsys):
    rows = [{"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n",
             "entry_point": "f"} for _ in range(8)]
    del rows[5]["test"]
    data = write_jsonl(tmp_path / "problems.jsonl", rows)
    path = code_study(tmp_path, dataset=None, train_file=str(data))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "of the training data has no 'test' text" in err, err
    assert "row 5 of" in err


def test_code_rewards_need_the_opt_in(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    assert main(["run", str(code_study(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    assert OPT_IN_ENV in capsys.readouterr().err


def test_an_rl_study_over_humaneval_runs(tmp_path, allowed):
    """Every trial samples, runs its completions in the sandbox and records a mean_reward
    (0 from a random tiny model) and its reward curve."""
    out = tmp_path / "out"
    assert main(["run", str(code_study(tmp_path)), "--out", str(out)]) == 0
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["complete"] * 2
    assert all(float(r["metric"]) == 0.0 for r in rows)  # mean_reward
    assert "reward" in (out / "curves.csv").read_text()
