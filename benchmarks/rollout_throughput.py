"""Rollout throughput of RL: K fused trials sampling in one `generate` against each trial
sampling alone with transformers' `generate`, as a one-trial-at-a-time GRPO loop does.

SmolLM2-135M-Instruct (packaged), the built-in arithmetic prompts in its chat template, K LoRA
trials (rank 8, all-linear; each trial's B drawn non-zero so the K policies differ), G samples
per prompt at temperature 1, at most `--tokens` new tokens. Tokens/s counts the completion tokens
each row really generates (up to and including its eos), so rows that idle after their eos count
nothing. Both sides run in the same process, alternately, `--repeats` times; the table reports the
median time.

- one trial at a time: for each trial, a PEFT model (`get_peft_model` over the base, the trial's
  weights) and `model.generate(do_sample=True, num_return_sequences=G)` on the left-padded
  prompts, as TRL's GRPOTrainer samples for its one policy;
- fused: lorasweep's `tasks/rollout.sample_completions` on the K-trial stacked model, one call.

    .venv/bin/python benchmarks/rollout_throughput.py --trials 4 --prompts 4 --group 4 --tokens 32
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides on it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig

    from lorasweep.config import ModelSpec
    from lorasweep.methods import get_method
    from lorasweep.models import load_model, load_tokenizer
    from lorasweep.space import Cell
    from lorasweep.tasks.data import BUILTIN_DATA_DIR
    from lorasweep.tasks.instruction import format_prompt, left_padded
    from lorasweep.tasks.rollout import sample_completions

    spec = ModelSpec(source="smollm2")
    tokenizer = load_tokenizer(spec)
    base = load_model(spec, "rl", None, tokenizer).eval()
    rows = (BUILTIN_DATA_DIR / "arithmetic" / "test.jsonl").read_text().splitlines()
    questions = [json.loads(r)["question"] for r in rows[:args.prompts]]
    prompts = [tokenizer(format_prompt(tokenizer, q, True), add_special_tokens=False)["input_ids"]
               for q in questions]
    k, group, eos, pad = args.trials, args.group, tokenizer.eos_token_id, tokenizer.pad_token_id

    cell = Cell(method="lora", rank=8, lora_alpha="16", init="kaiming",
                target_modules="all-linear")
    fused = copy.deepcopy(base)
    attached = get_method("lora").attach(fused, cell, k, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, params in enumerate(attached.trial_params):
            for name, param in params:
                if name.endswith("lora_B"):
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
    fused.eval().to(device)

    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    singles = []
    for params in attached.trial_params:
        peft_model = get_peft_model(copy.deepcopy(base), config)
        weights = {name.replace(".lora_A", ".lora_A.default.weight")
                   .replace(".lora_B", ".lora_B.default.weight"): p for name, p in params}
        state = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters()}
        with torch.no_grad():
            for name, value in weights.items():
                state[name].copy_(value)
        singles.append(peft_model.eval().to(device))

    ids, mask = (t.to(device) for t in left_padded(prompts, pad))
    sampling = GenerationConfig(max_new_tokens=args.tokens, do_sample=True, temperature=1.0,
                                top_k=0, top_p=1.0, num_return_sequences=group,
                                pad_token_id=pad, eos_token_id=eos)

    def generated(new: torch.Tensor) -> int:
        """Completion tokens up to and including each row's first eos."""
        ended = (new == eos).long()
        return int(((ended.cumsum(1) - ended) == 0).sum())

    @torch.no_grad()
    def one_at_a_time() -> int:
        torch.manual_seed(0)
        tokens = 0
        for model in singles:
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=sampling)
            tokens += generated(out[:, ids.shape[1]:])
        return tokens

    def fused_call() -> int:
        batch = sample_completions(fused, prompts, group, [0] * k, 1.0, args.tokens, pad, eos)
        return int(batch.completion_mask.sum())

    times: dict[str, list[float]] = {"one trial at a time": [], "fused": []}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, run in (("one trial at a time", one_at_a_time), ("fused", fused_call)):
            started = time.perf_counter()
            tokens[name] = run()
            times[name].append(time.perf_counter() - started)
    print(f"SmolLM2-135M-Instruct on {device}, K={k} LoRA trials x {args.prompts} prompts x "
          f"G={group}, at most {args.tokens} new tokens, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print("| mode | seconds | completion tokens | tokens/s | vs one trial at a time |")
    print("|---|---|---|---|---|")
    base_rate = None
    for name in times:
        seconds = statistics.median(times[name])
        rate = tokens[name] / seconds
        base_rate = base_rate or rate
        print(f"| {name} | {seconds:.1f} | {tokens[name]} | {rate:.1f} | {rate / base_rate:.2f}x |")


if __name__ == "__main__":
    main()
