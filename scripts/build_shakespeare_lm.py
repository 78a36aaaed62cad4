"""Pretrain "shakespeare-charlm": a tiny character-level causal LM on Shakespeare's plays.

Why
---
A causal-LM study needs a pretrained base whose next-token features the tuning adapts, and
enough trials to measure an LR search on real curves (benchmarks/search_cost.py: three methods x
21 LRs x 2 seeds). SmolLM2-135M, the causal LM that ships offline, takes seconds per step on a
2-core CPU, so such a grid would take a day. This script makes a base small enough for it, as
`scripts/build_digits_base.py` does for images: a 4-layer Llama (width 96, 0.45M parameters)
over characters, trained from scratch on the training passages of the built-in
shakespeare-genre task (42 plays). Its studies then tune it, as a causal LM, on another kind of
English: the GSM8K math word problems (``builtin:gsm8k``, loss on the answers).

How
---
The tokenizer maps each printable ASCII character and the newline to one token (anything else
to ``<unk>``), adds ``<s>`` before a text and pads with ``<pad>``. With one torch thread and a
fixed seed, so that re-running gives the same weights: AdamW at LR, STEPS steps of BATCH
windows of CONTEXT characters cut at random from the joined passages, linear warmup and cosine
decay. It prints the validation loss (nats per character) on the genre task's test passages
and saves ``config.json``, ``model.safetensors`` (float16) and the tokenizer in
``src/lorasweep/data/shakespeare_charlm``.

Usage::

    python scripts/build_shakespeare_lm.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorasweep.packaged_models import SHAKESPEARE_CHARLM_DIR

DATA = Path(__file__).resolve().parent.parent / "src" / "lorasweep" / "data" / "shakespeare_genre"
SEED = 0
STEPS = 1500
BATCH = 32
CONTEXT = 128
LR = 3e-3
WARMUP = 100
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CONFIG = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
              rms_norm_eps=1e-5)


def character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character and the newline: a BPE model with no merges."""
    characters = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate(SPECIALS + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # characters back to text with nothing between them
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   add_bos_token=True, model_max_length=CONFIG[
                                       "max_position_embeddings"])


def passages(name: str) -> str:
    with open(DATA / name) as handle:
        return "\n\n".join(json.loads(line)["text"] for line in handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHAKESPEARE_CHARLM_DIR)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    tokenizer = character_tokenizer()
    train = torch.tensor(tokenizer(passages("train.jsonl"), add_special_tokens=False)["input_ids"])
    valid = torch.tensor(tokenizer(passages("test.jsonl"), add_special_tokens=False)["input_ids"])
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **CONFIG)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / WARMUP, 0.5 * (1 + math.cos(math.pi * s / STEPS))))
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(1, STEPS + 1):
        starts = torch.randint(0, len(train) - CONTEXT - 1, (BATCH,), generator=generator)
        batch = torch.stack([train[s:s + CONTEXT] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0:
            print(f"step {step}: training loss {loss.item():.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        windows = valid[:len(valid) // CONTEXT * CONTEXT].view(-1, CONTEXT)[:64]
        print(f"validation loss {model(input_ids=windows, labels=windows).loss.item():.3f} "
              f"nats per character ({sum(p.numel() for p in model.parameters())} parameters)")
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
