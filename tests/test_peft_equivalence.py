"""Every native method PEFT also has matches it: init, outputs, gradients and 5 AdamW steps.

LoRA, rsLoRA, LoRA+, DoRA, PiSSA and OLoRA. Where the init is deterministic (PiSSA, OLoRA) ours
must equal PEFT's, base residual included; then both sides start from the same weights (ours are
copied into PEFT's model, with a zero B made non-zero so the adapters matter from the first
output), see the same batches, and are compared by relative error ||ours - peft|| / ||peft||
below 1e-6, on a BERT-style encoder and a Llama-style decoder.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

from lorasweep.config import METHOD_INITS, ModelSpec, TrainSpec
from lorasweep.methods import get_method
from lorasweep.methods.targets import resolve_targets
from lorasweep.models import load_model, load_tokenizer
from lorasweep.optim import build_optimizer
from lorasweep.space import Cell, TrialSpec

TOL = 1e-6
STEPS = 5
# our method -> (PEFT LoraConfig arguments, whether the init is deterministic)
PEFT_FORMS = {
    "lora": ({}, False),
    "rslora": ({"use_rslora": True}, False),
    "loraplus": ({}, False),
    "dora": ({"use_dora": True}, False),
    "pissa": ({"init_lora_weights": "pissa"}, True),
    "olora": ({"init_lora_weights": "olora"}, True),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).detach().norm() / ref.detach().norm().clamp(min=1e-30))


def build_pair(source: str, kind: str, method: str, quantize: str | None = None):
    spec = ModelSpec(source=source, quantize=quantize)
    tokenizer = load_tokenizer(spec)
    base = load_model(spec, kind, 3 if kind == "classification" else None, tokenizer)
    init = METHOD_INITS.get(method, "kaiming")
    cell = Cell(method=method, rank=4, lora_alpha="8", init=init,
                target_modules="all-linear", loraplus_ratio=16.0 if method == "loraplus" else None)
    ours = copy.deepcopy(base)
    attached = get_method(method).attach(ours, cell, 1, torch.Generator().manual_seed(0))
    extra, deterministic = PEFT_FORMS[method]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=resolve_targets(base, "all-linear"),
                        lora_dropout=0.0, **extra,
                        task_type="SEQ_CLS" if kind == "classification" else "CAUSAL_LM")
    ref = get_peft_model(copy.deepcopy(base), config)
    ours_params = dict(attached.trial_params[0])
    ref_params = {}
    for name, param in ref.named_parameters():
        if not param.requires_grad:
            continue
        key = (name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".lora_A")
               .replace(".lora_B.default.weight", ".lora_B")
               .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude")
               .replace(".modules_to_save.default", ""))
        ref_params[key] = param
    assert set(ref_params) == set(ours_params), set(ref_params) ^ set(ours_params)
    if deterministic:  # the init itself, and the residual base it leaves, are PEFT's
        for key, param in ours_params.items():
            if ".lora_" in key:
                assert rel_err(param, ref_params[key]) < TOL, key
        ref_bases = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
                     for n, p in ref.named_parameters() if ".base_layer.weight" in n}
        our_bases = {n.replace(".base.weight", ".weight"): p
                     for n, p in ours.named_parameters() if n.endswith(".base.weight")}
        assert set(ref_bases) == set(our_bases)
        for key, param in our_bases.items():
            assert rel_err(param, ref_bases[key]) < TOL, key
    with torch.no_grad():  # a zero B becomes non-zero, so outputs depend on the adapters
        for name, param in attached.trial_params[0]:
            if name.endswith("lora_B") and not param.any():
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        for key, param in ref_params.items():
            param.copy_(ours_params[key])
    return ours.eval(), ref.eval(), cell, attached, ours_params, ref_params


def batch(kind: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (4, 12), generator=generator)
    labels = torch.randint(0, 3, (4,), generator=generator) if kind == "classification" else ids
    return ids, labels


def loss_of(model, kind: str, ids, labels) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    if kind == "classification":
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


ARCHS = [("tiny:bert", "classification"), ("tiny:llama", "causal_lm")]


@pytest.mark.parametrize(("source", "kind"), ARCHS)
@pytest.mark.parametrize("method", list(PEFT_FORMS))
def test_matches_peft(source, kind, method):
    check_against_peft(source, kind, method)


def check_against_peft(source: str, kind: str, method: str, quantize: str | None = None):
    """Outputs, step-0 gradients and STEPS AdamW steps of ours and PEFT's from equal weights;
    returns both models."""
    ours, ref, cell, attached, ours_params, ref_params = build_pair(source, kind, method,
                                                                    quantize)
    lr, weight_decay = 2e-3, 0.01
    recipe = TrainSpec(steps=STEPS, weight_decay=weight_decay)
    trial = TrialSpec(grid_id=0, cell=cell, lr=lr, seed=0)
    our_opt = build_optimizer(get_method(method), attached, [trial], recipe)
    if method == "loraplus":
        ref_opt = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0,
                                            loraplus_weight_decay=weight_decay, foreach=False)
    else:
        params = [p for p in ref.parameters() if p.requires_grad]
        ref_opt = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=lr, foreach=False)

    ids, labels = batch(kind, 0)
    assert rel_err(ours(input_ids=ids).logits, ref(input_ids=ids).logits) < TOL
    for step in range(STEPS):
        ids, labels = batch(kind, step)
        our_loss, ref_loss = loss_of(ours, kind, ids, labels), loss_of(ref, kind, ids, labels)
        assert rel_err(our_loss, ref_loss) < TOL
        our_loss.backward()
        ref_loss.backward()
        if step == 0:
            for key, param in ours_params.items():
                assert rel_err(param.grad, ref_params[key].grad) < TOL, key
        our_opt.step()
        ref_opt.step()
        our_opt.zero_grad()
        ref_opt.zero_grad()
    for key, param in ours_params.items():
        assert rel_err(param, ref_params[key]) < TOL, key
    return ours, ref
    ids, _ = batch(kind, 99)
    assert rel_err(ours(input_ids=ids).logits, ref(input_ids=ids).logits) < TOL


def test_loraplus_lr_groups_follow_peft():
    """B matrices and every vector train at ratio x LR; A matrices and the head weight at LR."""
    _, ref, cell, attached, ours_params, ref_params = build_pair("tiny:bert", "classification",
                                                                 "loraplus")
    trial = TrialSpec(grid_id=0, cell=cell, lr=1e-3, seed=0)
    ours = build_optimizer(get_method("loraplus"), attached, [trial], TrainSpec(steps=1))
    theirs = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    names = {id(p): n for n, p in ours_params.items()}
    ref_names = {id(p): n for n, p in ref_params.items()}
    our_lr = {names[id(p)]: g["lr"] for g in ours.param_groups for p in g["params"]}
    ref_lr = {ref_names[id(p)]: g["lr"] for g in theirs.param_groups for p in g["params"]}
    assert our_lr == ref_lr
