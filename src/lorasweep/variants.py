"""What each method and each init is, in one table each: the one place a new variant is registered.

A `Variant` says what the rest of lorasweep needs to know of a method without building it: the
init its cells take, how lora_alpha becomes the scale s, whether K trials fuse over one base, its
PEFT LoraConfig arguments, and which muA analysis covers it. An `Init` says whether it takes
s B0 A0 out of the base, its PEFT init_lora_weights, and its muA kind. The trainer's half (how a
method attaches to a model) is the strategy named by `Variant.strategy` in `methods/`, and an
init's factors are the function of the same name in `methods/inits.py`.

This module imports neither torch nor PEFT, so the study file's validation, `suggest` and the
report read it without loading them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

# `pissa_niter_K`: PiSSA by K-iteration randomized SVD; parsed here and nowhere else.
PISSA_NITER = re.compile(r"^pissa_niter_(\d+)$")


@dataclass(frozen=True)
class Init:
    """How the factors A0, B0 start.

    `residual`: s B0 A0 is taken out of the base weight so the model is unchanged at step 0.
    `peft`: PEFT's init_lora_weights for it, None where PEFT has none.
    `mua`: "A" for B0 = 0 with A0 drawn at a rank-independent scale (muA's Init[A]), "B" for
    A0 = 0 with B0 random (Init[B]), None where muA says nothing.
    `plain`: one of the inits practice quotes the LoRA / full fine-tuning LR ratio for.
    """

    name: str
    residual: bool = False
    peft: bool | str | None = None
    mua: Literal["A", "B"] | None = None
    plain: bool = False


INITS: dict[str, Init] = {init.name: init for init in (
    Init("kaiming", peft=True, mua="A", plain=True),
    Init("gaussian", peft="gaussian", plain=True),  # N(0, 1/r^2): A's scale depends on r
    Init("mua_a", mua="A"),
    Init("mua_b", mua="B"),
    Init("pissa", residual=True, peft="pissa"),
    Init("milora", residual=True),
    Init("olora", residual=True, peft="olora"),
    Init("init_ab", residual=True),
    # the control that skips the subtraction: random A and B alone change the model
    Init("random_ab"),
)}


def pissa_niter(name: str) -> int | None:
    """K of a `pissa_niter_K` init, None for any other name."""
    match = PISSA_NITER.match(name)
    return int(match.group(1)) if match else None


def get_init(name: str | None) -> Init | None:
    """The init of that name (pissa_niter_K is PiSSA with its own PEFT name), None if unknown."""
    if name is None:
        return None
    if pissa_niter(name) is not None:
        return Init(name, residual=True, peft=name)
    return INITS.get(name)


def mua_kind(name: str | None) -> str | None:
    """The init's muA kind ("A": B = 0, A random; "B": the reverse), None where muA has none."""
    init = get_init(name)
    return init.mua if init is not None else None


def init_pattern() -> str:
    """The init names allowed, as a regular expression (an error message shows it)."""
    return "^(" + "|".join(INITS) + r"|pissa_niter_\d+)$"


# Plain LoRA's LoraConfig flags, which a variant changes
LORA_FLAGS: dict[str, Any] = {"use_rslora": False, "use_dora": False}


@dataclass(frozen=True)
class Variant:
    """A method as the study file, the analysis, `suggest` and `export` see it.

    `strategy`: the methods/ class that attaches it (see methods/__init__.py STRATEGIES).
    `init`: the init every cell of it takes (None: the study's search.inits; `takes_init`
    False: no init at all). `rank_power` p: s = lora_alpha / r^p (None: no adapter scale).
    `peft_flags`: its LoraConfig arguments beyond r, lora_alpha and the init; None where PEFT's
    LoraConfig has no form of it. `mua_family`: which muA analysis covers it ("lora": all of
    it, Init[B] to full fine-tuning included; "rank": the rank and width exponents only), None
    where none does. `plain`: practice's 10x LoRA / full LR ratio is quoted for it.
    """

    name: str
    strategy: str = "lora"
    init: str | None = None
    takes_init: bool = True
    is_adapter: bool = True
    fusable: bool = True
    rank_power: float | None = 1.0
    b_lr_ratio: bool = False  # B trains at search.loraplus_ratio x the LR (LoRA+)
    peft_flags: dict[str, Any] | None = field(default_factory=lambda: dict(LORA_FLAGS))
    mua_family: Literal["lora", "rank"] | None = None
    plain: bool = False

    def inits(self, default: list[str]) -> list[str]:
        """The inits its cells take when the study gives `default` (search.inits)."""
        return [self.init] if self.init is not None else default

    def rank_divisor(self, rank: float) -> float:
        """r^p, the divisor of lora_alpha in s (math.sqrt for p = 1/2, as PEFT's rsLoRA computes
        it: r ** 0.5 can differ from it in the last bit)."""
        assert self.rank_power is not None
        return math.sqrt(rank) if self.rank_power == 0.5 else rank ** self.rank_power

    def scale(self, alpha: float, rank: int) -> float:
        """s = lora_alpha / r^p."""
        return alpha / self.rank_divisor(rank)

    def alpha_factor(self, rank_factor: int) -> float:
        """What lora_alpha is multiplied by to keep s when the rank is multiplied by
        `rank_factor` (export's rank-2r adapter of a residual init)."""
        return self.rank_divisor(rank_factor)

    def peft_arguments(self, init: str | None) -> dict[str, Any] | None:
        """PEFT LoraConfig arguments beyond r, lora_alpha and targets for a cell of this
        variant with `init`; None where PEFT has no form of the pair."""
        spec = get_init(init)
        if self.peft_flags is None or spec is None or spec.peft is None:
            return None
        return {**self.peft_flags, "init_lora_weights": spec.peft}


VARIANTS: dict[str, Variant] = {variant.name: variant for variant in (
    Variant("lora", mua_family="lora", plain=True),
    Variant("rslora", rank_power=0.5, peft_flags={**LORA_FLAGS, "use_rslora": True},
            mua_family="rank", plain=True),
    Variant("loraplus", strategy="loraplus", b_lr_ratio=True, mua_family="rank", plain=True),
    Variant("dora", strategy="dora", peft_flags={**LORA_FLAGS, "use_dora": True}, plain=True),
    # LoRA with an init of its own
    Variant("pissa", init="pissa"),
    Variant("milora", init="milora"),
    Variant("olora", init="olora"),
    Variant("init_ab", init="init_ab"),
    Variant("random_ab", init="random_ab"),
    Variant("full", strategy="full", takes_init=False, is_adapter=False, fusable=False,
            rank_power=None, peft_flags=None),
    # any PEFT config, trained as PEFT builds it; its cells' init is "peft"
    Variant("peft", strategy="peft", takes_init=False, fusable=False, peft_flags=None),
)}


def get_variant(name: str | None) -> Variant | None:
    """The variant of that name; None for a name that is none (e.g. a peft entry's label)."""
    return VARIANTS.get(name) if name is not None else None


def variant(name: str) -> Variant:
    """The variant of a registered method name (a cell's `method`)."""
    return VARIANTS[name]
