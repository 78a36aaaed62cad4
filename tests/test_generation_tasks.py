"""Math and code tasks: answer extraction and scoring on fixed strings, the sandbox against
hostile programs, and the generation pipeline on a tiny causal LM (K stacked trials)."""

from __future__ import annotations

import socket
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml

from lorasweep.config import ModelSpec, load_study
from lorasweep.errors import StudyError
from lorasweep.models import load_model, load_tokenizer
from lorasweep.sandbox import (
    OPT_IN_ENV,
    Limits,
    require_opt_in,
    run_program,
)
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks import build_task, packaged_data
from lorasweep.tasks.code import definitions_only, pass_at_k, program
from lorasweep.tasks.instruction import generate, tokenize_pairs
from lorasweep.tasks.math import extract_flexible, extract_strict, normalize_number, score
from lorasweep.train import train_group

from .conftest import differing_pair

# --- extraction and scoring -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "strict", "flexible"), [
    ("She sells 9 eggs.\n#### 18", "18", "18"),
    ("#### 1,000 dollars, then 5", "1,000", "5"),
    ("The answer is $1,250.50.", None, "$1,250.50"),
    ("5 - 3 = 2, so -4 is wrong: 7.", None, "7"),
    ("####-12", "-12", "-12"),
    ("no digits here", None, None),
])
def test_extraction(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_normalization_and_accuracies():
    assert normalize_number("$1,000.00") == normalize_number("1000") == Fraction(1000)
    assert normalize_number(".5") == Fraction(1, 2) and normalize_number("7.") == 7
    assert normalize_number(None) is None and normalize_number(",") is None
    # only numbers as the extractors read them: no fractions, exponents (1e99999999 would take
    # minutes to build) or words
    assert all(normalize_number(t) is None for t in ("1/2", "1e5", "1e99999999", "nan", "inf"))
    assert normalize_number(" -$1,000.50 ") == Fraction(-2001, 2)
    texts = ["so #### 18", "it is 18", "#### 17 then 18", "#### 3"]
    assert score(texts, ["18", "18", "18", "4"]) == {"accuracy_strict": 0.25,
                                                     "accuracy_flexible": 0.75}


def test_pass_at_k_matches_its_closed_form():
    # 1 - C(n-c, k)/C(n, k): n=5, c=2, k=2 -> 1 - 3/10; k=1 -> c/n
    assert pass_at_k(5, [2], 2) == pytest.approx(0.7)
    assert pass_at_k(5, [2, 0], 1) == pytest.approx(0.2)


def test_program_assembly(runnable):
    problem = {"prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
               "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    body = "    return a + b\n\ndef junk():\n    raise SystemExit(1)\n"
    assert run_program(program(problem, body)).passed  # plain text stops at the next def
    fenced = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert run_program(program(problem, fenced)).passed
    assert not run_program(program(problem, "    return a - b\n")).passed
    # A chat model's plain answer: prose, an import, helpers, the definition, example calls.
    chat = ("Sure! Here is the function:\n\nimport operator\n\ndef helper(a, b):\n"
            "    return operator.add(a, b)\n\ndef add(a, b):\n    return helper(a, b)\n\n"
            "# Example usage:\nprint(add(1, 2))  # 3\nassert add(1, 1) == 3\n"
            "This function adds two numbers.")
    assert run_program(program(problem, chat)).passed
    fenced = "```python\ndef add(a, b):\n    return a + b\n\nassert add(1, 1) == 3\n```"
    assert run_program(program(problem, fenced)).passed
    assert run_program(program(problem, "```\n    return a + b\n```")).passed  # a fenced body
    assert definitions_only("x = 1\n@dec\ndef f():\n\n    return 1\nf()\n") == \
        "x = 1\n@dec\ndef f():\n\n    return 1\n"
    # Constants, a signature split over lines, a column-0 comment and string inside the body.
    split = ("```python\nOFFSET = 0\n\ndef add(\n    a, b\n) -> int:\n# sum them\n"
             "    note = '''\nplain\n'''\n    return a + b + OFFSET\n```")
    assert run_program(program(problem, split)).passed
    # A continuation of the body that then writes another definition keeps its body.
    assert run_program(program(problem, "    return a + b\n\ndef add(a, b):\n    return 0\n")
                       ).passed


# --- the sandbox --------------------------------------------------------------------------------

def test_opt_in_is_required(monkeypatch, runnable):
    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    with pytest.raises(StudyError, match=r"task\.execute_code"):
        require_opt_in(False)
    with pytest.raises(StudyError, match=OPT_IN_ENV):
        require_opt_in(True)
    monkeypatch.setenv(OPT_IN_ENV, "1")
    require_opt_in(True)


def test_hostile_programs_are_contained(tmp_path, runnable):
    outside = tmp_path / "escaped.txt"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    hostile = {
        "loop": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "memory hog": "x = []\nwhile True:\n    x.append(bytearray(1 << 26))",
        "write outside": f"open({str(outside)!r}, 'w').write('x')",
        "os write outside": f"import os\nos.open({str(outside)!r}, os.O_CREAT | os.O_WRONLY)",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', {str(outside)!r}])",
    }
    for name, code in hostile.items():
        outcome = run_program(code, Limits(timeout=1))
        assert not outcome.passed, name
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing ever connected
    listener.close()
    assert not outside.exists()
    # Writing inside its own working directory is allowed.
    assert run_program("open('x.txt', 'w').write('ok')\nassert open('x.txt').read() == 'ok'").passed


# --- the pipeline on a tiny causal LM ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    tokenizer = load_tokenizer(ModelSpec(source="tiny:llama"))
    return tokenizer, load_model(ModelSpec(source="tiny:llama"), "math", None, tokenizer)


def test_response_only_labels(tiny_llama):
    tokenizer, _ = tiny_llama
    split = tokenize_pairs(tokenizer, ["question: one plus one?"], ["two"], ["2"], 16,
                           "response", templated=False)
    n_prompt = len(split.prompts[0])
    labelled = split.labels[0][split.labels[0] != -100].tolist()
    assert labelled == tokenizer("two", add_special_tokens=False)["input_ids"]
    assert split.input_ids[0, n_prompt:n_prompt + len(labelled)].tolist() == labelled


def test_stacked_trials_generate_as_they_would_alone(tiny_llama):
    """Trial i of a K=2 group generates what a K=1 model with its weights generates, and a
    batch of prompts generates what each prompt alone does (left padding)."""
    tokenizer, base = tiny_llama
    cell = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming", target_modules="all-linear")
    pair, single = differing_pair(base, cell)
    texts = ["a short one", "a much longer prompt here to pad", "third"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    args = dict(device=torch.device("cpu"), tokenizer=tokenizer, max_new_tokens=5)
    grouped = generate(pair, prompts, 2, 3, **args)
    assert grouped[0] != grouped[1]  # trial 1's weights differ from trial 0's (B = 0)
    assert generate(single, prompts, 1, 3, **args)[0] == grouped[1]
    assert [generate(single, [p], 1, 1, **args)[0][0] for p in prompts] == grouped[1]


def test_math_group_trains_and_scores_each_trial_as_alone(tiny_llama, tmp_path):
    """A fused group of 2 LRs on the offline GSM8K split gives each trial the metrics (loss and
    both accuracies) it gets trained alone."""
    tokenizer, base = tiny_llama
    study = {"name": "m", "model": {"source": "tiny:llama"},
             "task": {"kind": "math", "dataset": "builtin:gsm8k", "prompt_field": "question",
                      "response_field": "answer", "validation_size": 3,
                      "max_train_examples": 8, "max_eval_examples": 2, "max_new_tokens": 3},
             "train": {"steps": 2, "batch_size": 4, "seq_len": 32},
             "search": {"methods": ["lora"], "ranks": [4], "lr": [1e-3, 1e-2]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    loaded = load_study(path)
    task = build_task(loaded, tokenizer)
    assert (len(task.train), len(task.validation), len(task.test)) == (8, 2, 2)
    cell = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming", target_modules="all-linear")
    trials = [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0) for i, lr in enumerate([1e-3, 1e-2])]
    cpu = torch.device("cpu")
    fused = train_group(base, task, loaded.train, trials, cpu)
    for trial, together in zip(trials, fused, strict=True):
        alone = train_group(base, task, loaded.train, [trial], cpu)[0]
        assert together.status == alone.status == "complete"
        assert set(together.metrics) >= {"eval_loss", "accuracy_strict", "accuracy_flexible"}
        assert together.metrics == pytest.approx(alone.metrics, rel=1e-5)
        assert together.test == pytest.approx(alone.test, rel=1e-5)


def test_math_task_from_a_hub_style_dataset(tiny_llama, tmp_path):
    """`task.dataset` names a hub dataset; here a folder laid out like a hub repo (parquet
    shards under data/, as MetaMathQA ships), loaded by the same `datasets.load_dataset` call,
    with MetaMathQA's field names and answer format (gold: the last number of the response)."""
    import datasets

    tokenizer, _ = tiny_llama
    records = [{"query": f"What is {i} times 3?", "type": "GSM_Rephrased",
                "response": f"{i} times 3 is {3 * i}.\nThe answer is: {3 * i}"}
               for i in range(1, 25)]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(records).to_parquet(
        tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    study = {"name": "m", "model": {"source": "tiny:llama"},
             "task": {"kind": "math", "dataset": str(tmp_path / "hub"), "prompt_field": "query",
                      "response_field": "response", "validation_size": 4},
             "train": {"steps": 1, "seq_len": 48}, "search": {"methods": ["lora"], "lr": [1e-3]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    task = build_task(load_study(path), tokenizer)
    assert (len(task.train), len(task.validation), task.test) == (20, 4, None)
    by_gold = {r["response"].rsplit(" ", 1)[1]: r for r in records}
    assert all(gold in by_gold for gold in task.validation.references)


def test_gsm8k_parts_are_fixed_and_disjoint():
    train, test = packaged_data.gsm8k()
    assert len(train) + len(test) == 1319 and len(test) == packaged_data.GSM8K_TEST_SIZE
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert packaged_data.gsm8k()[1] == test


def test_code_task_refuses_then_scores(tiny_llama, tmp_path, monkeypatch, runnable):
    tokenizer, model = tiny_llama
    train = tmp_path / "code.jsonl"
    train.write_text("".join(f'{{"prompt": "def f{i}():\\n", "response": "    return {i}\\n"}}\n'
                             for i in range(6)))
    raw = {"name": "c", "model": {"source": "tiny:llama"},
           "task": {"kind": "code", "train_file": str(train), "prompt_field": "prompt",
                    "response_field": "response", "validation_size": 1, "max_eval_examples": 2,
                    "max_new_tokens": 2, "samples": 2, "pass_k": [1, 2]},
           "train": {"steps": 1, "seq_len": 32}, "search": {"methods": ["lora"], "lr": [1e-3]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    with pytest.raises(StudyError, match="execute_code"):
        build_task(load_study(path), tokenizer)
    monkeypatch.setenv(OPT_IN_ENV, "1")
    task = build_task(load_study(path, ["task.execute_code=true"]), tokenizer)
    assert len(task.train) == 6 and len(task.validation) == 2
    metrics = task.evaluate(model, task.validation, 1, 4, torch.device("cpu"))
    assert metrics[0]["pass@1"] == 0.0 and metrics[0]["pass@2"] == 0.0  # random weights
    assert metrics[0]["eval_loss"] > 0
    assert Path(packaged_data.__file__).exists()
