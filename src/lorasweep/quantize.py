"""A 4-bit NormalFloat (NF4) frozen base, as QLoRA: `model.quantize: nf4`.

bitsandbytes stores and dequantizes the weights (on CUDA and, since its CPU backend, on the CPU).
transformers quantizes only while loading from files (`BitsAndBytesConfig`), and tiny test models
are built from a config, so lorasweep swaps the layers itself, with bitsandbytes' own
`Linear4bit`: one routine for every model source. The settings are QLoRA's (NF4, blocks of 64,
double quantization of the block scales) and PEFT recognises the layers as a 4-bit base (its
QLoRA layers wrap them), so PEFT over the same quantized model is the reference in the tests.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from lorasweep.errors import StudyError
from lorasweep.methods.targets import all_linear, layer_shape, out_in_weight, replace_module

QUANTIZE_LIBRARY = {"nf4": "bitsandbytes"}
BLOCKSIZE = 64  # QLoRA's block of weights sharing one scale


def check_quantize(quantize: str | None) -> None:
    """Refuse a quantization whose library is missing, before any model loads."""
    if quantize is None:
        return
    library = QUANTIZE_LIBRARY[quantize]
    if importlib.util.find_spec(library) is None:
        raise StudyError(f"model.quantize: {quantize} needs the {library} package, which is not "
                         f"installed (pip install -r requirements.txt); or drop model.quantize")


def quantize_base(model: nn.Module, quantize: str) -> nn.Module:
    """Store the linear layers that `all-linear` adapts in NF4 (BERT's pooler included).

    Embeddings, norms, the LM head and the task head keep their dtype, as transformers' own
    bitsandbytes loading keeps the output layer. Each layer computes in the dtype its weight
    had. A Conv1D (GPT-2) becomes a 4-bit linear layer of its transposed weight, as that
    loading does too.
    """
    import bitsandbytes as bnb

    for name in all_linear(model):
        dense = model.get_submodule(name)
        n_out, n_in = layer_shape(dense)
        layer = bnb.nn.Linear4bit(n_in, n_out,
                                  bias=dense.bias is not None, compute_dtype=dense.weight.dtype,
                                  compress_statistics=True, quant_type=quantize, device="meta")
        weight = out_in_weight(dense).data.contiguous()
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False,
                                         blocksize=BLOCKSIZE, compress_statistics=True,
                                         quant_type=quantize)
        layer.bias = dense.bias
        # bitsandbytes repacks a CPU layer for inference, its block scales rounded to bf16, the
        # first time it sees an input without grad in eval mode (lorasweep trains in eval mode):
        # the base would then differ between a trial's first layer and the rest, and from PEFT's.
        layer.support_avx512bf16_for_cpu = False
        replace_module(model, name, layer.to(dense.weight.device))  # .to() quantizes
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap these layers with its QLoRA layers
    return model

