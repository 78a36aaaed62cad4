"""QLoRA (`model.quantize: nf4`): bitsandbytes' NF4 base on the CPU, checked against PEFT's
QLoRA layers over the same quantized model, a whole study over it, and the refusals."""

from __future__ import annotations

import copy
import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from lorasweep.cli import main
from lorasweep.config import ModelSpec
from lorasweep.methods import get_method
from lorasweep.methods.stacked import dense_weight
from lorasweep.models import load_model, load_tokenizer
from lorasweep.space import Cell
from tests.test_peft_equivalence import ARCHS, check_against_peft

bnb = pytest.importorskip("bitsandbytes")


# BERT, Llama, and GPT-2 (whose Conv1D layers become 4-bit linear layers of the transposed weight)
@pytest.mark.numerics
@pytest.mark.parametrize(("source", "kind"), [*ARCHS[:2], ("gpt2", "causal_lm")])
@pytest.mark.parametrize("method", ["lora", "rslora", "loraplus", "dora"])
def test_matches_peft_over_the_same_4bit_base(source, kind, method):
    ours, (ref,) = check_against_peft(source, kind, method, quantize="nf4")
    from peft.tuners.lora.bnb import Linear4bit as PeftQLoRALayer

    assert any(isinstance(m, PeftQLoRALayer) for m in ref.modules())  # PEFT's QLoRA path
    bases = [m.base for m in ours.modules() if hasattr(m, "lora_A")]
    assert bases and all(isinstance(b, bnb.nn.Linear4bit) for b in bases)


def test_adapted_linears_are_nf4_and_the_rest_is_not():
    tokenizer = load_tokenizer(ModelSpec(source="tiny:llama"))
    dense = load_model(ModelSpec(source="tiny:llama"), "causal_lm", None, tokenizer)
    four = load_model(ModelSpec(source="tiny:llama", quantize="nf4"), "causal_lm", None,
                      tokenizer)
    layer = four.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
    assert layer.weight.quant_state.blocksize == 64 and layer.compute_dtype == torch.float32
    reference = dense.model.layers[0].mlp.up_proj.weight
    error = (dense_weight(layer) - reference).abs().detach()
    # NF4 keeps 16 levels per block of 64 weights: close to W, but not W
    assert 0 < float(error.max()) < 0.5 * float(reference.abs().max())
    assert type(four.lm_head) is torch.nn.Linear
    assert four.model.embed_tokens.weight.dtype == torch.float32
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.model.layers.parameters())
    four_bytes = sum(p.numel() * p.element_size() for p in four.model.layers.parameters())
    assert four_bytes < 0.25 * dense_bytes


@pytest.mark.parametrize("init", ["gaussian", "mua_a", "mua_b", "random_ab"])
def test_other_inits_train_fused_over_a_4bit_base(init):
    """Two fused trials over NF4: B A = 0 inits leave the 4-bit model's outputs as they were
    (random_ab changes them, by design), and gradients reach each trial's adapters."""
    spec = ModelSpec(source="tiny:llama", quantize="nf4")
    base = load_model(spec, "causal_lm", None, load_tokenizer(spec))
    model = copy.deepcopy(base)
    cell = Cell(method="lora", rank=4, lora_alpha="8", init=init, target_modules="all-linear")
    attached = get_method("lora").attach(model, cell, 2, torch.Generator().manual_seed(0))
    ids = torch.randint(1000, 5000, (2, 8), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=ids.repeat(2, 1)).logits
    same = torch.allclose(logits[:2], base(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert same == (init != "random_ab")
    logits.float().pow(2).mean().backward()
    for params in attached.trial_params:
        grads = [p.grad for n, p in params if ".lora_" in n]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_a_study_over_a_4bit_base_runs(tmp_path: Path, study_file):
    path = study_file(model={"source": "tiny:llama", "quantize": "nf4"},
                      train={"steps": 4, "batch_size": 4, "seq_len": 16},
                      search={"methods": ["dora"], "ranks": [4], "lr": [1e-3, 1e-2]})
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--max-group", "2"]) == 0
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"complete"}


@pytest.mark.parametrize(("search", "expected"), [
    ({"methods": ["lora", "full"]}, "method 'full' cannot train it"),
    ({"methods": ["pissa"]}, "cannot hold init 'pissa'"),
    ({"methods": ["lora"], "inits": ["olora"]}, "cannot hold init 'olora'"),
    ({"methods": ["init_ab"]}, "cannot hold init 'init_ab'"),
])
def test_nf4_refuses_what_a_4bit_base_cannot_do(tmp_path: Path, study_file, capsys, search,
                                                 expected):
    path = study_file(model={"source": "tiny:bert", "quantize": "nf4"}, search=search)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.quantize" in err and expected in err
    assert not out.exists()


def test_nf4_without_bitsandbytes_is_one_line_before_any_model_loads(
        tmp_path: Path, study_file, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("transformers.AutoModelForSequenceClassification.from_config", no_loading)
    path = study_file(model={"source": "tiny:bert", "quantize": "nf4"},
                      search={"methods": ["lora"]})
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs the bitsandbytes package" in err
    assert not out.exists()
