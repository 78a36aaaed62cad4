"""Target selection on GPT-2 (Conv1D) and mixed models: presets, explicit names, clear errors, and
peft pass-through entries that name their own targets."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

from lorasweep.errors import StudyError
from lorasweep.methods import get_method
from lorasweep.methods.targets import adapter_width, resolve_targets
from lorasweep.space import Cell

from .test_peft_equivalence import base_model, linearized, rel_err

# every test here compares two computations of the same numbers (tests/test_threads.py)
pytestmark = pytest.mark.numerics


def layers(prefix: str, names: list[str]) -> list[str]:
    return [f"{prefix}.{i}.{name}" for i in range(2) for name in names]


def test_gpt2_presets_know_its_names():
    gpt2 = base_model("gpt2", "causal_lm")
    assert resolve_targets(gpt2, "attention") == layers("transformer.h", ["attn.c_attn",
                                                                          "attn.c_proj"])
    assert resolve_targets(gpt2, "mlp") == layers("transformer.h", ["mlp.c_fc", "mlp.c_proj"])
    assert resolve_targets(gpt2, "c_attn,mlp.c_proj") == layers("transformer.h", [
        "attn.c_attn", "mlp.c_proj"])
    # c_attn: 32 in, 96 out; attn.c_proj 32, 32; c_fc 32, 128; mlp.c_proj 128, 32
    assert adapter_width(gpt2, "all-linear") == 2 * (128 + 64 + 160 + 160)


def test_mixed_model_is_adapted_completely():
    """CLVP's decoder: nn.Linear attention, Conv1D MLP."""
    clvp = base_model("clvp_decoder", "causal_lm")
    assert resolve_targets(clvp, "mlp") == layers("model.decoder.layers", ["mlp.c_fc",
                                                                           "mlp.c_proj"])
    assert resolve_targets(clvp, "attention") == layers(
        "model.decoder.layers", ["attn.k_proj", "attn.v_proj", "attn.q_proj", "attn.out_proj"])


@pytest.mark.parametrize(("targets", "message"), [
    ("wte", "transformer.wte is of type Embedding, not an nn.Linear or transformers' Conv1D"),
    ("attn", "transformer.h.0.attn is of type GPT2Attention"),
    ("q_proj", "its layers end in: c_attn, c_fc, c_proj"),
    ("score", "score is part of the task head"),
])
def test_unusable_names_are_named(targets, message):
    gpt2 = base_model("gpt2", "classification")
    with pytest.raises(StudyError, match=r"search\.target_modules") as error:
        resolve_targets(gpt2, targets)
    assert message in str(error.value)


def peft_cell(arguments: dict, target_modules: str) -> Cell:
    spec = {"config": "LoraConfig", "label": "own", "arguments": arguments}
    return Cell(method="peft", rank=4, lora_alpha="8", init="peft",
                target_modules=target_modules, peft=json.dumps(spec, sort_keys=True))


def adapted(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("own", [["c_attn", "c_proj", "c_fc"], r".*\.h\.1\.attn\.c_attn"])
def test_peft_entry_with_own_targets_reaches_peft_untouched(own):
    """The cell's preset ('mlp') is not resolved: PEFT sees the entry's list or regex as given."""
    gpt2 = base_model("gpt2", "causal_lm")
    cell = peft_cell({"fan_in_fan_out": True, "target_modules": own}, "mlp")
    get_method("peft").attach(gpt2, cell, 1, torch.Generator().manual_seed(0))
    want = (set(layers("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]))
            if isinstance(own, list) else {"transformer.h.1.attn.c_attn"})
    assert adapted(gpt2) == want
    assert gpt2.peft_config["default"].fan_in_fan_out


def test_peft_entry_without_targets_gets_the_preset_with_fan_in_fan_out():
    gpt2 = base_model("gpt2", "causal_lm")
    get_method("peft").attach(gpt2, peft_cell({}, "attention"), 1,
                              torch.Generator().manual_seed(0))
    assert adapted(gpt2) == set(layers("transformer.h", ["attn.c_attn", "attn.c_proj"]))
    assert gpt2.peft_config["default"].fan_in_fan_out


@pytest.mark.parametrize(("method", "init"), [
    ("lora", "gaussian"), ("lora", "mua_a"), ("lora", "mua_b"), ("milora", "milora"),
    ("init_ab", "init_ab"), ("random_ab", "random_ab"), ("pissa", "pissa_niter_2"),
    ("dora", "kaiming"), ("full", None)])
def test_conv1d_trains_as_the_linear_it_equals(method, init):
    """Every native init on GPT-2's Conv1D layers gives the outputs and gradients it gives on the
    same layers written as nn.Linear (W read as (out, in), the residual written back there)."""
    gpt2 = base_model("gpt2", "causal_lm")
    cell = Cell(method="full") if method == "full" else Cell(
        method=method, rank=4, lora_alpha="8", init=init, target_modules="all-linear")
    ids = torch.randint(1000, 5000, (2, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (copy.deepcopy(gpt2), linearized(gpt2)):
        torch.manual_seed(0)  # the randomized SVD of pissa_niter_K
        attached = get_method(method).attach(model, cell, 1, torch.Generator().manual_seed(0))
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        results.append((model, logits, {name: p.grad for name, p in attached.trial_params[0]}))
    (conv, ours, our_grads), (_, linear, linear_grads) = results
    # 1e-5: Conv1D's addmm (x W + b) rounds differently from nn.Linear's F.linear
    assert rel_err(ours, linear) < 1e-5
    assert set(our_grads) == set(linear_grads)
    for name, grad in our_grads.items():
        owner = conv.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, Conv1D) and name.endswith(".weight"):  # full fine-tuning's W
            grad = grad.t()
        assert rel_err(grad, linear_grads[name]) < 1e-5, name
    unchanged = rel_err(ours, gpt2(input_ids=ids).logits) < 1e-5
    assert unchanged == (method != "random_ab")
