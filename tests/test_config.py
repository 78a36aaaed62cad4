"""Bad study files get one line naming the field, exit code 2, and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorasweep.cli import main
from lorasweep.config import LRRange, load_study, resolve_study_path
from lorasweep.errors import StudyError
from lorasweep.space import expand_trials

from .conftest import tiny_study

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

BAD_STUDIES = [
    # (what to change, a word the error must contain)
    ({"train": {"steps": -5}}, "train.steps"),
    ({"train": {"steps": 10, "epochs": 1}}, "train.steps or train.epochs"),
    ({"train": {"warmup_ratio": 1.5}}, "train.warmup_ratio"),
    ({"train": {"schedule": "exponential"}}, "train.schedule"),
    ({"train": {"batch_size": "sixteen"}}, "train.batch_size"),
    ({"train": {"stepz": 10}}, "train.stepz"),
    ({"search": {"methods": ["lora", "qlora"]}}, "search.methods"),
    ({"search": {"methods": []}}, "search.methods"),
    ({"search": {"ranks": [0]}}, "search.ranks"),
    ({"search": {"lora_alpha": ["2x"]}}, "lora_alpha"),
    ({"search": {"lora_alpha": [-1]}}, "lora_alpha"),
    ({"search": {"inits": ["xavier"]}}, "search.inits"),
    ({"search": {"target_modules": "everything"}}, "target_modules"),
    ({"search": {"lr": {"low": 1e-2, "high": 1e-4}}}, "search.lr"),
    ({"search": {"lr": [0.0]}}, "search.lr"),
    ({"search": {"lr": None}}, "has no learning rates"),
    ({"search": {"seeds": [-1]}}, "search.seeds"),
    ({"search": {"seeds": [0, 0]}}, "listed twice"),
    ({"search": {"ranks": [8, 8]}}, "listed twice"),
    ({"search": {"lora_alpha": [16, 16.0]}}, "listed twice"),
    ({"search": {"methods": ["lora", "lora"]}}, "listed twice"),
    ({"search": {"methods": [{"name": "lora", "label": "x"}]}}, "a label names a peft entry"),
    ({"task": {"kind": "regression"}}, "task.kind"),
    ({"task": {"dataset": "builtin:shakespeare-genre"}}, "exactly one of task.dataset"),
    ({"task": {"validation_size": 0}}, "task.validation_size"),
    ({"task": {"validation_file": "dev.jsonl"}},  # tiny_study gives validation_size: 60
     "task.validation_file is used as given; task.validation_size (which carves one"),
    ({"task": {"validation_split": "validation", "validation_size": None}},
     "task.validation_split names a split of task.dataset; with task.train_file give "
     "task.validation_file"),
    ({"task": {"kind": "causal_lm", "messages_field": "messages", "prompt_field": "q",
               "response_field": "a"}}, "task.messages_field replaces task.prompt_field"),
    ({"task": {"messages_field": "messages"}}, "task.messages_field: for kinds causal_lm"),
    ({"task": {"kind": "causal_lm", "messages_field": "messages", "chat_template": False}},
     "task.chat_template: false cannot go with it"),
    ({"task": {"kind": "code", "prompt_field": "text", "response_field": "label",
               "validation_file": "dev.jsonl", "validation_size": None}},
     "task.validation_file: a code task is validated on HumanEval's validation half"),
    ({"task": {"kind": "code", "prompt_field": "text", "response_field": "label",
               "dataset": "builtin:humaneval", "train_file": None, "test_file": None}},
     "task.dataset: builtin:humaneval holds the code task's own validation and test problems"),
    ({"task": {"kind": "causal_lm", "loss_on": "assistant"}},
     "task.loss_on: 'assistant' needs task.messages_field"),
    ({"task": {"metric": "f1"}}, "task.metric 'f1': a classification task reports accuracy"),
    ({"model": {"source": ""}}, "model.source"),
    ({"name": "has spaces"}, "name"),
    ({"search": {"lr": [float("inf")]}}, "search.lr.0: Input should be a finite number"),
    ({"search": {"lora_alpha": [float("nan")]}}, "lora_alpha nan: a number"),
    ({"search": {"lora_alpha": ["1e400r"]}}, "lora_alpha '1e400r': a number"),
    ({"search": {"lr": {"low": 1e-2, "high": 1e-4}}},
     "search.lr: lr.high (0.0001) is below lr.low (0.01)"),
    ({"search": {"lr": {"low": 1e-4, "high": 1e-2, "per_decade": 0}}},
     "search.lr: per_decade: Input should be greater than 0"),
    ({"search": {"methods": [{"name": "lora", "lr": {"low": 1, "high": 2, "per_decade": -1}}]}},
     "search.methods.0.lr: per_decade: Input should be greater than 0"),
    ({"search": {"lr": [1e-6 * (i + 1) for i in range(20_000)]}},
     "search.lr: List should have at most 1000 items"),
    ({"search": {"lr": {"low": 1e-300, "high": 1e300}}}, "2401 learning rates; at most 1000"),
    ({"search": {"seeds": list(range(5000))}}, "search.seeds: List should have at most 1000"),
    ({"name": "x y" * 50_000}, "(got 'x yx yx y"),
    ({"train": {"dropout": "on"}}, "train.dropout: Input should be 'model' or 'off'"),
    ({"train": {"lora_dropout": 1.0}}, "train.lora_dropout: Input should be less than 1"),
    ({"train": {"lora_dropout": 0.1}, "search": {"methods": ["full"]}},
     "train.lora_dropout 0.1: method 'full' has no adapter"),
    ({"search": {"recipe": {"lora_dropout": [0.0, 0.1]}}},
     "search.recipe.lora_dropout: method 'full' has no adapter input to drop"),
    ({"search": {"methods": ["lora"], "recipe": {"lora_dropout": [0.1, 2]}}},
     "lora_dropout 2: Input should be less than 1"),
]


@pytest.mark.parametrize(("change", "expected"), BAD_STUDIES)
def test_bad_study_is_one_line_exit_2(tmp_path: Path, data_files, capsys, change, expected):
    study = tiny_study(data_files)
    for section, value in change.items():
        study[section] = {**study[section], **value} if isinstance(value, dict) else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert "Traceback" not in err and len(err) < 600, "the value shown is cut short"
    assert not (tmp_path / "out").exists(), "nothing is created for a bad study"


def test_yaml_alias_bomb_is_refused_in_one_line(tmp_path: Path, data_files):
    """Nine levels of nine aliases: 387 million values, built in microseconds by the YAML
    parser, that validation (and the error's repr of them) would take hours to walk."""
    levels = ["bomb0: &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"bomb{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(tiny_study(data_files)) + "\n".join(levels) + "\n")
    done = subprocess.run([sys.executable, "-m", "lorasweep.cli", "run", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"lorasweep: error: {path}: its YAML aliases expand to more "
                                   "than 100000 values (an alias bomb?); a study needs far fewer")


@pytest.mark.parametrize("text", ["model: [unclosed", "- a list\n- not a mapping", ""])
def test_unreadable_yaml(tmp_path: Path, capsys, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err


def test_missing_file_and_bad_override(tmp_path: Path, study_file, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "built-in studies: diffusion, quickstart, rl, vision" in capsys.readouterr().err
    assert main(["run", str(study_file()), "--set", "train.steps"]) == 2
    assert "FIELD=VALUE" in capsys.readouterr().err
    assert main(["run", str(study_file()), "--set", "train.steps=0"]) == 2
    assert "train.steps" in capsys.readouterr().err


@pytest.mark.parametrize(("change", "expected"), [
    ({"task": {"train_file": "/nonexistent/train.jsonl"}}, "task.train_file"),
    ({"task": {"text_field": "body"}}, "task.text_field"),
    ({"task": {"validation_file": "/nonexistent/dev.jsonl", "validation_size": None}},
     "task.validation_file: /nonexistent/dev.jsonl: no such file"),
    ({"search": {"target_modules": ["nonexistent_proj"]}}, "search.target_modules"),
    ({"model": {"source": "/nonexistent/model"}}, "model.source"),
    ({"task": {"train_file": None, "test_file": None, "dataset": "meta-math/MetaMathQA"}},
     "task.dataset: cannot load 'meta-math/MetaMathQA'"),  # the hub is offline in tests
])
def test_bad_data_or_model_fails_before_the_store(tmp_path: Path, study_file, capsys, change,
                                                  expected):
    out = tmp_path / "out"
    assert main(["run", str(study_file(**change)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (out / "optuna.journal").exists()


def test_overrides_and_grid(study_file):
    study = load_study(study_file(), ["train.steps=7", "search.ranks=[2, 8]",
                                      "search.lora_alpha=[16, '1r']"])
    assert study.train.steps == 7
    trials = expand_trials(study)
    # lora: 2 ranks x 2 alpha modes x 2 LRs, full: 2 LRs
    assert len(trials) == 10
    assert [t.grid_id for t in trials] == list(range(10))
    assert {t.cell.alpha for t in trials if t.cell.rank == 8} == {16.0, 8.0}


def test_lr_range_points_per_decade():
    assert LRRange(low=1e-5, high=1e-3, per_decade=2).values() == [1e-5, 3.16228e-05, 1e-4,
                                                                   3.16228e-4, 1e-3]
    assert len(LRRange(low=2e-6, high=2e-3, per_decade=4).values()) == 13


@pytest.mark.parametrize("name", ["quickstart", "vision", "diffusion", "rl"])
def test_builtin_studies_are_valid(name: str):
    """LoRA and full fine-tuning, each on its own grid with room for an optimum inside it."""
    study = load_study(resolve_study_path(name))
    lrs = {t.cell.method: [] for t in expand_trials(study)}
    for t in expand_trials(study):
        lrs[t.cell.method].append(t.lr)
    assert set(lrs) == {"lora", "full"} and all(len(v) >= 3 for v in lrs.values())


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_studies_are_valid(path: Path):
    assert expand_trials(load_study(path))


def test_study_error_is_an_exception_with_one_line():
    with pytest.raises(StudyError):
        resolve_study_path("no-such-study")


def test_a_folder_never_hides_a_builtin_study(tmp_path: Path, monkeypatch):
    """An `rl/` folder where `lorasweep run rl` is typed: the built-in study, not "cannot read";
    a folder with no built-in of its name is one line naming the file it may have meant."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rl").mkdir()
    assert resolve_study_path("rl").parent.name == "studies"
    (tmp_path / "mine").mkdir()
    with pytest.raises(StudyError, match="mine: a folder, not a study file"):
        resolve_study_path("mine")


def test_task_metric_chooses_the_objective_and_its_direction():
    from lorasweep.config import TaskSpec

    math = {"kind": "math", "dataset": "builtin:gsm8k", "prompt_field": "question",
            "response_field": "answer"}
    assert (TaskSpec(**math).objective, TaskSpec(**math).maximize) == ("accuracy_flexible", True)
    strict = TaskSpec(**math, metric="accuracy_strict")
    assert (strict.objective, strict.maximize) == ("accuracy_strict", True)
    loss = TaskSpec(**math, metric="eval_loss")
    assert (loss.objective, loss.maximize) == ("eval_loss", False)
    code = {**math, "kind": "code", "samples": 5, "pass_k": [1, 5]}
    assert TaskSpec(**code, metric="pass@5").objective == "pass@5"
    with pytest.raises(ValueError, match="pass@1, eval_loss, pass@5"):
        TaskSpec(**code, metric="pass@10")
    assert TaskSpec(kind="causal_lm", dataset="x").maximize is False


def test_dropout_defaults_and_axes(study_file):
    """A new study trains with the model's dropout and no lora_dropout; both are recipe axes
    (a study mixing LoRA and full fine-tuning gives lora_dropout to its adapter cells)."""
    from lorasweep.recipe import resolve_training

    study = load_study(study_file())
    assert (study.train.dropout, study.train.lora_dropout) == ("model", 0.0)
    mixed = load_study(study_file(), ["train.lora_dropout=0.05"])
    assert mixed.train.lora_dropout == 0.05
    swept = load_study(study_file(), ["search.methods=[lora]",
                                    "search.recipe={lora_dropout: [0.0, 0.1], dropout: [off]}"])
    training = resolve_training(swept.train, "dropout=off;lora_dropout=0.1")
    assert (training.train.dropout, training.train.lora_dropout) == ("off", 0.1)
