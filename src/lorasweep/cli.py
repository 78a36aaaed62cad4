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
    suggest.add_argument("--width", type=int, metavar="N",
                         help="the target model's hidden size (default: the source's)")
    suggest.add_argument("--source-width", type=int, metavar="N",
                         help="the source model's hidden size (default: read from its config)")
    suggest.add_argument("--method", help="only cells of this method")
    suggest.add_argument("--lora-alpha", help="only cells with this lora_alpha, e.g. 16 or 2r")
    suggest.add_argument("--out", type=Path, metavar="FILE",
                         help="write PEFT LoraConfig and optimizer settings (.yaml or .json)")
    suggest.set_defaults(handler=_suggest)
    return parser


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
    if args.threads is not None:
        if args.threads < 1:
            raise StudyError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
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


def _suggest(args: argparse.Namespace) -> int:
    from lorasweep import suggest

    if args.check:
        print(suggest.format_check(suggest.check(args.check)))
        return 0
    if args.rank is None and args.to is None:
        raise StudyError("suggest --from: give --rank R or --to full")
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
    return model_width(study.model)


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry()
