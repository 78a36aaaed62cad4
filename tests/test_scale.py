"""Large-model recipe: a half-precision frozen base, gradient accumulation, gradient
checkpointing, published architectures with random weights, and the device checks."""

from __future__ import annotations

import pytest
import torch
import yaml

from lorasweep.cli import main
from lorasweep.config import ModelSpec, TrainSpec, dump_study, validate_study
from lorasweep.errors import StudyError
from lorasweep.models import build_from_config, load_model, load_tokenizer
from lorasweep.precision import base_dtype, check_device_support
from lorasweep.space import Cell, TrialSpec
from lorasweep.study.folder import prepare_folder
from lorasweep.tasks.base import TokenSplit
from lorasweep.tasks.causal_lm import CausalLMTask
from lorasweep.tasks.classification import ClassificationTask
from lorasweep.train import train_group
from lorasweep.workbench import attach_group, batch_order
from tests.conftest import tiny_study

CPU = torch.device("cpu")


def tiny(source: str, kind: str, dtype: torch.dtype = torch.float32):
    tokenizer = load_tokenizer(ModelSpec(source=source))
    return load_model(ModelSpec(source=source), kind, 3 if kind == "classification" else None,
                      tokenizer, dtype)


def lm_task() -> CausalLMTask:
    """Rows of very different lengths, so micro-batches hold different numbers of tokens."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 3000, (32, 16), generator=generator)
    lengths = torch.randint(3, 17, (32,), generator=generator)
    mask = (torch.arange(16) < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[::4, :5] = -100  # a prompt that is not scored, as loss_on: response does
    split = TokenSplit(ids, mask, labels)
    return CausalLMTask(split, split, None)


def classification_task() -> ClassificationTask:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 3000, (48, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0
    split = TokenSplit(ids, mask, ids[:, 0] % 3)
    return ClassificationTask(split, split, None, ["a", "b", "c"])


def trials(method: str, lrs: list[float]) -> list[TrialSpec]:
    cell = Cell(method=method, rank=4, lora_alpha="8", init="kaiming",
                target_modules="all-linear")
    return [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0) for i, lr in enumerate(lrs)]


def assert_same_training(a, b) -> None:
    """The first step's loss (from the same weights) to 1e-6; later losses and the final
    validation loss to 1e-4. Not the trained weights: Adam moves a weight by about
    LR x sign(g), so where a gradient is at rounding level (LoRA's A while B is near zero) two
    correct sums of it step opposite ways, and a weight compare tests the CPU's rounding. That
    the update is the whole batch's is test_grad_accum_gradient_is_the_big_batch_gradient's."""
    for x, y in zip(a, b, strict=True):
        assert x.loss_curve[0] == pytest.approx(y.loss_curve[0], rel=1e-6)
        assert x.loss_curve == pytest.approx(y.loss_curve, rel=1e-4)
        assert x.metrics["eval_loss"] == pytest.approx(y.metrics["eval_loss"], rel=1e-4)


@pytest.mark.numerics
@pytest.mark.parametrize(("source", "kind", "method", "lrs"), [
    ("tiny:llama", "causal_lm", "lora", [1e-2]),
    ("tiny:llama", "causal_lm", "dora", [1e-3, 1e-2]),
    ("tiny:bert", "classification", "lora", [1e-3, 1e-2, 3e-2]),
])
def test_grad_accum_equals_one_big_batch(source, kind, method, lrs):
    """Micro-batches of batch_size / N give the update of the whole batch: a token-weighted mean
    for a language model (each micro-batch holds a different number of scored tokens, and its
    own padding), an example-weighted one for classification; alone (K = 1) and fused. With
    dropout off: N micro-batches draw other dropout masks than one batch (the same
    distribution, not the same numbers), as in any trainer."""
    base = tiny(source, kind)
    task = lm_task() if kind == "causal_lm" else classification_task()
    runs = {n: train_group(base, task, TrainSpec(steps=3, batch_size=8, grad_accum=n,
                                                 warmup_ratio=0.2, dropout="off"),
                           trials(method, lrs), CPU)
            for n in (1, 4)}
    assert_same_training(runs[4], runs[1])


@pytest.mark.numerics
@pytest.mark.parametrize(("source", "kind", "method", "k"), [
    ("tiny:llama", "causal_lm", "dora", 1), ("tiny:llama", "causal_lm", "lora", 3),
    ("tiny:bert", "classification", "lora", 2), ("tiny:llama", "causal_lm", "full", 1)])
def test_grad_accum_gradient_is_the_big_batch_gradient(source, kind, method, k):
    """One step's accumulated gradient equals the whole batch's to 1e-6 of its norm (random A
    and B, so every adapter weight has a gradient), alone and fused."""
    from lorasweep.tasks.base import accumulate_gradients

    base = tiny(source, kind)
    task = lm_task() if kind == "causal_lm" else classification_task()
    cell = Cell(method=method, rank=4, lora_alpha="8",
                init=None if method == "full" else "random_ab",
                target_modules=None if method == "full" else "all-linear")
    group = [TrialSpec(grid_id=i, cell=cell, lr=1e-3, seed=0) for i in range(k)]
    model, attached = attach_group(base, task, TrainSpec(steps=1, batch_size=8), group)
    grads, losses = {}, {}
    for n in (1, 2, 4):
        losses[n] = accumulate_gradients(model, task, torch.arange(8), k,
                                         TrainSpec(steps=1, batch_size=8, grad_accum=n),
                                         torch.ones(k, dtype=torch.bool))
        grads[n] = torch.cat([p.grad.flatten() for _, p in attached.trial_params[k - 1]])
        model.zero_grad(set_to_none=True)
    for n in (2, 4):
        assert torch.allclose(losses[n], losses[1], rtol=1e-6, atol=0)
        assert float((grads[n] - grads[1]).norm() / grads[1].norm()) < 1e-6


def test_grad_accum_weights_micro_batches_by_their_tokens():
    """The plain mean of micro-batch means is not the batch's loss when micro-batches hold
    different numbers of tokens: the accumulated step's loss is the whole batch's token mean."""
    task = lm_task()
    index = next(batch_order(len(task.train), 8, 1, 0))  # the first batch of seed 0
    base = tiny("tiny:llama", "causal_lm")
    model, _ = attach_group(base, task, TrainSpec(steps=1, batch_size=8), trials("lora", [1e-3]))
    with torch.no_grad():
        def mean_loss(rows: torch.Tensor) -> tuple[float, int]:
            batch = task.train.batch(rows, 1)
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            return float(task.trial_losses(logits, batch["labels"], 1)[0]), \
                task.loss_count(batch["labels"])

        whole, _ = mean_loss(index)
        halves = [mean_loss(part) for part in index.split(4)]
    assert halves[0][1] != halves[1][1]
    weighted = sum(loss * count for loss, count in halves) / sum(c for _, c in halves)
    assert weighted == pytest.approx(whole, rel=1e-6)
    assert abs(sum(loss for loss, _ in halves) / 2 - whole) > 1e-4 * whole  # the naive mean
    (result,) = train_group(base, task, TrainSpec(steps=1, batch_size=8, grad_accum=2),
                            trials("lora", [1e-3]), CPU)
    assert result.loss_curve[0] == pytest.approx(whole, rel=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize(("source", "kind", "method"), [
    ("tiny:llama", "causal_lm", "lora"), ("tiny:llama", "causal_lm", "dora"),
    ("tiny:bert", "classification", "lora"), ("tiny:llama", "causal_lm", "full")])
def test_gradient_checkpointing_gives_identical_numbers(source, kind, method):
    base = tiny(source, kind)
    task = lm_task() if kind == "causal_lm" else classification_task()
    lrs = [1e-3] if method == "full" else [1e-3, 1e-2]
    runs = {flag: train_group(base, task, TrainSpec(steps=4, batch_size=8,
                                                    gradient_checkpointing=flag),
                              trials(method, lrs), CPU)
            for flag in (False, True)}
    for off, on in zip(runs[False], runs[True], strict=True):
        assert off.loss_curve == on.loss_curve
        assert off.metrics == on.metrics


def test_gradient_checkpointing_recomputes_the_blocks(monkeypatch):
    """With checkpointing every adapted layer runs again in the backward (the blocks' insides
    are recomputed, not kept)."""
    from lorasweep.methods.stacked import StackedLoRALinear
    from lorasweep.train import checkpoint_blocks

    calls = [0]
    forward = StackedLoRALinear.forward

    def counted(self, x):
        calls[0] += 1
        return forward(self, x)

    monkeypatch.setattr(StackedLoRALinear, "forward", counted)
    base = tiny("tiny:llama", "causal_lm")
    batch = lm_task().train.batch(torch.arange(8), 1)
    counts = {}
    for flag in (False, True):
        model, _ = attach_group(base, lm_task(), TrainSpec(steps=1, batch_size=8),
                                trials("lora", [1e-3]))
        if flag:
            checkpoint_blocks(model)
        calls[0] = 0
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        forward_calls = calls[0]
        logits.float().sum().backward()
        counts[flag] = (forward_calls, calls[0])
    assert counts == {False: (14, 14), True: (14, 28)}  # 2 blocks x 7 adapted layers


def test_bf16_base_trains_fp32_adapters_and_tracks_the_fp32_base():
    """model.dtype: bf16 stores the frozen base in half the bytes; LoRA and DoRA weights and
    the task head stay fp32, and training follows the fp32-base run within bf16 rounding."""
    bases = {dtype: tiny("tiny:llama", "causal_lm", dtype)
             for dtype in (torch.float32, torch.bfloat16)}
    sizes = {dtype: sum(p.numel() * p.element_size() for p in base.parameters())
             for dtype, base in bases.items()}
    assert sizes[torch.bfloat16] * 2 == sizes[torch.float32]
    train = TrainSpec(steps=6, batch_size=8)
    runs = {dtype: train_group(base, lm_task(), train, trials("dora", [1e-2]), CPU)[0]
            for dtype, base in bases.items()}
    fp32, bf16 = (torch.tensor(runs[d].loss_curve) for d in (torch.float32, torch.bfloat16))
    assert not torch.equal(fp32, bf16)
    assert torch.allclose(fp32, bf16, rtol=2e-2), (fp32, bf16)
    assert {w.dtype for w in runs[torch.bfloat16].weights.values()} == {torch.float32}
    model, attached = attach_group(bases[torch.bfloat16], lm_task(), train,
                                   trials("dora", [1e-2]))
    trained = {id(p) for _, p in attached.trial_params[0]}
    assert {p.dtype for _, p in attached.trial_params[0]} == {torch.float32}
    assert {p.dtype for p in model.parameters() if id(p) not in trained} == {torch.bfloat16}


def test_bf16_base_keeps_a_fp32_head_and_full_fine_tuning_trains_fp32():
    """Over a bf16 base the task head trains in fp32 (native LoRA, and PEFT pass-through whose
    LoRA weights PEFT itself keeps fp32), and full fine-tuning trains an fp32 model."""
    import json

    base = tiny("tiny:bert", "classification", torch.bfloat16)
    task = classification_task()
    peft_cell = Cell(method="peft", rank=4, lora_alpha="8", target_modules="all-linear",
                     peft=json.dumps({"config": "LoraConfig", "label": "p", "arguments": {}}))
    for group in (trials("lora", [1e-3]), trials("full", [1e-3]),
                  [TrialSpec(grid_id=0, cell=peft_cell, lr=1e-3, seed=0)]):
        model, attached = attach_group(base, task, TrainSpec(steps=1, batch_size=8), group)
        assert {p.dtype for _, p in attached.trial_params[0]} == {torch.float32}
        assert any(n.startswith("classifier") for n, _ in attached.trial_params[0])
        if group[0].cell.method == "full":
            assert {p.dtype for p in model.parameters()} == {torch.float32}
        (result,) = train_group(base, task, TrainSpec(steps=3, batch_size=8), group, CPU)
        assert result.status == "complete"


def test_default_base_dtype_follows_precision_on_a_gpu():
    model = ModelSpec(source="tiny:llama")
    bf16 = TrainSpec(steps=1, precision="bf16")
    assert base_dtype(model, bf16, "cuda") == torch.bfloat16
    assert base_dtype(model, bf16, "cpu") == torch.float32
    assert base_dtype(model, TrainSpec(steps=1), "cuda:0") == torch.float32
    assert base_dtype(ModelSpec(source="x", dtype="fp16"), bf16, "cpu") == torch.float16


@pytest.mark.parametrize(("source", "billions"), [
    ("random:llama-1b", 1.236), ("random:llama-8b", 8.030), ("random:qwen2-0.5b", 0.494)])
def test_published_architectures_build_without_memory(source, billions):
    model = build_from_config(source, "causal_lm", None, 30522, torch.bfloat16, "meta")
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"}
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert sum(p.numel() for p in params) / 1e9 == pytest.approx(billions, rel=1e-3)


@pytest.mark.parametrize(("train", "message"), [
    ({"batch_size": 8, "grad_accum": 3}, "train.grad_accum 3 does not divide train.batch_size 8"),
    ({"batch_size": 8, "grad_accum": 0}, "train.grad_accum: Input should be greater than 0"),
])
def test_bad_grad_accum_is_one_line(tmp_path, study_file, capsys, train, message):
    assert main(["run", str(study_file(train=train)), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_swept_batch_size_must_split_into_micro_batches(tmp_path, study_file, capsys):
    path = study_file(train={"batch_size": 8, "grad_accum": 4},
                      search={"methods": ["lora"], "lr": [1e-3], "recipe": {"batch_size": [8, 6]}})
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "train.grad_accum 4 does not divide search.recipe.batch_size 6" in \
        capsys.readouterr().err


def test_fp16_base_on_the_cpu_is_refused_before_loading(tmp_path, study_file, capsys,
                                                        monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("lorasweep.workbench.load_preprocessor", no_loading)
    path = study_file(model={"source": "tiny:bert", "dtype": "fp16"})
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.dtype: fp16 needs a CUDA GPU" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(("section", "field"), [("model", "model.dtype"),
                                                ("train", "train.precision")])
def test_bf16_on_a_gpu_without_bf16_is_refused(data_files, monkeypatch, section, field):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    value = {"dtype": "bf16"} if section == "model" else {"precision": "bf16"}
    study = validate_study(tiny_study(data_files, **{section: value}), "s")
    with pytest.raises(StudyError, match=f"^{field}: bf16: this GPU \\(Tesla V100\\)"):
        check_device_support(study, "cuda")
    check_device_support(study, "cpu")  # torch computes bf16 on any CPU


def test_folders_written_before_these_fields_still_resume(tmp_path, data_files):
    """A study.yaml without model.dtype, train.grad_accum or train.gradient_checkpointing (as
    written before they existed) is the same study; changing one of them is not."""
    study = validate_study(tiny_study(data_files), "s")
    old = yaml.safe_load(dump_study(study))
    del old["model"]["dtype"], old["train"]["grad_accum"], old["train"]["gradient_checkpointing"]
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "study.yaml").write_text(yaml.safe_dump(old))
    prepare_folder(folder, study)
    for section, field, value in (("model", "dtype", "bf16"), ("train", "grad_accum", 2),
                                  ("train", "gradient_checkpointing", True)):
        changed = validate_study(tiny_study(data_files, **{section: {field: value}}), "s")
        with pytest.raises(StudyError, match=rf"{section}\.{field}"):
            prepare_folder(folder, changed)


def test_gpu_check_smoke_runs_every_configuration(capsys, monkeypatch):
    """`benchmarks/gpu_check.py --smoke`: every runner and variant gives a row, fused groups end
    at K = 1's losses, and the last line is the K = 8 speed-up."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    importlib.import_module("gpu_check").main(["--smoke"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| tiny:llama")]
    assert [(r[1], r[2]) for r in rows] == [
        (variant, runner) for variant in ("plain", "accum 2 + ckpt")
        for runner in ("stock PEFT, one by one", "lorasweep K = 1", "lorasweep K = 2",
                       "lorasweep K = 4", "lorasweep K = 8")]
    for row in rows:
        assert float(row[3].replace(",", "")) > 0 and float(row[5].replace(",", "")) > 0
        if row[2].startswith("lorasweep"):
            assert float(row[7].rstrip(" |")) < 1e-5, row
    assert lines[-1].startswith("K = 8 speed-up over stock PEFT one by one (plain): tiny:llama ")


def test_a_study_runs_with_the_large_model_recipe(tmp_path, study_file):
    """The three settings together through `lorasweep run`, recorded in the folder's study."""
    import csv

    path = study_file(model={"source": "tiny:bert", "dtype": "bf16"},
                      train={"steps": 2, "batch_size": 8, "grad_accum": 2,
                             "gradient_checkpointing": True},
                      search={"methods": ["lora"], "lr": [1e-3]})
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    with open(out / "trials.csv") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["complete"]
    saved = yaml.safe_load((out / "study.yaml").read_text())
    assert saved["model"]["dtype"] == "bf16" and saved["train"]["grad_accum"] == 2
