"""The starting factors of each init, one function per name of variants.INITS.

Random inits follow Hugging Face PEFT (kaiming-uniform A with a = sqrt(5); gaussian A ~
N(0, 1/r^2)) and the muA paper (Init[A]: A ~ N(0, 1/n), B = 0; Init[B]: A = 0, B ~ N(0, 1/r)).
Inits built from W (PiSSA: top-r SVD; MiLoRA: bottom-r SVD; OLoRA: QR) or random in both factors
(Init[AB], random_ab) are residual or not as variants.INITS says.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lorasweep.variants import pissa_niter


@dataclass
class Factors:
    """Starting A (r, n_in) and B (n_out, r) of one layer."""

    a: torch.Tensor
    b: torch.Tensor


# (rank, weight W (n_out, n_in), scale s, generator) -> A0, B0
InitFn = Callable[[int, torch.Tensor, float, torch.Generator], Factors]


def _kaiming(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default A: kaiming_uniform_(a=sqrt(5)), i.e. U(+-1/sqrt(cols))."""
    out = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)
    return out


def _zeros(rank: int, weight: torch.Tensor) -> Factors:
    n_out, n_in = weight.shape
    return Factors(torch.zeros(rank, n_in), torch.zeros(n_out, rank))


def kaiming(rank: int, weight: torch.Tensor, scale: float, generator: torch.Generator) -> Factors:
    return Factors(_kaiming(rank, weight.shape[1], generator), _zeros(rank, weight).b)


def gaussian(rank: int, weight: torch.Tensor, scale: float, generator: torch.Generator) -> Factors:
    zeros = _zeros(rank, weight)
    return Factors(zeros.a.normal_(0.0, 1.0 / rank, generator=generator), zeros.b)


def mua_a(rank: int, weight: torch.Tensor, scale: float, generator: torch.Generator) -> Factors:
    zeros = _zeros(rank, weight)
    std = 1.0 / math.sqrt(weight.shape[1])
    return Factors(zeros.a.normal_(0.0, std, generator=generator), zeros.b)


def mua_b(rank: int, weight: torch.Tensor, scale: float, generator: torch.Generator) -> Factors:
    zeros = _zeros(rank, weight)
    return Factors(zeros.a, zeros.b.normal_(0.0, 1.0 / math.sqrt(rank), generator=generator))


def random_ab(rank: int, weight: torch.Tensor, scale: float,
              generator: torch.Generator) -> Factors:
    n_out, n_in = weight.shape
    a = _kaiming(rank, n_in, generator)
    return Factors(a, _kaiming(n_out, rank, generator))


def olora(rank: int, weight: torch.Tensor, scale: float, generator: torch.Generator) -> Factors:
    q, r = torch.linalg.qr(weight.float())
    return Factors(a=r[:rank].contiguous(), b=q[:, :rank].contiguous())


def _svd(rank: int, weight: torch.Tensor, scale: float, top: bool,
         niter: int | None = None) -> Factors:
    """PiSSA (top-r) or MiLoRA (bottom-r) singular triplets, split as PEFT does for PiSSA:
    A = sqrt(S/s) V^T, B = U sqrt(S/s), so that s B A is the rank-r part of W."""
    n_out, n_in = weight.shape
    if rank > min(n_out, n_in):
        raise ValueError(f"rank {rank} exceeds the layer's size {n_out}x{n_in}")
    weight = weight.float()
    if niter is not None:
        u, s, v = torch.svd_lowrank(weight, rank, niter=niter)
        vh = v.t()
    else:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        keep = slice(0, rank) if top else slice(s.shape[0] - rank, s.shape[0])
        u, s, vh = u[:, keep], s[keep], vh[keep]
    root = torch.sqrt(s / scale)
    return Factors(a=torch.diag(root) @ vh, b=u @ torch.diag(root))


def pissa(rank: int, weight: torch.Tensor, scale: float, generator: torch.Generator) -> Factors:
    return _svd(rank, weight, scale, top=True)


def milora(rank: int, weight: torch.Tensor, scale: float, generator: torch.Generator) -> Factors:
    return _svd(rank, weight, scale, top=False)


FACTORS: dict[str, InitFn] = {
    "kaiming": kaiming, "gaussian": gaussian, "mua_a": mua_a, "mua_b": mua_b, "pissa": pissa,
    "milora": milora, "olora": olora, "init_ab": random_ab, "random_ab": random_ab,
}


def initial_factors(init: str, rank: int, weight: torch.Tensor, scale: float,
                    generator: torch.Generator) -> Factors:
    """The starting factors of one layer with weight W (n_out, n_in)."""
    niter = pissa_niter(init)
    if niter is not None:
        return _svd(rank, weight, scale, top=True, niter=niter)
    if init not in FACTORS:
        raise ValueError(f"unknown init '{init}'")
    return FACTORS[init](rank, weight, scale, generator)
