"""Generation throughput of math evaluation: lorasweep's batched generation against plain
`model.generate` one prompt at a time.

SmolLM2-135M-Instruct (packaged), GSM8K prompts in its chat template, greedy, a token cap.
Throughput counts the tokens each prompt really generates (up to its eos), so padding rows that
keep generating after their eos do not inflate the batched numbers. Also times a fused group of
K = 4 LoRA trials (4 x the prompts in one call) and reports how often batched greedy outputs equal
the one-at-a-time ones (left padding changes float rounding, rarely the argmax).

    .venv/bin/python benchmarks/generation_throughput.py --prompts 16 --tokens 64
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args()

    from lorasweep.config import ModelSpec
    from lorasweep.methods import get_method
    from lorasweep.models import load_model, load_tokenizer
    from lorasweep.space import Cell
    from lorasweep.tasks import packaged_data
    from lorasweep.tasks.instruction import format_prompt, generate

    spec = ModelSpec(source="smollm2")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, "math", None, tokenizer)
    cpu = torch.device("cpu")
    questions = [r["question"] for r in packaged_data.gsm8k()[1][:args.prompts]]
    prompts = [tokenizer(format_prompt(tokenizer, q, True), add_special_tokens=False)["input_ids"]
               for q in questions]

    def count(texts: list[str]) -> int:
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    def one_by_one() -> list[str]:
        texts = []
        for p in prompts:
            out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=args.tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(out[0, len(p):], skip_special_tokens=True))
        return texts

    reference, seconds = timed(one_by_one)
    base_rate = count(reference) / seconds
    print(f"SmolLM2-135M, {len(prompts)} GSM8K prompts, greedy, <= {args.tokens} new tokens")
    print(f"{'mode':<34} {'seconds':>8} {'tokens/s':>9} {'vs 1-by-1':>9} {'same text':>9}")
    print(f"{'model.generate, 1 prompt at a time':<34} {seconds:8.1f} {base_rate:9.1f} "
          f"{1.0:9.2f} {'-':>9}")
    for batch in args.batch:
        out, seconds = timed(lambda b=batch: generate(model, prompts, 1, b, cpu, tokenizer,
                                                      args.tokens)[0])
        texts = [s[0] for s in out]
        same = sum(a == b for a, b in zip(texts, reference, strict=True)) / len(texts)
        rate = count(texts) / seconds
        print(f"{f'lorasweep generate, batch {batch}':<34} {seconds:8.1f} {rate:9.1f} "
              f"{rate / base_rate:9.2f} {same:9.2f}")
    k = 4
    cell = Cell(method="lora", rank=8, lora_alpha="16", init="kaiming", target_modules="all-linear")
    stacked = copy.deepcopy(model)
    get_method("lora").attach(stacked, cell, k, torch.Generator().manual_seed(0))
    batch = max(args.batch)
    out, seconds = timed(lambda: generate(stacked, prompts, k, batch, cpu, tokenizer, args.tokens))
    texts = [s[0] for trial in out for s in trial]
    rate = count(texts) / seconds
    print(f"{f'K={k} LoRA trials fused, batch {batch}':<34} {seconds:8.1f} {rate:9.1f} "
          f"{rate / base_rate:9.2f} {'-':>9}")


if __name__ == "__main__":
    main()
