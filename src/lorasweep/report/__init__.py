"""`lorasweep report`: optima.csv, report.md and a self-contained report.html from a study folder.

The same tables go into both documents; the HTML embeds its figures so it opens from disk alone.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lorasweep.analysis.compare import (
    cell_name,
    fixed_lr_table,
    pairwise,
    tuned_peaks,
)
from lorasweep.analysis.optima import find_optima
from lorasweep.analysis.scaling import fit_rank_scaling
from lorasweep.files import atomic_path, write_text
from lorasweep.report.plots import lr_star_vs_rank, metric_vs_lr, peaks_plot

OPTIMA_CSV = "optima.csv"
OPTIMA_COLUMNS = ("method", "rank", "lora_alpha", "alpha_mode", "init", "target_modules",
                  "lr_best", "lr_star", "lr_star_low", "lr_star_high", "peak", "peak_std",
                  "n_seeds", "edge", "suggest", "n_lrs", "diverged")


@dataclass
class Table:
    title: str
    note: str
    header: list[str]
    rows: list[list[str]]


def _fmt(value: object, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}g}"
    return str(value)


def build_tables(rows: list[dict], metric_name: str, maximize: bool) -> tuple[list[Table], dict]:
    """Every table of the report, and what the figures need."""
    optima = find_optima(rows, maximize)
    optima_rows = [o.as_row() for o in optima]
    peaks = tuned_peaks(rows, optima)
    fits = fit_rank_scaling(optima)
    counts = Counter(r["status"] for r in rows)
    tables = [Table(
        "Trials", "Every trial of the grid by status; diverged and failed trials are results too.",
        ["status", "trials"], [[status, str(n)] for status, n in sorted(counts.items())])]
    tables.append(Table(
        "Optimal learning rate per cell",
        "lr_best is the best grid LR; lr_star refines it with a parabola in log-LR; the interval "
        "is a bootstrap over seeds (none with one seed). edge: the optimum sits at the end of the "
        "grid, so the true optimum may lie beyond: add the LRs suggested; flat: every LR scored "
        "the same, so the cell has no optimum (train longer or widen the grid).",
        ["cell", "lr_best", "lr_star", "interval", f"peak {metric_name}", "std", "seeds", "LRs",
         "diverged", "edge"],
        [[cell_name(o.cell), _fmt(o.lr_best), _fmt(o.lr_star),
          f"{_fmt(o.lr_star_low)} - {_fmt(o.lr_star_high)}" if o.lr_star_low else "-",
          _fmt(o.peak), _fmt(o.peak_std), str(o.n_seeds),
          str(o.n_lrs) + (" (too few)" if o.n_lrs < 3 else ""), str(o.diverged),
          f"{o.edge}: add {', '.join(map(_fmt, o.suggest))}" if o.suggest else o.edge]
         for o in optima]))
    if peaks:
        spread = max(p.mean for p in peaks) - min(p.mean for p in peaks)
        tables.append(Table(
            "Compared at each cell's own tuned LR",
            f"Peaks with 95% bootstrap intervals over seeds; spread (max - min) {_fmt(spread)}.",
            ["cell", f"peak {metric_name}", "interval", "seeds"],
            [[p.name, _fmt(p.mean), f"{_fmt(p.low)} - {_fmt(p.high)}" if p.low is not None
              else "-", str(len(p.values))] for p in peaks]))
        diffs = pairwise(peaks)
        if diffs:
            tables.append(Table(
                "Pairwise differences at tuned LR", "a - b, with 95% bootstrap intervals.",
                ["a", "b", "difference", "interval"],
                [[d["a"], d["b"], _fmt(d["difference"]),
                  f"{_fmt(d['low'])} - {_fmt(d['high'])}" if d["low"] is not None else "-"]
                 for d in diffs]))
    names, fixed = fixed_lr_table(rows, maximize)
    if len(names) > 1:
        tables.append(Table(
            "At one shared learning rate",
            "What a comparison at a single LR would conclude: the winner changes with the LR.",
            ["lr", *names, "winner"],
            [[_fmt(r["lr"]), *[_fmt(r["means"].get(n)) for n in names], r["winner"]]
             for r in fixed]))
    if fits:
        tables.append(Table(
            "Optimal LR against rank",
            "log lr_star = a + beta log r per method, alpha mode and init, with a 95% interval "
            "for beta (three ranks or more), beside the slope muA predicts.",
            ["method", "alpha mode", "init", "ranks", "beta", "interval", "muA"],
            [[f.method, str(f.alpha_mode), str(f.init), " ".join(map(str, f.ranks)),
              f"{f.beta:+.3f}", f"{f.beta_low:+.3f} - {f.beta_high:+.3f}"
              if f.beta_low is not None else "-",
              f"{f.predicted:+.3f}" if f.predicted is not None else "-"] for f in fits]))
    full = [o for o in optima if o.cell["method"] == "full"]
    adapters = [o for o in optima if o.cell["method"] != "full" and o.cell.get("rank")]
    if full and adapters:
        tables.append(Table(
            "LoRA / full fine-tuning LR ratio", "lr_star of each adapter cell over full "
            "fine-tuning's (practitioners use about 10).",
            ["cell", "ratio"],
            [[cell_name(o.cell), _fmt(o.lr_star / full[0].lr_star)] for o in adapters]))
    return tables, {"optima_rows": optima_rows, "peaks": peaks, "fits": fits}


def write_report(folder: Path, rows: list[dict], metric_name: str, maximize: bool,
                 title: str) -> list[Path]:
    """Write optima.csv, the figures, report.md and report.html into the study folder."""
    tables, parts = build_tables(rows, metric_name, maximize)
    tables += _curvature_section(folder, parts["optima_rows"])
    with atomic_path(folder / OPTIMA_CSV) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=OPTIMA_COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()}
                         for row in parts["optima_rows"])
    figures = [("Validation metric against learning rate",
                metric_vs_lr(rows, metric_name, folder / "metric_vs_lr.png"))]
    if parts["peaks"]:
        figures.append(("Peaks at tuned LR",
                        peaks_plot(parts["peaks"], metric_name, folder / "peaks.png")))
    if parts["fits"]:
        figures.append(("Optimal LR against rank",
                        lr_star_vs_rank(parts["fits"], parts["optima_rows"],
                                        folder / "lr_star_vs_rank.png")))
    write_text(folder / "report.md", _markdown(title, tables, figures))
    write_text(folder / "report.html", _html(title, tables, figures))
    return [folder / OPTIMA_CSV, folder / "report.md", folder / "report.html"]


def _curvature_section(folder: Path, optima_rows: list[dict]) -> list[Table]:
    """The tables of `lorasweep curvature`, where the folder has its curvature.csv."""
    from lorasweep.report.curvature import curvature_tables, read_curvature  # it imports Table

    return curvature_tables(read_curvature(folder), optima_rows)


def _markdown(title: str, tables: list[Table], figures: list[tuple[str, Path]]) -> str:
    out = [f"# {title}", ""]
    for table in tables:
        out += [f"## {table.title}", "", table.note, "",
                "| " + " | ".join(table.header) + " |",
                "|" + "---|" * len(table.header)]
        out += ["| " + " | ".join(row) + " |" for row in table.rows]
        out.append("")
    for caption, path in figures:
        out += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    return "\n".join(out)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; table-layout: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left;
         overflow-wrap: anywhere; font-size: 0.9em; }
th { background: #f3f3f3; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1.5em; }
p.note { color: #555; max-width: 60em; }
"""


def _html(title: str, tables: list[Table], figures: list[tuple[str, Path]]) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>"]
    for table in tables:
        out.append(f"<h2>{e(table.title)}</h2><p class='note'>{e(table.note)}</p><table>")
        out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in table.header) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                for row in table.rows]
        out.append("</table>")
    for caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        out.append(f"<h2>{e(caption)}</h2><img alt='{e(caption)}' "
                   f"src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)
