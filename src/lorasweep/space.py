"""The search space expanded: cells (everything but LR and seed) and trials (cell, LR, seed)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from itertools import pairwise, product
from typing import Any

from lorasweep.config import TARGETS_AXIS, Study, alpha_value, parse_lora_alpha
from lorasweep.config.search import is_parts
from lorasweep.recipe import recipe_text
from lorasweep.variants import get_variant, variant

# The columns that name a cell in trials.csv, optima.csv and curvature.csv (Cell.to_row).
CELL_FIELDS = ("method", "rank", "lora_alpha", "alpha_mode", "init", "target_modules", "recipe")


@dataclass(frozen=True)
class Cell:
    """What is held fixed while the LR varies: the thing whose optimal LR we want.

    The one currency of a cell from the study file to the report: the store keeps its fields,
    the files name it by `to_row`, and everything that reads those files gets it back by
    `from_row`. A row carries less than a cell (see `from_row`), so a study's cell is compared
    with a read one through `recorded`.
    """

    method: str
    rank: int | None = None
    lora_alpha: str | None = None  # the spec as written: "16" (constant) or "2r" (per rank)
    init: str | None = None
    target_modules: str | None = None  # a preset name or a comma-joined list of module names
    loraplus_ratio: float | None = None
    peft: str | None = None  # for method `peft`: JSON of {"config", "label", "arguments"}
    recipe: str | None = None  # swept recipe values, e.g. "batch_size=32" (see recipe.py)

    @property
    def label(self) -> str:
        """The method as a person named it (a peft entry's label)."""
        return json.loads(self.peft)["label"] if self.peft else self.method

    @property
    def is_adapter(self) -> bool:
        return variant(self.method).is_adapter

    @property
    def fusable(self) -> bool:
        """Whether trials of this cell can train K at a time over one base copy."""
        return variant(self.method).fusable

    @property
    def alpha(self) -> float | None:
        """The numeric lora_alpha at this cell's rank."""
        if self.lora_alpha is None or self.rank is None:
            return None
        return alpha_value(_alpha_spec(self.lora_alpha), self.rank)

    @property
    def alpha_spec(self) -> str | None:
        """lora_alpha as the study file writes it, in its shortest form: "16" or "2r"."""
        if self.lora_alpha is None:
            return None
        mode, number = parse_lora_alpha(_alpha_spec(self.lora_alpha))
        return f"{number:g}r" if mode == "per_rank" else f"{number:g}"

    @property
    def alpha_mode(self) -> str | None:
        if self.lora_alpha is None:
            return None
        return parse_lora_alpha(_alpha_spec(self.lora_alpha))[0]

    def to_row(self) -> dict[str, Any]:
        """The cell as the files name it (CELL_FIELDS): the method by its label, lora_alpha as
        its number at this rank beside its mode."""
        return {"method": self.label, "rank": self.rank, "lora_alpha": self.alpha,
                "alpha_mode": self.alpha_mode, "init": self.init,
                "target_modules": self.target_modules, "recipe": self.recipe}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Cell:
        """The cell a file's row names, from typed values or their text (blank: none).

        A row names a peft entry by its label only, so it comes back as method `peft` holding
        that label (no configuration), and LoRA+'s ratio (the study's, not the cell's) is not in
        a row; lora_alpha comes back as the study file writes it ("16", or "2r" per rank).
        """
        def text(name: str) -> str | None:
            value = row.get(name)
            return None if value is None or value == "" else str(value)
        label, rank_text, alpha = text("method"), text("rank"), text("lora_alpha")
        if label is None:
            raise ValueError("a cell's row names no method")
        rank = int(float(rank_text)) if rank_text is not None else None
        if rank is not None and rank < 1:
            raise ValueError(f"rank {rank}: a rank is at least 1")
        spec = None
        if alpha is not None and rank is not None:  # 15 digits: every digit a study file gives
            spec = (f"{float(alpha) / rank:.15g}r" if text("alpha_mode") == "per_rank"
                    else f"{float(alpha):.15g}")
        known = get_variant(label) is not None
        return cls(method=label if known else "peft", rank=rank, lora_alpha=spec,
                   init=text("init"), target_modules=text("target_modules"),
                   peft=None if known else json.dumps({"label": label}),
                   recipe=text("recipe"))

    @property
    def recorded(self) -> Cell:
        """This cell as read back from its records: what a study's cell is compared by."""
        return Cell.from_row(self.to_row())

    @property
    def family(self) -> Cell:
        """The cell without its rank: what a rank fit holds fixed (its recipe included)."""
        return replace(self, rank=None)

    def at_rank(self, rank: int) -> Cell:
        """The cell of this family at another rank (lora_alpha kept as written: "2r" follows the
        rank, a constant does not)."""
        return replace(self, rank=rank)

    @property
    def key(self) -> str:
        """The cell's identity in the store; a cell without recipe axes keeps its old key."""
        suffix = "" if self.recipe is None else f"|{self.recipe}"
        if not self.is_adapter:  # full fine-tuning of every weight, or of named parts
            parts = "" if self.target_modules is None else f"|{self.target_modules}"
            return self.method + parts + suffix
        parts = [self.method, f"r={self.rank}", f"alpha={self.lora_alpha}", self.init,
                 self.target_modules]
        if self.loraplus_ratio is not None:
            parts.append(f"ratio={self.loraplus_ratio:g}")
        if self.peft is not None:
            parts.append(self.peft)
        return "|".join(str(p) for p in parts) + suffix


@dataclass(frozen=True)
class TrialSpec:
    """One training run: a cell, a learning rate and a seed. `grid_id` numbers it in the study."""

    grid_id: int
    cell: Cell
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.cell.key}|lr={self.lr:.6g}|seed={self.seed}"

    @property
    def group_key(self) -> str:
        """Trials with the same group key share base, init and data order: they can be fused."""
        return f"{self.cell.key}|seed={self.seed}"

    def to_attrs(self) -> dict[str, Any]:
        """Flat, JSON-friendly fields for the store."""
        return {"grid_id": self.grid_id, "trial_key": self.key, "group_key": self.group_key,
                "lr": self.lr, "seed": self.seed, **asdict(self.cell)}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TrialSpec:
        cell_fields = {name: attrs.get(name) for name in Cell.__dataclass_fields__}
        return cls(grid_id=int(attrs["grid_id"]), cell=Cell(**cell_fields), lr=float(attrs["lr"]),
                   seed=int(attrs["seed"]))


def _alpha_spec(text: str) -> float | str:
    return text if text.endswith("r") else float(text)


def _alpha_text(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def target_text(targets: list[str] | str) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)


def recipes_of(study: Study) -> list[str | None]:
    """Every combination of the study's recipe axes (target modules aside) as cell text."""
    axes = {axis: values for axis, values in study.search.recipe.items() if axis != TARGETS_AXIS}
    return [recipe_text(dict(zip(axes, combo, strict=True)))
            for combo in product(*axes.values())]


def grid_step(lrs: list[float]) -> float | None:
    """One step of an LR grid: log10 of the median ratio between neighbouring LRs (ascending);
    None for a grid of one LR. Errors of predicted LRs are counted in it."""
    if len(lrs) < 2:
        return None
    return statistics.median(math.log10(b / a) for a, b in pairwise(lrs))


def matched_rank(rank: int, reference_width: int, width: int) -> int:
    """The rank whose adapter on layers of total `width` (in + out) has as many parameters as a
    rank-`rank` adapter on layers of total `reference_width`, to the nearest whole rank."""
    return max(1, round(rank * reference_width / width))


def cells_of(study: Study, widths: dict[str, int] | None = None
             ) -> list[tuple[Cell, list[float]]]:
    """Every cell of the study with its LR grid, in a stable order.

    With search.match_params, `widths` (target text -> adapter width, methods/targets.py) sets
    each target set's rank to match the first set's parameter count.
    """
    search = study.search
    targets = search.recipe.get(TARGETS_AXIS, [search.target_modules])
    if search.match_params and widths is None:
        raise ValueError("search.match_params needs the model's layer widths")

    def rank_for(rank: int, target: list[str] | str) -> int:
        if not search.match_params:
            return rank
        assert widths is not None
        return matched_rank(rank, widths[target_text(targets[0])], widths[target_text(target)])
    out: list[tuple[Cell, list[float]]] = []
    for entry, recipe in product(search.methods, recipes_of(study)):
        lrs = search.lrs_for(entry)
        if not variant(entry.name).is_adapter:
            # full fine-tuning trains every weight, or every weight of the parts a target names
            parts = [target for target in targets if is_parts(target)] or [None]
            out.extend((Cell(method=entry.name, target_modules=part, recipe=recipe), lrs)
                       for part in parts)
            continue
        ratio = search.loraplus_ratio if variant(entry.name).b_lr_ratio else None
        peft = None if entry.peft is None else json.dumps(
            {"config": entry.peft_config, "label": entry.display_name, "arguments": entry.peft},
            sort_keys=True)
        inits = ["peft"] if peft else entry.inits(search.inits)
        # A peft entry that fixes r itself trains at that rank only.
        ranks = [entry.peft["r"]] if entry.peft and "r" in entry.peft else search.ranks
        for target, rank, alpha, init in product(targets, ranks, search.lora_alpha, inits):
            if not entry.peft or "r" not in entry.peft:
                rank = rank_for(rank, target)
            cell = Cell(method=entry.name, rank=rank, lora_alpha=_alpha_text(alpha), init=init,
                        target_modules=target_text(target), loraplus_ratio=ratio, peft=peft,
                        recipe=recipe)
            out.append((cell, lrs))
    return out


def expand_trials(study: Study, widths: dict[str, int] | None = None) -> list[TrialSpec]:
    """All trials of the study: cells x seeds x LRs, numbered in a stable order."""
    trials: list[TrialSpec] = []
    for cell, lrs in cells_of(study, widths):
        for seed in study.search.seeds:
            for lr in lrs:
                trials.append(TrialSpec(grid_id=len(trials), cell=cell, lr=lr, seed=seed))
    return trials
