"""The `lorasweep` command: run a study, see its status."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

from lorasweep.errors import StudyError

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except StudyError as exc:
        print(f"lorasweep: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("lorasweep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorasweep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or resume) a study")
    run.add_argument("study", help="a study file, or a built-in study name such as 'quickstart'")
    run.add_argument("--out", type=Path, help="study folder (default: lorasweep-studies/NAME)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a study field, e.g. --set train.steps=200 (repeatable)")
    run.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    run.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    run.add_argument("--max-group", type=int, default=None, metavar="K",
                     help="most trials trained together over one base copy "
                          "(default: 1 on cpu, 8 on a GPU)")
    run.set_defaults(handler=_run)

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
    _curvature_parser(commands)
    return parser


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
    # Imported here so `lorasweep --help` answers without loading torch.
    import torch

    from lorasweep.config import load_study, resolve_study_path
    from lorasweep.study.runner import default_max_group, run_study

    _quiet_libraries()
    study = load_study(resolve_study_path(args.study), args.overrides)
    _set_threads(args.threads)
    if args.device != "cpu" and not _device_available(args.device):
        raise StudyError(f"--device {args.device}: not available on this machine; allowed: cpu"
                         + (", cuda" if torch.cuda.is_available() else ""))
    if args.max_group is not None and args.max_group < 1:
        raise StudyError(f"--max-group {args.max_group}: must be at least 1")
    folder = args.out or Path("lorasweep-studies") / study.name
    started = time.perf_counter()
    summary = run_study(study, folder, max_group=args.max_group or default_max_group(args.device),
                        retry_failed=args.retry_failed, device=args.device)
    elapsed = time.perf_counter() - started
    print(f"trained {summary.trained} trials in {elapsed:.0f} s; results in {folder}/trials.csv")
    _print_status(folder)
    return 1 if summary.failed else 0


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise StudyError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)


def _curvature(args: argparse.Namespace) -> int:
    from lorasweep.curvature.command import run_curvature
    from lorasweep.curvature.measure import Settings
    from lorasweep.study.store import JOURNAL_NAME

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
    if (folder / JOURNAL_NAME).exists():
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


def _report(args: argparse.Namespace) -> int:
    from lorasweep.report import write_report
    from lorasweep.results import write_trials_csv

    study, store, metric, maximize = _open_folder(args.folder)
    rows = write_trials_csv(args.folder, store, metric)
    for path in write_report(args.folder, rows, metric, maximize, study.name):
        print(f"wrote {path}")
    return 0


def _open_folder(folder: Path):
    """A study folder's study, store, metric name and direction, without loading any model."""
    from lorasweep.study.folder import load_folder_study
    from lorasweep.study.store import JOURNAL_NAME, Store
    from lorasweep.tasks import TASK_CLASSES

    study = load_folder_study(folder)
    if not (folder / JOURNAL_NAME).exists():
        raise StudyError(f"{folder}: the study has not started (no {JOURNAL_NAME})")
    task_class = TASK_CLASSES[study.task.kind]
    maximize = task_class.greater_is_better
    store = Store(folder, study.name, maximize=maximize, create=False)
    return study, store, task_class.metric_name, maximize


def _status(args: argparse.Namespace) -> int:
    _print_status(args.folder)
    return 0


def _print_status(folder: Path) -> None:
    from lorasweep.analysis.compare import cell_name
    from lorasweep.analysis.optima import find_optima
    from lorasweep.results import trial_rows

    study, store, metric, maximize = _open_folder(folder)
    rows = trial_rows(store, metric)
    counts = Counter(row["status"] for row in rows)
    print(f"study {study.name}: {len(rows)} trials: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for optimum in find_optima(rows, maximize):
        edge = f" ({optimum.edge} edge of the grid)" if optimum.edge else ""
        print(f"  {cell_name(optimum.cell):32s} best lr {optimum.lr_best:.3g}"
              f" (refined {optimum.lr_star:.3g}){edge}  {metric} {optimum.peak:.4f}"
              f" over {optimum.n_seeds} seed{'s' if optimum.n_seeds > 1 else ''}")
    for row in rows:
        if row["status"] == "running":
            print(f"  running: trial {row['trial']} lr {row['lr']:.3g}")


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry()
