"""Adding a variant is one registration: a `Variant` line (and, for a new init, an `Init` line and
its function) reaches the study file's validation, cell expansion, fusing, training, export,
`suggest`'s PEFT mapping and the muA analysis with no other edit."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from peft import PeftModel

from lorasweep.analysis.scaling import predicted_beta
from lorasweep.analysis.transfer import Prediction
from lorasweep.cli import main
from lorasweep.config import ModelSpec, load_study
from lorasweep.errors import StudyError
from lorasweep.methods import get_method
from lorasweep.methods.inits import FACTORS, Factors
from lorasweep.models import load_model, load_tokenizer
from lorasweep.space import cells_of
from lorasweep.suggest import settings
from lorasweep.variants import INITS, LORA_FLAGS, VARIANTS, Init, Variant

from .conftest import read_rows

# rsLoRA under another name: s = lora_alpha / sqrt(r), PEFT's use_rslora
TOY = Variant("toy", rank_power=0.5, peft_flags={**LORA_FLAGS, "use_rslora": True},
              mua_family="rank", plain=True)


def test_a_registered_variant_reaches_every_consumer(monkeypatch, study_file, tmp_path):
    monkeypatch.setitem(VARIANTS, "toy", TOY)
    path = study_file(train={"steps": 4},
                      search={"methods": ["toy", "lora"], "ranks": [4], "lora_alpha": [8],
                              "lr": [3e-3]})
    cell = next(c for c, _ in cells_of(load_study(path)) if c.method == "toy")
    assert (cell.init, cell.fusable, cell.is_adapter) == ("kaiming", True, True)
    method = get_method("toy")
    assert method.fusable and method.scale(cell) == 8 / 2  # lora_alpha / sqrt(r)
    assert method.peft_arguments(cell) == {"use_rslora": True, "use_dora": False,
                                           "init_lora_weights": True}
    assert predicted_beta(replace(cell, lora_alpha="8")) == -0.25  # rsLoRA's muA exponent

    folder = tmp_path / "study"
    assert main(["run", str(path), "--out", str(folder)]) == 0
    rows = {r["method"]: r for r in read_rows(folder)}
    assert float(rows["toy"]["effective_scale"]) == 4.0
    assert float(rows["lora"]["effective_scale"]) == 2.0

    out = tmp_path / "adapter"
    assert main(["export", str(folder), "--trial", rows["toy"]["trial"], str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True
    spec = ModelSpec(source="tiny:bert")
    base = load_model(spec, "classification", 3, load_tokenizer(spec))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    scales = {m.scaling["default"] for m in peft_model.modules()
              if isinstance(getattr(m, "scaling", None), dict) and m.scaling}
    assert scales == {4.0}

    suggested = settings(Prediction("fitted", cell.family, cell, 1e-3, 1e-3, 1e-3, ""), None)
    assert suggested["peft_config"]["use_rslora"] is True
    assert suggested["peft_config"]["init_lora_weights"] is True


def test_an_unregistered_method_is_refused(study_file):
    with pytest.raises(StudyError, match=r"search.methods.0.name: Input should be 'lora'.*'toy'"):
        load_study(study_file(search={"methods": ["toy"], "lr": [1e-3]}))


def half_kaiming(rank: int, weight: torch.Tensor, scale: float,
                 generator: torch.Generator) -> Factors:
    factors = FACTORS["kaiming"](rank, weight, scale, generator)
    return Factors(factors.a / 2, factors.b)


def test_a_registered_init_is_one_fact_and_one_function(monkeypatch, study_file):
    with pytest.raises(StudyError, match=r"search\.inits\.0: String should match pattern"):
        load_study(study_file(search={"methods": ["lora"], "inits": ["half"], "lr": [1e-3]}))
    monkeypatch.setitem(INITS, "half", Init("half", mua="A"))
    monkeypatch.setitem(FACTORS, "half", half_kaiming)
    study = load_study(study_file(search={"methods": ["lora"], "inits": ["half"],
                                          "ranks": [4], "lr": [1e-3]}))
    ((cell, _),) = cells_of(study)
    assert cell.init == "half"
    linear = torch.nn.Sequential(torch.nn.Linear(16, 8))
    attached = get_method("lora").attach(copy.deepcopy(linear), replace(cell, target_modules="0"),
                                         1, torch.Generator().manual_seed(0))
    a = dict(attached.trial_params[0])["0.lora_A"]
    expected = FACTORS["kaiming"](4, linear[0].weight, 1.0, torch.Generator().manual_seed(0)).a
    assert torch.equal(a.detach(), expected / 2)
    assert predicted_beta(replace(cell, lora_alpha="2r")) == -0.5  # an Init[A] to muA
