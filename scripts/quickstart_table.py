"""The quickstart's table in the README, from a finished run: never typed by hand.

    .venv/bin/lorasweep run quickstart
    .venv/bin/python scripts/quickstart_table.py [lorasweep-studies/quickstart]

prints, from the study folder's trials.csv, optima.csv and environment.json, one row per method:
validation loss (validation accuracy; test accuracy) at each LR, the best grid LR bold, the
refined lr_star, and under it the CPU, torch thread count and date of the study's latest run.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

DEFAULT_FOLDER = Path("lorasweep-studies/quickstart")
NAMES = {"lora": "LoRA r={rank}, lora_alpha {alpha}", "full": "full fine-tuning"}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def cell_name(row: dict[str, str]) -> str:
    alpha = row["lora_alpha"]
    if row["alpha_mode"] == "per_rank" and row["rank"]:
        alpha = f"{float(alpha) / int(row['rank']):g}r"
    return NAMES.get(row["method"], row["method"]).format(rank=row["rank"], alpha=alpha)


def lr_text(lr: float, digits: int = 2) -> str:
    """An LR as the README writes it: 1e-3, 3.2e-3, 2.27e-3."""
    mantissa, exponent = f"{lr:.{digits - 1}e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def table(folder: Path) -> str:
    trials = read_csv(folder / "trials.csv")
    optima = {row["method"]: row for row in read_csv(folder / "optima.csv")}
    methods = list(dict.fromkeys(row["method"] for row in trials))  # the study's order
    lines = ["| method | eval_loss (val accuracy; test accuracy) at each LR | best grid LR | "
             "refined lr_star |", "|---|---|---|---|"]
    for method in methods:
        optimum, best = optima[method], float(optima[method]["lr_best"])
        cells = []
        rows = sorted((r for r in trials if r["method"] == method), key=lambda r: float(r["lr"]))
        for row in rows:
            lr = float(row["lr"])
            text = (f"{lr_text(lr)}: {float(row['eval_loss']):.3f} "
                    f"({float(row['accuracy']):.2f}; {float(row['test_accuracy']):.2f})"
                    if row["status"] == "complete" else f"{lr_text(lr)}: {row['status']}")
            cells.append(f"**{text}**" if lr == best else text)
        lines.append(f"| {cell_name(optimum)} | {', '.join(cells)} | {lr_text(best)} | "
                     f"{lr_text(float(optimum['lr_star']), 3)} |")
    environment = json.loads((folder / "environment.json").read_text())
    lines += ["", f"The study's latest run (`environment.json`): "
                  f"{environment.get('cpu', 'CPU not recorded')}, "
                  f"{environment['torch_threads']} torch threads, {environment['started'][:10]}."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_FOLDER))
