"""`lorasweep export`: a trained trial as a PEFT adapter folder that `PeftModel` loads.

The adapter is assembled in a real PEFT model (so its file layout is PEFT's own) from the trial's
saved weights. Methods that change the base weight (PiSSA, MiLoRA, OLoRA, Init[AB]) export as
plain LoRA over the original W through PEFT's conversion identity: with W_res = W - s B0 A0,
W_res + s B A = W + s [B, -B0] [A; A0], a rank-2r adapter with the same scale s.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from lorasweep.errors import StudyError
from lorasweep.methods.stacked import StackedLoRALinear
from lorasweep.methods.targets import resolve_targets, uses_conv1d
from lorasweep.models import load_model, load_tokenizer
from lorasweep.space import TrialSpec
from lorasweep.study.folder import open_for_reading, weights_path
from lorasweep.study.store import Store
from lorasweep.tasks import build_task, num_labels
from lorasweep.variants import get_init, variant
from lorasweep.workbench import attach_trials


def find_trial(store: Store, grid_id: int) -> TrialSpec:
    """The spec of a complete trial, by its number (trials.csv's `trial`)."""
    for status, trial, _ in store.latest_by_key().values():
        spec = TrialSpec.from_attrs(trial.user_attrs)
        if spec.grid_id == grid_id:
            if status != "complete":
                raise StudyError(f"--trial {grid_id}: the trial is {status}, not complete")
            return spec
    raise StudyError(f"--trial {grid_id}: no such trial in {store.folder}")


def export_trial(folder: Path, grid_id: int, out: Path) -> Path:
    """Write the PEFT adapter of trial `grid_id` of the study in `folder` to `out`.

    The folder's records are read wherever they live (its journal, or its database).
    """
    study, store = open_for_reading(folder)
    spec = find_trial(store, grid_id)
    cell = spec.cell
    if not cell.is_adapter:
        raise StudyError(f"--trial {grid_id}: full fine-tuning has no adapter to export")
    method = variant(cell.method)
    if method.peft_flags is None:
        raise StudyError(f"--trial {grid_id}: exporting a peft pass-through trial is not "
                         "supported yet")
    residual = get_init(cell.init).residual
    # DoRA's magnitude is the row norm of the weight it starts from, so W_res + s B A is not
    # the rank-2r adapter over W that the conversion below writes.
    if method.peft_flags.get("use_dora") and residual:
        raise StudyError(f"--trial {grid_id}: DoRA over a {cell.init} residual has no PEFT form")
    path = weights_path(folder, grid_id)
    if not path.exists():
        raise StudyError(f"--trial {grid_id}: its weights are missing ({path})")
    trained = load_file(str(path))

    tokenizer = load_tokenizer(study.model)
    classify = study.task.kind == "classification"
    labels = num_labels(build_task(study, tokenizer)) if classify else None
    base = load_model(study.model, study.task.kind, labels, tokenizer)
    start = _initial_layers(base, spec)
    targets = resolve_targets(base, cell.target_modules)
    rank = cell.rank * (2 if residual else 1)
    assert cell.alpha is not None and cell.rank is not None
    # Keep the scale s: lora_alpha / r^p at the doubled rank.
    alpha = cell.alpha * (1 if not residual else method.alpha_factor(2))
    # fan_in_fan_out: W is stored (in, out) in a Conv1D (GPT-2); PEFT sets it per layer anyway
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                        fan_in_fan_out=uses_conv1d(base, targets),
                        **method.peft_flags, task_type="SEQ_CLS" if classify else "CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.copy_(_peft_value(name, trained, start, residual))
    try:
        peft_model.save_pretrained(str(out))
    except OSError as exc:
        raise StudyError(f"{out}: cannot write the adapter there ({exc.strerror})") from None
    return out


def _initial_layers(base: torch.nn.Module, spec: TrialSpec) -> dict[str, StackedLoRALinear]:
    """The trial's adapted layers at step 0 (their A0, B0), re-derived from its cell and seed."""
    model, _ = attach_trials(base, [spec])
    return {name: module for name, module in model.named_modules()
            if isinstance(module, StackedLoRALinear)}


def _peft_value(peft_name: str, trained: dict[str, torch.Tensor],
                start: dict[str, StackedLoRALinear], residual: bool) -> torch.Tensor:
    name = peft_name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
    for part, ours in ((".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B"),
                       (".lora_magnitude_vector.default.weight", ".lora_magnitude")):
        if part in name:
            module = name.split(part)[0]
            value = trained[module + ours]
            if residual and ours == ".lora_A":
                value = torch.cat([value, start[module].lora_A[0].detach()], dim=0)
            if residual and ours == ".lora_B":
                value = torch.cat([value, -start[module].lora_B[0].detach()], dim=1)
            return value
    return trained[name]
