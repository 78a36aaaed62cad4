"""lorasweep's Lanczos against PyHessian's power iteration, on the same model, parameters and
batch, with ratios measured in one run.

Four cases, each on the joint Hessian (every trainable parameter, the task head included) and on
the first adapted module's (A, B) block: tiny:bert (LoRA rank 1 on query/value), scored against
the dense Hessian (torch.autograd.functional.hessian, eigvalsh); MiniLM (LoRA rank 8 on every
linear layer: the Learning Rate Matters example's cell, one batch of 16 x 48 tokens of the
built-in task), scored against a tight Lanczos run (up to 100 products, tol 1e-9). For each:
the time of one Hessian-vector product against one gradient (forward + backward), and the
products each method needs at the same relative tolerance.

PyHessian (pip install pyhessian==0.1, requirements-dev.txt) is used as published: its
`hessian(...).eigenvalues(maxIter, tol)` runs power iteration, stopping when two consecutive
estimates agree to `tol` relative; it keeps the gradient graph of its single batch, as lorasweep
does, so one product costs the same in both. Its products are counted by wrapping its
`hessian_vector_product`; it differentiates every parameter that requires grad, so the others
are frozen for each case.

    .venv/bin/python benchmarks/curvature.py [--repeats 5] [--tol 1e-4] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Logits(nn.Module):
    """The model as PyHessian calls it, model(inputs): token ids in, logits out."""

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.attention_mask = attention_mask

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=self.attention_mask).logits


def load_cell(study_overrides: dict, method: str = "lora"):
    """A study's workbench, the model at the init of its `method` cell, that cell's named
    trainable parameters, and the first training batch."""
    from lorasweep.config import load_study, resolve_study_path, validate_study
    from lorasweep.curvature.measure import select_cells
    from lorasweep.space import TrialSpec
    from lorasweep.workbench import attach_group, load_workbench

    base = load_study(resolve_study_path("examples/learning_rate_matters.yaml")).model_dump(
        mode="json")
    for section, values in study_overrides.items():
        base[section] = {**base[section], **values}
    study = validate_study(base, "benchmark")
    bench = load_workbench(study)
    cell = next(c for c, _ in select_cells(study, [method], None))
    model, attached = attach_group(bench.base, bench.task, study.train,
                                   [TrialSpec(grid_id=-1, cell=cell, lr=1e-3, seed=0)])
    batch = bench.task.train.batch(torch.arange(study.train.batch_size), 1)
    return bench, model, attached.trial_params[0], batch


def pyhessian_top(model: nn.Module, batch: dict, params: list[nn.Parameter], tol: float,
                  max_iter: int) -> tuple[float, int]:
    """PyHessian's power iteration: (its lambda, products used)."""
    import importlib

    # the module, not the class of the same name that the package's __init__ exports
    ph = importlib.import_module("pyhessian.hessian")
    counted = {"n": 0}
    original = ph.hessian_vector_product

    def counting(*args):
        counted["n"] += 1
        return original(*args)

    for param in params:
        param.grad = None
    ph.hessian_vector_product = counting
    try:
        torch.manual_seed(0)
        engine = ph.hessian(Logits(model, batch["attention_mask"]),
                            lambda logits, labels: F.cross_entropy(logits.float(), labels),
                            data=(batch["input_ids"], batch["labels"]), cuda=False)
        values, _ = engine.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
    finally:
        ph.hessian_vector_product = original
        for param in params:
            param.grad = None
    return float(values[0]), counted["n"]


@dataclass
class Case:
    name: str
    bench: object
    model: nn.Module
    params: list[nn.Parameter]
    batch: dict


def tiny_cases() -> list[Case]:
    from tests.conftest import make_records, write_jsonl

    folder = Path(tempfile.mkdtemp(prefix="lorasweep-curvature-benchmark-"))
    train = write_jsonl(folder / "train.jsonl", make_records(240, 0))
    bench, model, named, batch = load_cell({
        "model": {"source": "tiny:bert"},
        "task": {"dataset": None, "train_file": str(train), "validation_size": 60},
        "train": {"batch_size": 8, "seq_len": 24},
        "search": {"ranks": [1], "target_modules": ["query", "value"]}})
    return cases("tiny:bert LoRA r=1 query,value", bench, model, named, batch)


def minilm_cases() -> list[Case]:
    bench, model, named, batch = load_cell({"search": {"ranks": [8]}})
    return cases("MiniLM LoRA r=8 all-linear", bench, model, named, batch)


def cases(label: str, bench, model, named, batch) -> list[Case]:
    """The joint Hessian (every trainable parameter, head included) and the first module's
    (A, B) block, whose spectrum at LoRA's init is nearly symmetric."""
    first = next(n for n, _ in named if n.endswith(".lora_A")).removesuffix(".lora_A")
    block = [p for n, p in named if n.startswith(first + ".")]
    return [Case(f"{label}, joint", bench, model, [p for _, p in named], batch),
            Case(f"{label}, block {first.split('.', 2)[-1]}", bench, model, block, batch)]


def compare(case: Case, tol: float, repeats: int, dense: bool) -> None:
    """Time a gradient and a product, run both eigensolvers, score them against a reference:
    the dense Hessian (`dense`) or a tight Lanczos run."""
    from lorasweep.curvature.hvp import LossHessian, eager_attention
    from lorasweep.curvature.lanczos import lanczos
    from tests.test_curvature import dense_hessian

    model, batch, params, task = case.model, case.batch, case.params, case.bench.task
    for param in model.parameters():
        param.requires_grad_(any(param is p for p in params))
    dim = sum(p.numel() for p in params)

    def gradient() -> None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.autograd.grad(F.cross_entropy(logits.float(), batch["labels"]), params)

    with eager_attention(model):
        hessian = LossHessian(model, task, [batch], params)
        operator = hessian.operator(params)
        vector = torch.randn(dim, generator=torch.Generator().manual_seed(0))
        gradient()  # warm the allocator before timing
        operator(vector)
        # interleaved, so that load from elsewhere falls on both alike
        grad_times, product_times = [], []
        for _ in range(repeats):
            grad_times.append(seconds(gradient))
            product_times.append(seconds(lambda: operator(vector)))
        grad_s, product_s = statistics.median(grad_times), statistics.median(product_times)
        fresh_s = seconds(lambda: LossHessian(model, task, [batch], params).operator(params)(
            vector))
        started = time.perf_counter()
        ours = lanczos(operator, dim, tol=tol, max_iter=30)
        ours_s = time.perf_counter() - started
        if dense:
            values = torch.linalg.eigvalsh(dense_hessian(model, [batch], params).double())
            top, bottom, source = float(values[-1]), float(values[0]), "dense Hessian"
        else:
            reference = lanczos(operator, dim, tol=1e-9, max_iter=100)
            top, bottom = reference.largest, reference.smallest
            source = f"Lanczos, {reference.products} products, tol 1e-9"
        started = time.perf_counter()
        theirs, products = pyhessian_top(model, batch, params, tol, 100)
        theirs_s = time.perf_counter() - started
    radius = max(abs(top), abs(bottom))
    print(f"{case.name}: {dim} parameters, batch {tuple(batch['input_ids'].shape)}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"  one gradient {grad_s * 1e3:.1f} ms; one Hessian-vector product "
          f"{product_s * 1e3:.1f} ms = {product_s / grad_s:.2f}x a gradient (forward and first "
          f"backward redone for it: {fresh_s / grad_s:.2f}x)")
    print(f"  reference ({source}): lambda_max {top:.6g}, lambda_min {bottom:.6g}")
    print(f"  lorasweep Lanczos: lambda_max {ours.largest:.6g} (rel. error "
          f"{abs(ours.largest - top) / abs(top):.1e}), lambda_min {ours.smallest:.6g} (error "
          f"{abs(ours.smallest - bottom) / radius:.1e} of the radius), {ours.products} products, "
          f"{ours_s:.1f} s, converged {ours.converged}")
    print(f"  PyHessian power iteration: lambda {theirs:.6g} (rel. error against lambda_max "
          f"{abs(theirs - top) / abs(top):.1e}), {products} products, {theirs_s:.1f} s")
    print(f"  PyHessian / lorasweep: products {products / ours.products:.2f}x, time "
          f"{theirs_s / ours_s:.2f}x")


def seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--tiny-only", action="store_true", help="skip MiniLM")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    for case in tiny_cases():
        compare(case, args.tol, args.repeats, dense=True)
    if not args.tiny_only:
        for case in minilm_cases():
            compare(case, args.tol, args.repeats, dense=False)


if __name__ == "__main__":
    main()
