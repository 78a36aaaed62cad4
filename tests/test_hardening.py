"""Hostile but realistic input: secrets on the command line, damaged study folders, inputs that
would crash or exhaust the machine. Each must be one line (exit 2) and lose nothing recorded."""

from __future__ import annotations

import errno
import json
import resource
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from lorasweep.analysis.optima import find_optima
from lorasweep.cli import main
from lorasweep.config import dump_study, load_study
from lorasweep.redact import redact_text
from lorasweep.space import expand_trials
from lorasweep.study.backend import JOURNAL_NAME, storage_address
from lorasweep.study.folder import describe_environment, open_for_running
from lorasweep.study.store import Store
from lorasweep.workbench import load_workbench

from .conftest import tiny_study, trial_records


def test_recorded_command_line_hides_secrets(monkeypatch):
    monkeypatch.setattr(sys, "argv", [
        "lorasweep", "run", "s.yaml", "--storage", "postgresql://me:pw1@db/x",
        "--storage=postgresql+psycopg2://me:p%40w2@db:5432/x", "--set",
        "task.dataset=https://u:pw3@example.org/data.jsonl", "--set", "model.hf_token=pw4",
        "HF_TOKEN=pw5", "--api-key", "pw6", "--set", "secret.path=pw7",
        "--storage", "postgresql://me@db/x?sslmode=require&password=pw8", "--set", "train.steps=5"])
    command = describe_environment()["command"]
    assert not any(f"pw{i}" in arg for arg in command for i in range(1, 9)), command
    assert command[4] == "postgresql://me:***@db/x"
    assert "postgresql://me@db/x?sslmode=require&password=***" in command
    assert command[-1] == "train.steps=5", "what holds no secret is kept as given"



@pytest.mark.parametrize(("text", "masked"), [
    ("postgresql://me:pw@db/x", "postgresql://me:***@db/x"),
    ("postgresql+psycopg://me:p%40w@db:5432/x", "postgresql+psycopg://me:***@db:5432/x"),
    ("postgresql://me:p@w/x@db/x", "postgresql://me:***@db/x"),  # an unencoded '@' or '/'
    ("postgresql://me@db/x?password=pw", "postgresql://me@db/x?password=***"),
    ("postgresql://me@db/x?sslmode=require&sslpassword=pw&connect_timeout=5",
     "postgresql://me@db/x?sslmode=require&sslpassword=***&connect_timeout=5"),
    ("postgresql://me@db/x?PassWord=pw;api_token=t&Client_Secret=s&sslkey=k&passwd=p",
     "postgresql://me@db/x?PassWord=***;api_token=***&Client_Secret=***&sslkey=***&passwd=***"),
    ("postgresql://me@db/x?pass%77ord=pw", "postgresql://me@db/x?pass%77ord=***"),
    ("postgresql://me:pw@db/x?password=pw2", "postgresql://me:***@db/x?password=***"),
    ("postgresql://me@db/x?a=b?password=pw", "postgresql://me@db/x?a=b?password=***"),
    ("postgresql://me:p?w&token=t@db/x?password=pw", "postgresql://me:***"),  # two readings
    ("host=db password='p w' dbname=x", "host=db password=*** dbname=x"),  # libpq's words
    ("sqlite:///study.db", "sqlite:///study.db"),
    ("postgresql://me@db/x?sslmode=require&password=", "postgresql://me@db/x?sslmode=require&password="),
])
def test_every_form_of_a_url_secret_is_masked(text, masked):
    assert redact_text(text) == masked
    assert redact_text(masked) == masked, "masking twice changes nothing"


@pytest.mark.parametrize(("url", "address"), [
    ("postgresql://me:pw@db/x", "postgresql://me@db/x"),
    ("postgresql://me@db:5432/x?password=pw", "postgresql://me@db:5432/x"),
    ("postgresql://me@db/x?sslmode=require&sslpassword=pw&token=t",
     "postgresql://me@db/x?sslmode=require"),
    ("postgresql://me@db/x", "postgresql://me@db/x"),  # as folders recorded it before
])
def test_the_recorded_address_drops_every_secret(url, address):
    """What storage.json keeps (and what two URLs are compared by): no secret, not even masked,
    so that the client looks for the password in PGPASSWORD or ~/.pgpass."""
    assert storage_address(url) == address


@pytest.fixture
def started(tmp_path: Path, study_file) -> Path:
    """A started study folder (its journal holds the study and its queued trials)."""
    folder = tmp_path / "study"
    study = load_study(study_file())
    store = open_for_running(study, folder, None)
    store.configure(dump_study(study))
    store.sync(expand_trials(study))
    return folder


def _records(journal: Path) -> list[dict]:
    data = journal.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize("tail", [b'{"op_code": 5, "worker_id": "x", "tri', b"garbage\n",
                                  b"\x00" * 100])
@pytest.mark.parametrize("when", ["before opening", "while open"])
def test_torn_journal_tail_is_cut_back(started: Path, tail: bytes, when: str, capsys):
    """A killed write leaves a cut last line (or junk): it is cut back to the last whole record,
    said in one line, and the study goes on readable; nothing is appended after a partial line."""
    journal = started / JOURNAL_NAME
    whole = journal.read_bytes()
    study = load_study(started / "study.yaml")
    store = Store(started, study.name, maximize=True) if when == "while open" else None
    journal.write_bytes(whole + tail)
    store = store or Store(started, study.name, maximize=True)
    store.configure(dump_study(study))  # an append
    assert main(["status", str(started)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut" in err[0] and f"byte {len(whole)}" in err[0], err
    assert journal.read_bytes().startswith(whole)
    assert len(_records(journal)) > len(whole.splitlines())


def test_damage_inside_the_journal_is_refused_with_its_offset(started: Path, capsys):
    journal = started / JOURNAL_NAME
    lines = journal.read_bytes().splitlines(keepends=True)
    offset = len(b"".join(lines[:2]))
    damaged = b"".join(lines[:2]) + b"{not json\n" + b"".join(lines[2:])
    journal.write_bytes(damaged)
    assert main(["status", str(started)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"byte {offset}" in err[0] and JOURNAL_NAME in err[0], err
    assert journal.read_bytes() == damaged, "nothing is changed or lost"


def test_a_dead_processs_journal_lock_is_released_at_once(started: Path):
    """A worker killed while it holds the journal's lock must not stall the next one."""
    journal = str(started / JOURNAL_NAME)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from lorasweep.study.backend import journal_lock\n"
         "journal_lock(sys.argv[1]).acquire()\n"
         "print('held', flush=True); time.sleep(600)", journal], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    appender = subprocess.run(
        [sys.executable, "-c", "import sys\n"
         "from pathlib import Path\n"
         "from lorasweep.study.store import Store\n"
         "Store(Path(sys.argv[1]), 'tiny', maximize=True).configure('x')\n"
         "print('appended')", str(started)], capture_output=True, text=True, timeout=300)
    assert appender.stdout.strip() == "appended", appender.stderr
    assert "lock" not in appender.stderr, appender.stderr


def _full_disk() -> None:
    """A file-size limit below any study file stands in for a disk already full."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))


def test_study_folder_on_a_full_disk_is_one_line_every_time(tmp_path: Path, study_file):
    path = study_file()
    load_workbench(load_study(path))  # the data's cache is written before the disk fills
    out = tmp_path / "study"
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "lorasweep.cli", "run", str(path), "--out",
                               str(out)], capture_output=True, text=True, timeout=300,
                              preexec_fn=_full_disk)
        assert done.returncode == 2, done.stderr
        err = done.stderr.strip().splitlines()
        assert len(err) == 1 and "cannot write" in err[0] and str(out) in err[0], done.stderr


def test_a_full_disk_at_any_write_is_one_line(tmp_path: Path, study_file, monkeypatch, capsys):
    """A write with no check of its own (here the adapter weights) meeting a full disk."""
    import lorasweep.study.runner as runner

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "adapters"))

    monkeypatch.setattr(runner, "save_weights", full)
    assert main(["run", str(study_file()), "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lorasweep: error: {tmp_path / 'adapters'}: cannot write (No space left on "
                   "device); what was recorded before is intact: free space, then run the same "
                   "command again"]


def _lines(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


GOOD = [{"text": f"words {i} here", "label": ["a", "b"][i % 2]} for i in range(40)]


@pytest.mark.parametrize(("content", "kind", "expected"), [
    (_lines(GOOD[:20]) + b'{"text": "caf\xe9", "label": "a"}\n' + _lines(GOOD[20:]),
     "classification", "train.jsonl: line 21 is not UTF-8"),
    (_lines(GOOD[:30]) + b'{"text": "cut short", "lab\n' + _lines(GOOD[30:]),
     "classification", "train.jsonl: line 31 is not valid JSON"),
    (_lines([{**r, "label": i % 2} for i, r in enumerate(GOOD)])
     + b'{"text": "no class", "label": NaN}\n', "classification",
     # numbered as stored, although the training data is shuffled (and carved) before the check
     "task.label_field: row 40 of the training data has no 'label' (null or NaN)"),
    (b"\n\n   \n\n", "causal_lm", "has no text"),
])
def test_bad_data_file_is_one_line(tmp_path: Path, content: bytes, kind: str, expected: str,
                                   capsys):
    train = tmp_path / ("train.txt" if kind == "causal_lm" else "train.jsonl")
    train.write_bytes(content)
    study = tiny_study({"train": train, "test": train}, task={"kind": kind, "test_file": None,
                                                              "validation_size": 0.2},
                       model={"source": "tiny:llama" if kind == "causal_lm" else "tiny:bert"})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """tiny:bert saved as a local model folder, with its tokenizer."""
    from lorasweep.config import ModelSpec
    from lorasweep.models import load_model, load_tokenizer

    spec = ModelSpec(source="tiny:bert")
    tokenizer = load_tokenizer(spec)
    folder = tmp_path / "model"
    load_model(spec, "classification", 2, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("overrides", "expected"), [
    (["train.seq_len=10000000"], "train.seq_len 10000000: above the 128 positions"),
    (["search.recipe={seq_len: [64, 4096]}"], "train.seq_len 4096: above the 128 positions"),
    (["search.ranks=[4, 64]"], "search.ranks: rank 64 is above the width"),
])
def test_what_would_exhaust_the_machine_is_refused_up_front(tmp_path: Path, study_file,
                                                            overrides, expected, capsys):
    args = [arg for o in overrides for arg in ("--set", o)]
    assert main(["run", str(study_file()), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_pickle_checkpoint_is_one_line(tmp_path: Path, study_file, model_folder, capsys):
    import torch
    from safetensors.torch import load_file

    weights = model_folder / "model.safetensors"
    torch.save(load_file(weights), model_folder / "pytorch_model.bin")
    weights.unlink()
    assert main(["run", str(study_file(model={"source": str(model_folder)})), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pickle checkpoints are not loaded; convert to safetensors" in err[0]


def test_remote_code_is_announced(model_folder, capsys):
    from lorasweep.config import ModelSpec
    from lorasweep.models import load_tokenizer

    load_tokenizer(ModelSpec(source=str(model_folder), trust_remote_code=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lorasweep: model.trust_remote_code: the Python code in {model_folder} runs, "
                   "as you, with your permissions"]


def test_optima_with_an_lr_not_yet_finished_warn_nothing():
    rows = [{"method": "lora", "rank": 8, "lora_alpha": 16.0, "alpha_mode": "constant",
             "init": "kaiming", "target_modules": "all-linear", "lr": lr, "seed": seed,
             "status": "complete", "metric": 0.5 - abs(lr - 1e-3)}
            for lr in (1e-4, 1e-3, 1e-2) for seed in (0, 1) if seed == 0 or lr < 1e-2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (optimum,) = find_optima(trial_records(rows), maximize=True)
    assert optimum.lr_best == 1e-3


def test_a_killed_worker_is_reported(tmp_path: Path, study_file, monkeypatch, capsys):
    """--workers 2 where the first worker dies at once: the other finishes the study, and the run
    says that a worker was killed."""
    import lorasweep.study.local_workers as local_workers

    real = subprocess.Popen
    started = []

    def popen(command, **kwargs):
        if "worker" in command:
            started.append(command)
        if started == [command]:
            command = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), 9)"]
        return real(command, **kwargs)

    monkeypatch.setattr(local_workers.subprocess, "Popen", popen)
    path = study_file(search={"methods": ["lora"], "lr": [1e-3, 1e-2]})
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "worker 1 of 2 was killed (SIGKILL); the others finished its trials" in err, err


def test_a_step_that_cannot_fit_in_memory_is_refused(tmp_path: Path, study_file, monkeypatch,
                                                     capsys):
    import lorasweep.trainers.fused as fused  # the fused engine checks its step's memory

    # tiny:bert keeps at least 8 x 24 x (32 x 2) x 4 bytes = 48 KiB per step at these settings
    monkeypatch.setattr(fused, "free_memory", lambda device: 40 * 1024)
    out = tmp_path / "out"
    assert main(["run", str(study_file()), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "micro-batch x train.seq_len x --max-group (8 x 24 x 1)" in err[0]
    assert not out.exists()
    monkeypatch.setattr(fused, "free_memory", lambda device: 60 * 1024)
    assert main(["run", str(study_file()), "--out", str(out)]) == 0
