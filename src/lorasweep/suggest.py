"""`lorasweep suggest`: the LR for a new rank, width or full fine-tuning from finished studies,
with the rule used, and a ready-to-use PEFT LoraConfig and optimizer settings.

A finished study folder is read from what the report wrote (optima.csv), its LR grids from
trials.csv, and its recipe from study.yaml when the folder has one. The rules are
analysis.transfer's; which one a suggestion uses is the one that predicted held-out optima best
on the studies given (`--check`), else the first that applies in transfer.RULES order.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from lorasweep.analysis.compare import cell_name, family_name
from lorasweep.analysis.recipe import AxisFit, fit_recipe_axes
from lorasweep.analysis.transfer import (
    RULES,
    CheckRow,
    Prediction,
    Target,
    check_rules,
    families,
    fits_by_family,
    grid_steps,
    predict,
    score_rules,
)
from lorasweep.config import Study, parse_lora_alpha
from lorasweep.config.search import REGEX_PREFIX, TARGET_PRESETS, is_parts
from lorasweep.errors import StudyError
from lorasweep.files import write_text
from lorasweep.recipe import resolve_training
from lorasweep.records import OPTIMA_CSV, TRIALS_CSV, Optimum, read_optima_csv, read_trials_csv
from lorasweep.report import series_name
from lorasweep.space import Cell
from lorasweep.variants import LORA_FLAGS, get_init, variant


@dataclass
class FinishedStudy:
    folder: Path
    optima: list[Optimum]
    steps: dict[Cell, float]  # each cell's LR grid step, log10
    study: Study | None  # None where the folder keeps no study.yaml


def load_finished(folder: Path) -> FinishedStudy:
    """A finished study's optima, grid steps and recipe; one-line errors for what is missing."""
    for name in (OPTIMA_CSV, TRIALS_CSV):
        if not (folder / name).is_file():
            raise StudyError(f"{folder}: no {name}; give a finished study folder (`lorasweep "
                             f"report {folder}` writes {OPTIMA_CSV})")
    optima = read_optima_csv(folder / OPTIMA_CSV)
    records = read_trials_csv(folder)
    usable = [o for o in optima if o.edge != "flat" and o.lr_star > 0]
    if not usable:
        raise StudyError(f"{folder}/{OPTIMA_CSV}: no cell has a usable optimum (every cell is "
                         "flat or the file is empty)")
    from lorasweep.study.folder import STUDY_FILE, load_folder_study  # imports torch

    study = load_folder_study(folder) if (folder / STUDY_FILE).exists() else None
    return FinishedStudy(folder, usable, grid_steps(records), study)


def check(folders: list[Path]) -> list[CheckRow]:
    """Leave-one-rank-out errors of every rule on the studies in `folders`."""
    studies = [load_finished(f) for f in folders]
    rows = check_rules([(s.optima, s.steps) for s in studies])
    if not rows:
        raise StudyError(f"--check {' '.join(map(str, folders))}: nothing to check: no family "
                         "of cells at two or more ranks, and no full fine-tuning cell")
    return rows


def format_check(rows: list[CheckRow]) -> str:
    """The check as text: each rule's summary, then every held-out optimum."""
    out = ["leave one rank out: each measured optimum predicted from the other ranks of its "
           "family (errors in its grid steps, + = predicted too high)",
           f"{'rule':12s} {'n':>3s} {'mean |err|':>10s} {'max |err|':>9s} "
           f"{'within 1':>8s} {'in interval':>11s}"]
    out += [f"{s.rule:12s} {s.n:3d} {s.mean_abs:10.2f} {s.max_abs:9.2f} "
            f"{s.within_one:8.0%} {s.covered:11.0%}" for s in score_rules(rows)]
    out += ["", f"{'held out':30s} {'rule':12s} {'measured':>9s} {'predicted':>9s} {'error':>6s}"]
    out += [f"{r.cell:30s} {r.rule:12s} {r.measured:9.3g} {r.predicted:9.3g} "
            f"{r.error_steps:+6.2f}" for r in rows]
    return "\n".join(out)


@dataclass
class Suggestion:
    family: str
    predictions: list[Prediction]
    chosen: Prediction


def suggest(folders: list[Path], target: Target, method: str | None = None,
            lora_alpha: str | None = None) -> tuple[FinishedStudy, list[Suggestion]]:
    """Predictions for `target` from each family of the first study; the others (and it) fit
    the rank exponent and rank the rules by their leave-one-rank-out error."""
    studies = [load_finished(f) for f in folders]
    source = studies[0]
    fits = fits_by_family(*[s.optima for s in studies])
    scores = {s.rule: s.mean_abs for s in
              score_rules(check_rules([(s.optima, s.steps) for s in studies]))}
    wanted = None if lora_alpha is None else _alpha_text(lora_alpha)
    chosen = [f for f in families(source.optima, source.steps)
              if (method is None or f.cell.label == method)
              and (wanted is None or f.cell.alpha_spec == wanted)]
    if not chosen:
        have = sorted({f"{f.cell.label} a={f.cell.alpha_spec}"
                       for f in families(source.optima, source.steps)})
        raise StudyError(f"--from {source.folder}: no adapter cells"
                         + ("" if method is None and wanted is None else " match --method/"
                            "--lora-alpha") + (f"; it has: {', '.join(have)}" if have else ""))
    out = []
    order = list(RULES)
    for family in chosen:
        predictions = predict(family, target, fits)
        if predictions:
            best = min(predictions, key=lambda p: (scores.get(p.rule, math.inf),
                                                   order.index(p.rule)))
            out.append(Suggestion(family_name(family.cell), predictions, best))
    if not out:
        raise StudyError(f"--from {source.folder}: no rule predicts {target.describe()} for its "
                         f"cells (rules: {', '.join(RULES)}; see README 'lorasweep suggest')")
    return source, out


def _alpha_text(value: str) -> str:
    try:
        mode, number = parse_lora_alpha(yaml.safe_load(value))
    except ValueError as exc:
        raise StudyError(f"--lora-alpha {value}: {exc}") from None
    return f"{number:g}r" if mode == "per_rank" else f"{number:g}"


def format_suggestions(source: FinishedStudy, target: Target,
                       suggestions: list[Suggestion]) -> str:
    out = [f"{source.folder}: optimal LR for {target.describe()} (* the rule used: lowest "
           "leave-one-rank-out error on the studies given, see --check)",
           f"  {'cell':24s} {'rule':12s} {'lr':>9s}  {'95% interval':19s} basis"]
    for s in suggestions:
        for p in s.predictions:
            mark = "*" if p is s.chosen else " "
            out.append(f"{mark} {s.family:24s} {p.rule:12s} {p.lr:9.3g}  "
                       f"{p.low:8.3g} - {p.high:8.3g} {p.basis}")
    return "\n".join(out)


def settings(prediction: Prediction, study: Study | None) -> dict:
    """A suggestion as settings to train with: PEFT LoraConfig arguments and AdamW's."""
    cell = prediction.target
    doc: dict = {"cell": cell_name(cell), "rule": prediction.rule, "basis": prediction.basis,
                 "lr": float(f"{prediction.lr:.3g}"),
                 "lr_interval": [float(f"{prediction.low:.3g}"),
                                 float(f"{prediction.high:.3g}")]}
    notes = []
    method = variant(cell.method)
    if method.is_adapter:
        alpha = cell.alpha
        assert alpha is not None
        flags = method.peft_flags or LORA_FLAGS
        peft: dict = {"r": cell.rank, "lora_alpha": int(alpha) if alpha == int(alpha) else alpha,
                      "target_modules": _peft_targets(str(cell.target_modules)),
                      "lora_dropout": 0.0 if study is None else resolve_training(
                          study.train, cell.recipe).train.lora_dropout, **flags}
        init = str(cell.init)
        known = get_init(init)
        peft_init = known.peft if known is not None else None
        if peft_init is None:
            notes.append(f"init '{init}' is not a PEFT init_lora_weights: initialize A and B "
                         "as lorasweep's README says, or train with lorasweep")
        else:
            peft["init_lora_weights"] = peft_init
        if cell.target_modules in ("attention", "mlp") or is_parts(cell.target_modules):
            notes.append(f"target_modules '{cell.target_modules}' is a lorasweep preset: "
                         "name the modules for PEFT (lorasweep export writes them)")
        doc["peft_config"] = peft
    optimizer: dict = {"name": "AdamW", "lr": doc["lr"]}
    if study is not None and study.trainer is not None:
        del optimizer["name"]  # the command's own
        notes.append("the LRs were tuned with the study's trainer command: keep its optimizer "
                     "and schedule")
    elif study is not None:
        train = study.train
        optimizer |= {"betas": [train.adam_beta1, train.adam_beta2], "eps": train.adam_eps,
                      "weight_decay": train.weight_decay, "schedule": train.schedule,
                      "warmup_ratio": train.warmup_ratio, "grad_clip": train.grad_clip,
                      "batch_size": train.batch_size}
        if method.b_lr_ratio:
            optimizer["loraplus_lr_ratio"] = study.search.loraplus_ratio
            notes.append("LoRA+: build the optimizer with peft.optimizers."
                         "create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, "
                         "loraplus_lr_ratio=loraplus_lr_ratio)")
    if study is None:
        notes.append("the source folder keeps no study.yaml: use the recipe its LRs were "
                     "tuned with")
    doc["optimizer"] = optimizer
    if notes:
        doc["notes"] = notes
    return doc


def _peft_targets(targets: str) -> str | list[str]:
    """target_modules as PEFT takes them: a list of names, or, where the cell has `re:`
    patterns, one pattern (PEFT full-matches a string against each module's name) with each
    name as a pattern matching it or its last components, as PEFT matches a listed name."""
    if targets in TARGET_PRESETS or is_parts(targets):
        return targets
    entries = targets.split(",")
    if not any(e.startswith(REGEX_PREFIX) for e in entries):
        return entries
    return "|".join(f"(?:{e.removeprefix(REGEX_PREFIX)})" if e.startswith(REGEX_PREFIX)
                    else rf"(?:(?:.*\.)?{re.escape(e)})" for e in entries)


def settings_format(path: Path) -> str:
    """"json" or "yaml", from the --out file's name."""
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise StudyError(f"--out {path}: name a .yaml, .yml or .json file")
    return suffix.removeprefix(".").replace("yml", "yaml")


def write_settings(path: Path, docs: list[dict]) -> None:
    """The suggestions as YAML (.yaml, .yml) or JSON (.json)."""
    body = {"suggestions": docs}
    text = (json.dumps(body, indent=2) + "\n" if settings_format(path) == "json"
            else yaml.safe_dump(body, sort_keys=False))
    try:
        write_text(path, text)
    except OSError as exc:
        raise StudyError(f"--out {path}: cannot write there ({exc.strerror})") from None


# Recipe axes `suggest` moves an LR along, and the flag that names each.
RECIPE_FLAGS = {"batch_size": "--batch-size", "train_examples": "--train-examples"}


@dataclass
class RecipeSuggestion:
    fit: AxisFit
    value: float
    lr: float
    low: float
    high: float

    def as_settings(self) -> dict:
        return {"cell": series_name(self.fit), self.fit.axis: self.value, "lr": self.lr,
                "lr_interval": [self.low, self.high],
                "rule": f"fitted lr_star ~ {self.fit.axis}^k, k = {self.fit.exponent:+.3f}"}


def suggest_recipe(folder: Path, axis: str, value: float) -> list[RecipeSuggestion]:
    """The LR at a new batch size or training-set size, from the power law the study fitted.

    The line goes through the measured optimum nearest `value` (in log), and the interval
    spans the 95% interval of the exponent from there: the further the move, the wider it is.
    """
    from lorasweep.study.folder import load_folder_study

    flag = f"{RECIPE_FLAGS[axis]} {value:g}"
    if value <= 0:
        raise StudyError(f"{flag}: must be positive")
    if not (folder / TRIALS_CSV).is_file():
        raise StudyError(f"{flag}: {folder} has no {TRIALS_CSV}; give a study folder")
    maximize = load_folder_study(folder).task.maximize
    fits = [f for f in fit_recipe_axes(read_trials_csv(folder), maximize) if f.axis == axis]
    if not fits:
        raise StudyError(f"{flag}: {folder} has no fit of lr_star against {axis}; sweep "
                         f"search.recipe.{axis} over two or more values first")
    out = []
    for fit in fits:
        logs = np.log(fit.values)
        nearest = int(np.argmin(np.abs(logs - math.log(value))))
        anchor = fit.lr_stars[nearest]
        ends = [fit.transfer(anchor, fit.values[nearest], value, k)
                for k in (fit.low, fit.high) if k is not None]
        lr = fit.transfer(anchor, fit.values[nearest], value)
        out.append(RecipeSuggestion(fit, value, lr, min(ends, default=lr),
                                    max(ends, default=lr)))
    return out


def format_recipe(suggestions: list[RecipeSuggestion]) -> str:
    lines = []
    for s in suggestions:
        fit = s.fit
        interval = (f" (95% {fit.low:+.2f} to {fit.high:+.2f})" if fit.low is not None else "")
        lines.append(f"{series_name(fit)}: lr {s.lr:.3g} at {fit.axis} {s.value:g} "
                     f"(95% {s.low:.3g} - {s.high:.3g}); rule: fitted lr_star ~ {fit.axis}^k, "
                     f"k = {fit.exponent:+.2f}{interval} over {fit.axis} "
                     + " ".join(f"{v:g}" for v in fit.values)
                     + f", through the optimum at {fit.axis} "
                     + f"{min(fit.values, key=lambda v: abs(math.log(v / s.value))):g}")
    return "\n".join(lines)
