"""Every native method PEFT also has matches it: init, outputs, gradients and 5 AdamW steps.

LoRA, rsLoRA, LoRA+, DoRA, PiSSA and OLoRA. Where the init is deterministic (PiSSA, OLoRA) ours
must equal PEFT's, base residual included; then both sides start from the same weights (ours are
copied into PEFT's model, with a zero B made non-zero so the adapters matter from the first
output), see the same batches, and are compared by relative error ||ours - peft|| / ||peft||
below 1e-6. Each variant runs alone (K = 1) and fused (K = 2 trials at different LRs, each
against its own PEFT model), on a BERT-style encoder and tiny Llama, GPT-2 (Conv1D layers,
fan_in_fan_out), OPT (with project_in / project_out), Qwen2, Phi-3 (fused qkv_proj /
gate_up_proj), Gemma-2 and Gemma-3 decoders, the image classifiers ViT and ConvNeXt (whose
pointwise convolutions are nn.Linear layers; PEFT takes the head as modules_to_save), and a
Stable Diffusion UNet (its attention, feed-forward and time-embedding linears between
convolutions, trained on the noise-prediction loss), SDXL's UNet (with its pooled-text and
time-id embedding) and SD3's MMDiT transformer (joint attention, AdaLN; on the flow-matching
loss with SD3's output preconditioning). `all-linear` selects exactly the layers
PEFT's own `all-linear` selects.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    ClvpForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from lorasweep.config import ModelSpec, TrainSpec
from lorasweep.dropout import TiledDropout, set_training
from lorasweep.kinds import kind_of
from lorasweep.methods import get_method
from lorasweep.methods.stacked import StackedLoRALinear
from lorasweep.methods.targets import (
    ADAPTABLE,
    head_module_names,
    layer_shape,
    out_in_weight,
    peft_task,
    replace_module,
    resolve_targets,
    uses_conv1d,
)
from lorasweep.models import load_model, load_preprocessor, take_added_conditioning
from lorasweep.optim import build_optimizer
from lorasweep.quantize import quantize_base
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks import logits_of
from lorasweep.tasks.classification import ClassificationTask
from lorasweep.variants import VARIANTS

from .diffusion_parts import POOLED, WIDTH, tiny_sd3_transformer, tiny_sdxl_unet, tiny_unet

# every test here compares two computations of the same numbers (tests/test_threads.py)
pytestmark = pytest.mark.numerics

TOL = 1e-6
STEPS = 5
# Every method with a PEFT form (its own LoraConfig arguments, variants.Variant.peft_arguments),
# at the init its cells take (kaiming where the study chooses): a newly registered variant with
# one is checked here without an edit.
PEFT_FORMS = [name for name, spec in VARIANTS.items()
              if spec.peft_arguments(spec.inits(["kaiming"])[0]) is not None]
DETERMINISTIC_INITS = ("pissa", "olora")  # built from W alone, so ours must equal PEFT's


def test_peft_forms_are_the_known_ones():
    """The registry's PEFT forms are the methods PEFT has: none lost, none invented."""
    assert PEFT_FORMS == ["lora", "rslora", "loraplus", "dora", "pissa", "olora"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: at these sizes a second one only adds contention (a shared 2-core
    machine measured 0.2 s of CPU per fused test at one thread, 3.5 s at two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).detach().norm() / ref.detach().norm().clamp(min=1e-30))


# Tiny decoders built from their configs (hidden size 32, 2 layers, vocabulary 5000).
DECODERS = {
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 bos_token_id=0, eos_token_id=0),
    "opt": dict(model_type="opt", hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                num_attention_heads=4, word_embed_proj_dim=16, max_position_embeddings=64),
    "qwen2": dict(model_type="qwen2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64),
    "phi3": dict(model_type="phi3", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma2": dict(model_type="gemma2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, head_dim=8,
                   max_position_embeddings=64),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                        head_dim=8, max_position_embeddings=64),
    # CLVP's decoder mixes nn.Linear attention with a Conv1D MLP
    "clvp_decoder": dict(model_type="clvp_decoder", hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, n_inner=64, max_position_embeddings=64,
                         max_text_tokens=64, bos_token_id=0, eos_token_id=0),
}
NOT_AUTO = {"clvp_decoder": ClvpForCausalLM}  # no AutoModelForCausalLM entry
ARCHS = [("tiny:bert", "classification"), ("tiny:llama", "causal_lm"),
         *((name, "causal_lm") for name in DECODERS),
         ("tiny:vit", "image_classification"), ("tiny:convnext", "image_classification"),
         ("tiny-unet", "image_generation"), ("tiny-sdxl", "image_generation"),
         ("tiny-sd3", "image_generation")]
# The denoisers by source: SDXL's UNet takes its added conditioning as keyword arguments, as
# models.load_denoiser leaves it.
DENOISERS = {"tiny-unet": tiny_unet, "tiny-sdxl": lambda: take_added_conditioning(tiny_sdxl_unet()),
             "tiny-sd3": tiny_sd3_transformer}


def base_model(source: str, kind: str, quantize: str | None = None) -> torch.nn.Module:
    if kind == "image_generation":
        return DENOISERS[source]()
    if source in DECODERS:
        labels = {"num_labels": 3, "pad_token_id": 0} if kind == "classification" else {}
        config = AutoConfig.for_model(**{**DECODERS[source], **labels}, vocab_size=5000)
        auto = (AutoModelForSequenceClassification if kind == "classification"
                else NOT_AUTO.get(source, AutoModelForCausalLM))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = (auto(config) if source in NOT_AUTO else auto.from_config(config)).eval()
        return quantize_base(model, quantize) if quantize else model
    spec = ModelSpec(source=source, quantize=quantize)
    return load_model(spec, kind, 3 if kind_of(kind).labels else None,
                      load_preprocessor(spec, kind))


def linearized(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every Conv1D replaced by the nn.Linear that computes the same."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            n_out, n_in = layer_shape(module)
            linear = torch.nn.Linear(n_in, n_out)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            replace_module(model, name, linear)
    return model


def peft_key(name: str) -> str:
    """A PEFT parameter name as lorasweep names it."""
    return (name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".lora_A")
            .replace(".lora_B.default.weight", ".lora_B")
            .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude")
            .replace(".modules_to_save.default", ""))


def build_pair(source: str, kind: str, method: str, k: int = 1, quantize: str | None = None,
               lora_dropout: float = 0.0, base: torch.nn.Module | None = None,
               targets: str = "all-linear"):
    """Our model with K trials and one PEFT model per trial, all from the same weights, the
    adapters on the layers `targets` names (resolved by lorasweep, as export hands them to
    PEFT)."""
    base = base_model(source, kind, quantize) if base is None else base
    init = VARIANTS[method].inits(["kaiming"])[0]
    cell = Cell(method=method, rank=4, lora_alpha="8", init=init,
                target_modules=targets, loraplus_ratio=16.0 if method == "loraplus" else None)
    ours = copy.deepcopy(base)
    attached = get_method(method).attach(ours, cell, k, torch.Generator().manual_seed(0),
                                         lora_dropout=lora_dropout)
    extra = get_method(method).peft_arguments(cell)
    deterministic = init in DETERMINISTIC_INITS
    layers = resolve_targets(base, targets)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=layers, lora_dropout=lora_dropout,
                        fan_in_fan_out=uses_conv1d(base, layers), **extra,
                        **peft_task(kind, base))
    # PEFT 0.21.2's olora_init ignores fan_in_fan_out (a QR of a Conv1D's stored (in, out)
    # weight: wrong shapes, or a changed model), so OLoRA's reference sees the Conv1D layers as
    # the nn.Linear layers they equal.
    ref = get_peft_model(linearized(base) if method == "olora" else copy.deepcopy(base), config)
    trials = [dict(params) for params in attached.trial_params]
    ref_params = {peft_key(name): param for name, param in ref.named_parameters()
                  if param.requires_grad}
    assert set(ref_params) == set(trials[0]), set(ref_params) ^ set(trials[0])
    if deterministic:  # the init itself, and the residual base it leaves, are PEFT's
        for key, param in trials[0].items():
            if ".lora_" in key:
                assert rel_err(param, ref_params[key]) < TOL, key
        ref_bases = {n.removeprefix("base_model.model."): out_in_weight(m.get_base_layer())
                     for n, m in ref.named_modules() if isinstance(m, LoraLayer)}
        our_bases = {n: out_in_weight(m.base) for n, m in ours.named_modules()
                     if isinstance(m, StackedLoRALinear)}
        assert set(ref_bases) == set(our_bases)
        for key, param in our_bases.items():
            assert rel_err(param, ref_bases[key]) < TOL, key
    with torch.no_grad():  # a zero B becomes non-zero, so outputs depend on the adapters
        for params in trials:
            for name, param in params.items():
                if name.endswith("lora_B") and not param.any():
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        for key, param in ref_params.items():
            param.copy_(trials[0][key])
    refs = [ref.eval()] + [copy.deepcopy(ref).eval() for _ in range(k - 1)]
    return ours.eval(), refs, cell, attached, trials


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {peft_key(name): p for name, p in model.named_parameters() if p.requires_grad}


def batch(kind: str, seed: int, source: str = "tiny-unet"
          ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs (token ids, 32x32 pixel values, or a UNet's noised latents, timesteps
    and text states) and labels (the noise, for a UNet)."""
    generator = torch.Generator().manual_seed(seed)
    if source == "tiny-sdxl":
        inputs = {"sample": torch.randn((4, 4, 8, 8), generator=generator),
                  "timestep": torch.randint(0, 1000, (4,), generator=generator),
                  "encoder_hidden_states": torch.randn((4, 6, 2 * WIDTH), generator=generator),
                  "text_embeds": torch.randn((4, POOLED), generator=generator),
                  "time_ids": torch.tensor([[20.0, 24.0, 2.0, 4.0, 16.0, 16.0]]).repeat(4, 1)}
        return inputs, torch.randn((4, 4, 8, 8), generator=generator)
    if source == "tiny-sd3":  # labels: latents, sigmas (the loss is sd3_loss)
        latents, noise = (torch.randn((4, 4, 8, 8), generator=generator) for _ in range(2))
        sigmas = torch.rand((4,), generator=generator)
        line = sigmas[:, None, None, None]
        inputs = {"hidden_states": (1 - line) * latents + line * noise,
                  "timestep": sigmas * 1000,
                  "encoder_hidden_states": torch.randn((4, 6, 2 * WIDTH), generator=generator),
                  "pooled_projections": torch.randn((4, 2 * WIDTH), generator=generator)}
        return inputs, (latents, line)
    if kind == "image_generation":
        inputs = {"sample": torch.randn((4, 4, 8, 8), generator=generator),
                  "timestep": torch.randint(0, 1000, (4,), generator=generator),
                  "encoder_hidden_states": torch.randn((4, 6, WIDTH), generator=generator)}
        return inputs, torch.randn((4, 4, 8, 8), generator=generator)
    if kind == "image_classification":
        pixels = torch.randn((4, 3, 32, 32), generator=generator)
        return {"pixel_values": pixels}, torch.randint(0, 3, (4,), generator=generator)
    ids = torch.randint(1000, 5000, (4, 12), generator=generator)
    labels = torch.randint(0, 3, (4,), generator=generator) if kind == "classification" else ids
    return {"input_ids": ids}, labels


def repeated(inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """K copies of the inputs end to end, one per trial."""
    return {name: t.repeat(k, *(1,) * (t.ndim - 1)) for name, t in inputs.items()}


def losses_of(model, kind: str, inputs, labels, k: int = 1) -> list[torch.Tensor]:
    """Each trial's loss: the model sees K copies of the batch, one per trial."""
    logits = logits_of(model, repeated(inputs, k))
    out = []
    for part in logits.chunk(k):
        if "pooled_projections" in inputs:  # SD3's preconditioned flow loss, as its script's
            latents, sigmas = labels
            out.append(F.mse_loss(part * (-sigmas) + inputs["hidden_states"], latents))
        elif kind == "image_generation":
            out.append(F.mse_loss(part, labels))
        elif kind_of(kind).labels:
            out.append(F.cross_entropy(part, labels))
        else:
            out.append(F.cross_entropy(part[:, :-1].reshape(-1, part.shape[-1]),
                                       labels[:, 1:].reshape(-1)))
    return out


def peft_optimizer(method: str, ref, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if method == "loraplus":
        return create_loraplus_optimizer(ref, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0,
                                         loraplus_weight_decay=weight_decay, foreach=False)
    params = [p for p in ref.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=lr, foreach=False)


@pytest.mark.parametrize("k", [1, 2], ids=["alone", "fused"])
@pytest.mark.parametrize(("source", "kind"), ARCHS)
@pytest.mark.parametrize("method", PEFT_FORMS)
def test_matches_peft(source, kind, method, k):
    in_fp64 = {(kind, method), (source, method, k)} & IN_FLOAT64
    with in_float64() if in_fp64 else contextlib.nullcontext():
        check_against_peft(source, kind, method, k)


# Where fp32 rounding alone reaches TOL: DoRA's step-0 gradients through the UNet's
# convolutions and group norms differ from PEFT's by up to 3e-6 in fp32 (the worst: a
# magnitude vector's), by 6e-15 in fp64. The same code, weights and steps,
# checked in fp64.
# SD3's MMDiT fused: a batch of 8 rows rounds differently from 4 in fp32, and 5 Adam steps
# grow that to 1e-6..1e-5 on the timestep embedder's A (Adam divides gradients of rounding
# size by their own size); in fp64 LoRA and LoRA+ match to 1e-13.
IN_FLOAT64 = {("image_generation", "dora"), ("tiny-sd3", "lora", 2),
              ("tiny-sd3", "loraplus", 2)}
# PEFT refuses to initialize PiSSA in fp64: fused on SD3 its outputs and step-0 gradients match
# to TOL, its weights after 5 steps to 3e-5 and its outputs then to 6e-6 (the same rounding
# as above).
AFTER_STEPS = {("tiny-sd3", "pissa", 2): 1e-4}


@contextlib.contextmanager
def in_float64():
    """Models, adapters and batches drawn in fp64 (torch's default dtype, restored after)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def check_against_peft(source: str, kind: str, method: str, k: int = 1,
                       quantize: str | None = None):
    """Outputs, step-0 gradients and STEPS AdamW steps of our K trials, each against its own
    PEFT model from equal weights; returns our model and the PEFT models."""
    ours, refs, cell, attached, trials = build_pair(source, kind, method, k, quantize)
    lrs, weight_decay = [2e-3, 6e-3][:k], 0.01
    train = TrainSpec(steps=STEPS, weight_decay=weight_decay)
    specs = [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0) for i, lr in enumerate(lrs)]
    our_opt = build_optimizer(get_method(method), attached, specs, train)
    ref_opts = [peft_optimizer(method, ref, lr, weight_decay)
                for ref, lr in zip(refs, lrs, strict=True)]
    ref_params = [trainable(ref) for ref in refs]

    def same_outputs(inputs, tol: float = TOL) -> None:
        ours_out = logits_of(ours, repeated(inputs, k)).chunk(k)
        for mine, ref in zip(ours_out, refs, strict=True):
            assert rel_err(mine, logits_of(ref, inputs)) < tol

    same_outputs(batch(kind, 0, source)[0])
    for step in range(STEPS):
        inputs, labels = batch(kind, step, source)
        our_losses = losses_of(ours, kind, inputs, labels, k)
        ref_losses = [losses_of(ref, kind, inputs, labels)[0] for ref in refs]
        for mine, theirs in zip(our_losses, ref_losses, strict=True):
            assert rel_err(mine, theirs) < TOL
        torch.stack(our_losses).sum().backward()
        for loss in ref_losses:
            loss.backward()
        if step == 0:
            assert_same_params(trials, ref_params, TOL, grads=True)
        for opt in [our_opt, *ref_opts]:
            opt.step()
            opt.zero_grad()
    after = AFTER_STEPS.get((source, method, k), TOL)
    assert_same_params(trials, ref_params, after)
    if k == 2:  # the two LRs led the trials apart: each matched its own run, not a shared one
        some = next(key for key in trials[0] if key.endswith("lora_A"))
        assert rel_err(trials[0][some], trials[1][some]) > 1e-3
    same_outputs(batch(kind, 99, source)[0], after)
    return ours, refs


@pytest.mark.parametrize(("source", "kind"), [*ARCHS, ("gpt2", "classification"),
                                              ("opt", "classification")])
def test_all_linear_is_peft_all_linear(source, kind):
    """The preset selects what PEFT's own target_modules="all-linear" adapts: BERT's pooler and
    OPT's project_in / project_out too, never the LM or classification head."""
    base = base_model(source, kind)
    config = LoraConfig(r=4, target_modules="all-linear", **peft_task(kind, base))
    peft_model = get_peft_model(copy.deepcopy(base), config)
    theirs = {name.removeprefix("base_model.model.")
              for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    ours = resolve_targets(base, "all-linear")
    assert len(ours) == len(set(ours))
    assert set(ours) == theirs
    assert set(LANDMARKS.get(source, ())) <= set(ours)


# Layers outside the blocks, Conv1D layers, and CLVP's lm_head (it reports no output embeddings)
LANDMARKS = {"tiny:bert": ("bert.pooler.dense",),
             "opt": ("model.decoder.project_in", "model.decoder.project_out"),
             "gpt2": ("transformer.h.1.mlp.c_proj",),
             "clvp_decoder": ("model.decoder.layers.1.mlp.c_fc", "lm_head"),
             "tiny:convnext": ("convnext.encoder.stages.1.layers.0.pwconv2",),
             "tiny-unet": ("time_embedding.linear_1", "mid_block.resnets.0.time_emb_proj",
                           "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
                           "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"),
             "tiny-sdxl": ("add_embedding.linear_1", "add_embedding.linear_2",
                           "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"),
             "tiny-sd3": ("context_embedder", "time_text_embed.text_embedder.linear_1",
                          "transformer_blocks.1.attn.add_k_proj",
                          "transformer_blocks.0.norm1_context.linear")}


def test_loraplus_lr_groups_follow_peft():
    """B matrices and every vector train at ratio x LR; A matrices and the head weight at LR."""
    _, (ref,), cell, attached, (ours_params,) = build_pair("tiny:bert", "classification",
                                                          "loraplus")
    ref_params = trainable(ref)
    trial = TrialSpec(grid_id=0, cell=cell, lr=1e-3, seed=0)
    ours = build_optimizer(get_method("loraplus"), attached, [trial], TrainSpec(steps=1))
    theirs = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    names = {id(p): n for n, p in ours_params.items()}
    ref_names = {id(p): n for n, p in ref_params.items()}
    our_lr = {names[id(p)]: g["lr"] for g in ours.param_groups for p in g["params"]}
    ref_lr = {ref_names[id(p)]: g["lr"] for g in theirs.param_groups for p in g["params"]}
    assert our_lr == ref_lr


# Dropout as PEFT and the Hugging Face Trainer train: the model's own dropout on (BERT's hidden,
# attention and classifier dropout; Llama's attention dropout) and PEFT's lora_dropout.
DROPOUT_CONFIGS = {
    "tiny:bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=3),
    "tiny:llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       max_position_embeddings=64, attention_dropout=0.1),
}


def dropout_base(source: str, kind: str, attention: str) -> torch.nn.Module:
    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    config = AutoConfig.for_model(**DROPOUT_CONFIGS[source], vocab_size=5000,
                                  attn_implementation=attention)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return auto.from_config(config).eval()


def check_dropout_against_peft(source: str, kind: str, method: str, k: int, attention: str,
                               tol: float = TOL, base: torch.nn.Module | None = None,
                               dropout: str = "model", data: Callable | None = None,
                               targets: str = "all-linear") -> None:
    """K trials under lorasweep's training mode (dropout.set_training, TiledDropout) against a
    stock PEFT model per trial in the mode the Hugging Face Trainer trains in (train() with
    `dropout: model`, eval() with `off`), the same seed set before each step on both sides:
    losses, step-0 gradients and STEPS AdamW steps within `tol`. `base`: the model (else a
    DROPOUT_CONFIGS one with `attention`); `data(step)`: each step's (inputs, labels) (else
    `batch`'s); `targets`: the cell's target_modules."""
    base = dropout_base(source, kind, attention) if base is None else base
    lora_dropout = 0.2 if dropout == "model" else 0.0
    ours, refs, cell, attached, trials = build_pair(source, kind, method, k,
                                                    lora_dropout=lora_dropout, base=base,
                                                    targets=targets)
    train = TrainSpec(steps=STEPS, dropout=dropout, lora_dropout=lora_dropout)
    data = data or functools.partial(batch, kind)
    specs = [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0)
             for i, lr in enumerate([2e-3, 6e-3][:k])]
    our_opt = build_optimizer(get_method(method), attached, specs, train)
    ref_opts = [peft_optimizer(method, ref, spec.lr, 0.0)
                for ref, spec in zip(refs, specs, strict=True)]
    ref_params = [trainable(ref) for ref in refs]
    set_training(ours, train)
    for ref in refs:
        ref.train(dropout == "model")
    for step in range(STEPS):
        inputs, labels = data(step)
        torch.manual_seed(step)
        with TiledDropout(k):
            our_losses = losses_of(ours, kind, inputs, labels, k)
            torch.stack(our_losses).sum().backward()
        for ref, mine in zip(refs, our_losses, strict=True):
            torch.manual_seed(step)
            (theirs,) = losses_of(ref, kind, inputs, labels)
            theirs.backward()
            assert rel_err(mine, theirs) < tol, step
        if step == 0:
            assert_same_params(trials, ref_params, tol, grads=True)
        for opt in [our_opt, *ref_opts]:
            opt.step()
            opt.zero_grad()
    assert_same_params(trials, ref_params, tol)


def assert_same_params(trials: list[dict], ref_params: list[dict], tol: float,
                       grads: bool = False) -> None:
    """Each trial's weights (or their gradients) are its PEFT run's, to `tol`. A layer whose
    output the model never reads (LLaVA's last vision layer: it takes the one before) has no
    gradient on either side."""
    for params, theirs in zip(trials, ref_params, strict=True):
        for key, param in params.items():
            mine, ref = (param.grad, theirs[key].grad) if grads else (param, theirs[key])
            if grads and mine is None and ref is None:
                continue
            assert rel_err(mine, ref) < tol, key


@pytest.mark.parametrize("k", [1, 2], ids=["alone", "fused"])
@pytest.mark.parametrize(("source", "kind"), [("tiny:bert", "classification"),
                                              ("tiny:llama", "causal_lm")])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_matches_peft(source, kind, method, k):
    """lora_dropout 0.2 and the model's own dropout, eager attention on both sides (its dropout
    is one F.dropout call, drawn the same way): equal within 1e-6 alone and fused."""
    check_dropout_against_peft(source, kind, method, k, "eager")


@pytest.mark.parametrize(("source", "kind"), [("tiny:bert", "classification"),
                                              ("tiny:llama", "causal_lm")])
def test_dropout_matches_peft_under_sdpa(source, kind):
    """With SDPA attention the kernel draws its dropout inside; lorasweep computes that attention
    by torch's reference formula with tiled masks. On the CPU both draw the same mask from the
    same generator state, so a fused pair matches PEFT within rounding (1e-5), not bit for bit."""
    check_dropout_against_peft(source, kind, "lora", 2, "sdpa", tol=1e-5)


def test_a_head_named_otherwise_trains_as_peft_saves_it():
    """XLNet's classifier ends in `logits_proj`, neither `classifier` nor `score`: it is the head
    (trained, drawn from the seed), and PEFT is told to save it beside SEQ_CLS's own. Alone:
    XLNet computes time-major, so its trials never fuse (the next test)."""
    config = AutoConfig.for_model("xlnet", d_model=32, n_layer=2, n_head=4, d_inner=64,
                                  vocab_size=5000, num_labels=3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_config(config).eval()
    assert head_module_names(base) == ["logits_proj"]
    assert peft_task("classification", base) == {"task_type": "SEQ_CLS",
                                                  "modules_to_save": ["logits_proj"]}
    check_dropout_against_peft("xlnet", "classification", "lora", 1, "eager", base=base,
                               dropout="off")


def test_a_time_major_model_trains_its_trials_one_at_a_time():
    """XLNet's blocks see (sequence, batch) rows: the probe on 2 and 3 rows of 8 tokens finds
    their rows are not the examples' (its pooled summary's are), so its trials train alone
    (exact, the test above), never fused; BERT's are the examples' rows."""
    from lorasweep.tasks.base import TokenSplit

    ids = torch.randint(1000, 5000, (4, 12), generator=torch.Generator().manual_seed(0))
    split = TokenSplit(ids, torch.ones_like(ids), torch.zeros(4, dtype=torch.long))
    task = ClassificationTask(split, split, None, ["a", "b", "c"])
    config = AutoConfig.for_model("xlnet", d_model=32, n_layer=2, n_head=4, d_inner=64,
                                  vocab_size=5000, num_labels=3)
    xlnet = AutoModelForSequenceClassification.from_config(config).eval()
    shared = task.layers_off_the_rows(xlnet, ADAPTABLE).shared
    blocks = {name for name in resolve_targets(xlnet, "all-linear")
              if name.startswith("transformer.")}
    assert blocks and blocks <= set(shared) and "sequence_summary.summary" not in shared
    assert "first dimension is 8 for a batch of 2" in shared["transformer.layer.0.ff.layer_1"]
    assert not task.layers_off_the_rows(base_model("tiny:bert", "classification"),
                                        ADAPTABLE).shared
