"""The answer a study gives, in a few sentences written from its numbers.

One builder for the three places that show it: the top of report.md and report.html, the end of
`lorasweep run` and `lorasweep status`. It says which cell is best at its own tuned LR and
whether the others can be told from it, each method's recommended LR with its interval and any
grid-edge warning, the adapter / full fine-tuning LR ratio, and what to run next.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from lorasweep.analysis.compare import Difference, Peak, cell_name, versus
from lorasweep.analysis.optima import Optimum
from lorasweep.analysis.stopping import StopCost
from lorasweep.analysis.summary import StudyAnalysis
from lorasweep.recipe import parse_recipe
from lorasweep.records import TrialRecord
from lorasweep.report.numbers import fmt

UNFINISHED = ("waiting", "running", "interrupted", "paused")
SHOWN_OTHERS = 4  # cells compared with the best one by one; the rest are counted


@dataclass
class AnswerPart:
    """One labelled part of the answer: a label and its sentences."""

    label: str
    lines: list[str]


def build_answer(analysis: StudyAnalysis) -> list[AnswerPart]:
    """The answer of a study, from the same optima, peaks and differences as its report."""
    optima, metric_name, records = analysis.optima, analysis.metric_name, analysis.records
    if not optima:
        return [AnswerPart("Best", ["no trial has finished yet"]), _next(records, optima, [])]
    peaks = analysis.peaks
    pick = max if analysis.maximize else min
    best = pick(range(len(peaks)), key=lambda i: peaks[i].mean)
    if len(peaks) > 1 and len({p.mean for p in peaks}) == 1:  # a tie: nothing to tell apart
        parts = [AnswerPart("Best", [f"none: every cell scored {metric_name} "
                                     f"{fmt(peaks[best].mean)} at its tuned LR"])]
        rivals = []
    else:
        parts = [AnswerPart("Best", [_best_line(optima[best], peaks[best], metric_name)])]
        rivals = versus(analysis.differences, best)
    if rivals:
        parts.append(AnswerPart("Versus the best", _versus_lines(rivals, peaks)))
    by_method = _best_per_method(optima, peaks, pick)
    parts.append(AnswerPart("Recommended LR (refined between grid LRs)", [
        _lr_line(method, optimum, optima) for method, optimum in by_method.items()]))
    ratio = _ratio_lines(by_method, optima)
    if ratio:
        parts.append(AnswerPart("LoRA / full-FT LR ratio", ratio))
    if analysis.stop_costs:
        parts.append(AnswerPart("Stopped early", [stopped_line(analysis.stop_costs[-1])]))
    parts.append(_next(records, optima, rivals))
    return parts


def stopped_line(total: StopCost) -> str:
    """What search.stop_early saved, in one sentence."""
    ended = total.complete + total.pruned + total.diverged
    return (f"{total.pruned} of {ended} trials stopped at a rung; they all trained "
            f"{total.steps} steps (decay probes included) of the {total.full_steps} they would "
            f"have run to the end ({total.share:.0%})")


def answer_text(parts: list[AnswerPart]) -> str:
    """The answer as terminal lines."""
    out = ["answer:"]
    for part in parts:
        if len(part.lines) == 1:
            out.append(f"  {part.label}: {part.lines[0]}")
        else:
            out += [f"  {part.label}:", *(f"    - {line}" for line in part.lines)]
    return "\n".join(out)


def interval_text(low: float | None, high: float | None) -> str:
    """A 95% interval as the answer writes it ("to", since bounds may be negative)."""
    return f"{fmt(low)} to {fmt(high)}"


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _best_line(optimum: Optimum, peak: Peak, metric_name: str) -> str:
    spread = (f"95% interval {interval_text(peak.low, peak.high)} over {_seeds(len(peak.values))}"
              if peak.low is not None else "one seed")
    where = (f"at the {optimum.edge} edge of its grid" if optimum.edge in ("low", "high")
             else "the best of its grid")
    return (f"{peak.name}: {metric_name} {fmt(peak.mean)} ({spread}) at its tuned LR "
            f"{fmt(optimum.lr_best)}, {where}")


def _versus_lines(rivals: list[Difference], peaks: list[Peak]) -> list[str]:
    """The other cells, closest first: each one's peak, its difference from the best and whether
    the 95% interval of that difference excludes 0 (a line first saying what one seed means)."""
    rivals = sorted(rivals, key=lambda d: abs(d.difference))
    lines = []
    if any(d.low is None for d in rivals):
        lines.append("one seed, so no interval: seed noise alone may explain these differences; "
                     "add seeds to tell")
    for d in rivals[:SHOWN_OTHERS]:
        peak = fmt(peaks[d.i].mean)
        if d.low is None or d.high is None:
            lines.append(f"{d.a} {peak} (difference {fmt(d.difference)})")
            continue
        verdict = "distinguishable" if d.low > 0 or d.high < 0 else "not distinguishable"
        lines.append(f"{d.a} {peak}: {verdict} (difference {fmt(d.difference)}, "
                     f"95% interval {interval_text(d.low, d.high)})")
    if len(rivals) > SHOWN_OTHERS:
        more = len(rivals) - SHOWN_OTHERS
        lines.append(f"and {more} more cell{'s' if more > 1 else ''}, further from the best")
    return lines


def _best_per_method(optima: list[Optimum], peaks: list[Peak], pick) -> dict[str, Optimum]:
    """Each method's best cell (by its peak at tuned LR), methods in the report's order."""
    cells: dict[str, list[int]] = defaultdict(list)
    for i, optimum in enumerate(optima):
        cells[optimum.cell.label].append(i)
    return {method: optima[pick(members, key=lambda i: peaks[i].mean)]
            for method, members in cells.items()}


def _edge_warning(optimum: Optimum) -> str:
    if optimum.edge == "stopped":
        return ("; not refined between grid LRs: a grid neighbour of its best LR was stopped "
                "early (search.stop_early), so its interval counts only the LRs that ran")
    if optimum.edge in ("low", "high"):
        return (f"; at the {optimum.edge} edge of its grid, so the optimum may lie "
                f"{'below' if optimum.edge == 'low' else 'above'}: add "
                f"{', '.join(map(fmt, optimum.suggest))}")
    return ""


def _span(method: str, optima: list[Optimum], scale: float = 1.0) -> str:
    """The range of a method's lr_star over its cells (divided by `scale`), when it has several
    that differ, naming the recipe axes they differ in (their own section of the report)."""
    cells = [o for o in optima if o.cell.label == method]
    low, high = (fmt(f(o.lr_star for o in cells) / scale) for f in (min, max))
    if low == high:
        return ""
    axes = sorted({axis for o in cells for axis in parse_recipe(o.cell.recipe)})
    see = f" (with {', '.join(axes)}: see Optimal LR against {axes[0]})" if axes else ""
    return f"; its {len(cells)} cells range {low} to {high}{see}"


def _lr_line(method: str, optimum: Optimum, optima: list[Optimum]) -> str:
    if optimum.edge == "flat":
        return (f"{method}: none: every LR of its grid scored the same ({fmt(optimum.peak)}), "
                "so it has no optimum")
    spread = (f"95% interval {interval_text(optimum.lr_star_low, optimum.lr_star_high)}"
              if optimum.lr_star_low is not None else "one seed: no interval")
    several = sum(o.cell.label == method for o in optima) > 1
    where = f" at its best cell {cell_name(optimum.cell)}" if several else ""
    return (f"{method}: {fmt(optimum.lr_star)}{where} ({spread}){_span(method, optima)}"
            f"{_edge_warning(optimum)}")


def _ratio_lines(by_method: dict[str, Optimum], optima: list[Optimum]) -> list[str]:
    """Each adapter method's recommended LR over full fine-tuning's; a bound where an optimum
    sits at a grid edge (the true optimum lies beyond it, so the ratio does too)."""
    full = by_method.get("full")
    if full is None:
        return []
    lines = []
    for method, optimum in by_method.items():
        if method == "full":
            continue
        flat = [name for name, o in ((method, optimum), ("full", full)) if o.edge == "flat"]
        if flat:
            lines.append(f"{method} / full: not measured: {' and '.join(flat)} scored the same "
                         "at every LR")
            continue
        ratio = optimum.lr_star / full.lr_star
        # an adapter optimum at the high edge, or full FT's at the low edge, can only raise it
        up = optimum.edge == "high" or full.edge == "low"
        down = optimum.edge == "low" or full.edge == "high"
        bound = {(True, False): "at least ", (False, True): "at most "}.get((up, down), "")
        text = f"{method} / full: {bound}{fmt(ratio)}"
        if up and down:
            text += (" (both optima at grid edges that move the ratio opposite ways, so it may be "
                     "higher or lower: widen both grids)")
        elif not (up or down) and optimum.lr_star_low is not None and full.lr_star_low is not None:
            low = optimum.lr_star_low / full.lr_star_high
            high = optimum.lr_star_high / full.lr_star_low
            text += f" (95% interval {interval_text(low, high)}, from the two LR intervals)"
        lines.append(text + _span(method, optima, full.lr_star) + "; practitioners use about 10")
    return lines


def _next(records: list[TrialRecord], optima: list[Optimum],
          rivals: list[Difference]) -> AnswerPart:
    """What to run next: finish, rerun failures, widen grids at an edge, add seeds, train
    longer where every LR scored the same."""
    counts = Counter(r.status for r in records)
    actions = []
    unfinished = sum(counts[s] for s in UNFINISHED)
    if unfinished:
        have = "trials have" if unfinished > 1 else "trial has"
        actions.append(f"finish the study: {unfinished} {have} not finished (`lorasweep run` "
                       "resumes)")
    if counts["failed"]:
        actions.append(f"{counts['failed']} trial{'s' if counts['failed'] > 1 else ''} failed "
                       "(reason column of trials.csv): "
                       "fix the cause and rerun with --retry-failed")
    widen: dict[tuple[str, str], set[float]] = defaultdict(set)
    for optimum in optima:
        if optimum.edge in ("low", "high"):
            widen[optimum.cell.label, optimum.edge].update(optimum.suggest)
    for (method, edge), lrs in widen.items():
        cells = [cell_name(o.cell) for o in optima
                 if o.cell.label == method and o.edge == edge]
        actions.append(f"widen {method}'s LR grid {'down' if edge == 'low' else 'up'}: add "
                       f"{', '.join(fmt(lr) for lr in sorted(lrs))} ({', '.join(cells)} "
                       f"{'peaks' if len(cells) == 1 else 'peak'} at the {edge} edge)")
    flat = [cell_name(o.cell) for o in optima if o.edge == "flat"]
    if flat:
        actions.append(f"train longer (train.steps) or widen the grid: {', '.join(flat)} scored "
                       "the same at every LR")
    overlapping = [d for d in rivals
                   if d.low is not None and d.high is not None and d.low <= 0 <= d.high]
    if any(d.low is None for d in rivals):
        actions.append("add seeds (search.seeds, e.g. [0, 1, 2]) to tell the cells apart: "
                       "with one seed no difference has an interval")
    elif overlapping:
        overlap = len(overlapping)
        actions.append(f"add seeds (search.seeds) to separate the best from the {overlap} "
                       f"cell{'s' if overlap > 1 else ''} whose difference interval includes 0")
    if not actions:
        actions.append("none: every optimum lies inside its grid and the best is "
                       "distinguishable from every other cell")
    return AnswerPart("Next", actions)
