"""`lorasweep report`: optima.csv, report.md and a self-contained report.html from a study folder.

The same tables go into both documents; the HTML embeds its figures so it opens from disk alone.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lorasweep.analysis.compare import cell_name, fixed_lr_table
from lorasweep.analysis.optima import Optimum
from lorasweep.analysis.recipe import AxisFit
from lorasweep.analysis.scaling import RankFit
from lorasweep.analysis.stopping import StopCost
from lorasweep.analysis.summary import StudyAnalysis
from lorasweep.analysis.transfer import CheckRow, score_rules
from lorasweep.config import Study
from lorasweep.files import write_text
from lorasweep.records import (
    OPTIMA_CSV,
    TrialRecord,
    TrialSource,
    read_curvature_csv,
    read_curves_csv,
    write_curves_csv,
    write_optima_csv,
    write_rungs_csv,
    write_trials_csv,
)
from lorasweep.report.answer import build_answer
from lorasweep.report.curvature import curvature_tables
from lorasweep.report.curves import curve_names, curve_tables
from lorasweep.report.numbers import fmt
from lorasweep.report.plots import (
    curve_figure,
    lr_star_vs_axis,
    lr_star_vs_rank,
    metric_vs_lr,
    peaks_plot,
)
from lorasweep.report.tables import Table, html_report, markdown_report


def build_tables(analysis: StudyAnalysis) -> list[Table]:
    """Every table of the report, in the order it shows them."""
    a = analysis
    return [_trials_table(a.records), *_stopping_tables(a.stop_costs),
            _optima_table(a.optima, a.metric_name),
            *_peak_tables(a), *_shared_lr_tables(a.records, a.maximize),
            *_rank_tables(a.rank_fits), *transfer_tables(a.transfer_checks),
            *_recipe_tables(a.recipe_fits, a.metric_name),
            *_target_tables(a.records, a.optima, a.metric_name), *_full_ratio_tables(a.optima)]


def _trials_table(records: list[TrialRecord]) -> Table:
    counts = Counter(r.status for r in records)
    return Table(
        "Trials", "Every trial of the grid by status; diverged and failed trials are results too.",
        ["status", "trials"], [[status, str(n)] for status, n in sorted(counts.items())])


def _stopping_tables(costs: list[StopCost]) -> list[Table]:
    if not costs:
        return []
    return [Table(
        "Stopped early",
        "search.stop_early: the LRs of a cell that could not be its optimum stopped at a rung "
        "(pruned), each after a decay probe. steps: what the trials trained, the probes "
        "included, against the same trials each trained to the end.",
        ["cell", "complete", "pruned", "diverged", "steps", "to the end", "share"],
        [[cell_name(c.cell) if c.cell is not None else "all", str(c.complete), str(c.pruned),
          str(c.diverged), str(c.steps), str(c.full_steps), f"{c.share:.0%}"]
         for c in costs])]


def _optima_table(optima: list[Optimum], metric_name: str) -> Table:
    return Table(
        "Optimal learning rate per cell",
        "lr_best is the best grid LR; lr_star refines it with a parabola in log-LR; the interval "
        "is a bootstrap over seeds (none with one seed). edge: the optimum sits at the end of the "
        "grid, so the true optimum may lie beyond: add the LRs suggested; flat: every LR scored "
        "the same, so the cell has no optimum (train longer or widen the grid)"
        + ("; stopped: a grid neighbour of the best stopped early at a rung, so the best is not "
           "refined." if any(o.edge == "stopped" for o in optima) else "."),
        ["cell", "lr_best", "lr_star", "interval", f"peak {metric_name}", "std", "seeds", "LRs",
         "diverged", "edge"],
        [[cell_name(o.cell), fmt(o.lr_best), fmt(o.lr_star),
          f"{fmt(o.lr_star_low)} - {fmt(o.lr_star_high)}" if o.lr_star_low else "-",
          fmt(o.peak), fmt(o.peak_std), str(o.n_seeds),
          str(o.n_lrs) + (" (too few)" if o.n_lrs < 3 else ""), str(o.diverged),
          f"{o.edge}: add {', '.join(map(fmt, o.suggest))}" if o.suggest else o.edge]
         for o in optima])


def _peak_tables(analysis: StudyAnalysis) -> list[Table]:
    """The cells at their own tuned LR, and (with seeds) their pairwise differences."""
    peaks, metric_name = analysis.peaks, analysis.metric_name
    if not peaks:
        return []
    spread = max(p.mean for p in peaks) - min(p.mean for p in peaks)
    tables = [Table(
        "Compared at each cell's own tuned LR",
        (f"Peaks with 95% bootstrap intervals over seeds; spread (max - min) {fmt(spread)}."
         if analysis.seeded else
         f"One seed per cell: each peak is a single run, so it has no interval and the "
         f"spread (max - min) {fmt(spread)} may be seed noise; add seeds (search.seeds) to "
         "tell. The pairwise differences and the peaks figure need seeds and are left out."),
        ["cell", f"peak {metric_name}", "interval", "seeds"],
        [[p.name, fmt(p.mean), f"{fmt(p.low)} - {fmt(p.high)}" if p.low is not None
          else "-", str(len(p.values))] for p in peaks])]
    if analysis.seeded and analysis.differences:
        tables.append(Table(
            "Pairwise differences at tuned LR", "a - b, with 95% bootstrap intervals.",
            ["a", "b", "difference", "interval"],
            [[d.a, d.b, fmt(d.difference),
              f"{fmt(d.low)} - {fmt(d.high)}" if d.low is not None else "-"]
             for d in analysis.differences]))
    return tables


def _rank_tables(fits: list[RankFit]) -> list[Table]:
    if not fits:
        return []
    return [Table(
        "Optimal LR against rank",
        "log lr_star = a + beta log r per method, lora_alpha and init, with a 95% interval "
        "for beta (three ranks or more), beside the slope muA predicts.",
        ["method", "lora_alpha", "init", "ranks", "beta", "interval", "muA"],
        [[_family_name(f), str(f.alpha), str(f.init), " ".join(map(str, f.ranks)),
          f"{f.beta:+.3f}", f"{f.beta_low:+.3f} - {f.beta_high:+.3f}"
          if f.beta_low is not None else "-",
          f"{f.predicted:+.3f}" if f.predicted is not None else "-"] for f in fits])]


def _full_ratio_tables(optima: list[Optimum]) -> list[Table]:
    full = [o for o in optima if o.cell.method == "full"]
    adapters = [o for o in optima if o.cell.method != "full" and o.cell.rank]
    if not (full and adapters):
        return []
    return [Table(
        "LoRA / full fine-tuning LR ratio", "lr_star of each adapter cell over full "
        "fine-tuning's (practitioners use about 10).",
        ["cell", "ratio"],
        [[cell_name(o.cell), fmt(o.lr_star / full[0].lr_star)] for o in adapters])]


def _shared_lr_tables(records: list[TrialRecord], maximize: bool) -> list[Table]:
    """What one shared LR would conclude, over only the LRs that two or more cells ran."""
    names, fixed = fixed_lr_table(records, maximize)
    if len(names) < 2:
        return []
    shared = [r for r in fixed if r["winner"]]
    if not shared:
        return [Table("At one shared learning rate", "The cells' LR grids share no learning "
                      "rate, so no single-LR comparison can be made; each cell is compared at "
                      "its own tuned LR above.", [], [])]
    return [Table(
        "At one shared learning rate",
        "What a comparison at a single LR would conclude, over the LRs that two or more cells "
        "ran: the winner changes with the LR.",
        ["lr", *names, "winner"],
        [[fmt(r["lr"]), *[fmt(r["means"].get(n)) for n in names], r["winner"]]
         for r in shared])]


def _family_name(fit: RankFit) -> str:
    """A rank fit's method, with its target set and recipe when they are not the defaults."""
    extras = [value for value in (fit.family.target_modules, fit.family.recipe)
              if value not in (None, "all-linear")]
    return " ".join([fit.method, *extras])


def series_name(fit: AxisFit) -> str:
    """The cells of a recipe fit, named by what they share."""
    return cell_name(fit.series)


def _target_tables(records: list[TrialRecord], optima: list[Optimum],
                   metric_name: str) -> list[Table]:
    """Adapters on different target modules side by side with their trainable parameter counts
    (equal, to a rank, under search.match_params)."""
    adapters = [o for o in optima if o.cell.target_modules is not None]
    if len({o.cell.target_modules for o in adapters}) < 2:
        return []
    params = {r.cell: r.trainable_params for r in records if r.trainable_params is not None}
    return [Table(
        "Target modules compared",
        "Each target set at its own tuned LR, with the trainable parameters of one trial "
        "(search.match_params scales each set's rank to the first set's count).",
        ["cell", "target modules", "trainable params", "lr_star", f"peak {metric_name}"],
        [[cell_name(o.cell), str(o.cell.target_modules), fmt(params.get(o.cell)), fmt(o.lr_star),
          fmt(o.peak)] for o in adapters])]


def _recipe_tables(fits: list[AxisFit], metric_name: str) -> list[Table]:
    """Per swept recipe axis: the fitted exponent beside its references, and the points."""
    tables = []
    for axis in dict.fromkeys(f.axis for f in fits):
        members = [f for f in fits if f.axis == axis]
        references = members[0].references
        tables.append(Table(
            f"Optimal LR against {axis}",
            f"lr_star = c * {axis}^k through the cells that differ only in {axis}, with a 95% "
            "interval for k (a bootstrap over seeds that re-refines every cell's lr_star; the t "
            "interval of the slope with one seed)" + (", beside reference exponents" if
                                                       references else "") + ".",
            ["cells", axis, "k", "interval", *references],
            [[series_name(f), " ".join(f"{v:g}" for v in f.values), f"{f.exponent:+.3f}",
              f"{f.low:+.3f} - {f.high:+.3f}" if f.low is not None else "-",
              *[f"{r:+.2f}" for r in references.values()]] for f in members]))
        tables.append(Table(
            f"lr_star and peak against {axis}",
            f"Each cell's refined optimal LR, the fitted power law there, and its peak "
            f"{metric_name} (at its best grid LR).",
            ["cells", axis, "lr_star", "fit", f"peak {metric_name}"],
            [[series_name(f), f"{v:g}", fmt(star), fmt(f.predict(v)), fmt(peak)]
             for f in members
             for v, star, peak in zip(f.values, f.lr_stars, f.peaks, strict=True)]))
    return tables


def transfer_tables(checks: list[CheckRow]) -> list[Table]:
    """How well each LR transfer rule (lorasweep suggest) predicted this study's own optima."""
    if not checks:
        return []
    return [Table(
        "LR transfer rules, leave one rank out",
        "Each measured optimum predicted from the other ranks of its cell family (full "
        "fine-tuning's from each family) by each rule of `lorasweep suggest`; errors in the "
        "held-out cell's grid steps; in interval: the measured optimum lies in the predicted "
        "95% interval.",
        ["rule", "predictions", "mean abs error", "max abs error", "within 1 step",
         "in interval"],
        [[s.rule, str(s.n), f"{s.mean_abs:.2f}", f"{s.max_abs:.2f}", f"{s.within_one:.0%}",
          f"{s.covered:.0%}"] for s in score_rules(checks)]), Table(
        "LR transfer, each held-out optimum", "Error: log10(predicted / measured) in grid "
        "steps; + means the rule predicted too high.",
        ["held out", "rule", "measured", "predicted", "error"],
        [[c.cell, c.rule, fmt(c.measured), fmt(c.predicted), f"{c.error_steps:+.2f}"]
         for c in checks])]


def write_study_outputs(folder: Path, store: TrialSource, study: Study) -> list[Path]:
    """trials.csv from the store, then the report on it, ranked by the study's metric."""
    records = write_trials_csv(folder, store, study.task.objective)
    write_curves_csv(folder, store)
    write_rungs_csv(folder, store)
    return write_report(folder, records, study.task.objective, study.task.maximize, study.name)


def write_report(folder: Path, records: list[TrialRecord], metric_name: str, maximize: bool,
                 title: str) -> list[Path]:
    """Write optima.csv, the figures, report.md and report.html into the study folder."""
    analysis = StudyAnalysis(records, metric_name, maximize)
    curves = read_curves_csv(folder)
    tables = (build_tables(analysis) + curve_tables(records, curves, metric_name)
              + curvature_tables(read_curvature_csv(folder), analysis.optima))
    write_optima_csv(folder, analysis.optima)
    answer = build_answer(analysis)
    figures = _figures(folder, analysis) + [
        (f"Training {name} against step", curve_figure(records, curves, name,
                                                       folder / f"{name}_curve.png"))
        for name in curve_names(records, curves)]
    write_text(folder / "report.md", markdown_report(title, tables, figures, answer))
    write_text(folder / "report.html", html_report(title, tables, figures, answer))
    return [folder / OPTIMA_CSV, folder / "report.md", folder / "report.html"]


def _figures(folder: Path, analysis: StudyAnalysis) -> list[tuple[str, Path]]:
    """Draw the report's figures into the folder; (caption, file) of each."""
    metric_name = analysis.metric_name
    figures = [("Validation metric against learning rate",
                metric_vs_lr(analysis.records, metric_name, folder / "metric_vs_lr.png"))]
    if analysis.seeded:
        figures.append(("Peaks at tuned LR",
                        peaks_plot(analysis.peaks, metric_name, folder / "peaks.png")))
    else:  # one seed: no intervals to draw; a figure from an earlier report would mislead
        (folder / "peaks.png").unlink(missing_ok=True)
    if analysis.rank_fits:
        figures.append(("Optimal LR against rank",
                        lr_star_vs_rank(analysis.rank_fits, analysis.optima,
                                        folder / "lr_star_vs_rank.png")))
    for axis in dict.fromkeys(f.axis for f in analysis.recipe_fits):
        members = [f for f in analysis.recipe_fits if f.axis == axis]
        figures.append((f"Optimal LR and peak against {axis}",
                        lr_star_vs_axis(members, [series_name(f) for f in members], metric_name,
                                        folder / f"lr_star_vs_{axis}.png")))
    return figures
