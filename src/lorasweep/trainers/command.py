"""A study's trials as runs of the user's own training command (`trainer:` in the study file).

Each trial runs the command once, in its own working folder (trials/trial-N/ in the study
folder, emptied first so a killed attempt leaves nothing behind for its retry to read), with
its arguments and environment rendered from the trial, and reads its metric from the JSON file
it writes or the JSON lines it prints. The worker loop, store, leases and report are the same
as for lorasweep's own engine. This module loads no torch (the command's trials need none;
the worker process still imports the fused engine beside it, once).

Fault tolerance: the command runs in its own process group (a new session), so stopping it
stops what it started; the worker kills that group on any way out it sees (a failure, Ctrl-C).
A SIGKILLed worker sees nothing, so on Linux the child is launched through a small guard that
asks the kernel to SIGKILL it when the worker dies (prctl PR_SET_PDEATHSIG, kept across exec)
and then execs the command. The guard is a separate exec rather than subprocess's preexec_fn
because preexec_fn is unsafe in a process with threads (the lease heartbeat is one).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from lorasweep.config import ResultSpec, Study, TrainerSpec
from lorasweep.errors import StudyError
from lorasweep.files import write_text
from lorasweep.recipe import parse_recipe, value_text
from lorasweep.records import TrialResult
from lorasweep.redact import redact_argv, redact_env, redact_text
from lorasweep.result_key import Step, find, key_text, parse_key, render_key
from lorasweep.space import TrialSpec
from lorasweep.trainers import DryRun, Keeper, Record, Show, describe_cell

TRIALS_DIR = "trials"
COMMAND_FILE = "command.json"  # the rendered command of the trial's last attempt, secrets masked
STDOUT_FILE, STDERR_FILE = "stdout.log", "stderr.log"
STDERR_LINES = 5  # the last lines of stderr a failed trial's reason keeps
# Run by the launched interpreter: die with the worker (PR_SET_PDEATHSIG is 1), unless the worker
# is already gone (then the parent is no longer the pid it passed), then become the command.
GUARD = ("import ctypes, os, signal, sys\n"
         "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
         "if os.getppid() != int(sys.argv[1]):\n"
         "    os._exit(1)\n"
         "os.execvp(sys.argv[2], sys.argv[2:])\n")


class TrialFailed(Exception):
    """The command ran but gave no usable result (it exited non-zero, or wrote no metric)."""


class CommandTrainer:
    """Runs each claimed trial as one run of the study's command, one after another."""

    widths = None  # the command's model is its own: nothing to match parameters on

    def __init__(self, study: Study, folder: Path) -> None:
        assert study.trainer is not None
        self.study, self.spec, self.folder = study, study.trainer, folder
        try:  # read once per process (the study file's check read them too)
            self.files = {name: self.spec.template_file(name) for name in self.spec.files}
        except ValueError as exc:
            raise StudyError(str(exc)) from None

    def check(self) -> None:
        """The program must exist (unless a shell runs it) where the worker looks for it."""
        if self.spec.shell:
            return
        try:  # a program named by the trial ({method}.sh) is checked when it runs
            program = render(self.spec.command[0], {"python": sys.executable,
                                                    "study_dir": self.spec.study_dir or "."},
                             shell=False)
        except KeyError:
            return
        if shutil.which(program) is None:
            raise StudyError(f"trainer.command[0]: '{program}' is not a program this worker "
                             "can run (not on PATH, or not executable)")

    def keep_in(self, store: Keeper) -> None:
        """Nothing beyond the resolved study file, which the store keeps already."""

    def claim_size(self) -> int:
        return 1  # each trial is its own process: idle workers take the next one

    def train(self, specs: list[TrialSpec], record: Record, show: Show, after: int = 0,
              checkpoints: dict | None = None) -> None:
        """Each trial a run of the command (search.stop_early is refused for a command, so
        every trial starts from the start)."""
        for spec in specs:
            show([spec])  # a command's steps are its own: the trial alone is shown
            record(spec, self.run(spec))

    def run(self, spec: TrialSpec) -> TrialResult:
        """Run the command for one trial and read its result."""
        out_dir = self.trial_dir(spec)
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        values = template_values(spec, out_dir, self.spec)
        argv, env = self.command(spec, values)
        for name, text in self.files.items():
            write_text(out_dir / name, render(text, values, shell=False))
        write_text(out_dir / COMMAND_FILE, json.dumps(
            {"argv": redact_argv(argv), "env": redact_env(env)}, indent=1) + "\n")
        start = time.monotonic()
        code = _run(argv, out_dir, {**os.environ, **env})
        seconds = time.monotonic() - start
        if code != 0:
            raise TrialFailed(f"the command exited with {_exit_text(code)}: "
                              + _tail(out_dir / STDERR_FILE))
        key = render_key(parse_key(self.spec.result.key),
                         lambda name: render(name, values, shell=False))
        final, curve = read_result(self.spec.result, key, out_dir, self.study.task.objective)
        return self.result(final, curve, seconds)

    def trial_dir(self, spec: TrialSpec) -> Path:
        return self.folder.resolve() / TRIALS_DIR / f"trial-{spec.grid_id}"

    def command(self, spec: TrialSpec, values: dict[str, Any]
                ) -> tuple[list[str], dict[str, str]]:
        """The trial's argument list and the environment variables it adds."""
        args = [render(text, values, self.spec.shell)
                for text in [*self.spec.command, *self.spec.method_args.get(spec.cell.label, [])]]
        argv = ["/bin/sh", "-c", " ".join(args)] if self.spec.shell else args
        env = {name: render(text, values, shell=False) for name, text in self.spec.env.items()}
        return argv, env

    def result(self, final: dict[str, Any], curve: list[dict[str, Any]],
               seconds: float) -> TrialResult:
        """The trial's TrialResult from its last report (or its best one, task.select best)."""
        name, goal = self.study.task.objective, (1 if self.study.task.maximize else -1)
        chosen = final
        if self.study.task.select == "best" and math.isfinite(final[name]):
            chosen = max((e for e in curve if math.isfinite(e[name])),
                         key=lambda e: goal * e[name], default=final)
        common: dict[str, Any] = {"steps": int(final.get("step", len(curve))),
                                  "seconds": seconds,
                                  "train_loss": final.get("train_loss", math.nan),
                                  "eval_curve": curve}
        for blown in (name, "train_loss"):  # a loss that blew up diverged whatever the metric
            if not math.isfinite(final.get(blown, 0.0)):
                return TrialResult(status="diverged", reason=f"{blown} is {final[blown]}",
                                   **common)
        return TrialResult(status="complete",
                           metrics={k: v for k, v in chosen.items() if k != "step"},
                           selected_step=chosen.get("step"), **common)

    def describe(self, trials: list[TrialSpec]) -> DryRun:
        """Each trial's command line as it would run (secrets masked)."""
        lines = []
        for spec in trials:
            argv, env = self.command(spec, template_values(spec, self.trial_dir(spec),
                                                           self.spec))
            shown = [f"{k}={v}" for k, v in redact_env(env).items()] + redact_argv(argv)
            lines.append(f"  {describe_cell(spec.cell)} seed {spec.seed} lr {spec.lr:.3g}: "
                         + shlex.join(shown))
        return DryRun(how="each trial a run of the trainer command, one per process",
                      groups=lines)


class _Number(float):
    """A number in a template: its shortest text by default (`16`, not `16.0`, for
    lora_alpha), any float format with a spec (`{lr:.1e}`)."""

    def __format__(self, spec: str) -> str:
        return value_text(float(self)) if not spec else float.__format__(self, spec)


def template_values(spec: TrialSpec, out_dir: Path, trainer: TrainerSpec) -> dict[str, Any]:
    """The values of config.TRIAL_TEMPLATE_NAMES, ADAPTER_TEMPLATE_NAMES and the recipe axes."""
    cell = spec.cell
    values: dict[str, Any] = {
        "lr": _Number(spec.lr), "seed": spec.seed, "method": cell.label, "trial": spec.grid_id,
        "out_dir": str(out_dir), "study_dir": trainer.study_dir or ".",
        "python": sys.executable}
    if cell.is_adapter:
        values |= {"rank": cell.rank, "lora_alpha": _Number(cell.alpha), "init": cell.init,
                   "target_modules": cell.target_modules}
    for axis, value in parse_recipe(cell.recipe).items():
        values[axis] = _Number(value) if isinstance(value, float) else value
    return values


class _Renderer(string.Formatter):
    """str.format over the trial's values; in a shell line each value is quoted."""

    def __init__(self, shell: bool) -> None:
        self.shell = shell

    def format_field(self, value: Any, format_spec: str) -> str:
        text = super().format_field(value, format_spec)
        return shlex.quote(text) if self.shell else text


def render(text: str, values: dict[str, Any], shell: bool) -> str:
    """A template with the trial's values in (names were checked when the study loaded)."""
    return _Renderer(shell).vformat(text, (), values)


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> int:
    """Run the command in its own process group, its output into files in `cwd`; kill the
    group if this process leaves the wait any way but the command's exit."""
    if sys.platform.startswith("linux"):
        argv = [sys.executable, "-I", "-S", "-c", GUARD, str(os.getpid()), *argv]
    with open(cwd / STDOUT_FILE, "wb") as out, open(cwd / STDERR_FILE, "wb") as err:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=err, start_new_session=True)
        try:
            return process.wait()
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def read_result(spec: ResultSpec, key: tuple[Step, ...], out_dir: Path, metric: str
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The command's final report and its evaluation curve, from its JSON file (one object: its
    one report) or its JSON lines (on stdout, or a file of them: each line holding the key is
    one evaluation, the last is the final one). `key`: spec.key parsed and rendered."""
    where = f"its {spec.file}" if spec.file is not None else "its stdout"
    path = out_dir / (spec.file if spec.file is not None else STDOUT_FILE)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise TrialFailed(f"trainer.result.file: the command wrote no {spec.file}") from None
    try:
        documents = [json.loads(text)] if spec.file is not None else None
    except ValueError:
        documents = None
    if documents is None:
        documents = []
        for line in text.splitlines():
            try:
                documents.append(json.loads(line))
            except ValueError:
                continue  # not every line a command prints is a report
    curve = [r for r in (_report(d, key, metric) for d in documents) if r is not None]
    if not curve:
        raise TrialFailed(f"trainer.result.key: {where} holds no number at "
                          f"'{spec.key}' ({key_text(key)} for this trial)")
    return curve[-1], curve


def _report(data: Any, key: tuple[Step, ...], metric: str) -> dict[str, Any] | None:
    """One report: the number at `key`, named `metric`, with the numbers beside it in the same
    object and at the top level (eval_loss, train_loss, step, ...); None where `key` holds no
    number."""
    found = find(data, key)
    if found is None or not _is_number(found[0]):
        return None
    value, holder = found
    beside = holder if isinstance(holder, dict) else {}
    around = data if isinstance(data, dict) and data is not holder else {}
    numbers = {k: int(v) if k == "step" else float(v) for k, v in {**around, **beside}.items()
               if _is_number(v) and (k != "step" or math.isfinite(v))}
    return {**numbers, metric: float(value)}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tail(path: Path) -> str:
    """The last lines of the command's stderr, joined into one line (URL passwords masked)."""
    with open(path, errors="replace") as handle:
        lines = deque((line.strip() for line in handle if line.strip()), maxlen=STDERR_LINES)
    return redact_text(" | ".join(lines)) or "(nothing on stderr)"


def _exit_text(code: int) -> str:
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:  # real-time signals have no name
        return f"signal {-code}"
