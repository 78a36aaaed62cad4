"""`lorasweep export`: a trained trial as a PEFT adapter folder that `PeftModel` loads.

The adapter is assembled in a real PEFT model (so its file layout is PEFT's own) from the trial's
saved weights. Methods that change the base weight (PiSSA, MiLoRA, OLoRA, Init[AB]) export as
plain LoRA over the original W through PEFT's conversion identity: with W_res = W - s B0 A0,
W_res + s B A = W + s [B, -B0] [A; A0], a rank-2r adapter with the same scale s.

A peft entry's trial is PEFT's own model: it is rebuilt as training built it (from its seed, and
its first training batches for inits that look at data), given its trained weights and saved by
PEFT; a LoRA init that changes the base weight (PiSSA, OLoRA, CorDA, LoRA-GA) is saved through
PEFT's own conversion to plain LoRA over the original weights.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorasweep.config import Study
from lorasweep.errors import StudyError
from lorasweep.kinds import kind_of
from lorasweep.methods.stacked import StackedLoRALinear
from lorasweep.methods.targets import peft_task, resolve_targets, uses_conv1d
from lorasweep.models import load_model, load_preprocessor
from lorasweep.recipe import resolve_training
from lorasweep.space import TrialSpec
from lorasweep.study.folder import open_for_reading, weights_path
from lorasweep.study.store import Store
from lorasweep.tasks import build_task, num_labels
from lorasweep.variants import get_init, variant
from lorasweep.workbench import attach_group, attach_trials, load_workbench

# The LoRA inits whose PEFT adapter holds the base weight's change (W_res = W - ...), which
# PEFT's save_pretrained converts to plain LoRA given the adapter at step 0 (its own list).
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "lora_ga")


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
    if study.trainer is not None:
        raise StudyError(f"--trial {grid_id}: the study's trials ran its trainer command, which "
                         f"keeps what it trained (see {folder}/trials/trial-{grid_id}/)")
    kind = kind_of(study.task.kind)
    if kind.no_export is not None:
        raise StudyError(f"--trial {grid_id}: {kind.no_export}")
    if not cell.is_adapter:
        raise StudyError(f"--trial {grid_id}: full fine-tuning has no adapter to export")
    method = variant(cell.method)
    residual = method.peft_flags is not None and get_init(cell.init).residual
    # DoRA's magnitude is the row norm of the weight it starts from, so W_res + s B A is not
    # the rank-2r adapter over W that the conversion below writes.
    if residual and method.peft_flags.get("use_dora"):
        raise StudyError(f"--trial {grid_id}: DoRA over a {cell.init} residual has no PEFT form")
    path = weights_path(folder, grid_id)
    if not path.exists():
        raise StudyError(f"--trial {grid_id}: its weights are missing ({path})")
    try:
        trained = _TrainedWeights(load_file(str(path)), path)
    except (SafetensorError, OSError) as exc:  # a file cut short or damaged
        raise StudyError(f"--trial {grid_id}: its weights file {path} cannot be read "
                         f"({str(exc).splitlines()[0]})") from None
    if method.peft_flags is None:  # a peft entry: PEFT's own model
        return _export_peft_entry(study, spec, trained, out)

    preprocessor = load_preprocessor(study.model, kind.name)
    labels = num_labels(build_task(study, preprocessor)) if kind.labels else None
    base = load_model(study.model, kind.name, labels, preprocessor)
    start = _initial_layers(base, spec)
    targets = resolve_targets(base, cell.target_modules)
    rank = cell.rank * (2 if residual else 1)
    assert cell.alpha is not None and cell.rank is not None
    # Keep the scale s: lora_alpha / r^p at the doubled rank.
    alpha = cell.alpha * (1 if not residual else method.alpha_factor(2))
    # fan_in_fan_out: W is stored (in, out) in a Conv1D (GPT-2); PEFT sets it per layer anyway
    # lora_dropout: the trial's own, so training on from the export keeps its recipe
    lora_dropout = resolve_training(study.train, cell.recipe).train.lora_dropout
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=lora_dropout,
                        fan_in_fan_out=uses_conv1d(base, targets),
                        **method.peft_flags, **peft_task(kind.name, base))
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.copy_(_peft_value(name, trained, start, residual))
    return _save(peft_model, out)


def _export_peft_entry(study: Study, spec: TrialSpec, trained: dict[str, torch.Tensor],
                       out: Path) -> Path:
    bench = load_workbench(study)
    training = resolve_training(study.train, spec.cell.recipe)
    _, attached = attach_group(bench.base, bench.task_for(training), training.train, [spec])
    peft_model = attached.peft_model
    assert peft_model is not None
    config = peft_model.peft_config["default"]
    init = str(getattr(config, "init_lora_weights", "")).lower()
    converts = isinstance(config, LoraConfig) and init.startswith(BASE_CHANGING_INITS)
    with tempfile.TemporaryDirectory() as scratch:
        initial = Path(scratch) / "initial"
        if converts:  # the adapter at step 0, which PEFT subtracts (saved as a plain init)
            config.init_lora_weights = True
            peft_model.save_pretrained(str(initial))
        with torch.no_grad():
            for name, param in attached.trial_params[0]:
                param.copy_(trained[name])
        _save(peft_model, out, initial if converts else None)
    if converts:
        _restore_non_lora(peft_model, out)
    return out


def _restore_non_lora(peft_model: torch.nn.Module, out: Path) -> None:
    """PEFT's conversion (`subtract_mutated_init`) keeps only the LoRA tensors, so the rest of
    what the adapter saves (modules_to_save: the trained task head) is put back beside them."""
    path = out / SAFETENSORS_WEIGHTS_NAME
    tensors = load_file(str(path))
    tensors |= {name: value.contiguous() for name, value in
                get_peft_model_state_dict(peft_model).items() if "lora_" not in name}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _save(peft_model: torch.nn.Module, out: Path, initial: Path | None = None) -> Path:
    try:
        peft_model.save_pretrained(
            str(out), path_initial_model_for_weight_conversion=str(initial) if initial else None)
    except OSError as exc:
        raise StudyError(f"{out}: cannot write the adapter there ({exc.strerror})") from None
    except ValueError as exc:  # a conversion PEFT refuses (rsLoRA with rank or alpha patterns)
        raise StudyError(f"{out}: PEFT cannot write this adapter ({exc})") from None
    return out


class _TrainedWeights(dict):
    """A trial's saved weights; a name the file lacks is a one-line error naming the file
    (a file cut short, or from another trial), not a KeyError."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        super().__init__(tensors)
        self.path = path

    def __missing__(self, name: str) -> torch.Tensor:
        raise StudyError(f"{self.path}: holds no weight '{name}'; the trial's weights file is "
                         "not as its run wrote it")


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
