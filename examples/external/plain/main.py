"""A small training script with the command-line shape of the "LoRA Without Regret"
reproduction's main.py (`--lrs ... --rank ... --alpha ... --full-finetune`, results.json), so
that sweeping such a script through lorasweep can be tried offline on a CPU in seconds.

The "pretrained" model is a two-layer MLP with fixed random weights; the task is to regress the
outputs of the same MLP with a rank-4 change to its first layer, which LoRA can learn. Each LR
trains from the same start (the seed fixes the adapter's init and the batch order), so one run
over several LRs gives what one run per LR gives.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn

WIDTH, HIDDEN, TRUE_RANK = 32, 64, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--full-finetune", action="store_true")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same numbers on any machine load
    results = [{"lr": lr, **train(args, lr)} for lr in args.lrs]
    with open(args.output, "w") as handle:
        json.dump({"args": vars(args), "results": results}, handle, indent=1)


def task() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base weights, and train and eval inputs with their targets (always the same)."""
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(HIDDEN, WIDTH, generator=g) / WIDTH ** 0.5, torch.randn(
        1, HIDDEN, generator=g) / HIDDEN ** 0.5
    delta = torch.randn(HIDDEN, TRUE_RANK, generator=g) @ torch.randn(
        TRUE_RANK, WIDTH, generator=g) / WIDTH
    x_train, x_eval = torch.randn(1024, WIDTH, generator=g), torch.randn(256, WIDTH, generator=g)

    def target(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ (w1 + delta).T) @ w2.T
    return [w1, w2], x_train, target(x_train), x_eval, target(x_eval)


class Adapted(nn.Module):
    """The MLP with a LoRA adapter (scale alpha / rank) on its first layer, or all trainable."""

    def __init__(self, weights: list[torch.Tensor], rank: int, alpha: float, full: bool,
                 g: torch.Generator) -> None:
        super().__init__()
        w1, w2 = (w.clone() for w in weights)
        self.w1, self.w2 = nn.Parameter(w1, requires_grad=full), nn.Parameter(w2,
                                                                             requires_grad=full)
        self.full, self.scale = full, alpha / rank
        self.a = nn.Parameter(torch.randn(rank, WIDTH, generator=g) / WIDTH ** 0.5)
        self.b = nn.Parameter(torch.zeros(HIDDEN, rank), requires_grad=not full)
        self.a.requires_grad_(not full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1 = self.w1 if self.full else self.w1 + self.scale * self.b @ self.a
        return torch.tanh(x @ w1.T) @ self.w2.T


def train(args: argparse.Namespace, lr: float) -> dict[str, float]:
    weights, x_train, y_train, x_eval, y_eval = task()
    g = torch.Generator().manual_seed(args.seed)
    model = Adapted(weights, args.rank, args.alpha, args.full_finetune, g)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(math.nan)
    for _ in range(args.steps):
        batch = torch.randint(len(x_train), (args.batch_size,), generator=g)
        loss = nn.functional.mse_loss(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        eval_loss = nn.functional.mse_loss(model(x_eval), y_eval).item()
    return {"final_loss": loss.item(), "eval_loss": eval_loss}


if __name__ == "__main__":
    main()
