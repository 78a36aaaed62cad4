"""Curvature: Lanczos on Hessian-vector products against dense Hessians, a reparametrization
whose effect on the spectrum is known, determinism, the LR prediction, and the command."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lorasweep.analysis.curvature import CellCurvature, predict_lrs
from lorasweep.cli import main
from lorasweep.config import validate_study
from lorasweep.curvature.hvp import LossHessian, adam_scale, eager_attention
from lorasweep.curvature.lanczos import lanczos
from lorasweep.curvature.measure import blocks_of, grid_middle, select_cells, warm_up
from lorasweep.records import Optimum
from lorasweep.space import Cell, TrialSpec
from lorasweep.workbench import attach_group, batch_order, load_workbench

from .conftest import make_records, tiny_study, write_jsonl

TARGETS = ["query", "value"]  # small blocks, so that dense Hessians stay cheap
RTOL = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("curvature-data")
    return {"train": write_jsonl(folder / "train.jsonl", make_records(240, 0)),
            "test": write_jsonl(folder / "test.jsonl", make_records(60, 1))}


@pytest.fixture(scope="module")
def setup(data):
    """The tiny study, loaded once, and a builder of one cell's model at its trials' init."""
    study = validate_study(tiny_study(data, search={
        "methods": ["lora", "pissa", "init_ab", "full"], "ranks": [1], "lora_alpha": ["2r"],
        "target_modules": TARGETS, "lr": [1e-3, 1e-2], "seeds": [0]}), "test")
    bench = load_workbench(study)
    cells = {cell.label: (cell, lrs) for cell, lrs in select_cells(study, None, None)}
    train = bench.task.train
    batches = [train.batch(index, 1) for index in batch_order(len(train), 8, 2, 0)]

    def build(method: str):
        trial = TrialSpec(grid_id=-1, cell=cells[method][0], lr=1e-2, seed=0)
        model, attached = attach_group(bench.base, bench.task, study.train, [trial])
        return model, attached, trial

    return study, bench, batches, build


def dense_hessian(model, batches, block) -> torch.Tensor:
    """The Hessian of the token-weighted loss in `block`, written out independently of
    LossHessian: summed cross-entropy over every batch / the number of examples."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in block]
    shapes = [p.shape for p in block]
    sizes = [p.numel() for p in block]
    count = sum(b["labels"].shape[0] for b in batches)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        weights = {k: t.reshape(s) for k, t, s in zip(keys, flat.split(sizes), shapes,
                                                       strict=True)}
        total = flat.new_zeros(())
        for batch in batches:
            logits = functional_call(model, weights, kwargs={
                "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).logits
            total = total + F.cross_entropy(logits, batch["labels"], reduction="sum")
        return total / count

    flat = torch.cat([p.detach().reshape(-1) for p in block])
    with eager_attention(model):
        return torch.autograd.functional.hessian(loss, flat, vectorize=True)


def check_against_dense(spectrum, dense: torch.Tensor, top_k: int) -> None:
    values = torch.linalg.eigvalsh(dense.double())
    radius = float(values.abs().max())
    expected_top = values.flip(0)[:top_k].tolist()
    assert spectrum.converged and spectrum.products <= 30
    for got, want in zip(spectrum.top, expected_top, strict=True):
        assert abs(got - want) <= RTOL * abs(want), (got, want)
    assert abs(spectrum.smallest - float(values[0])) <= RTOL * radius


@pytest.mark.numerics
@pytest.mark.parametrize(("method", "block_index"), [
    ("lora", -1), ("pissa", -1), ("pissa", 1), ("full", 3)])
def test_lanczos_matches_the_dense_hessian(setup, method, block_index):
    """LoRA and PiSSA jointly (every trainable parameter, head included) and on one module's
    (A, B) block; full fine-tuning on one module's (weight, bias) block."""
    study, bench, batches, build = setup
    model, attached, trial = build(method)
    blocks = blocks_of(bench.base, study, trial.cell, attached.trial_params[0],
                       ("modules", "joint"))
    name, block = blocks[block_index]
    assert (name == "joint") == (block_index == -1)
    with eager_attention(model):
        hessian = LossHessian(model, bench.task, batches, [p for _, p in attached.trial_params[0]])
        spectrum = lanczos(hessian.operator(block), sum(p.numel() for p in block), top_k=2)
    check_against_dense(spectrum, dense_hessian(model, batches, block), top_k=2)


@pytest.mark.numerics
def test_warm_up_takes_the_trainers_own_steps(setup):
    """Warm-up runs the trainer's step: two micro-batches (train.grad_accum) give the state one
    whole batch gives, to rounding, and `precision: bf16` computes under autocast, as in
    training."""
    study, bench, _, build = setup
    states = []
    for update in ({}, {"grad_accum": 2}, {"precision": "bf16"}):
        model, attached, trial = build("lora")
        recipe = study.train.model_copy(update=update)
        optimizer = warm_up(model, attached, trial, recipe, bench.task, steps=2)
        states.append(torch.cat([optimizer.state[p]["exp_avg_sq"].flatten()
                                 for _, p in attached.trial_params[0]]))
    whole, micro, bf16 = states
    assert torch.allclose(whole, micro, rtol=1e-4, atol=1e-12)
    assert not torch.allclose(whole, bf16, rtol=1e-4, atol=1e-12)  # autocast ran
    assert torch.allclose(whole, bf16, rtol=0.2, atol=1e-9)  # ... and tracks fp32


def test_adam_preconditioned_sharpness_matches_dense(setup):
    study, bench, batches, build = setup
    model, attached, trial = build("lora")
    optimizer = warm_up(model, attached, trial, study.train, bench.task, steps=3)
    block = [p for _, p in attached.trial_params[0]]
    scale = adam_scale(optimizer, block)
    with eager_attention(model):
        hessian = LossHessian(model, bench.task, batches, block)
        spectrum = lanczos(hessian.operator(block, scale), scale.numel(), top_k=1)
    dense = dense_hessian(model, batches, block)
    check_against_dense(spectrum, scale[:, None] * dense * scale[None, :], top_k=1)
    # Adam's preconditioner changes the spectrum a lot: the comparison above is not vacuous.
    assert spectrum.largest > 10 * float(torch.linalg.eigvalsh(dense.double())[-1])


def test_eigenvalues_follow_a_known_reparametrization(setup):
    """B -> c B, A -> A / c leaves the function alone and turns the (A, B) block's Hessian H into
    S H S, S = diag(c on A, 1/c on B): the rescaled model's eigenvalues are those of S H S."""
    study, bench, batches, build = setup
    c = 4.0
    model, attached, trial = build("init_ab")  # A and B both nonzero
    _, block = blocks_of(bench.base, study, trial.cell, attached.trial_params[0], ("modules",))[1]
    a, b = block
    dense = dense_hessian(model, batches, block)
    scale = torch.cat([torch.full((a.numel(),), c), torch.full((b.numel(),), 1 / c)])
    expected = scale[:, None] * dense * scale[None, :]
    with torch.no_grad():
        a.div_(c)
        b.mul_(c)
    with eager_attention(model):
        hessian = LossHessian(model, bench.task, batches, block)
        spectrum = lanczos(hessian.operator(block), scale.numel(), top_k=2)
    check_against_dense(spectrum, expected, top_k=2)
    plain = torch.linalg.eigvalsh(dense.double())
    assert abs(spectrum.largest - float(plain[-1])) > 0.5 * abs(float(plain[-1]))


def test_lanczos_finds_the_algebraic_top_of_a_near_symmetric_spectrum():
    """Eigenvalues -1.0001 and +1: power iteration would report the larger magnitude; Lanczos
    returns the largest algebraic value and the smallest separately."""
    values = torch.cat([torch.tensor([1.0, -1.0001]), torch.linspace(-0.5, 0.5, 98)]).double()
    basis, _ = torch.linalg.qr(torch.randn(100, 100, generator=torch.Generator().manual_seed(3),
                                           dtype=torch.float64))
    matrix = basis @ torch.diag(values) @ basis.T
    spectrum = lanczos(lambda v: matrix @ v.double(), 100, top_k=1, tol=1e-8, max_iter=100,
                       dtype=torch.float64)
    assert spectrum.largest == pytest.approx(1.0, rel=1e-6)
    assert spectrum.smallest == pytest.approx(-1.0001, rel=1e-6)


def _curvature(cell: Cell, lam: float, step: float = 0.5) -> CellCurvature:
    return CellCurvature(cell=cell, lam=lam, source="modules", grid_step=step)


def _optimum(cell: Cell, lr_star: float) -> Optimum:
    return Optimum(cell=cell, lr_best=lr_star, lr_star=lr_star, lr_star_low=None,
                   lr_star_high=None, peak=0.5, peak_std=None, n_seeds=1, edge="", suggest=[],
                   n_lrs=5, diverged=0)


def test_prediction_recovers_a_known_exponent():
    """Optima laid on lr = 1e-3 (lambda / lambda_LoRA)^-0.7 exactly: every leave-one-out fit
    finds p = 0.7 and every prediction hits its optimum."""
    lams = {"lora": 2.0, "pissa": 24.0, "milora": 4.4, "dora": 3.0}
    cells = [Cell(m, rank=8, lora_alpha="16", init=m) for m in lams]
    optima = [_optimum(c, 1e-3 * (lams[c.method] / 2.0) ** -0.7) for c in cells]
    result, fit = predict_lrs([_curvature(c, lams[c.method]) for c in cells], optima)
    assert fit.p == pytest.approx(0.7) and fit.n == 4
    for item in result[1:]:
        assert item.p_used == pytest.approx(0.7)
        assert item.lr_predicted == pytest.approx(item.lr_star)
        assert item.error_steps == pytest.approx(0.0, abs=1e-9)


def test_prediction_with_only_lora_tuned_uses_the_stability_exponent():
    cells = [Cell("lora", rank=8), Cell("pissa", rank=8)]
    result, fit = predict_lrs([_curvature(cells[0], 2.0), _curvature(cells[1], 20.0)],
                              [_optimum(cells[0], 0.001)])
    assert fit is None
    assert result[1].p_used == 1.0 and result[1].lr_predicted == pytest.approx(1e-4)
    assert result[1].lr_star is None and result[1].error_steps is None


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_command_is_deterministic_and_reports(tmp_path: Path, study_file, capsys):
    """Run a study, measure LoRA twice (same numbers), and find the section in the report."""
    path = study_file(search={"methods": ["lora", "pissa"], "ranks": [1], "lr": [1e-2],
                              "target_modules": TARGETS})
    folder = tmp_path / "study"
    assert main(["run", str(path), "--out", str(folder)]) == 0
    options = ["--batches", "1", "--warmup-steps", "2", "--adam", "--max-iter", "12"]
    assert main(["curvature", str(folder), "--method", "lora", *options]) == 0
    first = read_csv(folder / "curvature.csv")
    assert main(["curvature", str(folder), "--method", "lora", *options]) == 0
    assert read_csv(folder / "curvature.csv") == first
    # 4 module blocks + joint, at init, after warm-up, and Adam-preconditioned after warm-up
    assert len(first) == 15 and {r["stage"] for r in first} == {"init", "warmup"}
    assert all(math.isfinite(float(r["lambda_max"])) for r in first)
    assert main(["curvature", str(folder), "--method", "pissa", "--batches", "1",
                 "--blocks", "modules"]) == 0
    rows = read_csv(folder / "curvature.csv")
    assert {r["method"] for r in rows} == {"lora", "pissa"}  # LoRA's rows kept
    out = capsys.readouterr().out
    assert "Curvature and the optimal learning rate" in out
    report = (folder / "report.md").read_text()
    assert "## Largest Hessian eigenvalue" in report and "attention.self.query" in report


def test_a_recipe_axis_cell_is_measured_under_its_own_recipe(tmp_path: Path, study_file):
    """On a study that sweeps batch_size, the measured cell (the first recipe, batch size 4)
    warms up at its own lr_star and its Hessian scores batches of its own size, not the
    study's train.batch_size (8)."""
    path = study_file(search={"methods": ["lora"], "ranks": [1], "lr": [1e-3, 3e-3, 1e-2],
                              "target_modules": TARGETS, "recipe": {"batch_size": [4, 8]}})
    folder = tmp_path / "study"
    assert main(["run", str(path), "--out", str(folder)]) == 0
    assert main(["curvature", str(folder), "--batches", "1", "--warmup-steps", "1",
                 "--blocks", "joint", "--max-iter", "4"]) == 0
    optima = {r["recipe"]: float(r["lr_star"]) for r in read_csv(folder / "optima.csv")}
    # a missed lookup would warm up at the grid's middle instead
    assert optima["batch_size=4"] != grid_middle([1e-3, 3e-3, 1e-2])
    rows = read_csv(folder / "curvature.csv")
    assert {r["recipe"] for r in rows} == {"batch_size=4"}
    warmed = [r for r in rows if r["stage"] == "warmup"]
    assert warmed and {float(r["warmup_lr"]) for r in warmed} == {optima["batch_size=4"]}
    assert {r["items"] for r in rows} == {"4"}


@pytest.mark.parametrize(("options", "message"), [
    (["--method", "dora"], "--method dora: not in the study"),
    (["--adam"], "--adam: needs --warmup-steps"),
    (["--blocks", "layers"], "--blocks layers: allowed: modules, joint"),
    (["--rank", "64"], "--rank 64: not in the study's search.ranks"),
    (["--optima", "nowhere.csv"], "--optima nowhere.csv: no such file"),
])
def test_bad_options_are_one_line_errors(tmp_path, study_file, options, message, capsys):
    code = main(["curvature", str(study_file()), "--out", str(tmp_path / "c"), *options])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_causal_lm_loss_is_weighted_by_token_count(tmp_path: Path):
    """Two batches with different numbers of scored tokens: the loss is the mean over all their
    tokens (not the mean of the batch means), and a tiny Llama's block has finite eigenvalues
    through eager attention."""
    records = [{"text": " ".join(["word"] * (2 + 5 * (i % 2) + i % 7))} for i in range(40)]
    study = validate_study({
        "name": "lm", "model": {"source": "tiny:llama"},
        "task": {"kind": "causal_lm", "train_file": str(write_jsonl(tmp_path / "t.jsonl",
                                                                    records)),
                 "validation_size": 8},
        "train": {"steps": 4, "batch_size": 4, "seq_len": 24},
        "search": {"methods": ["lora"], "lr": [1e-3], "ranks": [1],
                   "target_modules": ["q_proj", "v_proj"]}}, "lm")
    bench = load_workbench(study)
    cell, _ = select_cells(study, None, None)[0]
    model, attached = attach_group(bench.base, bench.task, study.train,
                                   [TrialSpec(grid_id=-1, cell=cell, lr=1e-3, seed=0)])
    train = bench.task.train
    batches = [train.batch(torch.arange(0, 4), 1), train.batch(torch.arange(4, 7), 1)]
    params = [p for _, p in attached.trial_params[0]]
    with torch.no_grad():
        sums, counts = [], []
        for batch in batches:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            sums.append(float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                              targets.reshape(-1), ignore_index=-100,
                                              reduction="sum")))
            counts.append(int((targets != -100).sum()))
    assert counts[0] != counts[1]
    with eager_attention(model):
        hessian = LossHessian(model, bench.task, batches, params)
        spectrum = lanczos(hessian.operator(params), sum(p.numel() for p in params),
                           max_iter=10)
    weighted = sum(sums) / sum(counts)
    unweighted = sum(s / c for s, c in zip(sums, counts, strict=True)) / 2
    assert abs(float(hessian.loss.detach()) - weighted) <= 0.01 * abs(weighted - unweighted)
    assert math.isfinite(spectrum.largest) and spectrum.largest > 0
