"""Inits, scales, target modules and heads of the native methods, and fused-group equality."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lorasweep.config import ModelSpec, TrainSpec
from lorasweep.errors import StudyError
from lorasweep.methods import STRATEGIES, get_method
from lorasweep.methods.inits import FACTORS, initial_factors
from lorasweep.methods.stacked import StackedDoRALinear
from lorasweep.methods.targets import resolve_targets
from lorasweep.models import load_model, load_tokenizer
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks.base import TokenSplit
from lorasweep.tasks.classification import ClassificationTask
from lorasweep.train import BestOf, train_group
from lorasweep.variants import INITS, VARIANTS, get_init, variant

from .conftest import read_rows


def tiny(source: str, kind: str = "classification"):
    tokenizer = load_tokenizer(ModelSpec(source=source))
    return load_model(ModelSpec(source=source), kind, 3 if kind == "classification" else None,
                      tokenizer)


def test_registry_matches_the_schema():
    """Every registered variant builds through its strategy, and every init has its factors."""
    assert {v.strategy for v in VARIANTS.values()} <= set(STRATEGIES)
    assert all(get_method(name).variant is spec for name, spec in VARIANTS.items())
    assert set(FACTORS) == set(INITS)


@pytest.mark.parametrize(("init", "a_std", "b_std"), [
    ("kaiming", 1 / math.sqrt(3 * 512), 0.0),   # U(+-1/sqrt(n)) has std 1/sqrt(3n)
    ("gaussian", 1 / 16, 0.0),                  # N(0, 1/r^2)
    ("mua_a", 1 / math.sqrt(512), 0.0),         # N(0, 1/n)
    ("mua_b", 0.0, 1 / math.sqrt(16)),          # A = 0, B ~ N(0, 1/r)
    ("init_ab", 1 / math.sqrt(3 * 512), 1 / math.sqrt(3 * 16)),  # both kaiming-uniform
])
def test_init_distributions(init, a_std, b_std):
    factors = initial_factors(init, 16, torch.zeros(1024, 512), 2.0,
                              torch.Generator().manual_seed(0))
    a, b = factors.a, factors.b
    assert get_init(init).residual == (init == "init_ab")
    assert a.shape == (16, 512) and b.shape == (1024, 16)
    assert float(a.std()) == pytest.approx(a_std, rel=0.05, abs=1e-12)
    assert float(b.std()) == pytest.approx(b_std, rel=0.05, abs=1e-12)
    if init == "kaiming":
        assert float(a.abs().max()) <= 1 / math.sqrt(512)


@pytest.mark.parametrize(("method", "alpha", "rank", "scale"), [
    ("lora", "16", 4, 4.0), ("lora", "2r", 8, 2.0), ("rslora", "16", 4, 8.0),
    ("rslora", "1r", 16, 4.0), ("loraplus", "8", 4, 2.0)])
def test_effective_scale(method, alpha, rank, scale):
    cell = Cell(method=method, rank=rank, lora_alpha=alpha, init="kaiming",
                target_modules="all-linear", loraplus_ratio=16.0)
    attached = get_method(method).attach(tiny("tiny:bert"), cell, 1, torch.Generator())
    assert attached.effective_scale == pytest.approx(scale)


@pytest.mark.parametrize(("source", "preset", "expected"), [
    ("tiny:bert", "attention", {"query", "key", "value", "dense"}),
    ("tiny:bert", "mlp", {"dense"}),
    ("tiny:llama", "attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("tiny:llama", "mlp", {"gate_proj", "up_proj", "down_proj"}),
])
def test_target_presets(source, preset, expected):
    model = tiny(source)
    names = resolve_targets(model, preset)
    assert {n.split(".")[-1] for n in names} == expected
    everything = resolve_targets(model, "all-linear")
    assert set(names) < set(everything)
    assert not any(n.startswith(("classifier", "score", "lm_head")) for n in everything)
    assert not any("pooler" in n for n in names)  # presets stay inside the numbered blocks
    if source == "tiny:bert":
        assert all(("attention" in n) == (preset == "attention") for n in names)


def test_unknown_target_names_the_layers():
    with pytest.raises(StudyError, match=r"search\.target_modules.*query"):
        resolve_targets(tiny("tiny:bert"), "q_proj")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_head_is_trained_and_seeded_under_every_method(method):
    cell = Cell(method=method, rank=4, lora_alpha="8", init="kaiming",
                target_modules="all-linear") if method != "full" else Cell(method="full")
    heads = []
    for _ in range(2):
        model = tiny("tiny:bert")
        attached = get_method(method).attach(model, cell, 1, torch.Generator().manual_seed(3))
        named = dict(attached.trial_params[0])
        assert "classifier.weight" in named and named["classifier.weight"].requires_grad
        heads.append(named["classifier.weight"].detach().clone())
    assert torch.equal(heads[0], heads[1])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert bool(frozen) == (method != "full")


def toy_task(n: int = 48) -> ClassificationTask:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 3000, (n, 10), generator=generator)
    labels = ids[:, 0] % 3
    split = TokenSplit(ids, torch.ones_like(ids), labels)
    return ClassificationTask(split, split, None, ["a", "b", "c"])


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["lora", "rslora", "loraplus", "dora", "pissa", "milora",
                                    "olora", "init_ab"])
def test_fused_group_equals_trials_run_one_by_one(method):
    """Every fusable variant, those that change the base weight or add a magnitude included,
    trained as users train: the model's dropout on (tiny BERT: 0.1) and a lora_dropout."""
    base = tiny("tiny:bert")
    task = toy_task()
    train = TrainSpec(steps=8, batch_size=8, grad_clip=1.0, warmup_ratio=0.25, lora_dropout=0.1)
    cell = Cell(method=method, rank=4, lora_alpha="8", init=variant(method).inits(["kaiming"])[0],
                target_modules="all-linear", loraplus_ratio=4.0 if method == "loraplus" else None)
    trials = [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0)
              for i, lr in enumerate([1e-4, 1e-3, 1e-2, 3e-2])]
    fused = train_group(base, task, train, trials, torch.device("cpu"))
    for trial, together in zip(trials, fused, strict=True):
        (alone,) = train_group(copy.deepcopy(base), task, train, [trial], torch.device("cpu"))
        curve_a, curve_b = torch.tensor(together.loss_curve), torch.tensor(alone.loss_curve)
        assert torch.allclose(curve_a, curve_b, rtol=1e-5, atol=0), (trial.lr, curve_a, curve_b)
        assert together.metrics["accuracy"] == alone.metrics["accuracy"]


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fused_group_with_dropout_is_exact_under_accumulation_and_checkpointing(method):
    """Dropout masks are drawn per trial (one trial's rows, tiled), so with grad_accum 2 and
    gradient checkpointing (whose recomputation redraws the forward's masks) a fused group
    still computes bit for bit what its trials compute alone; two runs give the same numbers;
    and the masks matter (dropout off, or another lora_dropout, trains otherwise)."""
    base = tiny("tiny:bert")
    task = toy_task()
    train = TrainSpec(steps=4, batch_size=8, warmup_ratio=0.0, lora_dropout=0.2, grad_accum=2,
                      gradient_checkpointing=True)
    cell = Cell(method=method, rank=4, lora_alpha="8", init="kaiming", target_modules="all-linear")
    trials = [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0) for i, lr in enumerate([1e-3, 1e-2])]
    fused = train_group(base, task, train, trials, torch.device("cpu"))
    again = train_group(base, task, train, trials, torch.device("cpu"))
    for trial, together, repeat in zip(trials, fused, again, strict=True):
        (alone,) = train_group(base, task, train, [trial], torch.device("cpu"))
        assert together.loss_curve == alone.loss_curve == repeat.loss_curve, trial.lr
        assert together.metrics == alone.metrics == repeat.metrics
    curves = {(dropout, p): train_group(base, task, train.model_copy(
        update={"dropout": dropout, "lora_dropout": p}), trials[1:], torch.device("cpu"))[0]
        .loss_curve for dropout, p in [("off", 0.0), ("off", 0.2), ("model", 0.0)]}
    assert len({tuple(c) for c in [*curves.values(), fused[1].loss_curve]}) == 4


def test_full_fine_tuning_trains_with_the_models_dropout():
    """Full fine-tuning has no lora_dropout; its model's own dropout is on with `model`
    (the curve differs from `off`) and drawn from the seed (two runs agree)."""
    base = tiny("tiny:bert")
    trial = TrialSpec(grid_id=0, cell=Cell(method="full"), lr=1e-3, seed=0)
    runs = {dropout: [train_group(base, toy_task(), TrainSpec(steps=3, batch_size=8,
                                                             warmup_ratio=0.0, dropout=dropout),
                                  [trial], torch.device("cpu"))[0].loss_curve for _ in range(2)]
            for dropout in ("model", "off")}
    assert runs["model"][0] == runs["model"][1] and runs["off"][0] == runs["off"][1]
    assert runs["model"][0] != runs["off"][0]


def test_peft_passthrough_honours_lora_dropout_and_the_dropout_setting():
    """A method PEFT builds takes train.lora_dropout into its LoraConfig (its own arguments
    would win), and trains with it under either dropout setting: PEFT's lora_dropout modules
    stay in train mode when the model's dropout is off. Each setting trains differently and
    the same way twice."""
    import json

    from lorasweep.workbench import attach_group

    base = tiny("tiny:bert")
    cell = Cell(method="peft", rank=4, lora_alpha="8", target_modules="all-linear",
                peft=json.dumps({"config": "LoraConfig", "label": "p", "arguments": {}}))
    trial = TrialSpec(grid_id=0, cell=cell, lr=1e-2, seed=0)
    train = TrainSpec(steps=3, batch_size=8, warmup_ratio=0.0)
    _, attached = attach_group(base, toy_task(), train.model_copy(update={"lora_dropout": 0.2}),
                               [trial])
    assert attached.peft_model.peft_config["default"].lora_dropout == 0.2
    curves = [train_group(base, toy_task(), train.model_copy(update=update), [trial],
                          torch.device("cpu"))[0].loss_curve
              for update in ({"dropout": "off"}, {"dropout": "off", "lora_dropout": 0.2},
                             {"dropout": "off", "lora_dropout": 0.2}, {})]
    assert curves[1] == curves[2]
    assert len({tuple(c) for c in curves}) == 3


def test_select_best_reports_the_peak_and_final_the_last_evaluation():
    """A trial whose validation loss is lowest mid-training (half the validation labels disagree
    with the training labels, so fitting the training data hurts later): task.select 'best'
    reports that evaluation and its step, 'final' the last one; with 'best' the test metrics and
    weights are those of the selected step (the test split is the validation split here, so
    they must equal the selected validation metrics exactly)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 3000, (48, 10), generator=generator)
    labels = ids[:, 0] % 3
    disagree = torch.where(torch.arange(48) % 2 == 0, labels, (labels + 1) % 3)
    validation = TokenSplit(ids, torch.ones_like(ids), disagree)
    task = ClassificationTask(TokenSplit(ids, torch.ones_like(ids), labels), validation, validation,
                              ["a", "b", "c"])
    base = tiny("tiny:bert")
    cell = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming",
                target_modules="attention")  # its loss bottoms out at step 8 of 24
    train = TrainSpec(steps=24, batch_size=8, eval_every=4, schedule="constant",
                       warmup_ratio=0.0)
    trial = TrialSpec(grid_id=0, cell=cell, lr=1e-2, seed=0)
    (best,) = train_group(base, task, train, [trial], torch.device("cpu"),
                          best_of=BestOf("eval_loss", maximize=False))
    (final,) = train_group(base, task, train, [trial], torch.device("cpu"))
    losses = {e["step"]: e["eval_loss"] for e in best.eval_curve}
    assert sorted(losses) == [4, 8, 12, 16, 20, 24]
    peak_step = min(losses, key=losses.get)
    assert 4 < peak_step < 24, losses  # the peak is mid-training, neither first nor last
    assert best.selected_step == peak_step and best.metrics["eval_loss"] == losses[peak_step]
    assert best.test == best.metrics  # test and weights from the selected step
    assert final.selected_step == 24 and final.metrics["eval_loss"] == losses[24]
    assert final.metrics["eval_loss"] > best.metrics["eval_loss"]
    assert final.eval_curve == best.eval_curve  # selecting changes nothing that is trained
    assert not all(torch.equal(best.weights[n], final.weights[n]) for n in best.weights)


@pytest.mark.numerics
def test_bf16_autocast_keeps_fp32_weights_and_tracks_fp32_training():
    """precision: bf16 runs the matmuls in bfloat16 (the curve differs from fp32's) while the
    trained adapter stays fp32 and the run follows the fp32 one closely."""
    base = tiny("tiny:bert")
    task = toy_task()
    cell = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming",
                target_modules="all-linear")
    trial = TrialSpec(grid_id=0, cell=cell, lr=1e-3, seed=0)
    runs = {precision: train_group(base, task, TrainSpec(steps=6, batch_size=8,
                                                         precision=precision),
                                   [trial], torch.device("cpu"))[0]
            for precision in ("fp32", "bf16")}
    fp32, bf16 = (torch.tensor(runs[p].loss_curve) for p in ("fp32", "bf16"))
    assert not torch.equal(fp32, bf16), "autocast changed the arithmetic"
    assert torch.allclose(fp32, bf16, rtol=2e-2), (fp32, bf16)
    assert {w.dtype for w in runs["bf16"].weights.values()} == {torch.float32}


def test_diverging_trial_leaves_its_group_untouched():
    base = tiny("tiny:bert")
    task = toy_task()
    train = TrainSpec(steps=8, batch_size=8, grad_clip=None, warmup_ratio=0.0)
    cell = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming",
                target_modules="all-linear")
    calm = TrialSpec(grid_id=0, cell=cell, lr=1e-3, seed=0)
    wild = TrialSpec(grid_id=1, cell=cell, lr=1e4, seed=0)
    together = train_group(base, task, train, [calm, wild], torch.device("cpu"))
    (alone,) = train_group(base, task, train, [calm], torch.device("cpu"))
    assert together[1].status == "diverged" and together[1].steps < 8
    assert together[0].status == "complete"
    assert torch.allclose(torch.tensor(together[0].loss_curve), torch.tensor(alone.loss_curve),
                          rtol=1e-5, atol=0)


def low_rank_weight(n_out: int = 48, n_in: int = 32) -> torch.Tensor:
    """A weight whose top and bottom 4 singular values stand apart, so subspaces are unambiguous."""
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(n_out, n_in, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=generator))
    singular = torch.cat([torch.tensor([10.0, 8.0, 6.0, 4.0]), torch.linspace(1.0, 0.3, n_in - 8),
                          torch.tensor([0.1, 0.08, 0.06, 0.04])])
    return u @ torch.diag(singular) @ v.t()


@pytest.mark.parametrize("init", ["pissa", "milora", "olora", "init_ab", "pissa_niter_4"])
def test_residual_inits_leave_the_model_unchanged(init):
    """The adapted layer computes what the original did, though s B0 A0 is far from zero."""
    linear = torch.nn.Linear(32, 48)
    with torch.no_grad():
        linear.weight.copy_(low_rank_weight())
    model = torch.nn.Sequential(copy.deepcopy(linear))
    cell = Cell(method="lora", rank=4, lora_alpha="8", init=init, target_modules="0")
    torch.manual_seed(0)  # pissa_niter_K draws from the global generator
    get_method("lora").attach(model, cell, 1, torch.Generator().manual_seed(0))
    assert get_init(init).residual
    layer = model[0]
    assert float((layer.scale * layer.lora_B[0] @ layer.lora_A[0]).norm()) > 0.1
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(model(x), linear(x), atol=1e-5)
    assert not torch.allclose(layer.base(x), linear(x), atol=1e-2)  # W_res itself differs


@pytest.mark.parametrize(("init", "expected"), [("milora", slice(28, 32)),
                                                ("pissa", slice(0, 4))])
def test_svd_inits_span_their_singular_subspace(init, expected):
    """MiLoRA (not in PEFT) by its definition: A and B span the bottom singular subspace."""
    weight, scale, rank = low_rank_weight(), 2.0, 4
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    factors = initial_factors(init, rank, weight, scale, torch.Generator())
    part = scale * factors.b @ factors.a
    want = u[:, expected] @ torch.diag(s[expected]) @ vh[expected]
    assert torch.allclose(part, want, atol=1e-4)
    # B's columns lie in the chosen left singular subspace, A's rows in the right one
    left, right = u[:, expected], vh[expected].t()
    assert torch.allclose(left @ (left.t() @ factors.b), factors.b, atol=1e-4)
    assert torch.allclose(right @ (right.t() @ factors.a.t()), factors.a.t(), atol=1e-4)


def test_fast_pissa_approximates_exact_pissa():
    weight = low_rank_weight()
    exact = initial_factors("pissa", 4, weight, 2.0, torch.Generator())
    torch.manual_seed(0)
    fast = initial_factors("pissa_niter_4", 4, weight, 2.0, torch.Generator())
    assert torch.allclose(fast.b @ fast.a, exact.b @ exact.a, atol=1e-3)


def test_random_ab_without_subtraction_changes_the_model():
    """The control: random A and B with no residual shift the pretrained function; Init[AB] not."""
    base = tiny("tiny:bert")
    ids = torch.randint(1000, 3000, (2, 8), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for init in ("kaiming", "init_ab", "random_ab"):
        model = copy.deepcopy(base)
        cell = Cell(method="lora", rank=4, lora_alpha="8", init=init, target_modules="all-linear")
        get_method("lora").attach(model, cell, 1, torch.Generator().manual_seed(0))
        outputs[init] = model.bert(input_ids=ids).last_hidden_state
    assert torch.allclose(outputs["init_ab"], outputs["kaiming"], atol=1e-4)
    assert not torch.allclose(outputs["random_ab"], outputs["kaiming"], atol=1e-2)


def test_dora_zero_norm_rows_are_guarded():
    linear = torch.nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight[1] = 0.0
    layer = StackedDoRALinear(linear, rank=2, k=1, scale=1.0)
    layer.set_init(torch.randn(2, 8), torch.zeros(4, 2))
    x = torch.randn(3, 8)
    out = layer(x)
    assert torch.isfinite(out).all()
    # at init (B = 0) DoRA is the base layer, the zero row included (its m / norm is eps / eps)
    assert torch.allclose(out, linear(x), atol=1e-6)
    assert float(layer.magnitude[0][1]) == pytest.approx(StackedDoRALinear.NORM_EPS)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (layer.lora_A[0], layer.magnitude[0]))


def test_peft_pass_through_trains_any_peft_config(tmp_path, study_file):
    from lorasweep.cli import main

    methods = [{"name": "peft", "label": "lora-gaussian",
                "peft": {"init_lora_weights": "gaussian"}},
               {"name": "peft", "label": "randlora", "peft_config": "RandLoraConfig",
                "peft": {"r": 8}},
               {"name": "lora", "init": "gaussian"}]
    out = tmp_path / "out"
    assert main(["run", str(study_file(search={"methods": methods, "lr": [1e-2]})),
                 "--out", str(out)]) == 0
    rows = {r["method"]: r for r in read_rows(out)}
    assert set(rows) == {"lora-gaussian", "randlora", "lora"}
    assert all(r["status"] == "complete" for r in rows.values())
    # PEFT's gaussian LoRA has the native one's trainable parameters (adapters + head) and scale
    assert rows["lora-gaussian"]["trainable_params"] == rows["lora"]["trainable_params"]
    assert rows["lora-gaussian"]["effective_scale"] == rows["lora"]["effective_scale"]


@pytest.mark.parametrize(("entry", "expected"), [
    ({"name": "peft", "peft": {"rr": 4}}, "rejects these arguments"),
    ({"name": "peft", "peft_config": "NoSuchConfig", "peft": {}}, "not a PEFT config class"),
    ({"name": "lora", "peft": {"r": 4}}, "go with (and only with) method name 'peft'"),
    ({"name": "peft"}, "go with (and only with) method name 'peft'"),
    ({"name": "peft", "peft": {"target_modules": ["nope"]}}, "cannot be built"),
])
def test_peft_pass_through_bad_arguments(tmp_path, study_file, capsys, entry, expected):
    from lorasweep.cli import main

    assert main(["run", str(study_file(search={"methods": [entry], "lr": [1e-3]})),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "search.methods" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("label", "arguments"), [
    ("eva", {"init_lora_weights": "eva", "eva_config": {"rho": 1.0}}),
    ("corda", {"init_lora_weights": "corda", "corda_config": {"corda_method": "kpm"}}),
    ("lora-ga", {"init_lora_weights": "lora_ga", "lora_ga_config": {}}),
])
def test_peft_data_driven_inits_see_training_batches(tmp_path, study_file, monkeypatch, label,
                                                     arguments):
    """EVA, CorDA and LoRA-GA get the trial's first training batches through PEFT's own calls
    (counted on the way in), then train."""
    import peft

    from lorasweep.cli import main
    from lorasweep.methods import peft_passthrough
    from lorasweep.workbench import CALIBRATION_BATCHES

    seen: list[torch.Tensor] = []
    run, eva = peft_passthrough._run, peft.initialize_lora_eva_weights

    def counting_run(model, batches, backward):
        seen.extend(b["input_ids"] for b in batches)
        return run(model, batches, backward)

    def counting_eva(peft_model, dataloader, **options):
        seen.extend(b["input_ids"] for b in dataloader)
        return eva(peft_model, dataloader=dataloader, **options)

    monkeypatch.setattr(peft_passthrough, "_run", counting_run)
    monkeypatch.setattr(peft, "initialize_lora_eva_weights", counting_eva)
    methods = [{"name": "peft", "label": label, "peft": arguments}]
    out = tmp_path / "out"
    # attention: PEFT's EVA and CorDA hooks cannot take BERT's pooler.dense, which all-linear
    # holds (as PEFT's own all-linear does): its input has no sequence dimension
    search = {"methods": methods, "lr": [1e-3], "target_modules": "attention"}
    assert main(["run", str(study_file(search=search, train={"steps": 4})),
                 "--out", str(out)]) == 0
    (row,) = read_rows(out)
    assert row["method"] == label and row["status"] == "complete", row
    # CorDA takes the batches one sequence at a time; the others whole (batch_size 8)
    rows = sum(t.shape[0] for t in seen)
    assert rows == CALIBRATION_BATCHES * 8, rows
    assert all(t.shape[1] <= 24 for t in seen)  # the study's seq_len: real training batches


@pytest.mark.numerics
def test_fused_causal_lm_group_equals_trials_run_one_by_one():
    from lorasweep.tasks.causal_lm import CausalLMTask

    base = tiny("tiny:llama", "causal_lm")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 3000, (32, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 9:] = 0  # some padded rows, whose positions are not scored
    split = TokenSplit(ids, mask, ids.masked_fill(mask == 0, -100))
    task = CausalLMTask(split, split, None)
    train = TrainSpec(steps=6, batch_size=8)
    cell = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming", target_modules="all-linear")
    trials = [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0) for i, lr in enumerate([1e-3, 1e-2])]
    fused = train_group(base, task, train, trials, torch.device("cpu"))
    for trial, together in zip(trials, fused, strict=True):
        (alone,) = train_group(base, task, train, [trial], torch.device("cpu"))
        assert torch.allclose(torch.tensor(together.loss_curve), torch.tensor(alone.loss_curve),
                              rtol=1e-5, atol=0)
        assert together.metrics["eval_loss"] == pytest.approx(alone.metrics["eval_loss"],
                                                              rel=1e-5)


def test_a_final_validation_loss_that_is_not_finite_is_divergence_under_either_rule():
    """With task.select best, an earlier good evaluation is restored and chosen, but a trial
    whose final validation loss is not finite is still reported diverged (README, task.select)."""
    from lorasweep.train import BestOf, DivergenceWatch, TrialCourse

    weight = torch.nn.Parameter(torch.zeros(2))
    course = TrialCourse(DivergenceWatch(10.0), [("w", weight)])
    best_of = BestOf("eval_loss", maximize=False)
    for step, loss in ((1, 1.0), (2, 0.9)):
        course.trained(step, loss, {})
    course.evaluated(1, {"eval_loss": 0.5}, best_of)
    with torch.no_grad():
        weight += 1.0  # trained on after that evaluation
    final = {"eval_loss": math.nan}
    selected = course.select(2, final, best_of)
    assert selected == {"step": 1, "eval_loss": 0.5} and torch.equal(weight, torch.zeros(2))
    result = course.result(2, final, selected, {}, keep_weights=True, seconds=0.0)
    assert (result.status, result.steps, result.reason) == ("diverged", 2,
                                                            "validation loss is not finite")
