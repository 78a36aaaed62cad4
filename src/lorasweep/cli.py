"""The `lorasweep` command: run a study, see its status."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from lorasweep.errors import EXIT_BAD_INPUT, StudyError, Terminated
from lorasweep.files import is_disk_full

if TYPE_CHECKING:  # the commands import what they need when they run
    from lorasweep.config import Study
    from lorasweep.study.store import Store
from lorasweep.study.defaults import DEFAULT_PATIENCE_SECONDS, STORAGE_ENV


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes' CPU backend, imported with PEFT, warns that it cannot fetch an optional hub
    # kernel for its inference-only packed layout, which quantize.py turns off anyway.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except StudyError as exc:
        print(f"lorasweep: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        # a full disk met by a write that has no check of its own (weights, trials.csv, the
        # report): every such write is atomic, so nothing recorded is lost
        if not is_disk_full(exc):
            raise
        print(f"lorasweep: error: {exc.filename or 'a study file'}: cannot write "
              f"({exc.strerror}); what was recorded before is intact: free space, then run the "
              "same command again", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("lorasweep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Terminated:
        print("lorasweep: stopped by SIGTERM; the trials it ran go back to the queue for the "
              "other workers (or the next run)", file=sys.stderr)
        return 128 + 15


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command, its arguments and their help (docs/ prints it)."""
    parser = argparse.ArgumentParser(prog="lorasweep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or resume) a study")
    run.add_argument("study", help="a study file, or a built-in study name such as 'quickstart'")
    run.add_argument("--out", type=Path, help="study folder (default: lorasweep-studies/NAME)")
    run.add_argument("--workers", type=int, default=1, metavar="N",
                     help="worker processes on this machine sharing the study (default: 1)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the planned trials, groups and predicted peak memory of each "
                          "group; write nothing")
    _add_launch_options(run)
    _add_worker_options(run)
    run.set_defaults(handler=_run)

    worker = commands.add_parser(
        "worker", help="join a running study and train its trials until none is left")
    worker.add_argument("folder", type=Path, nargs="?",
                        help="the study folder (with --storage/--study: where this worker "
                             "writes its adapters; default lorasweep-studies/NAME)")
    worker.add_argument("--study", help="the study's name in the --storage database")
    _add_worker_options(worker)
    worker.set_defaults(handler=_worker)

    _slurm_parser(commands)

    export = commands.add_parser("export", help="write a trial's adapter as a PEFT folder")
    export.add_argument("folder", type=Path, help="the study folder")
    export.add_argument("--trial", type=int, required=True, help="the trial number (trials.csv)")
    export.add_argument("out", type=Path, help="the adapter folder to write")
    export.set_defaults(handler=_export)

    report = commands.add_parser("report", help="write optima.csv, report.md and report.html")
    report.add_argument("folder", type=Path)
    report.set_defaults(handler=_report)

    status = commands.add_parser("status", help="progress and best LRs of a study folder")
    status.add_argument("folder", type=Path)
    status.set_defaults(handler=_status)

    dashboard = commands.add_parser(
        "dashboard", help="open optuna-dashboard on a study's records, live while it runs",
        description="Serve optuna-dashboard (pip install optuna-dashboard) on a study folder's "
                    "journal file (read-only) or database: each trial with its lr and metrics "
                    "as workers record it.")
    dashboard.add_argument("source", help="a study folder, its optuna.journal, or a database "
                                          "URL such as postgresql://USER@HOST/DB")
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default: 127.0.0.1, this machine only)")
    dashboard.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    dashboard.add_argument("--storage", default=os.environ.get(STORAGE_ENV), metavar="URL",
                           help="the full database URL of a folder whose study lives in one "
                                f"(default: ${STORAGE_ENV}, else the folder's storage.json)")
    dashboard.set_defaults(handler=_dashboard)

    suggest = commands.add_parser(
        "suggest", help="the LR for a new rank, width or full fine-tuning, from finished studies")
    source = suggest.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="sources", type=Path, action="append", metavar="DIR",
                        help="finished study folder(s): predictions from the first, the rank "
                             "exponent fitted on all (repeatable)")
    source.add_argument("--check", type=Path, action="append", metavar="DIR",
                        help="leave-one-rank-out error of each rule on these studies")
    target = suggest.add_mutually_exclusive_group()
    target.add_argument("--rank", type=int, help="the rank to predict the LR for")
    target.add_argument("--to", choices=["full"], help="predict full fine-tuning's LR")
    target.add_argument("--batch-size", type=float, metavar="B",
                        help="the LR at this batch size, from the exponent the study fitted "
                             "(search.recipe.batch_size)")
    target.add_argument("--train-examples", type=float, metavar="N",
                        help="the LR at this training-set size, from the fitted exponent "
                             "(search.recipe.train_examples)")
    suggest.add_argument("--width", type=int, metavar="N",
                         help="the target model's hidden size (default: the source's)")
    suggest.add_argument("--source-width", type=int, metavar="N",
                         help="the source model's hidden size (default: read from its config)")
    suggest.add_argument("--method", help="only cells of this method")
    suggest.add_argument("--lora-alpha", help="only cells with this lora_alpha, e.g. 16 or 2r")
    suggest.add_argument("--out", type=Path, metavar="FILE",
                         help="write PEFT LoraConfig and optimizer settings (.yaml or .json)")
    suggest.set_defaults(handler=_suggest)
    _curvature_parser(commands)
    return parser


def _add_launch_options(parser: argparse.ArgumentParser) -> None:
    """What a command that creates a study and starts its workers (run, slurm) takes."""
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="override a study field, e.g. --set train.steps=200 (repeatable)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    parser.add_argument("--lease-seconds", type=float, metavar="S",
                        help="a running trial whose worker has been silent this long is run "
                             "again (default: 180; kept in the study)")
    parser.add_argument("--max-attempts", type=int, metavar="N",
                        help="runs of one trial lost to dead, preempted or timed-out workers "
                             "before it is marked failed (default: 3; kept in the study)")


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=os.environ.get(STORAGE_ENV), metavar="URL",
                        help="a database shared by workers on many machines, e.g. "
                             "postgresql://USER@HOST/DB (default: the folder's journal file, "
                             f"or ${STORAGE_ENV})")
    parser.add_argument("--device", default="cpu",
                        help="torch device: cpu, cuda (with --workers: one GPU per worker) or "
                             "cuda:N (default: cpu)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads per process (default: the cores shared out)")
    parser.add_argument("--max-group", default=None, metavar="K|auto",
                        help="most trials trained together over one base copy; auto: as many "
                             "as fit the memory (default: 1 on cpu, auto on a GPU)")
    parser.add_argument("--memory-limit", metavar="SIZE",
                        help="size groups to fit this much device memory, e.g. 40GiB "
                             "(default: the free memory; with --max-group K, at most K)")
    parser.add_argument("--patience", type=float, default=DEFAULT_PATIENCE_SECONDS, metavar="S",
                        help="how long to wait for an unreachable storage before giving up "
                             f"(default: {DEFAULT_PATIENCE_SECONDS:.0f})")


def _slurm_parser(commands) -> None:
    slurm = commands.add_parser(
        "slurm", help="train a study with N workers as a SLURM job array",
        description="Check the study and create it in its shared storage (as run does), then "
                    "submit a job array whose every task is one `lorasweep worker`; a task "
                    "preempted or at its time limit gives its trials back and is requeued. "
                    "The storage must reach every node: the study folder's journal on a shared "
                    "file system, or --storage postgresql://...")
    slurm.add_argument("study", help="a study file, or a built-in study name")
    slurm.add_argument("--array", required=True, metavar="N",
                       help="how many workers: array tasks 0..N-1")
    slurm.add_argument("--parallel", metavar="P",
                       help="at most P tasks running at once (sbatch --array=0-(N-1)%%P)")
    slurm.add_argument("--partition", help="the SLURM partition (default: the cluster's)")
    slurm.add_argument("--account", help="the SLURM account to charge")
    slurm.add_argument("--time", metavar="LIMIT",
                       help="each task's time limit: MINUTES, HH:MM:SS or D-HH:MM:SS; a task "
                            "warned 120 s before it is requeued (default: the partition's)")
    slurm.add_argument("--gpus-per-task", metavar="G",
                       help="GPUs per worker (default: 0; with G > 0, --device defaults to cuda)")
    slurm.add_argument("--cpus-per-task", metavar="C",
                       help="CPU cores per worker, also its torch threads (default: SLURM's, 1)")
    slurm.add_argument("--sbatch-option", dest="sbatch_options", action="append", default=[],
                       metavar="OPTION", help="another sbatch option for every task, written "
                       "as one word: --sbatch-option=--mem=32G (repeatable)")
    slurm.add_argument("--out", type=Path, help="study folder (default: lorasweep-studies/NAME);"
                       " it keeps the batch script and the tasks' logs (slurm/)")
    slurm.add_argument("--dry-run", action="store_true",
                       help="print the batch script; check the storage; submit nothing")
    slurm.add_argument("--wait", action="store_true",
                       help="wait until the job leaves the queue, then write the report and "
                            "print the status (as run does)")
    _add_launch_options(slurm)
    _add_worker_options(slurm)
    slurm.set_defaults(handler=_slurm, device=None)


def _curvature_parser(commands) -> None:
    curv = commands.add_parser(
        "curvature", help="largest Hessian eigenvalue per method, and the LR it predicts",
        description="Lanczos on the loss Hessian of each method's cell at its trials' init "
                    "(and after warm-up): per adapted module's block and jointly. Writes "
                    "curvature.csv and curvature.md; a started study's report gets the section.")
    curv.add_argument("study", help="a study file, a built-in study name, or a study folder")
    curv.add_argument("--out", type=Path, help="folder to write (default: the study folder, "
                      "lorasweep-studies/NAME for a study file)")
    curv.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="FIELD=VALUE", help="override a study field (study files only)")
    curv.add_argument("--method", dest="methods", action="append", metavar="NAME",
                      help="measure only this method (repeatable; default: every method)")
    curv.add_argument("--rank", type=int, help="the rank to measure (default: the study's first)")
    curv.add_argument("--batches", type=int, default=4,
                      help="training batches the loss is taken over (default: 4)")
    curv.add_argument("--warmup-steps", type=int, default=0, metavar="N",
                      help="also measure after the trial's first N steps (default: 0, init only)")
    curv.add_argument("--warmup-lr", type=float,
                      help="LR of the warm-up (default: the cell's measured optimum, else the "
                           "middle of its LR grid)")
    curv.add_argument("--adam", action="store_true",
                      help="after warm-up, also the Adam-preconditioned sharpness")
    curv.add_argument("--blocks", default="modules,joint",
                      help="modules, joint, or both comma-joined (default: both)")
    curv.add_argument("--top-k", type=int, default=1,
                      help="how many of the largest eigenvalues (default: 1)")
    curv.add_argument("--tol", type=float, default=1e-4,
                      help="Lanczos tolerance, relative to the spectral radius (default: 1e-4)")
    curv.add_argument("--max-iter", type=int, default=30,
                      help="most Hessian-vector products per block (default: 30)")
    curv.add_argument("--optima", type=Path, help="an optima.csv with measured optima (default: "
                      "the study folder's trials or optima.csv)")
    curv.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    curv.set_defaults(handler=_curvature)


def _quiet_libraries() -> None:
    """Keep the libraries' load reports and progress bars out of lorasweep's own output."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run(args: argparse.Namespace) -> int:
    from lorasweep.config import load_study, resolve_study_path
    from lorasweep.study.runner import run_study

    _quiet_libraries()
    study = load_study(resolve_study_path(args.study), args.overrides)
    options = _work_options(args)
    for flag, value, least in (("--workers", args.workers, 1), ("--max-attempts",
                               args.max_attempts, 1), ("--lease-seconds", args.lease_seconds, 1)):
        if value is not None and value < least:
            raise StudyError(f"{flag} {value:g}: must be at least {least}")
    folder = args.out or Path("lorasweep-studies") / study.name
    if args.dry_run:
        from lorasweep.study.runner import dry_run

        print(dry_run(study, folder, options))
        return 0
    started = time.perf_counter()
    summary = run_study(study, folder, options, retry_failed=args.retry_failed,
                        storage_url=args.storage, workers=args.workers, threads=args.threads,
                        lease_seconds=args.lease_seconds, max_attempts=args.max_attempts)
    elapsed = time.perf_counter() - started
    print(f"trained {summary.trained} trials in {elapsed:.0f} s; results in {folder}/trials.csv")
    _print_status(folder, args.storage)  # the full URL: the folder keeps it without its password
    return 1 if summary.failed else 0


def _slurm(args: argparse.Namespace) -> int:
    from lorasweep.config import load_study, resolve_study_path
    from lorasweep.study import slurm
    from lorasweep.study.backend import check_storage_url
    from lorasweep.study.shared_storage import check_reachable

    job = slurm.slurm_job(args.array, args.parallel, args.partition, args.account, args.time,
                          args.gpus_per_task, args.cpus_per_task, args.sbatch_options)
    if args.storage is not None:
        check_storage_url(args.storage)
    for flag, value in (("--max-attempts", args.max_attempts),
                        ("--lease-seconds", args.lease_seconds), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise StudyError(f"{flag} {value:g}: must be at least 1")
    if args.patience < 0:
        raise StudyError(f"--patience {args.patience:g}: must be at least 0")
    device = args.device or ("cuda" if job.gpus_per_task else "cpu")
    max_group = _max_group(args.max_group, device, None)
    study = load_study(resolve_study_path(args.study), args.overrides)
    folder = (args.out or Path("lorasweep-studies") / study.name).absolute()
    check_reachable(args.storage, folder, slurm.other_nodes(job.partition))
    worker = [sys.executable, "-m", "lorasweep.cli", "worker", str(folder),
              *(["--study", study.name] if args.storage else []), "--device", device,
              "--max-group", str(max_group or "auto"), "--patience", str(args.patience),
              "--threads", str(args.threads or job.cpus_per_task or 1),
              *(["--memory-limit", args.memory_limit] if args.memory_limit else [])]
    logs = folder / slurm.LOG_FOLDER
    script = slurm.batch_script(job, study.name, worker, logs)
    if args.dry_run:
        print(script, end="")
        print(f"# dry run: nothing was written or submitted; without --dry-run this is "
              f"{logs / slurm.SCRIPT_NAME}")
        return 0
    return _submit(args, study, folder, job, script)


def _submit(args: argparse.Namespace, study: Study, folder: Path, job, script: str) -> int:
    """`lorasweep slurm` past its checks: the study created and checked as `run` does it
    (on this machine's CPU, or its GPU where the job's device is here), then the array."""
    from lorasweep.files import write_text
    from lorasweep.report import write_study_outputs
    from lorasweep.study import slurm
    from lorasweep.study.options import WorkOptions
    from lorasweep.study.runner import start_study

    _quiet_libraries()
    here = args.device if args.device and _device_available(args.device) else "cpu"
    study, store, _ = start_study(study, folder, WorkOptions(device=here, patience=args.patience),
                                  retry_failed=args.retry_failed, storage_url=args.storage,
                                  lease_seconds=args.lease_seconds,
                                  max_attempts=args.max_attempts)
    path = folder / slurm.LOG_FOLDER / slurm.SCRIPT_NAME
    path.parent.mkdir(exist_ok=True)
    write_text(path, script)
    job_id = slurm.submit(path, slurm.storage_env(dict(os.environ), args.storage))
    print(f"submitted job {job_id}: {job.tasks} workers on study {study.name} "
          f"(script {path}, logs {path.parent}/{job_id}_*.out); follow it with "
          f"`lorasweep status {folder}` or `squeue -j {job_id}`")
    if not args.wait:
        return 0
    slurm.wait_for(job_id)
    write_study_outputs(folder, store, study)
    _print_status(folder, args.storage)
    unfinished = [s for s, _, _ in store.latest_by_key().values()
                  if s not in ("complete", "diverged", "pruned")]
    return 1 if unfinished else 0


def _worker(args: argparse.Namespace) -> int:
    from lorasweep.study.runner import run_worker

    _quiet_libraries()
    summary = run_worker(_work_options(args), folder=args.folder, storage_url=args.storage,
                         study_name=args.study)
    print(f"worker done: trained {summary.trained} trials ({summary.failed} failed)")
    return 1 if summary.failed else 0


def _work_options(args: argparse.Namespace):
    """Check the device, thread and group options shared by `run` and `worker`."""
    import torch

    from lorasweep.study.backend import check_storage_url
    from lorasweep.study.options import WorkOptions
    from lorasweep.trainers.memory import parse_memory

    if args.storage is not None:
        check_storage_url(args.storage)  # before any model is loaded

    _set_threads(args.threads)
    if args.device != "cpu" and not _device_available(args.device):
        raise StudyError(f"--device {args.device}: not available on this machine; allowed: cpu"
                         + (", cuda" if torch.cuda.is_available() else ""))
    if args.patience < 0:
        raise StudyError(f"--patience {args.patience:g}: must be at least 0")
    memory_limit = None if args.memory_limit is None else parse_memory(args.memory_limit)
    return WorkOptions(device=args.device, patience=args.patience, memory_limit=memory_limit,
                       max_group=_max_group(args.max_group, args.device, memory_limit))


def _max_group(text: str | None, device: str, memory_limit: int | None) -> int | None:
    """--max-group: a count of at least 1, or auto (None); a memory limit alone means auto."""
    from lorasweep.study.runner import default_max_group

    if text is None:
        return None if memory_limit is not None else default_max_group(device)
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise StudyError(f"--max-group {text}: must be a whole number of at least 1, or auto")
    return int(text)


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise StudyError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)


def _curvature(args: argparse.Namespace) -> int:
    from lorasweep.curvature.command import run_curvature
    from lorasweep.curvature.measure import Settings
    from lorasweep.study.folder import started

    _quiet_libraries()
    _set_threads(args.threads)
    settings = Settings(batches=args.batches, warmup_steps=args.warmup_steps,
                        warmup_lr=args.warmup_lr, top_k=args.top_k, tol=args.tol,
                        max_iter=args.max_iter, adam=args.adam,
                        blocks=tuple(b.strip() for b in args.blocks.split(",") if b.strip()))
    folder, text = run_curvature(args.study, settings, out=args.out, overrides=args.overrides,
                                 methods=args.methods, rank=args.rank, optima_file=args.optima)
    print(text)
    print(f"wrote {folder / 'curvature.csv'} and {folder / 'curvature.md'}")
    if started(folder):
        return _report(argparse.Namespace(folder=folder))
    return 0


def _device_available(name: str) -> bool:
    import torch

    try:
        torch.empty(1, device=name)
    except (RuntimeError, AssertionError):
        return False
    return True


def _export(args: argparse.Namespace) -> int:
    from lorasweep.export import export_trial

    _quiet_libraries()
    out = export_trial(args.folder, args.trial, args.out)
    print(f"wrote a PEFT adapter to {out}; load it with PeftModel.from_pretrained(base, '{out}')")
    return 0


def _open_results(folder: Path, storage_url: str | None = None
                  ) -> tuple[Study, Store | None]:
    """A folder's study and its store; no store for a folder of results without its records (a
    copy, an example), whose trials.csv is read instead."""
    from lorasweep.records import TRIALS_CSV
    from lorasweep.study.folder import load_folder_study, open_for_reading, started

    if not started(folder) and (folder / TRIALS_CSV).exists():
        return load_folder_study(folder), None
    return open_for_reading(folder, storage_url=storage_url)


def _report(args: argparse.Namespace) -> int:
    from lorasweep.records import read_trials_csv
    from lorasweep.report import write_report, write_study_outputs

    study, store = _open_results(args.folder)
    if store is None:
        paths = write_report(args.folder, read_trials_csv(args.folder), study.task.objective,
                             study.task.maximize, study.name)
    else:
        paths = write_study_outputs(args.folder, store, study)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    _print_status(args.folder)
    return 0


def _print_status(folder: Path, storage_url: str | None = None) -> None:
    from lorasweep.analysis.compare import cell_name
    from lorasweep.analysis.summary import StudyAnalysis
    from lorasweep.records import TrialRecord, read_trials_csv, trial_rows
    from lorasweep.report.answer import answer_text, build_answer

    study, store = _open_results(folder, storage_url)
    metric = study.task.objective
    rows = trial_rows(store, metric) if store is not None else []
    records = ([TrialRecord.from_row(row) for row in rows] if store is not None
               else read_trials_csv(folder))
    counts = Counter(record.status for record in records)
    print(f"study {study.name}: {len(records)} trials: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    analysis = StudyAnalysis(records, metric, study.task.maximize)
    for optimum in analysis.optima:
        edge = (" (a grid neighbour stopped early: not refined)" if optimum.edge == "stopped"
                else f" ({optimum.edge} edge of the grid)" if optimum.edge else "")
        print(f"  {cell_name(optimum.cell):32s} best lr {optimum.lr_best:.3g}"
              f" (refined {optimum.lr_star:.3g}){edge}  {metric} {optimum.peak:.4f}"
              f" over {optimum.n_seeds} seed{'s' if optimum.n_seeds > 1 else ''}")
    if store is not None:
        _print_workers(rows, store)
    print(answer_text(build_answer(analysis)))


def _print_workers(rows: list[dict], store) -> None:
    """Per worker: trials finished and the leases it holds; stale leases are flagged."""
    done: dict[str, Counter] = {}
    for row in rows:
        if row["worker"] and row["status"] in ("complete", "diverged", "failed"):
            done.setdefault(row["worker"], Counter())[row["status"]] += 1
    leases = store.leases()
    workers = sorted(set(done) | {lease.worker for lease in leases})
    if not workers:
        return
    print("workers:")
    for worker in workers:
        finished = ", ".join(f"{n} {s}" for s, n in sorted(done.get(worker, {}).items()))
        print(f"  {worker}: {finished or 'nothing finished yet'}")
        for lease in (lease for lease in leases if lease.worker == worker):
            if not lease.stale:  # the store's rule (Store._is_stale); the lines say why
                state = (f"heartbeat {lease.heartbeat_age:.0f} s ago, lease "
                         f"{lease.lease_left:.0f} s left")
            elif lease.process_gone:
                state = "STALE: its process has ended; the next worker reruns it"
            elif lease.lease_left <= 0:
                state = (f"STALE: silent for {lease.heartbeat_age:.0f} s, lease expired "
                         f"{-lease.lease_left:.0f} s ago; the next worker reruns it")
            else:
                state = ("STALE: its claim was cut off before a worker took it; the next "
                         "worker reruns it")
            print(f"    running trial {lease.grid_id}: {state}")


def _dashboard(args: argparse.Namespace) -> int:
    from lorasweep.study.dashboard import serve

    try:
        serve(args.source, args.host, args.port, storage_url=args.storage)
    except KeyboardInterrupt:
        print("dashboard stopped", file=sys.stderr)
    return 0


def _suggest(args: argparse.Namespace) -> int:
    from lorasweep import suggest

    if args.check:
        print(suggest.format_check(suggest.check(args.check)))
        return 0
    for axis in suggest.RECIPE_FLAGS:
        value = getattr(args, axis)
        if value is not None:
            if args.out is not None:
                suggest.settings_format(args.out)
            found = suggest.suggest_recipe(args.sources[0], axis, value)
            print(suggest.format_recipe(found))
            if args.out is not None:
                suggest.write_settings(args.out, [s.as_settings() for s in found])
                print(f"wrote {args.out}")
            return 0
    if args.rank is None and args.to is None:
        raise StudyError("suggest --from: give --rank R, --to full, --batch-size B or "
                         "--train-examples N")
    if args.rank is not None and args.rank < 1:
        raise StudyError(f"--rank {args.rank}: must be at least 1")
    if args.out is not None:
        suggest.settings_format(args.out)  # a bad name fails before anything is computed
    ratio = 1.0
    if args.width is not None:
        ratio = args.width / _source_width(args)
    target = suggest.Target(rank=args.rank, full=args.to == "full", width_ratio=ratio)
    source, suggestions = suggest.suggest(args.sources, target, args.method, args.lora_alpha)
    print(suggest.format_suggestions(source, target, suggestions))
    if args.out is not None:
        suggest.write_settings(args.out, [suggest.settings(s.chosen, source.study)
                                          for s in suggestions])
        print(f"wrote {args.out}")
    return 0


def _source_width(args: argparse.Namespace) -> int:
    """The hidden size of the model the source study tuned, to scale its LRs to --width."""
    from lorasweep.models import model_width
    from lorasweep.study.folder import load_folder_study

    for name, value in (("--width", args.width), ("--source-width", args.source_width)):
        if value is not None and value < 1:
            raise StudyError(f"{name} {value}: must be at least 1")
    if args.source_width is not None:
        return args.source_width
    try:
        study = load_folder_study(args.sources[0])
    except StudyError:
        raise StudyError(f"--width: {args.sources[0]} keeps no study.yaml to read the source "
                         "model's width from; give --source-width") from None
    if study.model is None:
        raise StudyError(f"--width: {args.sources[0]} ran a trainer command, whose model "
                         "lorasweep does not know; give --source-width")
    return model_width(study.model)


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry()
