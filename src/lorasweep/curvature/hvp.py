"""Hessian-vector products of a trial's training loss over a fixed set of batches.

The loss is the token-weighted mean over the batches (each batch's summed loss over the number
of items it scores, all batches together: a batch with more tokens counts for more, as one big
batch would). Its gradient is built once with `create_graph=True` and kept; each product is then
one backward pass through that gradient graph (double backward) restricted to the block asked
for, so the forward pass and first backward are paid once, not once per product.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorasweep.tasks import Task, logits_of

Params = Sequence[nn.Parameter]


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Plain attention code inside the block (SDPA has no double backward on the CPU), the
    model's own outside it, so warm-up steps train exactly as the trial does. A diffusers
    denoiser has no attention implementation setting but attention processors: its plain one;
    a joint-attention transformer's (SD3's MMDiT) has no plain processor, so its SDPA runs on
    torch's math backend, which has one."""
    if hasattr(model, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor

        processors = model.attn_processors
        if any(type(p).__name__.startswith("Joint") for p in processors.values()):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                yield
            return
        model.set_attn_processor(AttnProcessor())
        try:
            yield
        finally:
            model.set_attn_processor(processors)
        return
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if before in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class LossHessian:
    """Products with diagonal blocks of the Hessian of the loss in `params`."""

    def __init__(self, model: nn.Module, task: Task, batches: list[dict[str, torch.Tensor]],
                 params: Params) -> None:
        self.params = list(params)
        total = torch.zeros((), dtype=torch.float32)
        count = 0
        for batch in batches:
            logits = logits_of(model, batch)
            loss_sum, items, _ = task.eval_terms(logits, batch["labels"], 1)
            total = total + loss_sum[0]
            count += items
        self.items = count
        self.loss = total / max(count, 1)
        self.grads = torch.autograd.grad(self.loss, self.params, create_graph=True,
                                         allow_unused=True, materialize_grads=True)
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def operator(self, block: Params, scale: torch.Tensor | None = None):
        """v -> S H_block S v on flat vectors of the block's size (S = diag(scale), e.g. Adam's
        P^-1/2; identity when None), for Lanczos."""
        chosen = [self._index[id(p)] for p in block]
        shapes = [self.params[i].shape for i in chosen]
        sizes = [self.params[i].numel() for i in chosen]
        # Gradients that do not depend on any parameter (constant) contribute nothing to H.
        live = [k for k, i in enumerate(chosen) if self.grads[i].requires_grad]

        device = self.params[0].device

        def matvec(vector: torch.Tensor) -> torch.Tensor:
            if scale is not None:
                vector = vector * scale
            pieces = [p.reshape(s).to(device)
                      for p, s in zip(vector.split(sizes), shapes, strict=True)]
            out = [torch.zeros_like(self.params[i]) for i in chosen]
            if live:
                products = torch.autograd.grad(
                    [self.grads[chosen[k]] for k in live], [self.params[chosen[k]] for k in live],
                    grad_outputs=[pieces[k] for k in live], retain_graph=True,
                    allow_unused=True, materialize_grads=True)
                for k, product in zip(live, products, strict=True):
                    out[k] = product.detach()
            flat = torch.cat([o.reshape(-1) for o in out]).to(vector.device)
            return flat * scale if scale is not None else flat

        return matvec


def block_size(block: Params) -> int:
    return sum(p.numel() for p in block)


def adam_scale(optimizer: torch.optim.Adam, block: Params) -> torch.Tensor:
    """P^-1/2 on a block, flat, where P = sqrt(v_hat) + eps is the diagonal Adam divides its step
    by (v_hat: the bias-corrected second moment), so S H S has the eigenvalues of P^-1 H."""
    pieces = []
    for param in block:
        state = optimizer.state.get(param)
        if not state or "exp_avg_sq" not in state:
            raise ValueError("the optimizer holds no second moment for this parameter yet")
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        beta2, eps = group["betas"][1], group["eps"]
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** step)
        pieces.append((v_hat.sqrt() + eps).rsqrt().reshape(-1).cpu())
    return torch.cat(pieces)
