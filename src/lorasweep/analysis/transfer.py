"""LR transfer rules: predict a cell's optimal LR from optima measured at other ranks, widths or
for LoRA rather than full fine-tuning, and measure how well each rule predicted held-out optima.

Every rule reads a *family* (one study's optima of cells that differ only in rank) and a target
(a rank, a width, or full fine-tuning), and returns log10 of the predicted LR with an interval:

- `muA`: the muA table (analysis.scaling): lr ~ r^beta n^omega for the inits and alpha modes the
  paper covers;
- `muA-init-b`: muA Init[B] with lora_alpha = r transfers its LR to full fine-tuning unchanged
  (both scale as n^-1);
- `lora-10x`: practice (LoRA Without Regret): LoRA's optimal LR is about 10x full fine-tuning's;
- `fitted`: the rank exponent fitted on the studies given (the report's beta), pooled over them.

A rule anchors its exponent on every measured rank of the family: log lr(r) = mean over the
measured ranks r_i of (log lr*_i + beta (log r - log r_i)), the least-squares line of slope beta.
The interval (95%) holds the uncertainty of those optima (their seed bootstrap, or a grid step's
resolution with one seed: a uniform error over one step, sd = step / sqrt(12)) and, for `fitted`,
that of beta; a theory rule's own error is not in it: `check` measures that.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lorasweep.analysis.compare import cell_name, family_name
from lorasweep.analysis.optima import Optimum
from lorasweep.analysis.scaling import (
    RankFit,
    family_order,
    fit_rank_scaling,
    predicted_beta,
    predicted_width_exponent,
)
from lorasweep.records import TrialRecord
from lorasweep.space import Cell, grid_step
from lorasweep.variants import get_init, get_variant, mua_kind

Z95 = 1.959963984540054  # two-sided 95% of a standard normal
LORA_FULL_RATIO = 10.0


@dataclass(frozen=True)
class Target:
    """What to predict for: a rank (None with `full`), and the target width over the source's."""

    rank: int | None = None
    full: bool = False
    width_ratio: float = 1.0

    def describe(self) -> str:
        where = "full fine-tuning" if self.full else f"rank {self.rank}"
        return where + (f", width x{self.width_ratio:g}" if self.width_ratio != 1 else "")


@dataclass
class Family:
    """One study's optima of cells that differ only in rank, and their LR grid step (log10)."""

    cell: Cell  # its cells without their rank
    optima: list[Optimum]
    steps: list[float]  # each optimum's grid step, in the same order

    @property
    def ranks(self) -> list[int]:
        return [o.cell.rank for o in self.optima]


@dataclass
class Prediction:
    rule: str
    source: Cell  # the family it came from (no rank)
    target: Cell  # the predicted cell
    lr: float
    low: float
    high: float
    basis: str


def grid_steps(records: list[TrialRecord]) -> dict[Cell, float]:
    """Each cell's LR grid step (space.grid_step of the LRs it has trials at; NaN for one LR)."""
    lrs: dict[Cell, set[float]] = defaultdict(set)
    for record in records:
        lrs[record.cell].add(record.lr)
    return {cell: grid_step(sorted(values)) or math.nan for cell, values in lrs.items()}


def families(optima: list[Optimum], steps: dict[Cell, float]) -> list[Family]:
    """The adapter families of one study's optima, ranks in order."""
    groups: dict[Cell, list[Optimum]] = defaultdict(list)
    for optimum in optima:
        if optimum.cell.rank is not None:
            groups[optimum.cell.family].append(optimum)
    out = []
    for family, members in groups.items():
        members.sort(key=lambda o: o.cell.rank)
        out.append(Family(family, members, [steps.get(o.cell, math.nan) for o in members]))
    return sorted(out, key=lambda f: family_order(f.cell))


def _log_sd(optimum: Optimum, step: float) -> float:
    """Uncertainty (sd, log10) of a measured optimum: its seed bootstrap, else a grid step's."""
    if optimum.lr_star_low and optimum.lr_star_high:
        return math.log10(optimum.lr_star_high / optimum.lr_star_low) / (2 * Z95)
    return step / math.sqrt(12) if math.isfinite(step) else 0.0


def _anchored(family: Family, beta: float, rank: float) -> tuple[float, float, float]:
    """log10 lr at `rank` on the line of slope beta through the family's optima, the sd of that
    from the optima's own uncertainty, and the distance (log10) from their mean rank."""
    x = np.log10(family.ranks)
    y = np.log10([o.lr_star for o in family.optima])
    center = float(np.mean(y + beta * (math.log10(rank) - x)))
    sd = math.sqrt(sum(_log_sd(o, s) ** 2 for o, s in zip(family.optima, family.steps,
                                                           strict=True))) / len(x)
    return center, sd, abs(math.log10(rank) - float(x.mean()))


def _prediction(rule: str, family: Family, target: Target, log_lr: float, half: float,
                basis: str) -> Prediction:
    cell = Cell(method="full") if target.full else family.cell.at_rank(target.rank)
    return Prediction(rule, family.cell, cell, 10 ** log_lr, 10 ** (log_lr - half),
                      10 ** (log_lr + half), basis)


def _sources(family: Family) -> str:
    edges = [str(o.cell.rank) for o in family.optima if o.edge in ("low", "high")]
    return ("from rank" + ("s " if len(family.ranks) > 1 else " ")
            + " ".join(map(str, family.ranks))
            + (f" (rank {', '.join(edges)} at its grid's edge: a bound, not an optimum)"
               if edges else ""))


def mua_rule(family: Family, target: Target, fits: dict[Cell, RankFit]) -> Prediction | None:
    """muA's exponents in rank and width for the family's init and alpha mode."""
    beta, omega = predicted_beta(family.cell), predicted_width_exponent(family.cell)
    if target.full or beta is None or omega is None:
        return None
    center, sd, _ = _anchored(family, beta, target.rank)
    log_lr = center + omega * math.log10(target.width_ratio)
    return _prediction("muA", family, target, log_lr, Z95 * sd,
                       f"muA: lr ~ r^{beta:+g} n^{omega:+g} for {family.cell.init} init, "
                       f"lora_alpha {family.cell.alpha_spec}; {_sources(family)}")


def init_b_full_rule(family: Family, target: Target,
                     fits: dict[Cell, RankFit]) -> Prediction | None:
    """muA Init[B] with lora_alpha = r: full fine-tuning's LR is the (rank-invariant) LoRA LR."""
    cell = family.cell
    variant = get_variant(cell.method)
    if not target.full or variant is None or variant.mua_family != "lora" \
            or (cell.alpha_spec, mua_kind(cell.init)) != ("1r", "B"):
        return None
    center, sd, _ = _anchored(family, 0.0, family.ranks[0])
    log_lr = center - math.log10(target.width_ratio)
    return _prediction("muA-init-b", family, target, log_lr, Z95 * sd,
                       "muA Init[B], lora_alpha = r: the LoRA LR transfers to full fine-tuning "
                       f"(both ~ n^-1); {_sources(family)}")


def ten_x_rule(family: Family, target: Target, fits: dict[Cell, RankFit]) -> Prediction | None:
    """Practice: full fine-tuning's optimal LR is a tenth of LoRA's (same model, any rank)."""
    variant, init_spec = get_variant(family.cell.method), get_init(family.cell.init)
    if not target.full or target.width_ratio != 1 or variant is None or not variant.plain \
            or init_spec is None or not init_spec.plain:
        return None
    center, sd, _ = _anchored(family, 0.0, family.ranks[0])
    return _prediction("lora-10x", family, target, center - math.log10(LORA_FULL_RATIO),
                       Z95 * sd, f"practice: LoRA's optimal LR / full fine-tuning's = "
                       f"{LORA_FULL_RATIO:g}; {_sources(family)} (their mean)")


def fitted_rule(family: Family, target: Target, fits: dict[Cell, RankFit]) -> Prediction | None:
    """The rank exponent fitted on the studies given, anchored on this family's optima."""
    fit = fits.get(family.cell)
    if target.full or target.width_ratio != 1 or fit is None:
        return None
    center, sd, distance = _anchored(family, fit.beta, target.rank)
    beta_half = (fit.beta_high - fit.beta) if fit.beta_high is not None else 0.0
    half = math.hypot(Z95 * sd, beta_half * distance)
    interval = (f"{fit.beta_low:+.2f} to {fit.beta_high:+.2f}" if fit.beta_high is not None
                else "no interval from two ranks")
    return _prediction("fitted", family, target, center, half,
                       f"fitted: lr ~ r^{fit.beta:+.2f} ({interval}) on ranks "
                       f"{' '.join(map(str, fit.ranks))}; {_sources(family)}")


Rule = Callable[[Family, Target, dict[Cell, RankFit]], Prediction | None]
# Every rule, in the order a suggestion prefers them when no check has measured them: theory
# first, then the fit, then the rule of thumb. A new rule (e.g. in batch size) is one entry here.
RULES: dict[str, Rule] = {"muA": mua_rule, "muA-init-b": init_b_full_rule,
                          "fitted": fitted_rule, "lora-10x": ten_x_rule}


def predict(family: Family, target: Target, fits: dict[Cell, RankFit]) -> list[Prediction]:
    """What every applicable rule predicts for the target from this family."""
    return [p for rule in RULES.values() if (p := rule(family, target, fits)) is not None]


def fits_by_family(*studies: list[Optimum]) -> dict[Cell, RankFit]:
    return {fit.family: fit for fit in fit_rank_scaling(*studies)}


@dataclass
class CheckRow:
    """One held-out optimum predicted by one rule; error in grid steps (signed)."""

    rule: str
    cell: str
    measured: float
    predicted: float
    error_steps: float
    covered: bool  # the measured optimum lies in the prediction's interval


def check_rules(studies: list[tuple[list[Optimum], dict[Cell, float]]]) -> list[CheckRow]:
    """Leave one rank out: predict each measured adapter optimum from the family's other ranks
    (fitted rules refitted without it), and full fine-tuning's from each family; errors are in
    the held-out cell's grid steps. `studies` are (optima, grid_steps) pairs."""
    rows = []
    for index, (optima, steps) in enumerate(studies):
        for family in families(optima, steps):
            for held, step in zip(family.optima, family.steps, strict=True):
                if len(family.optima) < 2 or not math.isfinite(step):
                    continue
                rest = [o for o in family.optima if o is not held]
                reduced = Family(family.cell, rest,
                                 [s for o, s in zip(family.optima, family.steps, strict=True)
                                  if o is not held])
                others = [s[0] if i != index else [o for o in s[0] if o is not held]
                          for i, s in enumerate(studies)]
                target = Target(rank=held.cell.rank)
                rows += _scored(predict(reduced, target, fits_by_family(*others)), held, step)
            # full fine-tuning of a model's parts is predicted from LoRA on the same parts
            for full in (o for o in optima if o.cell.method == "full" and o.cell.target_modules
                         in (None, family.cell.target_modules)):
                step = steps.get(full.cell, math.nan)
                if math.isfinite(step):
                    rows += _scored(predict(family, Target(full=True), {}), full, step)
    return rows


def _scored(predictions: list[Prediction], held: Optimum, step: float) -> list[CheckRow]:
    return [CheckRow(p.rule, cell_name(held.cell) if held.cell.rank is not None
                     else f"full from {family_name(p.source)}",
                     held.lr_star, p.lr, math.log10(p.lr / held.lr_star) / step,
                     p.low <= held.lr_star <= p.high) for p in predictions]


@dataclass
class RuleScore:
    rule: str
    n: int
    mean_abs: float
    max_abs: float
    within_one: float  # fraction of held-out optima within one grid step
    covered: float  # fraction inside the predicted interval


def score_rules(rows: list[CheckRow]) -> list[RuleScore]:
    """Each rule's leave-one-out errors summarized, rules in RULES order."""
    out = []
    for rule in RULES:
        errors = np.abs([r.error_steps for r in rows if r.rule == rule])
        if len(errors):
            covered = [r.covered for r in rows if r.rule == rule]
            out.append(RuleScore(rule, len(errors), float(errors.mean()), float(errors.max()),
                                 float((errors <= 1).mean()), float(np.mean(covered))))
    return out
